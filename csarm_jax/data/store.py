"""The image store: one format for synthetic and real (JUMP) data.

A store is a directory (local path or any tensorstore kvstore URL: ``file://``, ``gs://``, ``s3://``)
holding three things:

* ``data.zarr`` -- one zarr3 array, sharded along its first axis (``shard_items`` items per file).
  Inside a shard an image is split into tiles (inner chunks ``(1, tile_h, tile_w, C)``, see
  ``store_writer.tile_side``; bitshuffled and LZ4HC-compressed by default, see
  ``store_writer.COMPRESSIONS``), so reading a crop touches one shard file and decodes only the
  tiles under it. ``kind='images'``:
  (N, H, W, C) uint8 or uint16; ``kind='features'``: (N, D) float32 (e.g. CellProfiler profiles).
* ``metadata.parquet`` -- one row per item, JUMP column names, every ID a string (see ``COLUMNS``);
  ``row`` indexes the array, ``label`` is the class id (-1: unlabelled, e.g. a control) and
  ``is_control`` flags the plate's negative-control (DMSO) images.
* ``manifest.json`` -- format version, kind, channel (or feature) names in array order, dtype, item
  shape, the classes in label order, the control id, how the store was made, and
  ``num_unused_rows``: array rows no table row references (e.g. sites a converter skipped and
  reported). Written last: its presence marks a complete store.

This module reads: ``open_store`` validates the three against each other and never reads the
array's data; ``ImageStore`` reads items and crops. ``store_writer`` writes stores.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd
import tensorstore as ts

if TYPE_CHECKING:
  from csarm_jax.data.augment import Windows

FORMAT_VERSION = 1
ARRAY_NAME, TABLE_NAME, MANIFEST_NAME = 'data.zarr', 'metadata.parquet', 'manifest.json'
ID_COLUMNS = ('Metadata_Source', 'Metadata_Batch', 'Metadata_Plate', 'Metadata_Well',
              'Metadata_Site', 'Metadata_JCP2022', 'Metadata_PlateType')
COLUMNS = ID_COLUMNS + ('is_control', 'label', 'row')
MANIFEST_KEYS = ('format_version', 'kind', 'channels', 'dtype', 'item_shape', 'num_items',
                 'classes', 'control_id', 'created_by', 'num_unused_rows')
DTYPES = {'images': ('uint8', 'uint16'), 'features': ('float32',)}


class StoreError(ValueError):
  """A store whose array, table or manifest is missing, malformed or inconsistent."""


def url(path: str) -> str:
  """A kvstore URL with a trailing slash for a local path or URL."""
  if '://' not in path:
    path = 'file://' + os.path.abspath(os.path.expanduser(path))
  return path.rstrip('/') + '/'


def kvstore(path: str) -> ts.KvStore:
  return ts.KvStore.open(url(path)).result()


def array_spec(path: str) -> dict[str, Any]:
  """The tensorstore spec of a store's array (to open, or with metadata added, to create)."""
  return {'driver': 'zarr3', 'kvstore': url(path) + ARRAY_NAME + '/',
          # No chunk cache: reads go straight to the caller, resident memory stays flat.
          'context': {'cache_pool': {'total_bytes_limit': 0}}}


def kind_of(item_shape: Sequence[int]) -> str:
  """'images' for (H, W, C) items, 'features' for (D,), else 'invalid'."""
  return {3: 'images', 1: 'features'}.get(len(item_shape), 'invalid')


def open_array(path: str, write: bool = False) -> ts.TensorStore:
  """The store's array (``write=True``: for a writer filling a created array)."""
  try:
    return ts.open(array_spec(path), open=True, read=True, write=write).result()
  except Exception as e:  # tensorstore raises ValueError subclasses with long messages
    raise StoreError(f'cannot open image array {url(path) + ARRAY_NAME}: {e}') from None


def read_manifest(path: str) -> dict[str, Any]:
  raw = kvstore(path).read(MANIFEST_NAME).result()
  if raw.state != 'value':
    raise StoreError(f'{url(path) + MANIFEST_NAME} is missing (an incomplete or foreign store)')
  try:
    return json.loads(bytes(raw.value))
  except json.JSONDecodeError as e:
    raise StoreError(f'{url(path) + MANIFEST_NAME} is not valid JSON: {e}') from None


