"""Hand-crafted image features, a CellProfiler-like profile of each image: pure numpy, vectorised.

    features = image_features(images, max_value=255)       # (N, H, W, C) -> (N, D) float32
    names = feature_names(channels)                        # D names, in column order
    wells, profiles = well_medians(table, features)        # one row per well (median of its sites)

Per channel, on the image scaled to [0, 1]:

* intensity -- mean, std and the ``QUANTILES`` of the pixel values;
* texture -- gradient energy (mean squared difference of neighbouring pixels), local variance
  (mean 3x3 variance, borders mirrored) and Haralick statistics of the grey-level co-occurrence
  matrix (``LEVELS`` fixed bins of the full scale, horizontal and vertical neighbours, symmetric):
  contrast, homogeneity, energy, entropy, correlation;
* shape -- foreground (pixels above the midpoint of the median and the 99th percentile): its
  fraction of the image, its mean intensity, the fraction of its pixels on its boundary (4-
  neighbourhood, borders extended) and the density of its local maxima (3x3), an object count
  proxy;

then the Pearson correlation of every pair of channels (co-localisation). A statistic that is
undefined on a constant image (a correlation, a foreground mean) is 0, so every value is finite.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
LEVELS = 8                        # grey levels of the co-occurrence matrix
INTENSITY = ('mean', 'std') + tuple(f'q{round(q * 100):02d}' for q in QUANTILES)
TEXTURE = ('gradient_energy', 'local_variance', 'glcm_contrast', 'glcm_homogeneity',
           'glcm_energy', 'glcm_entropy', 'glcm_correlation')
SHAPE = ('foreground_fraction', 'foreground_mean', 'boundary_fraction', 'maxima_density')
PER_CHANNEL = INTENSITY + TEXTURE + SHAPE


def feature_names(channels: Sequence[str]) -> list[str]:
  """Column names of ``image_features``: channel-major per-channel statistics, then correlations."""
  return ([f'{c}_{s}' for c in channels for s in PER_CHANNEL]
          + [f'corr_{a}_{b}' for a, b in itertools.combinations(channels, 2)])


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  return np.where(den > 0, num / np.where(den > 0, den, 1), 0).astype(np.float32)


def cooccurrence(x: np.ndarray, levels: int = LEVELS) -> np.ndarray:
  """(N, C, L, L) symmetric, normalised grey-level co-occurrence matrices of (N, H, W, C) images
  in [0, 1] (horizontal and vertical neighbour pairs, counted both ways)."""
  n, _, _, c = x.shape
  q = np.minimum((x * levels).astype(np.int32), levels - 1)
  base = (np.arange(n * c, dtype=np.int32) * levels ** 2).reshape(n, 1, 1, c)   # per image, channel
  index = [(a * levels + b + base).ravel() for a, b in ((q[:, :, :-1], q[:, :, 1:]),
                                                        (q[:, :-1], q[:, 1:]))]
  counts = np.bincount(np.concatenate(index), minlength=n * c * levels ** 2)
  counts = counts.reshape(n, c, levels, levels)
  counts = counts + counts.transpose(0, 1, 3, 2)           # each pair both ways
  return (counts / counts.sum((2, 3), keepdims=True)).astype(np.float32)


def _haralick(p: np.ndarray) -> list[np.ndarray]:
  """Contrast, homogeneity, energy, entropy and correlation of (N, C, L, L) matrices."""
  levels = p.shape[-1]
  i, j = np.meshgrid(np.arange(levels), np.arange(levels), indexing='ij')
  total = lambda v: np.sum(p * v, axis=(2, 3))
  mean = total(i)                                            # symmetric: mean_i == mean_j
  var = total((i - mean[..., None, None]) ** 2)
  cov = total((i - mean[..., None, None]) * (j - mean[..., None, None]))
  entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=(2, 3))
  return [total((i - j) ** 2), total(1 / (1 + np.abs(i - j))), np.sum(p * p, axis=(2, 3)),
          entropy, _safe_ratio(cov, var)]


def _shape(x: np.ndarray, q50: np.ndarray, q99: np.ndarray) -> list[np.ndarray]:
  """Foreground fraction, foreground mean, boundary fraction and local-maxima density."""
  fg = x > ((q50 + q99) / 2)[:, None, None, :]
  area = fg.sum((1, 2))
  pad = np.pad(fg, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')   # outside: the edge pixel
  interior = fg & pad[:, :-2, 1:-1] & pad[:, 2:, 1:-1] & pad[:, 1:-1, :-2] & pad[:, 1:-1, 2:]
  peaks = fg & (x >= ndimage.maximum_filter(x, size=(1, 3, 3, 1), mode='nearest'))
  pixels = x.shape[1] * x.shape[2]
  return [area / pixels, _safe_ratio((x * fg).sum((1, 2)), area),
          _safe_ratio((fg & ~interior).sum((1, 2)), area), peaks.sum((1, 2)) / pixels]


def _correlations(flat: np.ndarray) -> np.ndarray:
  """(N, C(C-1)/2) Pearson correlations between the channels of (N, P, C) pixel values."""
  centred = flat - flat.mean(1, keepdims=True)
  cov = np.matmul(centred.transpose(0, 2, 1), centred) / flat.shape[1]
  std = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
  a, b = np.triu_indices(flat.shape[2], k=1)
  return _safe_ratio(cov[:, a, b], std[:, a] * std[:, b])


def image_features(images: np.ndarray, max_value: float) -> np.ndarray:
  """(N, D) float32 features of (N, H, W, C) images with values in [0, max_value]."""
  x = images.astype(np.float32) / np.float32(max_value)
  n, h, w, c = x.shape
  flat = x.reshape(n, h * w, c)
  quantiles = np.quantile(flat, QUANTILES, axis=1)          # (Q, N, C)
  q50, q99 = quantiles[QUANTILES.index(0.5)], quantiles[QUANTILES.index(0.99)]
  gradient = ((np.diff(x, axis=1) ** 2).mean((1, 2)) + (np.diff(x, axis=2) ** 2).mean((1, 2)))
  local_mean = ndimage.uniform_filter(x, size=(1, 3, 3, 1), mode='reflect')
  local_square = ndimage.uniform_filter(x * x, size=(1, 3, 3, 1), mode='reflect')
  local_variance = np.maximum(local_square - local_mean ** 2, 0).mean((1, 2))
  per_channel = ([flat.mean(1), flat.std(1), *quantiles, gradient, local_variance]
                 + _haralick(cooccurrence(x)) + _shape(x, q50, q99))
  stacked = np.stack([np.asarray(v, np.float32) for v in per_channel], axis=-1)   # (N, C, S)
  return np.concatenate([stacked.reshape(n, -1), _correlations(flat)], axis=1).astype(np.float32)


WELL_KEYS = ('Metadata_Plate', 'Metadata_Well')
WELL_CONSTANT = ('Metadata_Source', 'Metadata_Batch', 'Metadata_JCP2022', 'label', 'is_control')


def well_medians(table: pd.DataFrame, features: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
  """One row per well (first-seen order): the well's first table row with ``Metadata_Site`` 'all'
  and ``row`` renumbered, and the per-feature median over the well's sites (``features[i]``
  belongs to ``table`` row i), as CellProfiler aggregates profiles. Raises ValueError for a well
  whose sites disagree on a label, control flag, compound, batch or source."""
  group = table.groupby(list(WELL_KEYS), sort=False).ngroup().to_numpy()
  mixed = table.groupby(group)[list(WELL_CONSTANT)].nunique().gt(1).any(axis=1)
  if mixed.any():
    first = table.loc[group == mixed.index[mixed.to_numpy()][0]].iloc[0]
    raise ValueError(f"well {first['Metadata_Well']} of plate {first['Metadata_Plate']}: its "
                     f'sites disagree on {", ".join(WELL_CONSTANT)}')
  medians = pd.DataFrame(features).groupby(group).median().to_numpy(np.float32)
  wells = table.groupby(group, sort=True).head(1).reset_index(drop=True)
  wells['Metadata_Site'] = 'all'
  wells['row'] = np.arange(len(wells), dtype=np.int64)
  return wells, medians
