"""Per-channel image math of the paper's JUMP preprocessing (ml-jku/cs-arm-bn, images/04), in numpy.

Per channel: optional illumination correction (raw / illum, as jump_portrait), x1/factor nearest
downsampling, a clipping threshold at the ``clip_percentile`` (the value of the n-th brightest
pixel, n = round(size * (100 - percentile) / 100), at least 1), then
``floor(min(x * max / threshold, max))`` into uint8 (max 255) or uint16 (max 65535). Then a centre
crop to the store's (H, W).

Nearest downsampling follows libvips ``resize(1/factor, kernel='nearest')`` (centre convention,
which the reference called through pyvips): output size ``round(n / factor)``, output pixel ``i``
taken from input ``floor((factor - extra) / 2 + i * factor)`` with ``extra = out * factor - n`` --
for factor 2 the odd pixels (1, 3, 5, ...) of an even-sized image and the even ones of an
odd-sized image.
"""
from __future__ import annotations

import numpy as np

SCALE_MAX = {'uint8': 255, 'uint16': 65535}


def downsampled_size(n: int, factor: int) -> int:
  return max(1, int(np.floor(n / factor + 0.5)))


def nearest_indices(n: int, factor: int) -> np.ndarray:
  """Input indices the libvips nearest kernel samples when shrinking ``n`` pixels by ``factor``."""
  out = downsampled_size(n, factor)
  extra = out * factor - n
  return np.minimum(np.floor((factor - extra) / 2 + factor * np.arange(out)).astype(np.int64),
                    n - 1)


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour shrink of a 2-D image by an integer factor (1: unchanged)."""
  if factor == 1:
    return image
  if factor == 2 and image.shape[0] % 2 == 0 and image.shape[1] % 2 == 0:
    return image[1::2, 1::2]    # the pixels nearest_indices picks, as a cheap strided view
  rows, cols = nearest_indices(image.shape[0], factor), nearest_indices(image.shape[1], factor)
  return image[np.ix_(rows, cols)]


def clip_threshold(image: np.ndarray, percentile: float) -> float:
  """The n-th largest value, n = round(size * (100 - percentile) / 100) (at least 1)."""
  top_fraction = round(100.0 - percentile, 10) / 100
  n = max(1, int(np.around(image.size * top_fraction)))
  flat, k = image.ravel(), image.size - n          # the k-th smallest (from 0)
  if flat.dtype in (np.uint8, np.uint16):          # a histogram is 2x faster than a partition
    return flat.dtype.type(np.searchsorted(np.cumsum(np.bincount(flat)), k, side='right'))
  return np.partition(flat, k)[k]


def scale(image: np.ndarray, threshold: float, dtype: str) -> np.ndarray:
  """``floor(min(image * max / threshold, max))`` as ``dtype``; threshold must be positive."""
  top = SCALE_MAX[dtype]
  scaled = image.astype(np.float64) * (top / threshold)
  np.minimum(scaled, top, out=scaled)
  return scaled.astype(dtype)


def preprocess_channel(raw: np.ndarray, illum: np.ndarray | None, factor: int, percentile: float,
                       dtype: str) -> np.ndarray:
  """One channel: illumination division, downsampling, clipping and scaling (see module doc).

  Division and nearest sampling commute, so both are downsampled first (exactly the same result).
  Raises ValueError if the channel is blank after correction (threshold 0).
  """
  image = downsample(raw, factor)
  if illum is not None:
    image = image.astype(np.float64) / downsample(illum, factor)
  threshold = clip_threshold(image, percentile)
  if not threshold > 0:
    raise ValueError(f'blank channel: clipping threshold {threshold}')
  return scale(image, threshold, dtype)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """The central ``height`` x ``width`` window (top-left offset rounds down)."""
  h, w = image.shape[:2]
  if h < height or w < width:
    raise ValueError(f'image {h}x{w} is smaller than the crop {height}x{width}')
  top, left = (h - height) // 2, (w - width) // 2
  return image[top:top + height, left:left + width]
