"""The compiled training step shared by every method.

A batch holds C contexts (leading axis; see csarm_jax.data.pipeline for the contract): ``images``
(C, M, ...), ``labels`` (C, M; -1 = unlabelled), ``mask`` (C, M; 0 = padding), ``is_control`` and,
optionally, ``flip_w`` (C, M): the horizontal flips the pipeline leaves to the step, applied first.
The step vmaps the method's context forward over C -- each context normalised with its own
statistics, gradients flowing through them -- averages each context's mean cross-entropy over its
labelled rows -- plus, for a method with an ``objective`` (DANN, CORAL), the mean over contexts of
that loss on each context's features and ``domain`` ids (C, M) -- and applies one optimizer
update. Under ``jit`` with the context axis sharded over a
device mesh this is pmap-style data parallelism without pmap.

Dropout (models with a dropout rate) draws its masks from ``dropout_keys(seed, step)``: one key
per context, a function of the seed and the step number only, so a resumed run and a micro-batched
step draw the same masks; TrainState carries no rng.

With ``contexts_per_microbatch`` B < C the contexts are processed B at a time under ``lax.scan``,
gradients (and ERM's running averages) accumulated inside the one compiled step: peak activation
memory follows B, the update is the all-at-once one up to float rounding.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
import flax.linen as nn

from csarm_jax.data.augment import flip_w_on_device
from csarm_jax.methods import Method, labelled_cross_entropy
from csarm_jax.models import DROPOUT
from csarm_jax.nn import RUNNING_STATS
from csarm_jax.parallel import context_sharded, replicated
from csarm_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Preprocess = Callable[[jax.Array], jax.Array]
CONTEXT_KEYS = ('images', 'labels', 'mask', 'is_control')
DROPOUT_STREAM = 1                # folded into the seed: dropout keys differ from the init key


def dropout_keys(seed: int, step: jax.Array, num_contexts: int) -> jax.Array:
  """(num_contexts,) dropout keys of training step ``step`` (jit-able)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM), step)
  return jax.random.split(key, num_contexts)


def mean_over_contexts(loss_sum: jax.Array, count: jax.Array) -> jax.Array:
  """Mean over contexts of each context's mean loss; contexts without labelled rows are ignored."""
  has = count > 0
  per_context = loss_sum / jnp.maximum(count, 1)
  return jnp.sum(per_context * has) / jnp.maximum(jnp.sum(has), 1)


def context_weights(labels: jax.Array) -> jax.Array:
  """(C,) weights w with sum_c w_c * loss_sum_c == mean_over_contexts(loss_sum, count)."""
  count = jnp.sum(labels >= 0, axis=1)
  has = count > 0
  return has / jnp.maximum(count, 1) / jnp.maximum(jnp.sum(has), 1)


def check_microbatch(contexts_per_step: int, contexts_per_microbatch: int | None,
                     num_devices: int = 1) -> None:
  """Micro-batches split the step's contexts evenly, each itself split evenly across devices."""
  b = contexts_per_microbatch
  if b and (contexts_per_step % b or b % num_devices):
    raise ValueError(f'contexts_per_microbatch={b} must divide contexts_per_step='
                     f'{contexts_per_step} and be a multiple of the number of devices '
                     f'({num_devices})')


