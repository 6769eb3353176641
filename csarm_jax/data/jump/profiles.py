"""Well-level CellProfiler profiles (JUMP ``workspace/profiles``) as a features store.

The wells are those of a site index (the same selection, labels and plates as the image store, as
the paper's ``preprocess/cellprofiler`` does); each plate's profiles come from
``ROOT/cpg0016-jump/<source>/workspace/profiles/<batch>/<plate>/<plate>.parquet``. Features are
the numeric non-``Metadata_`` columns present in every plate; columns with any NaN/inf among the
selected wells, with zero variance (over all wells or within any ``variance_groups`` group, e.g. a
source), or that overflow float32 are dropped, each listed in the report. One store row per well,
``Metadata_Site`` = 'all'; ``row``/``label``/``is_control`` as in the image store.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from csarm_jax.data import store as store_lib
from csarm_jax.data import store_writer
from csarm_jax.data.jump.load_data import DATASET
from csarm_jax.data.jump.tables import JumpDataError, normalise_well, read_table


WELL_KEYS = ('Metadata_Source', 'Metadata_Plate', 'Metadata_Well')
REPORT_KEY = 'profiles_report.json'
WELL_COLUMNS = ('Metadata_Source', 'Metadata_Batch', 'Metadata_Plate', 'Metadata_Well',
                'Metadata_JCP2022', 'Metadata_PlateType', 'Metadata_Plate_ID', 'Metadata_Compound',
                'label', 'is_control')


def profile_path(root: str, source: str, batch: str, plate: str) -> str:
  return os.path.join(root, DATASET, source, 'workspace', 'profiles', batch, plate,
                      f'{plate}.parquet')


def index_wells(index: pd.DataFrame) -> pd.DataFrame:
  """One row per well of a site index, with its labels and IDs."""
  wells = index[list(WELL_COLUMNS)].drop_duplicates(subset=list(WELL_KEYS)).reset_index(drop=True)
  wells['Metadata_Site'] = 'all'
  wells['Metadata_Well_ID'] = wells['Metadata_Plate_ID'] + '_' + wells['Metadata_Well']
  return wells


def _feature_columns(table: pd.DataFrame) -> list[str]:
  return [c for c in table.columns
          if not c.startswith('Metadata_') and pd.api.types.is_numeric_dtype(table[c])
          and not pd.api.types.is_bool_dtype(table[c])]


def read_plate_profiles(root: str, wells: pd.DataFrame,
                        progress: Callable[[Iterable], Iterable] = lambda x: x
                        ) -> tuple[list[pd.DataFrame], dict[str, Any]]:
  """Each plate's profiles of the selected wells (keys normalised, duplicates dropped); a report."""
  report: dict[str, Any] = {'plates_without_profiles': [], 'duplicate_profile_rows': 0}
  plates = wells.groupby(['Metadata_Source', 'Metadata_Batch', 'Metadata_Plate'], sort=False)
  tables = []
  for (source, batch, plate), plate_wells in progress(list(plates['Metadata_Well'])):
    path = profile_path(root, source, batch, plate)
    if not os.path.isfile(path):
      report['plates_without_profiles'].append(path)
      continue
    table = read_table(path)
    if 'Metadata_Well' not in table.columns:
      raise JumpDataError(f'{path} lacks column Metadata_Well')
    table['Metadata_Source'], table['Metadata_Plate'] = source, plate   # the folder says which
    table['Metadata_Well'] = normalise_well(table['Metadata_Well'])
    duplicated = table.duplicated(subset=list(WELL_KEYS))
    report['duplicate_profile_rows'] += int(duplicated.sum())
    tables.append(table[~duplicated & table['Metadata_Well'].isin(set(plate_wells))])
  return tables, report


