"""Small models: a CNN for tests and quick runs, an MLP for feature vectors (profiles, embeddings).

Both use ContextBatchNorm and the same call signature as the ResNets:
``__call__(x, *, norm, weights=None, return_features=False)``.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from csarm_jax.models.resnet import kaiming_fan_out
from csarm_jax.nn import ContextBatchNorm, max_pool

DROPOUT = 'dropout'               # the rng collection that switches dropout on


class CNN(nn.Module):
  """conv3x3 -> BN -> ReLU (-> 2x2 max-pool) per stage, doubling width; GAP; Dense."""
  num_classes: int
  in_channels: int = 5
  width: int = 16
  num_stages: int = 3
  dtype: Any = jnp.float32
  input_rank = 4

  @nn.compact
  def __call__(self, x, *, norm: str, weights=None, return_features: bool = False):
    min_size = 2 ** (self.num_stages - 1)
    if min(x.shape[1:3]) < min_size:
      raise ValueError(f'CNN with {self.num_stages} stages needs images of at least '
                       f'{min_size}x{min_size} pixels, got {x.shape[1]}x{x.shape[2]}')
    x = x.astype(self.dtype)
    for i in range(self.num_stages):
      x = nn.Conv(self.width * 2 ** i, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                  kernel_init=kaiming_fan_out, name=f'conv{i}')(x)
      x = nn.relu(ContextBatchNorm(dtype=self.dtype, name=f'bn{i}')(x, norm, weights))
      if i < self.num_stages - 1:
        x = max_pool(x, 2)
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name='head')(features)
    return (logits, features) if return_features else logits


class MLP(nn.Module):
  """[BN on the inputs] -> (Dense -> BN -> ReLU -> Dropout) x num_layers -> Dense, for (N, D)
  feature vectors.

  Every hidden layer has its own BatchNorm (the reference shares one across depth, a bug).
  Dropout (rate ``dropout``) is active only when the call is given a ``'dropout'`` rng, as the
  training step does (``training.step.dropout_keys``); evaluation, adaptation and prediction give
  none, so they are deterministic.
  """
  num_classes: int
  in_features: int
  hidden: int = 256
  num_layers: int = 2
  input_norm: bool = True
  dropout: float = 0.0
  dtype: Any = jnp.float32
  input_rank = 2

  @property
  def in_channels(self) -> int:
    return self.in_features

  @nn.compact
  def __call__(self, x, *, norm: str, weights=None, return_features: bool = False):
    x = x.astype(self.dtype)
    if self.input_norm:
      x = ContextBatchNorm(dtype=self.dtype, name='input_bn')(x, norm, weights)
    for i in range(self.num_layers):
      x = nn.Dense(self.hidden, use_bias=False, dtype=self.dtype, name=f'dense{i}')(x)
      x = nn.relu(ContextBatchNorm(dtype=self.dtype, name=f'bn{i}')(x, norm, weights))
      x = nn.Dropout(self.dropout, deterministic=not self.has_rng(DROPOUT))(x)
    features = x.astype(jnp.float32)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name='head')(features)
    return (logits, features) if return_features else logits
