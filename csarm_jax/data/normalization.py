"""Per-channel normalisation: statistics from a fold's training images, and the one function that
applies them everywhere (training, evaluation, prediction).

    stats = compute_normalization(store, train_rows)       # exact, streamed; or max_images=...
    stats.save(workdir / 'normalization.json'); NormStats.load(...)
    x = normalize(batch['images'], stats)                  # jnp, jit-able: float32

Images (uint8/uint16): ``(x / max_value - mean) / std`` per channel, with mean and std in units of
``x / max_value`` (as torchvision's ToDtype(scale=True) + Normalize). Feature stores:
``(x - mean) / std`` per feature. The statistics are over every pixel of the given (whole,
uncropped) stored images: integer images are summed exactly (int64 per chunk, Python integers
across chunks), feature vectors with float64 Chan-combined per-chunk moments. Standard deviations
are the population ones. A feature constant over the rows is centred only (std 1, as
scikit-learn's StandardScaler); a constant image channel is an error.
"""
from __future__ import annotations

import json
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath


@flax.struct.dataclass
class NormStats:
  """Per-channel (or per-feature) mean and std; a pytree, so it can be passed into ``jax.jit``."""
  mean: np.ndarray                      # float32 (channels,)
  std: np.ndarray                       # float32 (channels,)
  kind: str = flax.struct.field(pytree_node=False, default='images')
  max_value: float = flax.struct.field(pytree_node=False, default=255.0)
  channels: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
  num_images: int = flax.struct.field(pytree_node=False, default=0)

  def to_json(self) -> str:
    return json.dumps({'kind': self.kind, 'channels': list(self.channels),
                       'mean': [float(v) for v in self.mean], 'std': [float(v) for v in self.std],
                       'max_value': self.max_value, 'num_images': self.num_images}, indent=2)

  @classmethod
  def from_json(cls, text: str) -> NormStats:
    raw = json.loads(text)
    return cls(mean=np.asarray(raw['mean'], np.float32), std=np.asarray(raw['std'], np.float32),
               kind=raw['kind'], max_value=float(raw['max_value']),
               channels=tuple(raw['channels']), num_images=int(raw['num_images']))

  def save(self, path: str | epath.Path) -> None:
    epath.Path(path).write_text(self.to_json())

  @classmethod
  def load(cls, path: str | epath.Path) -> NormStats:
    return cls.from_json(epath.Path(path).read_text())


def normalize(x, stats: NormStats, constants: tuple | None = None) -> jnp.ndarray:
  """Integer crops (..., C) or feature vectors (..., D) to normalised float32. Jit-able.

  ``constants``: ``device_constants(stats)``, for calls outside ``jit`` that must not transfer
  the statistics implicitly (the same operations, so the same numbers)."""
  scale, mean, std = constants if constants is not None else (
      jnp.float32(1.0 / stats.max_value), jnp.asarray(stats.mean, jnp.float32),
      jnp.asarray(stats.std, jnp.float32))
  x = jnp.asarray(x).astype(jnp.float32)
  if stats.kind == 'images':
    x = x * scale
  return (x - mean) / std


def device_constants(stats: NormStats) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(scale, mean, std) of ``normalize``, put on the default device explicitly."""
  return jax.device_put((np.float32(1.0 / stats.max_value), np.asarray(stats.mean, np.float32),
                         np.asarray(stats.std, np.float32)))


def _integer_moments(store, rows: np.ndarray, chunk_size: int) -> tuple[int, list[int], list[int]]:
  """Exact pixel count and per-channel sums of x and x^2 (Python integers)."""
  height, width, channels = store.item_shape
  top = int(np.iinfo(store.manifest['dtype']).max)
  chunk_size = max(1, min(chunk_size, 2 ** 62 // (height * width * top * top)))  # no int64 overflow
  count, s1, s2 = 0, [0] * channels, [0] * channels
  for start in range(0, len(rows), chunk_size):
    x = store.read(rows[start:start + chunk_size])
    wide = x.reshape(-1, x.shape[-2] * channels)      # long contiguous rows: fast int64 einsum
    c1 = np.einsum('ij->j', wide, dtype=np.int64).reshape(-1, channels).sum(0)
    c2 = np.einsum('ij,ij->j', wide, wide, dtype=np.int64).reshape(-1, channels).sum(0)
    count += x.size // channels
    s1 = [a + int(b) for a, b in zip(s1, c1)]
    s2 = [a + int(b) for a, b in zip(s2, c2)]
  return count, s1, s2


def _float_moments(store, rows: np.ndarray, chunk_size: int) -> tuple[int, np.ndarray, np.ndarray]:
  """Count, mean and centred sum of squares per feature, float64, Chan et al.'s combination."""
  count, mean, m2 = 0, 0.0, 0.0
  for start in range(0, len(rows), chunk_size):
    x = store.read(rows[start:start + chunk_size]).astype(np.float64)
    n_b, mean_b = len(x), x.mean(0)
    m2_b = ((x - mean_b) ** 2).sum(0)
    delta, total = mean_b - mean, count + n_b
    mean = mean + delta * n_b / total
    m2 = m2 + m2_b + delta ** 2 * count * n_b / total
    count = total
  return count, np.asarray(mean), np.asarray(m2)


def compute_normalization(store, rows: Sequence[int] | np.ndarray, max_images: int | None = None,
                          seed: int = 0, chunk_size: int = 32) -> NormStats:
  """Per-channel mean/std over the store items at ``rows`` (a fold's training perturbed images).

  ``max_images`` caps the pass at a seeded random subset of that many rows (exact otherwise).
  Raises ValueError for no rows, a channel holding NaN or inf, or a constant image channel (a
  constant feature gets std 1).
  """
  rows = np.asarray(rows, np.int64)
  if rows.size == 0:
    raise ValueError('normalisation statistics need at least one image; got no rows')
  if max_images is not None and len(rows) > max_images:
    rows = np.random.default_rng(seed).choice(rows, max_images, replace=False)
  rows = np.sort(rows)                                  # store order: sequential shard reads
  if store.kind == 'images':
    max_value = float(np.iinfo(store.manifest['dtype']).max)
    count, s1, s2 = _integer_moments(store, rows, chunk_size)
    mean = np.array([a / count for a in s1]) / max_value
    var = np.array([(count * b - a * a) / (count * count) for a, b in zip(s1, s2)])
    std = np.sqrt(var) / max_value
  else:
    max_value = 1.0
    count, mean, m2 = _float_moments(store, rows, chunk_size)
    std = np.sqrt(m2 / count)
  broken = [c for c, m, s in zip(store.channels, mean, std) if not (math.isfinite(m) and
                                                                   math.isfinite(s))]
  if broken:
    raise ValueError(f'channel {broken[0]} holds NaN or inf in the {len(rows)} images: it cannot '
                     f'be normalised (plate_check.check_parts skips such images)')
  flat = [c for c, s in zip(store.channels, std) if not s > 0]
  if flat and store.kind == 'images':
    raise ValueError(f'channel {flat[0]} is constant over the {len(rows)} images (std 0): '
                     f'it cannot be normalised')
  if flat:        # features: centred only, as scikit-learn's StandardScaler does
    logging.warning('%d features are constant over the %d training rows (e.g. %s): centred, '
                    'not scaled (std set to 1)', len(flat), len(rows), flat[0])
    std = np.where(std > 0, std, 1.0)
  return NormStats(mean=mean.astype(np.float32), std=std.astype(np.float32), kind=store.kind,
                   max_value=max_value, channels=tuple(store.channels), num_images=len(rows))