def read_table(path: str) -> pd.DataFrame:
  raw = kvstore(path).read(TABLE_NAME).result()
  if raw.state != 'value':
    raise StoreError(f'{url(path) + TABLE_NAME} is missing')
  try:
    return pd.read_parquet(io.BytesIO(bytes(raw.value)))
  except Exception as e:
    raise StoreError(f'{url(path) + TABLE_NAME} is not a readable Parquet file: {e}') from None


def _first(table: pd.DataFrame, bad: np.ndarray, column: str) -> str:
  """'N rows, e.g. plate P well W: column = value' for the rows flagged in ``bad``."""
  row = table.loc[bad].iloc[0]
  value = row[column].item() if isinstance(row[column], np.generic) else row[column]
  return (f"{int(bad.sum())} rows, e.g. plate {row['Metadata_Plate']} well {row['Metadata_Well']}: "
          f'{column} = {value!r}')


def validate(table: pd.DataFrame, manifest: dict[str, Any], array_shape: tuple[int, ...],
             array_dtype: str, where: str = '') -> None:
  """Raises StoreError naming the file and column at fault if the three parts disagree."""
  mf, tb = f'{where}{MANIFEST_NAME}', f'{where}{TABLE_NAME}'
  missing = [k for k in MANIFEST_KEYS if k not in manifest]
  if missing:
    raise StoreError(f'{mf} lacks keys {missing}')
  if manifest['format_version'] != FORMAT_VERSION:
    raise StoreError(f"{mf}: format_version {manifest['format_version']} is not supported "
                     f'(this csarm_jax reads version {FORMAT_VERSION})')
  n, item = array_shape[0], list(array_shape[1:])
  if item != list(manifest['item_shape']) or n != manifest['num_items']:
    raise StoreError(f"{mf}: item_shape {manifest['item_shape']} / num_items "
                     f"{manifest['num_items']} disagree with the array's shape {array_shape}")
  if manifest['kind'] != kind_of(item):
    raise StoreError(f"{mf}: kind {manifest['kind']!r} does not fit an array of shape "
                     f"{array_shape}")
  if len(manifest['channels']) != item[-1]:
    raise StoreError(f"{mf}: {len(manifest['channels'])} channel/feature names for an array whose "
                     f'last axis has {item[-1]}')
  if manifest['dtype'] != array_dtype:
    raise StoreError(f"{mf}: dtype {manifest['dtype']} but the array holds {array_dtype}")
  absent = [col for col in COLUMNS if col not in table.columns]
  if absent:
    raise StoreError(f'{tb} lacks columns {absent}')
  for col in ID_COLUMNS:
    if not (pd.api.types.is_string_dtype(table[col]) or pd.api.types.is_object_dtype(table[col])) \
        or not table[col].map(lambda v: isinstance(v, str)).all():
      raise StoreError(f'{tb}: column {col} must hold strings (JUMP IDs are strings), '
                       f'found dtype {table[col].dtype}')
  for col in ('row', 'label'):
    if not pd.api.types.is_integer_dtype(table[col]):
      raise StoreError(f'{tb}: column {col} must hold integers, found dtype {table[col].dtype}')
  rows = table['row'].to_numpy()
  outside = (rows < 0) | (rows >= n)
  if outside.any():
    raise StoreError(f'{tb}: column row must index the array\'s {n} items, but '
                     f"{_first(table, outside, 'row')}")
  repeated = table['row'].duplicated(keep=False).to_numpy()
  if repeated.any():
    raise StoreError(f'{tb}: column row has duplicates (table rows pointing at one item): '
                     f"{_first(table, repeated, 'row')}")
  if n - len(rows) != manifest['num_unused_rows']:
    raise StoreError(f"{tb}: {len(rows)} rows for {n} items, but {mf} declares "
                     f"{manifest['num_unused_rows']} unused rows: items would be silently lost")
  classes = [k['id'] for k in manifest['classes']]
  labels = table['label'].to_numpy()
  unknown = (labels < -1) | (labels >= len(classes))
  if unknown.any():
    raise StoreError(f'{tb}: column label must hold -1 or a class id in [0, {len(classes)}), but '
                     f"{_first(table, unknown, 'label')}")
  labelled = labels >= 0
  expected = np.asarray(classes, dtype=object)[labels[labelled]]
  wrong = table.loc[labelled, 'Metadata_JCP2022'].to_numpy() != expected
  if wrong.any():
    bad = table.loc[labelled].loc[wrong].iloc[0]
    raise StoreError(f"{tb}: column label disagrees with Metadata_JCP2022 in "
                     f"{int(wrong.sum())} rows, e.g. plate {bad['Metadata_Plate']} "
                     f"well {bad['Metadata_Well']}: "
                     f"{bad['Metadata_JCP2022']} labelled {bad['label']}")
  if not pd.api.types.is_bool_dtype(table['is_control']):   # 'False' as a string is truthy
    raise StoreError(f"{tb}: column is_control must be boolean, "
                     f"found dtype {table['is_control'].dtype}")
  ctrl = table['is_control'].to_numpy()
  wrong = ctrl & ((table['Metadata_JCP2022'] != manifest['control_id']).to_numpy() | (labels >= 0))
  if wrong.any():
    raise StoreError(f"{tb}: column is_control marks rows that are not unlabelled "
                     f"{manifest['control_id']} images: {_first(table, wrong, 'Metadata_JCP2022')}")
  plates = table.groupby('Metadata_Plate')[['Metadata_Source', 'Metadata_Batch']].nunique()
  ambiguous = plates.index[(plates > 1).any(axis=1)]
  if len(ambiguous):
    raise StoreError(f'{tb}: plate {ambiguous[0]} appears under several sources or batches; '
                     f'plate IDs must be unique')


