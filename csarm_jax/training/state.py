"""The training state: one pytree of arrays (parameters, running BN averages, optimizer, step)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
import flax.linen as nn
from flax import struct

from csarm_jax.models import init_variables


@struct.dataclass
class TrainState:
  step: jax.Array                 # int32 scalar: optimizer updates done
  params: Any
  batch_stats: Any                # running averages (used by ERM-style methods only)
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    return {'params': self.params, 'batch_stats': self.batch_stats}


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, example: jax.Array,
                   sharding: jax.sharding.Sharding) -> TrainState:
  """The state's shapes and dtypes with ``sharding``: the target a checkpoint restores into."""
  shapes = jax.eval_shape(lambda: create_state(model, tx, jax.random.key(0), example))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def create_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                 example: jax.Array) -> TrainState:
  """A fresh state; ``example`` is one context's input (float, any batch size)."""
  # The second key was once kept as TrainState.rng (never read); splitting keeps the init draws.
  init_rng, _ = jax.random.split(rng)
  variables = init_variables(model, init_rng, example)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                    batch_stats=variables['batch_stats'], opt_state=tx.init(variables['params']))
