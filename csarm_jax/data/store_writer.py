"""Writing the image store (see ``store`` for the format): codec and tile policy, array creation,
metadata written last. Writers (``synthetic``, ``jump``, benchmarks) use this module; readers
need only ``store.open_store``, which validates what was written here.

    array = create_array(out, n, (540, 540, 5), 'uint8')   # then write whole shards
    write_metadata(out, table, make_manifest(channels, 'uint8', (540, 540, 5), n, classes, ...))
"""
from __future__ import annotations

import io
import json
from typing import Any, Sequence

import numpy as np
import pandas as pd
import tensorstore as ts

from csarm_jax.data.store import (DTYPES, FORMAT_VERSION, MANIFEST_NAME, TABLE_NAME, StoreError,
                                  array_spec, kind_of, kvstore, open_array, url, validate)

# Store codecs, all blosc with bitshuffle (on cell images the bit planes above the noise compress
# well; ``codecs`` sets the element size). On 540-px microscopy-like content (BENCHMARKS.md)
# 'lz4hc' is the smallest, decodes as fast as 'lz4' and 20-40 % faster than 'zstd', and encodes
# ~2x slower than 'zstd'; 'zstd' may be smaller on smoother content
# (experiments/benchmark_codecs.py compares them on a store of yours). 'none' reads fastest.
COMPRESSIONS = {
    'lz4hc': [{'name': 'blosc', 'configuration': {'cname': 'lz4hc', 'clevel': 5,
                                                  'shuffle': 'bitshuffle'}}],
    'zstd': [{'name': 'blosc', 'configuration': {'cname': 'zstd', 'clevel': 3,
                                                 'shuffle': 'bitshuffle'}}],
    'lz4': [{'name': 'blosc', 'configuration': {'cname': 'lz4', 'clevel': 5,
                                                'shuffle': 'bitshuffle'}}],
    'none': [],
}
DEFAULT_COMPRESSION = 'lz4hc'
LAYOUT_OPTIONS = ('compression', 'tile')   # how create_array lays images out; fixed once created
MAX_TILE, MIN_TILE = 192, 48   # default tile side: a divisor of the side in this range
# blosc bitshuffles a chunk only if it holds a multiple of 8 elements (of ``blosc_typesize``
# bytes); otherwise it compresses the raw bytes, which on noisy images is larger and 1.5-2x slower
# to decode.
BITSHUFFLE_ELEMENTS = 8


def blosc_typesize(dtype: str) -> int:
  """The element size blosc bitshuffles by: the dtype's, but at least 2 bytes. blosc's SIMD
  bitshuffle handles only even sizes and runs scalar code on 1-byte elements; uint8 images
  bitshuffled as byte pairs decode 16-20 % faster and come out 3-4 % larger (BENCHMARKS.md)."""
  return max(2, np.dtype(dtype).itemsize)


def codecs(compression: str, dtype: str) -> list[dict[str, Any]]:
  """The zarr3 codecs after ``bytes`` for an inner chunk: ``COMPRESSIONS[compression]`` with
  blosc's ``typesize`` set for ``dtype``."""
  return [{**c, 'configuration': {**c['configuration'], 'typesize': blosc_typesize(dtype)}}
          if c['name'] == 'blosc' else c for c in COMPRESSIONS[compression]]


def tile_side(side: int, channels: int, tile: int | None = None, dtype: str = 'uint8') -> int:
  """The tile side for an image side: ``tile`` if given (it must divide ``side``), else the largest
  divisor of ``side`` at most ``MAX_TILE`` whose tile (side² x ``channels`` values of ``dtype``)
  blosc can bitshuffle (540 -> 180, 512 -> 128, 300 -> 100 with 5 channels); failing that the
  largest divisor in that range; the whole side when the divisor would be under ``MIN_TILE`` (a
  prime side). A crop then decodes only the tiles it touches; smaller tiles cost more per-chunk
  work than they save (BENCHMARKS.md)."""
  if tile is None:
    divisors = [d for d in range(min(MIN_TILE, side), min(side, MAX_TILE) + 1) if side % d == 0]
    unit = BITSHUFFLE_ELEMENTS * blosc_typesize(dtype)    # bytes
    shuffled = [d for d in divisors if d * d * channels * np.dtype(dtype).itemsize % unit == 0]
    return max(shuffled or divisors or [side])
  if tile < 1 or side % tile:
    raise StoreError(f'tile {tile} must be a positive divisor of the image side {side}')
  return tile


