"""One compiled training step and one compiled evaluation step, shared by every method.

A batch holds C contexts (leading axis; see csarm_jax.data.pipeline for the contract): ``images``
(C, M, ...), ``labels`` (C, M; -1 = unlabelled), ``mask`` (C, M; 0 = padding) and ``is_control``.
The step vmaps the method's context forward over C -- each context normalised with its own
statistics, gradients flowing through them -- averages each context's mean cross-entropy over its
labelled rows, and applies one optimizer update. Under ``jit`` with the context axis sharded over a
device mesh this is pmap-style data parallelism without pmap.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
import flax.linen as nn

from csarm_jax.methods import Method
from csarm_jax.nn import CONTEXT, RUNNING, RUNNING_STATS
from csarm_jax.training.sharding import context_sharded, replicated
from csarm_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Preprocess = Callable[[jax.Array], jax.Array]


def masked_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, ...]:
  """(sum of cross-entropy, number of labelled rows, number correct) over rows with label >= 0."""
  labelled = labels >= 0
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
  correct = (jnp.argmax(logits, -1) == labels) & labelled
  return jnp.sum(nll * labelled), jnp.sum(labelled), jnp.sum(correct)


def context_logits(model: nn.Module, method: Method, variables: dict[str, Any], x: jax.Array,
                   mask: jax.Array, is_control: jax.Array, train: bool, **kwargs):
  """Logits of one context under the method's rule (and updated running averages when training).

  ``kwargs`` go to the model (e.g. ``return_features=True`` makes the logits a (logits, features)
  pair)."""
  weights = method.weights(mask, is_control)
  if train and method.running_stats:
    out, updates = model.apply(variables, x, norm=CONTEXT, weights=weights,
                               mutable=[RUNNING_STATS], **kwargs)
    return out, updates[RUNNING_STATS]
  norm = RUNNING if (not train and method.eval_norm == RUNNING) else CONTEXT
  return model.apply(variables, x, norm=norm, weights=weights, **kwargs), variables[RUNNING_STATS]


def _mean_over_contexts(loss_sum: jax.Array, count: jax.Array) -> jax.Array:
  """Mean over contexts of each context's mean loss; contexts without labelled rows are ignored."""
  has = count > 0
  per_context = loss_sum / jnp.maximum(count, 1)
  return jnp.sum(per_context * has) / jnp.maximum(jnp.sum(has), 1)


def make_train_step(model: nn.Module, method: Method, tx: optax.GradientTransformation,
                    preprocess: Preprocess) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    def loss_fn(params):
      variables = {'params': params, RUNNING_STATS: state.batch_stats}

      def one_context(images, labels, mask, is_control):
        logits, running = context_logits(model, method, variables, preprocess(images), mask,
                                         is_control, train=True)
        return masked_cross_entropy(logits, labels), running

      (loss_sum, count, correct), running = jax.vmap(one_context)(
          batch['images'], batch['labels'], batch['mask'], batch['is_control'])
      running = jax.tree.map(lambda r: jnp.mean(r, axis=0), running)   # averaged over contexts
      return _mean_over_contexts(loss_sum, count), (running, jnp.sum(count), jnp.sum(correct))

    (loss, (running, count, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=running, opt_state=opt_state)
    metrics = {'loss': loss, 'accuracy': correct / jnp.maximum(count, 1),
               'grad_norm': optax.tree_utils.tree_norm(grads), 'labelled': count,
               'images': jnp.sum(batch['mask'] > 0)}
    return new_state, metrics
  return step


def make_eval_step(model: nn.Module, method: Method, preprocess: Preprocess,
                   with_features: bool = False
                   ) -> Callable[[dict[str, Any], Batch], dict[str, jax.Array]]:
  """(variables, batch) -> per-row logits (C, M, K) and the summed masked loss, no update
  (and the penultimate features (C, M, F) when ``with_features``)."""
  def evaluate(variables: dict[str, Any], batch: Batch) -> dict[str, jax.Array]:
    def one_context(images, labels, mask, is_control):
      out, _ = context_logits(model, method, variables, preprocess(images), mask, is_control,
                              train=False, return_features=with_features)
      logits, features = out if with_features else (out, jnp.zeros(labels.shape + (0,)))
      return (logits, features) + masked_cross_entropy(logits, labels)

    logits, features, loss_sum, count, correct = jax.vmap(one_context)(
        batch['images'], batch['labels'], batch['mask'], batch['is_control'])
    out = {'logits': logits, 'loss_sum': loss_sum, 'labelled': count, 'correct': correct}
    return {**out, 'features': features} if with_features else out
  return evaluate


def compile_train_step(step: Callable, mesh) -> Callable:
  """jit with the state replicated (and donated) and the batch sharded over contexts."""
  repl, shard = replicated(mesh), context_sharded(mesh)
  return jax.jit(step, in_shardings=(repl, shard), out_shardings=(repl, repl), donate_argnums=0)


def compile_eval_step(evaluate: Callable, mesh) -> Callable:
  repl, shard = replicated(mesh), context_sharded(mesh)
  return jax.jit(evaluate, in_shardings=(repl, shard), out_shardings=shard)
