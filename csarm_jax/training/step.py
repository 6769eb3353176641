"""The compiled training step shared by every method.

A batch holds C contexts (leading axis; see csarm_jax.data.pipeline for the contract): ``images``
(C, M, ...), ``labels`` (C, M; -1 = unlabelled), ``mask`` (C, M; 0 = padding) and ``is_control``.
The step vmaps the method's context forward over C -- each context normalised with its own
statistics, gradients flowing through them -- averages each context's mean cross-entropy over its
labelled rows, and applies one optimizer update. Under ``jit`` with the context axis sharded over a
device mesh this is pmap-style data parallelism without pmap.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
import flax.linen as nn

from csarm_jax.methods import Method, labelled_cross_entropy
from csarm_jax.nn import RUNNING_STATS
from csarm_jax.parallel import context_sharded, replicated
from csarm_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Preprocess = Callable[[jax.Array], jax.Array]


def mean_over_contexts(loss_sum: jax.Array, count: jax.Array) -> jax.Array:
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
        logits, running = method.forward(model, variables, preprocess(images), mask, is_control,
                                         train=True)
        return labelled_cross_entropy(logits, labels), running

      (loss_sum, count, correct), running = jax.vmap(one_context)(
          batch['images'], batch['labels'], batch['mask'], batch['is_control'])
      running = jax.tree.map(lambda r: jnp.mean(r, axis=0), running)   # averaged over contexts
      return mean_over_contexts(loss_sum, count), (running, jnp.sum(count), jnp.sum(correct))

    (loss, (running, count, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=running, opt_state=opt_state)
    metrics = {'loss': loss, 'accuracy': correct / jnp.maximum(count, 1),
               'grad_norm': optax.tree_utils.tree_norm(grads), 'labelled': count,
               'images': jnp.sum(batch['mask'] > 0)}
    return new_state, metrics
  return step


def compile_train_step(step: Callable, mesh) -> Callable:
  """jit with the state replicated (and donated) and the batch sharded over contexts."""
  repl, shard = replicated(mesh), context_sharded(mesh)
  return jax.jit(step, in_shardings=(repl, shard), out_shardings=(repl, repl), donate_argnums=0)