def _zero_variance(features: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
  """Columns constant over all rows, or over the rows of any group with at least two rows."""
  constant = np.ptp(features, axis=0) == 0
  for rows in groups:
    if rows.sum() >= 2:
      constant |= np.ptp(features[rows], axis=0) == 0
  return constant


def build_profiles(index: pd.DataFrame, root: str,
                   variance_groups: Sequence[str] = ('Metadata_Source',),
                   progress: Callable[[Iterable], Iterable] = lambda x: x
                   ) -> tuple[pd.DataFrame, np.ndarray, list[str], dict[str, Any]]:
  """(well table, float32 features, feature names, report) for the wells of a site index."""
  wells = index_wells(index)
  tables, report = read_plate_profiles(root, wells, progress)
  if not tables:
    raise JumpDataError(f'no profiles found for the {len(wells)} wells of the index under {root} '
                        f'(expected e.g. {report["plates_without_profiles"][0]})')
  per_plate = [_feature_columns(t) for t in tables]
  everywhere = set.intersection(*map(set, per_plate))
  common = [c for c in per_plate[0] if c in everywhere]          # in the first plate's order
  report['columns_not_in_every_plate'] = sorted(set().union(*map(set, per_plate)) - everywhere)
  profiles = pd.concat([t[list(WELL_KEYS) + common] for t in tables], ignore_index=True)
  merged = wells.merge(profiles, how='left', on=list(WELL_KEYS), indicator=True)
  missing = merged['_merge'] == 'left_only'
  report['wells_without_profiles'] = merged.loc[missing, 'Metadata_Well_ID'].tolist()
  merged = merged[~missing].reset_index(drop=True)

  values = merged[common].to_numpy(np.float64)
  with np.errstate(over='ignore'):
    non_finite = ~np.isfinite(values).all(axis=0)
    overflow = ~non_finite & ~np.isfinite(values.astype(np.float32)).all(axis=0)
  groups = [(merged[col] == g).to_numpy() for col in variance_groups for g in merged[col].unique()]
  zero_var = ~non_finite & ~overflow & _zero_variance(np.nan_to_num(values), groups)
  names = np.asarray(common, dtype=object)
  report['nan_or_inf_columns'] = names[non_finite].tolist()
  report['float32_overflow_columns'] = names[overflow].tolist()
  report['zero_variance_columns'] = names[zero_var].tolist()
  keep = ~(non_finite | overflow | zero_var)
  features = values[:, keep].astype(np.float32)
  report.update(wells=len(merged), features=int(keep.sum()),
                variance_groups=list(variance_groups))
  table = merged[list(WELL_COLUMNS) + ['Metadata_Site', 'Metadata_Well_ID']].copy()
  table['is_control'] = table['is_control'].astype(bool)
  table['label'] = table['label'].astype(np.int64)
  table['row'] = np.arange(len(table), dtype=np.int64)
  return table, features, names[keep].tolist(), report


def report_line(report: dict[str, Any]) -> str:
  return (f"profiles: {report['wells']} wells x {report['features']} features; dropped columns: "
          f"{len(report['nan_or_inf_columns'])} NaN/inf, {len(report['zero_variance_columns'])} "
          f"zero-variance, {len(report['float32_overflow_columns'])} float32 overflow, "
          f"{len(report['columns_not_in_every_plate'])} not in every plate; "
          f"{len(report['wells_without_profiles'])} wells and "
          f"{len(report['plates_without_profiles'])} plates without profiles; "
          f"{report['duplicate_profile_rows']} duplicate rows")


def write_feature_store(out: str, table: pd.DataFrame, features: np.ndarray, names: Sequence[str],
                        info: dict[str, Any], report: dict[str, Any], created_by: dict[str, Any],
                        shard_items: int = 4096, overwrite: bool = False) -> None:
  """Writes the features store (array, report, table, manifest last)."""
  if len(table) == 0:
    raise JumpDataError('no well has a profile: nothing to write')
  try:
    store_writer.write_feature_store(
        out, table, features, names, [tuple(c) for c in info['classes']], info['control_id'],
        created_by, shard_items=shard_items, delete_existing=overwrite,
        extra_files={REPORT_KEY: json.dumps(report, indent=1).encode()})
  except store_lib.StoreError:       # the table or manifest at fault: its own message
    raise
  except ValueError as e:            # tensorstore: a store already at ``out``
    raise JumpDataError(f'cannot create the store at {out} (pass --overwrite to replace one): '
                        f'{e}') from None