def _micro_groups(batch: Batch, size: int) -> Batch:
  """(C, ...) -> (C // size, size, ...); context c = j * (C // size) + i lands in group i, so a
  group takes the same share of every device's consecutive block of contexts (no data moves)."""
  def split(x):
    return jnp.swapaxes(x.reshape((size, x.shape[0] // size) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, method: Method, tx: optax.GradientTransformation,
                    preprocess: Preprocess, contexts_per_microbatch: int | None = None,
                    seed: int = 0, total_steps: int = 1
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """The step; ``contexts_per_microbatch`` (None/0: all at once) bounds the contexts in flight;
  ``seed`` seeds dropout; ``total_steps``: the schedule length an objective's progress
  (step / total) refers to."""
  objective = method.objective
  keys = CONTEXT_KEYS + (DROPOUT,) + (('domain',) if objective is not None else ())

  def per_context(batch: Batch) -> Batch:
    """The arrays the context forward reads (``flip_w`` when the batch has it)."""
    return {k: batch[k] for k in keys + (('flip_w',) if 'flip_w' in batch else ())}

  def forward(params, batch_stats, group: Batch, progress):
    """Per-context (loss_sum, count, correct, objective) and running averages of a group."""
    variables = {'params': params, RUNNING_STATS: batch_stats}

    def one_context(c: Batch):
      images = c['images'] if 'flip_w' not in c else flip_w_on_device(c['images'], c['flip_w'])
      out, running = method.forward(model, variables, preprocess(images), c['mask'],
                                    c['is_control'], train=True, rngs={DROPOUT: c[DROPOUT]},
                                    return_features=objective is not None)
      if objective is None:
        return labelled_cross_entropy(out, c['labels']) + (jnp.float32(0.0),), running
      logits, features = out
      extra = objective.loss(model, variables, features, c['domain'], c['mask'], progress)
      return labelled_cross_entropy(logits, c['labels']) + (extra,), running
    return jax.vmap(one_context)(per_context(group))

  def all_at_once(state: TrainState, batch: Batch, progress):
    def loss_fn(params):
      (loss_sum, count, correct, extra), running = forward(params, state.batch_stats, batch,
                                                           progress)
      running = jax.tree.map(lambda r: jnp.mean(r, axis=0), running)   # averaged over contexts
      extra = jnp.mean(extra)
      return mean_over_contexts(loss_sum, count) + extra, (running, jnp.sum(count),
                                                           jnp.sum(correct), extra)
    return jax.value_and_grad(loss_fn, has_aux=True)(state.params)

  def micro_batched(state: TrainState, batch: Batch, size: int, progress):
    num_contexts = batch['labels'].shape[0]
    group_batch = per_context(batch)
    group_batch['weight'] = context_weights(batch['labels'])

    def body(carry, group):
      def loss_fn(params):
        (loss_sum, count, correct, extra), running = forward(params, state.batch_stats, group,
                                                             progress)
        running = jax.tree.map(lambda r: jnp.sum(r, axis=0), running)
        extra = jnp.sum(extra) / num_contexts
        return jnp.sum(loss_sum * group['weight']) + extra, (running, jnp.sum(count),
                                                              jnp.sum(correct), extra)
      out = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      return jax.tree.map(jnp.add, carry, out), None

    zero = lambda x: jnp.zeros(jnp.shape(x), jnp.result_type(x))
    init = ((zero(0.0), (jax.tree.map(zero, state.batch_stats), zero(0), zero(0), zero(0.0))),
            jax.tree.map(zero, state.params))
    (loss, (running, count, correct, extra)), grads = jax.lax.scan(
        body, init, _micro_groups(group_batch, size))[0]
    if method.running_stats:      # the mean over contexts of each context's updated averages
      running = jax.tree.map(lambda r: r / num_contexts, running)
    else:
      running = state.batch_stats
    return (loss, (running, count, correct, extra)), grads

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    num_contexts = batch['labels'].shape[0]
    size = contexts_per_microbatch
    check_microbatch(num_contexts, size)
    batch = {**batch, DROPOUT: dropout_keys(seed, state.step, num_contexts)}
    progress = jnp.minimum(state.step / max(total_steps, 1), 1.0).astype(jnp.float32)
    if size and size < num_contexts:
      (loss, (running, count, correct, extra)), grads = micro_batched(state, batch, size,
                                                                      progress)
    else:
      (loss, (running, count, correct, extra)), grads = all_at_once(state, batch, progress)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=running, opt_state=opt_state)
    metrics = {'loss': loss, 'accuracy': correct / jnp.maximum(count, 1),
               'grad_norm': optax.tree_utils.tree_norm(grads), 'labelled': count,
               'images': jnp.sum(batch['mask'] > 0)}
    if objective is not None:
      metrics['domain_loss'] = extra
    return new_state, metrics
  return step


# XLA:CPU expands the optimization barriers that jax.checkpoint places around the backward pass's
# recomputation before it schedules, so the recomputation is merged back into the forward and a
# rematerialised step keeps every activation (BENCHMARKS.md section 7). Keeping the barriers makes
# model.remat save memory on CPU as it does on GPU and TPU; without remat there are none to keep.
CPU_COMPILER_OPTIONS = {'xla_disable_hlo_passes': 'cse_barrier_expander'}


def compiler_options(mesh) -> dict[str, str] | None:
  """The step's XLA options for the mesh's backend (CPU: keep remat's barriers; else none)."""
  return CPU_COMPILER_OPTIONS if mesh.devices.flat[0].platform == 'cpu' else None


def compile_train_step(step: Callable, mesh) -> Callable:
  """jit with the state replicated (and donated) and the batch sharded over contexts."""
  repl, shard = replicated(mesh), context_sharded(mesh)
  return jax.jit(step, in_shardings=(repl, shard), out_shardings=(repl, repl), donate_argnums=0,
                 compiler_options=compiler_options(mesh))
