"""Test-time adaptation of plates: one compiled step, plates in parallel, pure functions.

    adapted, logits = adapt_plate(model, variables, images, weights, rows, algo, key)
    adapted, logits = adapt_plates(model, variables, images, weights, rows, algo, key)  # P plates
    run = compile_adapt_plates(model, algo, mesh)    # jit, plate axis sharded over the data mesh

A plate's contexts ``images`` (T, M, ...) are seen in order; each is one adaptation batch:
``algo.steps`` Adam steps on the BatchNorm scales and biases (nothing else changes), every forward
normalised with the batch's own statistics weighted by ``weights`` (T, M) -- 0 for padding, the
method's rule otherwise (e.g. controls only for BEN) -- and the loss taken over ``rows`` (T, M), the
rows to classify (perturbed images). ``logits`` (T, M, K) are the online predictions of each batch
(of the forward its last step was computed on; with 0 steps plain AdaBN). Everything is traceable:
use it inside ``jit``, ``vmap`` or ``grad``.

``adapt_plates`` is episodic by default: each plate starts from ``variables`` with a fresh
optimizer (a separate copy per plate under ``vmap``), so plates never influence each other.
``algo.continual`` adapts one parameter set through the plates in the given order instead.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
import flax.linen as nn
from flax import traverse_util

from csarm_jax import parallel
from csarm_jax.nn import CONTEXT
from csarm_jax.tta.algorithms import Tent

Variables = dict[str, Any]
AFFINE = ('scale', 'bias')


class State(NamedTuple):
  bn: Any          # the adapted BatchNorm scales and biases (a subtree of params)
  opt: Any         # their Adam state
  extra: Any       # the algorithm's own state


def bn_params(params: Any) -> dict:
  """The subtree of ``params`` holding normalisation affines: layers whose parameters are exactly
  a scale and a bias (convolutions and dense layers have a kernel)."""
  flat = traverse_util.flatten_dict(params)
  layers = {path[:-1] for path in flat}
  keep = {p for p in layers if {q[-1] for q in flat if q[:-1] == p} == set(AFFINE)}
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[:-1] in keep})


def with_bn(variables: Variables, bn: Any) -> Variables:
  """``variables`` with the BatchNorm affines replaced by ``bn``."""
  flat = traverse_util.flatten_dict(variables['params'])
  flat.update(traverse_util.flatten_dict(bn))
  return {**variables, 'params': traverse_util.unflatten_dict(flat)}


def _optimizer(algo: Tent) -> optax.GradientTransformation:
  return optax.adam(algo.learning_rate)     # torch Adam defaults: betas 0.9/0.999, eps 1e-8


def init_state(variables: Variables, algo: Tent, num_classes: int) -> State:
  bn = bn_params(variables['params'])
  return State(bn, _optimizer(algo).init(bn), algo.init_extra(num_classes))


def adapt_batch(model: nn.Module, variables: Variables, algo: Tent, state: State, x: jax.Array,
                weights: jax.Array, rows: jax.Array, key: jax.Array) -> tuple[State, jax.Array]:
  """``algo.steps`` updates on one batch; (new state, the batch's (corrected) logits)."""
  source = bn_params(variables['params'])
  tx = _optimizer(algo)

  def forward(bn, images, w):
    return model.apply(with_bn(variables, bn), images, norm=CONTEXT, weights=w)

  logits = None
  for step in range(algo.steps):
    grad_fn = jax.value_and_grad(algo.objective, argnums=1, has_aux=True)
    (_, (logits, count, extra)), grads = grad_fn(forward, state.bn, x, weights, rows, state.extra,
                                                 jax.random.fold_in(key, step))
    updates, opt = tx.update(grads, state.opt, state.bn)
    bn = algo.after_update(optax.apply_updates(state.bn, updates), source)
    moved = count > 0          # nothing to learn from (e.g. a padding context): no update at all
    state = jax.tree.map(lambda new, old: jnp.where(moved, new, old), State(bn, opt, extra), state)
  if logits is None:
    logits = forward(state.bn, x, weights)
  return state, algo.output(logits, rows)


def _scan_contexts(model, variables, algo, state, images, weights, rows, key, preprocess):
  def body(state, inputs):
    t, x, w, r = inputs
    return adapt_batch(model, variables, algo, state, preprocess(x), w, r,
                       jax.random.fold_in(key, t))
  return jax.lax.scan(body, state, (jnp.arange(images.shape[0]), images, weights, rows))


def _identity(x):
  return x


def adapt_plate(model: nn.Module, variables: Variables, images: jax.Array, weights: jax.Array,
                rows: jax.Array, algo: Tent, key: jax.Array,
                preprocess: Callable[[jax.Array], jax.Array] = _identity
                ) -> tuple[Variables, jax.Array]:
  """One plate's contexts (T, M, ...) adapted in order from ``variables``: (adapted variables,
  logits (T, M, K)). ``preprocess`` maps a context's raw images to model inputs inside the scan."""
  state = init_state(variables, algo, model.num_classes)
  state, logits = _scan_contexts(model, variables, algo, state, images, weights, rows, key,
                                 preprocess)
  return with_bn(variables, state.bn), logits


def adapt_plates(model: nn.Module, variables: Variables, images: jax.Array, weights: jax.Array,
                 rows: jax.Array, algo: Tent, key: jax.Array, plate_ids: jax.Array | None = None,
                 preprocess: Callable[[jax.Array], jax.Array] = _identity
                 ) -> tuple[Variables, jax.Array]:
  """P plates (P, T, M, ...): (adapted variables, logits (P, T, M, K)).

  Episodic (``algo.continual`` False, the default): plates adapt independently and in parallel
  (``vmap``), plate i with key ``fold_in(key, plate_ids[i])`` (default ids 0..P-1, so a plate's
  result does not depend on which plates share its call); the adapted variables carry a leading
  plate axis. Continual: one parameter set through plate 0, 1, ... with ``key``.
  """
  if algo.continual:
    p, t = images.shape[:2]
    flat = lambda a: a.reshape((p * t,) + a.shape[2:])
    adapted, logits = adapt_plate(model, variables, flat(images), flat(weights), flat(rows), algo,
                                  key, preprocess)
    return adapted, logits.reshape((p, t) + logits.shape[1:])
  ids = jnp.arange(images.shape[0]) if plate_ids is None else plate_ids
  return jax.vmap(lambda x, w, r, i: adapt_plate(model, variables, x, w, r, algo,
                                                 jax.random.fold_in(key, i), preprocess))(
      images, weights, rows, ids)


def plate_sharding(algo: Tent, mesh):
  """Where a batch of plates lives: split over the devices (episodic) or replicated (continual)."""
  return parallel.replicated(mesh) if algo.continual else parallel.context_sharded(mesh)


def compile_adapt_plates(model: nn.Module, algo: Tent, mesh,
                         preprocess: Callable[[jax.Array], jax.Array] = _identity,
                         logits_only: bool = False) -> Callable:
  """``run(variables, images, weights, rows, key, plate_ids)``: ``adapt_plates`` under ``jit``
  with the plates sharded over the mesh's data axis (episodic; continual runs replicated, in
  order). ``logits_only``: return just the logits (no per-plate copy of the variables)."""
  repl, plates = parallel.replicated(mesh), plate_sharding(algo, mesh)

  def run(variables, images, weights, rows, key, plate_ids):
    out = adapt_plates(model, variables, images, weights, rows, algo, key, plate_ids, preprocess)
    return out[1] if logits_only else out
  return jax.jit(run, in_shardings=(repl, plates, plates, plates, repl, plates),
                 out_shardings=plates if logits_only else (plates, plates))