@dataclass
class ImageStore:
  """An opened, validated store. ``read(rows)`` fetches items; the array is never loaded whole."""
  path: str
  manifest: dict[str, Any]
  table: pd.DataFrame
  array: ts.TensorStore

  @property
  def channels(self) -> list[str]:
    return list(self.manifest['channels'])

  @property
  def class_ids(self) -> list[str]:
    return [c['id'] for c in self.manifest['classes']]

  @property
  def class_names(self) -> list[str]:
    return [c['name'] for c in self.manifest['classes']]

  @property
  def kind(self) -> str:
    return self.manifest['kind']

  @property
  def item_shape(self) -> tuple[int, ...]:
    return tuple(self.manifest['item_shape'])

  @property
  def dtype(self) -> str:
    return self.manifest['dtype']

  def read(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """Items at array ``rows`` (any order, repeats allowed), as (len(rows), *item_shape)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
      return np.zeros((0, *self.item_shape), self.dtype)
    return self.array.oindex[rows].read().result()

  def read_crops(self, rows: np.ndarray, windows: Windows, out: np.ndarray | None = None
                 ) -> np.ndarray:
    """Crops of the images at ``rows``: each a view of the array (``augment.Windows``: window,
    flips), all fetched concurrently by tensorstore, which copies out only the crops -- into
    ``out`` (M, size, size, C) if given (e.g. a ``buffers.BufferPool`` buffer), else into new
    memory."""
    s = windows.size
    shape = (len(rows), s, s, self.item_shape[-1])
    if out is not None and (out.shape != shape or out.dtype != np.dtype(self.dtype)):
      raise ValueError(f'out is {out.dtype} {out.shape}, the crops are {self.dtype} {shape}')
    if len(rows) == 0:
      return np.zeros(shape, self.dtype) if out is None else out
    layers = [self.array[int(r), int(y):int(y) + s, int(x):int(x) + s][
                  ::-1 if fh else 1, ::-1 if fw else 1].translate_to[0, 0, 0]
              for r, y, x, fh, fw in zip(rows, windows.ys, windows.xs, windows.flip_h,
                                         windows.flip_w)]
    if out is None:
      return ts.stack(layers).read().result()
    # One write per crop: as concurrent as the stacked read, and cheaper than one stacked write.
    writes = [ts.array(o, copy=False, write=True).write(layer) for o, layer in zip(out, layers)]
    for write in writes:
      write.result()
    return out

  def __getstate__(self):  # pickles for worker processes: the array handle is reopened
    return {'path': self.path, 'manifest': self.manifest, 'table': self.table}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.array = open_array(self.path)


def open_store(path: str) -> ImageStore:
  """Opens and validates a store at a local path or kvstore URL; raises StoreError on problems."""
  manifest = read_manifest(path)
  array = open_array(path)
  table = read_table(path)
  validate(table, manifest, tuple(array.shape), str(array.dtype.numpy_dtype), where=url(path))
  return ImageStore(path=path, manifest=manifest, table=table, array=array)
