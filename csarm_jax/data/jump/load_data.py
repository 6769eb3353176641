"""JUMP load_data files: find them in a mirror, read either column style, map S3 URLs onto it.

A mirror is a local copy of (part of) the Cell Painting Gallery bucket:
``s3://cellpainting-gallery/KEY`` lives at ``ROOT/KEY``. Per plate, cpg0016 has
``ROOT/cpg0016-jump/<source>/workspace/load_data_csv/<batch>/<plate>/load_data[_with_illum].<ext>``
(``ext`` csv, csv.gz or parquet) with one row per site and, per channel, either ``URL_Orig<Ch>``
or ``PathName_Orig<Ch>`` + ``FileName_Orig<Ch>`` (and ``*_Illum<Ch>`` for the illumination
functions). Channels are picked by name, never by the microscope's channel number in the file name.

``read_load_data`` returns one row per site with the ``SITE_KEYS`` columns and, per channel ``Ch``
of ``CHANNELS``, ``path_<Ch>`` (local file) and ``key_<Ch>`` (bucket key, '' when the file is not
in the bucket) plus ``illum_path_<Ch>`` / ``illum_key_<Ch>`` ('' when the file lists no
illumination).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import pandas as pd

from csarm_jax.data.constants import CHANNELS
from csarm_jax.data.jump.tables import (TABLE_SUFFIXES, JumpDataError, normalise_site,
                                        normalise_well, read_table)

DATASET = 'cpg0016-jump'
BUCKET_PREFIXES = ('s3://cellpainting-gallery/', 'https://cellpainting-gallery.s3.amazonaws.com/')
SITE_KEYS = ('Metadata_Source', 'Metadata_Batch', 'Metadata_Plate', 'Metadata_Well',
             'Metadata_Site')
LOAD_DATA_STEMS = ('load_data_with_illum', 'load_data')   # the illum variant is a superset
IMAGE_KINDS = ('Orig', 'Illum')
PREFIXES = {'Orig': '', 'Illum': 'illum_'}


def path_column(channel: str, kind: str = 'Orig') -> str:
  return f'{PREFIXES[kind]}path_{channel}'


def key_column(channel: str, kind: str = 'Orig') -> str:
  return f'{PREFIXES[kind]}key_{channel}'


@dataclass(frozen=True)
class LoadDataFile:
  path: str
  source: str
  batch: str
  plate: str


def _listdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


def find_load_data(root: str, sources: Iterable[str]) -> tuple[list[LoadDataFile], list[str]]:
  """One load_data file per plate folder of the given sources (the illum variant, Parquet first).

  Returns the files and the plate folders that hold none (reported, not fatal).
  """
  found, empty = [], []
  for source in sorted(sources):
    base = os.path.join(root, DATASET, source, 'workspace', 'load_data_csv')
    if not os.path.isdir(base):
      raise JumpDataError(f'{base} does not exist: is --root the folder that mirrors '
                          f's3://cellpainting-gallery/ and was {source} fetched?')
    for batch in _listdirs(base):
      for plate in _listdirs(os.path.join(base, batch)):
        folder = os.path.join(base, batch, plate)
        candidates = [os.path.join(folder, stem + suffix)
                      for stem in LOAD_DATA_STEMS for suffix in TABLE_SUFFIXES]
        existing = [c for c in candidates if os.path.isfile(c)]
        if existing:
          found.append(LoadDataFile(existing[0], source, batch, plate))
        else:
          empty.append(folder)
  return found, empty


def _column(table: pd.DataFrame, name: str) -> str | None:
  """The table's column called ``name``, matched exactly, else case-insensitively."""
  if name in table.columns:
    return name
  lower = {c.lower(): c for c in table.columns}
  return lower.get(name.lower())


