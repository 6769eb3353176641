"""A features store of hand-crafted profiles (``handcrafted``) computed from an image store: the
synthetic benchmark's stand-in for CellProfiler profiles, so the profile path runs without JUMP.

    profiles.write('data/quickstart', 'data/quickstart_profiles', level='well')
    profiles.ensure('data/quickstart_profiles', 'data/quickstart', level='well')   # reuse or write

``level='image'``: one row per image, the image store's table (``row`` renumbered 0..N-1 in table
order; equal to it for a synthetic store). ``level='well'``: one row per well, the median of its
sites' features (``handcrafted.well_medians``), as CellProfiler's well-level profiles. Either way
the table keeps every column of the image store, so splits, plates and controls carry over. The
manifest records the image store's ``created_by`` and the level: ``ensure`` reuses a store only if
both match.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pandas as pd
import tqdm

from csarm_jax.data import handcrafted, store, store_writer

TOOL = 'csarm_jax.data.synthetic.profiles'
VERSION = 1                       # of the features: bump when ``handcrafted`` changes them
LEVELS = ('image', 'well')
PENDING_NAME = 'profiles_pending.json'   # marks a write in progress (a rerun replaces it)


def _check(images: store.ImageStore, level: str) -> None:
  if level not in LEVELS:
    raise ValueError(f'level must be one of {LEVELS}, got {level!r}')
  if images.kind != 'images':
    raise ValueError(f'{images.path} holds {images.kind}, not images: nothing to profile')


def compute(images: store.ImageStore, level: str = 'image', chunk_size: int = 256,
            progress: bool = False) -> tuple[pd.DataFrame, np.ndarray]:
  """(table, (rows, D) float32 features) of an image store at ``level``."""
  _check(images, level)
  table = images.table.reset_index(drop=True)
  rows = table['row'].to_numpy()
  max_value = float(np.iinfo(images.dtype).max)
  chunks = range(0, len(rows), chunk_size)
  features = np.concatenate([
      handcrafted.image_features(images.read(rows[start:start + chunk_size]), max_value)
      for start in tqdm.tqdm(chunks, unit='chunk', desc=f'profiles <- {images.path}',
                             disable=not progress)])
  if level == 'well':
    return handcrafted.well_medians(table, features)
  table = table.copy()
  table['row'] = np.arange(len(table), dtype=np.int64)
  return table, features


def fingerprint(images: store.ImageStore, level: str) -> dict[str, Any]:
  """What identifies a profiles store: the features' version, the level and the image store."""
  return json.loads(json.dumps({'tool': TOOL, 'version': VERSION, 'level': level,
                                'images_created_by': images.manifest['created_by']}))


def _local(path: str) -> str:
  if '://' in path and not path.startswith('file://'):
    raise ValueError(f'profiles are written to a local directory, got {path!r}')
  return os.path.abspath(os.path.expanduser(path.removeprefix('file://')))


def write(images_path: str, out: str, level: str = 'image', chunk_size: int = 256,
          progress: bool = True) -> str:
  """Writes the profiles of the image store at ``images_path`` as a features store at ``out``
  (absent, empty, or an interrupted write of this module). Returns ``out``."""
  out = _local(out)
  if os.path.exists(os.path.join(out, store.MANIFEST_NAME)):
    raise FileExistsError(f'{out} already holds a complete store; use ensure() to reuse it or '
                          'choose another directory')
  pending = os.path.join(out, PENDING_NAME)
  if os.path.isdir(out) and os.listdir(out) and not os.path.exists(pending):
    raise FileExistsError(f'{out} is not empty and is not an interrupted profiles write; choose '
                          'an empty or new directory')
  images = store.open_store(images_path)
  _check(images, level)
  made_by = fingerprint(images, level)
  os.makedirs(out, exist_ok=True)
  with open(pending, 'w') as f:
    json.dump(made_by, f)
  table, features = compute(images, level, chunk_size, progress)
  classes = [(c['id'], c['name']) for c in images.manifest['classes']]
  store_writer.write_feature_store(
      out, table, features, handcrafted.feature_names(images.channels), classes,
      images.manifest['control_id'], {**made_by, 'images': images_path}, delete_existing=True)
  os.remove(pending)
  return out


def ensure(out: str, images_path: str, level: str = 'image', progress: bool = True) -> str:
  """``out`` holding the ``level`` profiles of the image store at ``images_path``: reused if
  complete and made from that store's content, written if absent. Raises FileExistsError if
  ``out`` holds anything else."""
  local = _local(out)
  if not os.path.exists(os.path.join(local, store.MANIFEST_NAME)):
    return write(images_path, local, level, progress=progress)
  want = fingerprint(store.open_store(images_path), level)
  made_by = store.read_manifest(local).get('created_by', {})
  have = {key: made_by.get(key) for key in want}
  if have != want:
    wrong = [key for key in want if have[key] != want[key]]
    raise FileExistsError(f'{local} holds profiles made with a different {", ".join(wrong)} '
                          f'than the {level} profiles of {images_path}; choose another directory '
                          'or delete it')
  store.open_store(local)                        # validates array, table and manifest
  return local