def create_array(path: str, num_items: int, item_shape: Sequence[int], dtype: str,
                 shard_items: int = 64, delete_existing: bool = False,
                 compression: str = DEFAULT_COMPRESSION, tile: int | None = None) -> ts.TensorStore:
  """Creates the (N, *item_shape) array: item_shape (H, W, C) for images, (D,) for features.

  Write whole shards (``shard_items`` rows, see ``shard_items_of``) from one writer at a time.
  ``compression``: a key of ``COMPRESSIONS`` ('lz4hc' by default). ``tile``: the side of an
  image's square inner chunks (default ``tile_side``). Readers need not know either.
  """
  kind = kind_of(item_shape)
  if kind == 'invalid' or dtype not in DTYPES[kind]:
    raise StoreError(f'item_shape {tuple(item_shape)} / dtype {dtype!r}: expected (H, W, C) with '
                     f"{DTYPES['images']} or (D,) with {DTYPES['features']}")
  if compression not in COMPRESSIONS:
    raise StoreError(f'compression must be one of {sorted(COMPRESSIONS)}, got {compression!r}')
  item = [int(s) for s in item_shape]
  inner = [1] + item
  if kind == 'images':
    inner = [1, tile_side(item[0], item[2], tile, dtype), tile_side(item[1], item[2], tile, dtype),
             item[2]]
  spec = array_spec(path)
  spec['metadata'] = {
      'shape': [int(num_items)] + item, 'data_type': dtype,
      'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': [shard_items] + item}},
      'codecs': [{'name': 'sharding_indexed', 'configuration': {
          'chunk_shape': inner,
          'codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}},
                     *codecs(compression, dtype)],
          'index_codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}},
                           {'name': 'crc32c'}]}}],
  }
  return ts.open(spec, create=True, delete_existing=delete_existing).result()


def shard_items_of(array: ts.TensorStore) -> int:
  """Items per shard file (the unit a writer should write at once)."""
  return int(array.chunk_layout.write_chunk.shape[0])


def write_metadata(path: str, table: pd.DataFrame, manifest: dict[str, Any]) -> None:
  """Validates, then writes the table and (last, marking the store complete) the manifest."""
  array = open_array(path)
  validate(table, manifest, tuple(array.shape), str(array.dtype.numpy_dtype), where=url(path))
  kv = kvstore(path)
  buf = io.BytesIO()
  table.to_parquet(buf, index=False)
  kv.write(TABLE_NAME, buf.getvalue()).result()
  kv.write(MANIFEST_NAME, json.dumps(manifest, indent=2).encode()).result()


def write_feature_store(path: str, table: pd.DataFrame, features: np.ndarray,
                        names: Sequence[str], classes: Sequence[tuple[str, str]], control_id: str,
                        created_by: dict[str, Any], shard_items: int = 4096,
                        delete_existing: bool = False,
                        extra_files: dict[str, bytes] | None = None) -> None:
  """A whole features store from memory: ``features[i]`` (float32) is the item of ``table``'s
  row i (its ``row`` column: 0..N-1); ``extra_files`` (name -> bytes, e.g. a report) are written
  beside the array, the table and the manifest last."""
  array = create_array(path, len(table), (features.shape[1],), 'float32',
                       shard_items=shard_items, delete_existing=delete_existing)
  for start in range(0, len(table), shard_items):
    stop = min(start + shard_items, len(table))         # tensorstore does not clamp slices
    array[start:stop].write(features[start:stop]).result()
  kv = kvstore(path)
  for name, value in (extra_files or {}).items():
    kv.write(name, value).result()
  manifest = make_manifest(names, 'float32', (features.shape[1],), len(table), classes, control_id,
                           created_by)
  write_metadata(path, table, manifest)


def make_manifest(channels: Sequence[str], dtype: str, item_shape: Sequence[int], num_items: int,
                  classes: Sequence[tuple[str, str]], control_id: str, created_by: dict[str, Any],
                  num_unused_rows: int = 0) -> dict[str, Any]:
  """``channels``: channel names (images) or feature names (features), in array order."""
  return {'format_version': FORMAT_VERSION, 'kind': kind_of(item_shape), 'channels': list(channels),
          'dtype': dtype, 'item_shape': [int(s) for s in item_shape], 'num_items': int(num_items),
          'classes': [{'id': i, 'name': n} for i, n in classes], 'control_id': control_id,
          'created_by': created_by, 'num_unused_rows': int(num_unused_rows)}