def _urls(table: pd.DataFrame, kind: str, channel: str, where: str) -> pd.Series | None:
  """Full URLs/paths of one channel's files from URL_ or PathName_ + FileName_ columns."""
  url = _column(table, f'URL_{kind}{channel}')
  if url is not None:
    return table[url].astype('str')
  path_name = _column(table, f'PathName_{kind}{channel}')
  file_name = _column(table, f'FileName_{kind}{channel}')
  if path_name is not None and file_name is not None:
    joined = table[path_name].astype('str').str.rstrip('/') + '/' + table[file_name].astype('str')
    return joined.where(table[path_name].notna() & table[file_name].notna())
  if path_name is not None or file_name is not None:
    raise JumpDataError(f'{where}: has only one of PathName_{kind}{channel} / '
                        f'FileName_{kind}{channel}')
  return None


def to_local(urls: pd.Series, root: str, where: str, column: str) -> tuple[pd.Series, pd.Series]:
  """(local paths, bucket keys) for URLs of the gallery bucket or local paths ('' when missing)."""
  urls = urls.fillna('').str.strip()
  keys = pd.Series('', index=urls.index, dtype='str')
  for prefix in BUCKET_PREFIXES:
    hit = urls.str.startswith(prefix)
    keys = keys.mask(hit, urls.str.slice(len(prefix)))
  in_bucket = keys != ''
  foreign = urls.str.contains('://', regex=False) & ~in_bucket
  if foreign.any():
    raise JumpDataError(f'{where}: {column} holds {urls[foreign].iloc[0]!r}, which is neither in '
                        f'the cellpainting-gallery bucket nor a local path')
  relative = ~in_bucket & (urls != '') & ~urls.str.startswith('/')
  paths = urls.mask(in_bucket, root.rstrip('/') + '/' + keys)
  paths = paths.mask(relative, root.rstrip('/') + '/' + urls)
  return paths.astype('str'), keys


def site_table(raw: pd.DataFrame, root: str, where: str, defaults: dict[str, str] | None = None
               ) -> pd.DataFrame:
  """Normalises one load_data table (see the module docstring); ``defaults`` fill absent IDs."""
  defaults = defaults or {}
  out = pd.DataFrame(index=raw.index)
  for col in SITE_KEYS:
    if col in raw.columns:
      out[col] = raw[col]
    elif col in defaults:
      out[col] = defaults[col]
    else:
      raise JumpDataError(f'{where} lacks column {col}')
    if out[col].isna().any():
      raise JumpDataError(f'{where}: column {col} has empty values '
                          f'(row {int(out[col].isna().argmax())})')
  out['Metadata_Well'] = normalise_well(out['Metadata_Well'])
  out['Metadata_Site'] = normalise_site(out['Metadata_Site'])
  for kind in IMAGE_KINDS:
    urls = {ch: _urls(raw, kind, ch, where) for ch in CHANNELS}
    absent = [ch for ch, u in urls.items() if u is None]
    if kind == 'Orig' and absent:
      raise JumpDataError(f'{where}: no URL_Orig<Ch> or PathName_Orig<Ch> + FileName_Orig<Ch> '
                          f'columns for channels {absent} '
                          f'(channels are matched by name: {list(CHANNELS)})')
    for ch in CHANNELS:
      if absent:   # no (complete) illumination columns: not an error, illum is optional
        out[path_column(ch, kind)], out[key_column(ch, kind)] = '', ''
      else:
        out[path_column(ch, kind)], out[key_column(ch, kind)] = to_local(
            urls[ch], root, where, f'{kind}{ch}')
  out['load_data'] = where
  return out.reset_index(drop=True)


def read_load_data(file: LoadDataFile, root: str) -> pd.DataFrame:
  """One plate's sites, normalised; Source/Batch/Plate default to the folder names."""
  raw = read_table(file.path)
  defaults = {'Metadata_Source': file.source, 'Metadata_Batch': file.batch,
              'Metadata_Plate': file.plate}
  return site_table(raw, root, file.path, defaults)
