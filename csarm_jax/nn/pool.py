"""Stride-2 max pooling whose gradient needs no scatter.

    y = max_pool(x, 3)    # nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    y = max_pool(x, 2)    # nn.max_pool(x, (2, 2), strides=(2, 2))

``nn.max_pool``'s gradient is XLA's ``select_and_scatter``, which XLA:CPU runs 4-5x slower than
this (ResNet's stem pool, 48 x 64² x 64: 330 vs 83 ms forward + backward; BENCHMARKS.md section 8)
and which adds index and scatter buffers to the memory plan (section 7). Here the 2-D pool is two
1-D pools (the columns' maxima, then the rows'), each a maximum over two or three strided taps
that also records which tap won (int8): the backward pass routes each cotangent with elementwise
selects to the window's first maximal element in row-major order, the element ``nn.max_pool``'s
gradient picks. Same values forward; gradients equal up to the order of float sums where windows
overlap.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

WINDOWS = (2, 3)   # padding (window - 1) // 2 on each side: VALID for 2, the ResNet stem's for 3


def _pad(x: jax.Array, axis: int, before: int, after: int, value) -> jax.Array:
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (before, after, 0)
  return lax.pad(x, jnp.asarray(value, x.dtype), config)


def _offsets(window: int) -> range:
  """Each tap's offset from its window's anchor 2i: (-1, 0, 1) for 3 (padding 1), (0, 1) for 2."""
  first = -((window - 1) // 2)
  return range(first, first + window)


def _pool_axis(x: jax.Array, axis: int, window: int) -> tuple[jax.Array, jax.Array]:
  """1-D pool along ``axis``: (maxima, int8 index of the first maximal tap)."""
  n = x.shape[axis]
  length = (n + 2 * ((window - 1) // 2) - window) // 2 + 1
  # Outputs i read positions 2i + e: cut to, or pad with -inf up to, 2 * length, then split the
  # even and odd positions ("phases"); e = -1 is the odd phase shifted by one block.
  x = lax.slice_in_dim(x, 0, 2 * length, axis=axis) if n >= 2 * length else \
      _pad(x, axis, 0, 2 * length - n, -jnp.inf)
  phases = x.reshape(x.shape[:axis] + (length, 2) + x.shape[axis + 1:])
  taps = []
  for e in _offsets(window):
    tap = lax.index_in_dim(phases, e % 2, axis + 1, keepdims=False)
    if e < 0:
      tap = lax.slice_in_dim(_pad(tap, axis, 1, 0, -jnp.inf), 0, length, axis=axis)
    taps.append(tap)
  out = taps[0]
  for tap in taps[1:]:
    out = jnp.maximum(out, tap)
  index = jnp.zeros(out.shape, jnp.int8)
  for k in reversed(range(len(taps))):        # the lowest k whose tap is the maximum wins
    index = jnp.where(taps[k] == out, jnp.int8(k), index)
  return out, index


def _unpool_axis(g: jax.Array, index: jax.Array, axis: int, window: int, n: int) -> jax.Array:
  """The cotangent of ``_pool_axis``'s input (length ``n`` along ``axis``)."""
  length = g.shape[axis]
  phases = [None, None]      # both windows' taps read both phases
  for k, e in enumerate(_offsets(window)):
    routed = jnp.where(index == k, g, jnp.zeros((), g.dtype))
    if e < 0:        # tap i read block i - 1: send it back one block
      routed = lax.slice_in_dim(_pad(routed, axis, 0, 1, 0), 1, length + 1, axis=axis)
    phases[e % 2] = routed if phases[e % 2] is None else phases[e % 2] + routed
  dx = jnp.stack(phases, axis=axis + 1)
  dx = dx.reshape(g.shape[:axis] + (2 * length,) + g.shape[axis + 1:])
  return lax.slice_in_dim(dx, 0, n, axis=axis) if n <= 2 * length else \
      _pad(dx, axis, 0, n - 2 * length, 0)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x: jax.Array, window: int, shape: tuple[int, ...]) -> jax.Array:
  return _forward(x, window, shape)[0]


def _forward(x, window, shape):
  del shape    # x's; the backward pass needs it static
  columns, column_index = _pool_axis(x, 2, window)
  out, row_index = _pool_axis(columns, 1, window)
  return out, (column_index, row_index)


def _backward(window, shape, residuals, g):
  column_index, row_index = residuals
  dcolumns = _unpool_axis(g, row_index, 1, window, shape[1])
  return (_unpool_axis(dcolumns, column_index, 2, window, shape[2]),)


_max_pool.defvjp(_forward, _backward)


def max_pool(x: jax.Array, window: int) -> jax.Array:
  """Max pool of (N, H, W, C) floats over ``window`` x ``window`` windows (2 or 3), stride 2,
  padding (window - 1) // 2 each side: ``nn.max_pool``'s result, with a scatter-free gradient."""
  if window not in WINDOWS:
    raise ValueError(f'max_pool supports windows {WINDOWS}, got {window}')
  if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'max_pool takes (N, H, W, C) floats, got {x.dtype} {x.shape}')
  return _max_pool(x, window, tuple(x.shape))
