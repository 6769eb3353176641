"""ARM-CML (Zhang et al. 2021, adaptive risk minimisation with a context network).

A small CNN (the context net: two 5x5 conv -> BN -> ReLU blocks and a 5x5 conv to
``context_channels``, at full resolution) runs on every image of the context; its outputs are
averaged over the context (weighted by the same per-row weights as the statistics: padding
excluded, a plate's controls included for ``cs_arm_cml``) into one embedding map, which is
appended as extra input channels to every image before the backbone. Everything is one module,
so the context net's parameters live in the model's variables, checkpoints and exports (the
reference saves only the backbone). As in the reference the context net always normalises with
the statistics of the context it summarises; the backbone follows ``norm``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from csarm_jax.models.resnet import kaiming_fan_out
from csarm_jax.nn import CONTEXT, ContextBatchNorm


class ContextNet(nn.Module):
  out_channels: int = 12
  hidden: int = 64
  kernel: int = 5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, weights):
    k = (self.kernel, self.kernel)
    for i in range(2):
      x = nn.Conv(self.hidden, k, padding='SAME', dtype=self.dtype, kernel_init=kaiming_fan_out,
                  name=f'conv{i}')(x)
      x = nn.relu(ContextBatchNorm(dtype=self.dtype, name=f'bn{i}')(x, CONTEXT, weights))
    return nn.Conv(self.out_channels, k, padding='SAME', dtype=self.dtype, name='out')(x)


def context_embedding(h: jax.Array, weights: jax.Array | None) -> jax.Array:
  """The weighted mean over the context (axis 0) of the context net's output, (H, W, C)."""
  h = h.astype(jnp.float32)
  if weights is None:
    return h.mean(0)
  w = weights.astype(jnp.float32).reshape((-1,) + (1,) * (h.ndim - 1))
  return (w * h).sum(0) / jnp.maximum(w.sum(), jnp.finfo(jnp.float32).tiny)


class ARMCML(nn.Module):
  """``__call__(x, *, norm, weights=None, return_features=False)`` like every model; ``backbone``
  takes ``in_channels + context_channels`` channels."""
  backbone: nn.Module
  num_classes: int
  in_channels: int = 5
  context_channels: int = 12
  context_hidden: int = 64
  context_kernel: int = 5
  dtype: Any = jnp.float32
  input_rank = 4

  @nn.compact
  def __call__(self, x, *, norm: str, weights=None, return_features: bool = False):
    h = ContextNet(self.context_channels, self.context_hidden, self.context_kernel, self.dtype,
                   name='context_net')(x.astype(self.dtype), weights)
    embedding = jnp.broadcast_to(context_embedding(h, weights), x.shape[:-1] + h.shape[-1:])
    x = jnp.concatenate([x.astype(self.dtype), embedding.astype(self.dtype)], axis=-1)
    return self.backbone(x, norm=norm, weights=weights, return_features=return_features)
