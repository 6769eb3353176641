"""The compiled evaluation step: per-row logits of C contexts under a method's test-time rule."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from csarm_jax.methods import Method, labelled_cross_entropy
from csarm_jax.parallel import context_sharded, replicated

Batch = dict[str, jax.Array]


def make_eval_step(model: nn.Module, method: Method, preprocess: Callable[[jax.Array], jax.Array],
                   with_features: bool = False
                   ) -> Callable[[dict[str, Any], Batch], dict[str, jax.Array]]:
  """(variables, batch) -> per-row logits (C, M, K) and the summed masked loss, no update
  (and the penultimate features (C, M, F) when ``with_features``)."""
  def evaluate(variables: dict[str, Any], batch: Batch) -> dict[str, jax.Array]:
    def one_context(images, labels, mask, is_control):
      out, _ = method.forward(model, variables, preprocess(images), mask, is_control, train=False,
                              return_features=with_features)
      logits, features = out if with_features else (out, jnp.zeros(labels.shape + (0,)))
      return (logits, features) + labelled_cross_entropy(logits, labels)

    logits, features, loss_sum, count, correct = jax.vmap(one_context)(
        batch['images'], batch['labels'], batch['mask'], batch['is_control'])
    out = {'logits': logits, 'loss_sum': loss_sum, 'labelled': count, 'correct': correct}
    return {**out, 'features': features} if with_features else out
  return evaluate


def compile_eval_step(evaluate: Callable, mesh) -> Callable:
  """jit with the variables replicated and the batch (and every output) sharded over contexts."""
  repl, shard = replicated(mesh), context_sharded(mesh)
  return jax.jit(evaluate, in_shardings=(repl, shard), out_shardings=shard)


def compiled_eval_step(model: nn.Module, method: Method, preprocess, mesh,
                       with_features: bool = False) -> Callable:
  return compile_eval_step(make_eval_step(model, method, preprocess, with_features), mesh)
