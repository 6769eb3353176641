"""Reading JUMP tables (CSV, gzipped CSV, Parquet) with every ``Metadata_*`` column as a string.

JUMP IDs look numeric in places (source_2 plates are all digits, sites are numbers); read as numbers
they lose leading zeros or become floats and joins fail silently. Everything here keeps them
strings.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
import pandas as pd

TABLE_SUFFIXES = ('.parquet', '.csv.gz', '.csv')   # preference order when twins exist
_WELL = re.compile(r'^([A-Za-z]+)0*(\d+)$')


class JumpDataError(ValueError):
  """Bad JUMP input; the message names the file, plate or column at fault."""


def find_table(directory: str, stem: str) -> str | None:
  """``directory/stem`` with the first suffix of TABLE_SUFFIXES that exists, else None."""
  for suffix in TABLE_SUFFIXES:
    path = os.path.join(directory, stem + suffix)
    if os.path.isfile(path):
      return path
  return None


def as_str(column: pd.Series) -> pd.Series:
  """A column as strings; missing values stay missing, integral floats lose their '.0'."""
  if pd.api.types.is_float_dtype(column) and (np.mod(column.dropna(), 1) == 0).all():
    column = column.astype('Int64')
  return column.astype('str').where(column.notna())    # pandas 2 would write NaN as 'nan'


def read_table(path: str) -> pd.DataFrame:
  """Reads a .csv, .csv.gz or .parquet file; ``Metadata_*`` columns come back as strings."""
  if not path.endswith(TABLE_SUFFIXES):
    raise JumpDataError(f'{path}: expected one of {TABLE_SUFFIXES}')
  if not os.path.isfile(path):
    raise JumpDataError(f'{path} does not exist')
  try:
    if path.endswith('.parquet'):
      table = pd.read_parquet(path)
    else:
      header = pd.read_csv(path, nrows=0).columns
      table = pd.read_csv(path, low_memory=False,
                          dtype={c: str for c in header if c.startswith('Metadata_')})
  except (OSError, ValueError, EOFError) as e:   # pandas/pyarrow parse errors are ValueErrors
    raise JumpDataError(f'{path} is not a readable table: {e}') from None
  for col in table.columns:
    if col.startswith('Metadata_'):
      table[col] = as_str(table[col])
  return table


def require_columns(table: pd.DataFrame, columns: Sequence[str], where: str) -> None:
  missing = [c for c in columns if c not in table.columns]
  if missing:
    raise JumpDataError(f'{where} lacks columns {missing} (has {list(table.columns)[:12]}...)')


def normalise_well(wells: pd.Series) -> pd.Series:
  """'a1', 'A1' and 'A001' become 'A01' (JUMP's zero-padded form); anything else is kept."""
  def one(well):
    if not isinstance(well, str):
      return well
    match = _WELL.match(well.strip())
    return f'{match[1].upper()}{int(match[2]):02d}' if match else well.strip()
  return wells.map(one)


def normalise_site(sites: pd.Series) -> pd.Series:
  """'01' and '1' become '1'; non-numeric site names are kept."""
  return sites.map(lambda s: str(int(s)) if isinstance(s, str) and s.strip().isdigit() else s)


def natural_site_order(sites: pd.Series) -> pd.Series:
  """A sort key that orders sites 1, 2, ..., 10 rather than 1, 10, 2."""
  return sites.map(lambda s: (0, int(s), '') if str(s).isdigit() else (1, 0, str(s)))
