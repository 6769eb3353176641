"""Context BatchNorm: a BatchNorm whose statistics are a value.

One module, four behaviours chosen per call by ``mode``:

* ``'context'`` -- normalise with the (weighted) statistics of the incoming batch, the ARM-BN /
  CS-ARM-BN forward. Gradients flow through the statistics. When the ``context_stats`` collection
  is mutable the statistics are written there (that is how :func:`csarm_jax.adapt` reads them
  out); when ``batch_stats`` is mutable the running averages are updated (the ERM training step).
* ``'context_constant'`` -- as ``'context'``, but the statistics are constants for ``grad``
  (``stop_gradient``): the reference's BEN, whose control statistics carry no gradient.
* ``'given'`` -- normalise with statistics passed in the ``context_stats`` collection.
* ``'running'`` -- normalise with the running averages in ``batch_stats`` (ERM at test time).
* ``'stream'`` -- internal to :func:`csarm_jax.plate_statistics`: layers flagged in ``stream_flags``
  use the given statistics, the others their chunk's, and every layer records its chunk's
  sufficient statistics in ``stat_sums``.

Statistics are per-feature (last axis) over every other axis, computed and kept in float32 with a
biased two-pass variance. There is deliberately no ``axis_name``: statistics are never pooled across
contexts or devices.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

CONTEXT, GIVEN, RUNNING, STREAM = 'context', 'given', 'running', 'stream'
CONTEXT_CONSTANT = 'context_constant'
MODES = (CONTEXT, CONTEXT_CONSTANT, GIVEN, RUNNING, STREAM)

STATS = 'context_stats'          # {'mean', 'var'} per layer: the adaptation pytree
RUNNING_STATS = 'batch_stats'    # running averages, for ERM
STREAM_FLAGS = 'stream_flags'    # {'use_given'} per layer, for streamed statistics
STREAM_SUMS = 'stat_sums'        # {'count', 'mean', 'm2'} per layer, for streamed statistics


def _broadcast_weights(weights: jax.Array, x: jax.Array) -> jax.Array:
  """(N,) sample weights -> shape broadcastable against x (N, ..., F)."""
  if weights.shape != x.shape[:1]:
    raise ValueError(f'weights must have shape {x.shape[:1]} (one per sample), got {weights.shape}')
  return weights.astype(jnp.float32).reshape(weights.shape + (1,) * (x.ndim - 1))


def moments(x: jax.Array,
            weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Weighted count, mean and biased variance per feature over every axis but the last.

  Two-pass (centred) variance in float32. Rows of weight 0 contribute nothing. With zero total
  weight the result is defined as mean 0, variance 1 (the layer then applies its affine part only).
  """
  x = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  per_sample = 1
  for d in x.shape[1:-1]:
    per_sample *= d
  if weights is None:
    count = jnp.asarray(x.shape[0] * per_sample, jnp.float32)
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    return count, mean, var
  w = _broadcast_weights(weights, x)
  count = w.sum() * per_sample
  safe = jnp.maximum(count, jnp.finfo(jnp.float32).tiny)
  mean = (w * x).sum(axes) / safe
  var = (w * jnp.square(x - mean)).sum(axes) / safe
  empty = count <= 0
  return count, jnp.where(empty, 0.0, mean), jnp.where(empty, 1.0, var)


class ContextBatchNorm(nn.Module):
  """BatchNorm with explicit statistics. See the module docstring for the modes."""
  epsilon: float = 1e-5
  momentum: float = 0.9            # running averages: new = momentum * old + (1 - momentum) * batch
  dtype: Any = None                # output dtype; None keeps the input's
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, mode: str, weights: jax.Array | None = None) -> jax.Array:
    if mode not in MODES:
      raise ValueError(f'unknown BatchNorm mode {mode!r}; expected one of {MODES}')
    features = x.shape[-1]
    scale = self.param('scale', self.scale_init, (features,), self.param_dtype)
    bias = self.param('bias', self.bias_init, (features,), self.param_dtype)
    ra_mean = self.variable(RUNNING_STATS, 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable(RUNNING_STATS, 'var', jnp.ones, (features,), jnp.float32)

    if self.is_initializing() or mode in (CONTEXT, CONTEXT_CONSTANT):
      count, mean, var = moments(x, weights)
      if mode == CONTEXT_CONSTANT:
        mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
      if not self.is_initializing():
        if self.is_mutable_collection(STATS):
          self.put_variable(STATS, 'mean', mean)
          self.put_variable(STATS, 'var', var)
        if self.is_mutable_collection(RUNNING_STATS):
          m = self.momentum
          ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
          ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
    elif mode == GIVEN:
      mean, var = self._given()
    elif mode == RUNNING:
      mean, var = ra_mean.value, ra_var.value
    else:  # STREAM
      count, chunk_mean, chunk_var = moments(x, weights)
      self.put_variable(STREAM_SUMS, 'count', count)
      self.put_variable(STREAM_SUMS, 'mean', chunk_mean)
      self.put_variable(STREAM_SUMS, 'm2', chunk_var * count)
      given_mean, given_var = self._given()
      use_given = self.get_variable(STREAM_FLAGS, 'use_given')
      mean = jnp.where(use_given, given_mean, chunk_mean)
      var = jnp.where(use_given, given_var, chunk_var)

    inv = jax.lax.rsqrt(var.astype(jnp.float32) + self.epsilon) * scale.astype(jnp.float32)
    y = (x.astype(jnp.float32) - mean) * inv + bias.astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)

  def _given(self) -> tuple[jax.Array, jax.Array]:
    if not self.has_variable(STATS, 'mean'):
      raise ValueError(f'no statistics given for BatchNorm layer {"/".join(self.path)!r}; pass the '
                       f'pytree returned by adapt() as the {STATS!r} collection')
    return self.get_variable(STATS, 'mean'), self.get_variable(STATS, 'var')
