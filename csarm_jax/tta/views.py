"""Augmented views of an NHWC context used by DeYO and ROID, pure and jit-able.

* ``patch_shuffle`` (DeYO's default ``aug_type='patch'``): the image cut into a ``grid`` x ``grid``
  grid of patches, the patches permuted independently per image (resized to a multiple of the
  grid first and back after, when needed).
* ``affine_view`` (ROID's TTA view, colour jitter removed as in the reference): one random affine
  per call (rotation +-15 deg, translation +-1/16, scale 0.9-1.1; torchvision draws one per batch
  tensor) with reflected borders, bilinear, then a horizontal flip with probability 1/2.

Feature-vector contexts (rank 2) have no spatial structure: both views return them unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def patch_shuffle(key: jax.Array, x: jax.Array, grid: int = 4) -> jax.Array:
  if x.ndim != 4:
    return x
  n, h, w, c = x.shape
  hh, ww = max(h // grid, 1) * grid, max(w // grid, 1) * grid
  y = x if (hh, ww) == (h, w) else jax.image.resize(x, (n, hh, ww, c), 'bilinear')
  ph, pw = hh // grid, ww // grid
  patches = y.reshape(n, grid, ph, grid, pw, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(n, grid * grid, ph, pw, c)
  perm = jnp.argsort(jax.random.uniform(key, (n, grid * grid)), axis=-1)
  patches = jnp.take_along_axis(patches, perm[:, :, None, None, None], axis=1)
  y = patches.reshape(n, grid, grid, ph, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hh, ww, c)
  return y if (hh, ww) == (h, w) else jax.image.resize(y, x.shape, 'bilinear')


def affine_view(key: jax.Array, x: jax.Array, degrees: float = 15.0, translate: float = 1 / 16,
                scale: tuple[float, float] = (0.9, 1.1)) -> jax.Array:
  if x.ndim != 4:
    return x
  k_rot, k_tx, k_ty, k_scale, k_flip = jax.random.split(key, 5)
  n, h, w, c = x.shape
  angle = jnp.deg2rad(jax.random.uniform(k_rot, (), minval=-degrees, maxval=degrees))
  tx = jax.random.uniform(k_tx, (), minval=-translate, maxval=translate) * w
  ty = jax.random.uniform(k_ty, (), minval=-translate, maxval=translate) * h
  s = jax.random.uniform(k_scale, (), minval=scale[0], maxval=scale[1])
  # Output pixel (i, j) samples input at centre + R(-angle)/s (p - centre - t).
  ci, cj = (h - 1) / 2, (w - 1) / 2
  i, j = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                      indexing='ij')
  di, dj = i - ci - ty, j - cj - tx
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_i = ci + (cos * di - sin * dj) / s
  src_j = cj + (sin * di + cos * dj) / s

  def warp(channel):
    return jax.scipy.ndimage.map_coordinates(channel, [src_i, src_j], order=1, mode='mirror')

  flat = x.astype(jnp.float32).transpose(0, 3, 1, 2).reshape(n * c, h, w)
  y = jax.vmap(warp)(flat).reshape(n, c, h, w).transpose(0, 2, 3, 1)
  y = jnp.where(jax.random.bernoulli(k_flip), y[:, :, ::-1], y)
  return y.astype(x.dtype)
