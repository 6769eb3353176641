"""Crop windows and flips of (M, H, W, C) integer images, chosen on the host.

    windows = crop_windows(m, 540, 540, 256, rng)    # training: random 256 crops, random h/v flips
    windows = crop_windows(m, 540, 540, 256)         # evaluation and prediction: centre crops
    crops   = apply_windows(images, windows)          # in-memory images: slicing, one copy

The pipeline applies the same windows inside the store read (``ImageStore.read_crops``), so only
the crops are ever copied out -- except horizontal flips, which it leaves to the accelerator
(``flip_w_on_device``, in the training step). Scaling to float and normalising happen on the
accelerator too (``normalization.normalize``): batches travel as uint8/uint16.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Windows:
  """Per image: the crop's top-left corner (ys, xs), flips of the H axis (``flip_h``, vertical)
  and of the W axis (``flip_w``, horizontal); ``size`` x ``size`` crops."""
  ys: np.ndarray
  xs: np.ndarray
  flip_h: np.ndarray
  flip_w: np.ndarray
  size: int


def crop_windows(m: int, height: int, width: int, size: int | None,
                 rng: np.random.Generator | None = None, flips: bool = True) -> Windows:
  """``rng`` given: uniformly placed crops and (if ``flips``) each flip with probability 1/2;
  None: the central window ((H - size) // 2, (W - size) // 2), no flips. ``size=None``: the
  largest square."""
  size = min(height, width) if size is None else size
  if not 0 < size <= min(height, width):
    raise ValueError(f'crop size {size} does not fit images of {height}x{width}')
  if rng is None:
    return Windows(np.full(m, (height - size) // 2), np.full(m, (width - size) // 2),
                   np.zeros(m, bool), np.zeros(m, bool), size)
  ys = rng.integers(0, height - size + 1, m)
  xs = rng.integers(0, width - size + 1, m)
  flip_h, flip_w = (rng.random((2, m)) < 0.5) if flips else np.zeros((2, m), bool)
  return Windows(ys, xs, flip_h, flip_w, size)


def concatenate(windows: list[Windows]) -> Windows:
  """The windows of several image sets (of one crop size), in order."""
  return Windows(*(np.concatenate([getattr(w, f) for w in windows])
                   for f in ('ys', 'xs', 'flip_h', 'flip_w')), windows[0].size)


def apply_windows(images: np.ndarray, windows: Windows) -> np.ndarray:
  """Crops (and flips) in-memory ``images`` (M, H, W, C) into a new (M, size, size, C) array."""
  if images.ndim != 4 or len(windows.ys) != len(images):
    raise ValueError(f'images must be (M, H, W, C) with one window each, got shape {images.shape} '
                     f'for {len(windows.ys)} windows')
  s = windows.size
  out = np.empty((len(images), s, s, images.shape[-1]), images.dtype)
  for i, (y, x, fh, fw) in enumerate(zip(windows.ys, windows.xs, windows.flip_h, windows.flip_w)):
    out[i] = images[i, y:y + s, x:x + s][::-1 if fh else 1, ::-1 if fw else 1]
  return out


def random_crop_flip(images: np.ndarray, size: int | None, rng: np.random.Generator,
                     flips: bool = True) -> np.ndarray:
  """Training augmentation of in-memory images: random crops, random flips."""
  return apply_windows(images, crop_windows(len(images), *images.shape[1:3], size, rng, flips))


def center_crop(images: np.ndarray, size: int | None) -> np.ndarray:
  """Evaluation/prediction crops of in-memory images."""
  return apply_windows(images, crop_windows(len(images), *images.shape[1:3], size))


def flip_w_on_device(images: jax.Array, flip_w: jax.Array) -> jax.Array:
  """(..., h, w, ch) images with those where ``flip_w`` (...) is set reversed along w (jit-able;
  the batch contract's deferred horizontal flips)."""
  return jnp.where(flip_w[..., None, None, None], jnp.flip(images, axis=-2), images)
