"""Host-side crops and flips of (M, H, W, C) integer images: slicing views, one copy into ``out``.

    crops = random_crop_flip(images, 256, rng)     # training: random 256 crop, random h/v flips
    crops = center_crop(images, 256)               # evaluation and prediction

``size=None`` keeps the whole image. Scaling to float and normalising happen on the accelerator
(``normalization.normalize``), so batches travel as uint8/uint16.
"""
from __future__ import annotations

import numpy as np


def _check(images: np.ndarray, size: int | None) -> int:
  if images.ndim != 4:
    raise ValueError(f'images must be (M, H, W, C), got shape {images.shape}')
  height, width = images.shape[1:3]
  size = min(height, width) if size is None else size
  if not 0 < size <= min(height, width):
    raise ValueError(f'crop size {size} does not fit images of {height}x{width}')
  return size


def _output(images: np.ndarray, size: int, out: np.ndarray | None) -> np.ndarray:
  shape = (len(images), size, size, images.shape[-1])
  if out is None:
    return np.empty(shape, images.dtype)
  if out.shape != shape:
    raise ValueError(f'out has shape {out.shape}, expected {shape}')
  return out


def random_crop_flip(images: np.ndarray, size: int | None, rng: np.random.Generator,
                     flips: bool = True, out: np.ndarray | None = None) -> np.ndarray:
  """Per image: a uniformly placed ``size`` x ``size`` crop, then (if ``flips``) a horizontal
  (W axis) and a vertical (H axis) flip, each with probability 1/2."""
  size = _check(images, size)
  out = _output(images, size, out)
  m, height, width = images.shape[:3]
  ys = rng.integers(0, height - size + 1, m)
  xs = rng.integers(0, width - size + 1, m)
  flip_w, flip_h = (rng.random((2, m)) < 0.5) if flips else np.zeros((2, m), bool)
  for i in range(m):
    view = images[i, ys[i]:ys[i] + size, xs[i]:xs[i] + size]
    out[i] = view[::-1 if flip_h[i] else 1, ::-1 if flip_w[i] else 1]
  return out


def center_crop(images: np.ndarray, size: int | None, out: np.ndarray | None = None) -> np.ndarray:
  """The central ``size`` x ``size`` window, at offsets ((H - size) // 2, (W - size) // 2)."""
  size = _check(images, size)
  out = _output(images, size, out)
  y = (images.shape[1] - size) // 2
  x = (images.shape[2] - size) // 2
  out[...] = images[:, y:y + size, x:x + size]
  return out
