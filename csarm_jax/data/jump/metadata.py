"""The JUMP metadata tables (github.com/jump-cellpainting/datasets, ``metadata/``), read as strings.

``plate`` (Source, Batch, Plate, PlateType) and ``well`` (Source, Plate, Well, JCP2022) are
required; ``compound`` and ``perturbation_control`` (JCP2022, pert_type, Name) are optional and
only give names. Each may be ``.csv``, ``.csv.gz`` or ``.parquet``.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from csarm_jax.data.constants import CONTROL_ID, CONTROL_NAME, POSITIVE_CONTROLS
from csarm_jax.data.jump.tables import (JumpDataError, find_table, normalise_well, read_table,
                                        require_columns)

REQUIRED = {
    'plate': ('Metadata_Source', 'Metadata_Batch', 'Metadata_Plate', 'Metadata_PlateType'),
    'well': ('Metadata_Source', 'Metadata_Plate', 'Metadata_Well', 'Metadata_JCP2022'),
}
OPTIONAL = {
    'compound': ('Metadata_JCP2022',),
    'perturbation_control': ('Metadata_JCP2022', 'Metadata_Name'),
}


@dataclass(frozen=True)
class Metadata:
  plate: pd.DataFrame
  well: pd.DataFrame
  well_rows_without_ids: int = 0          # well-table rows dropped for a missing plate or well ID
  compound: pd.DataFrame | None = None
  perturbation_control: pd.DataFrame | None = None

  def compound_names(self) -> dict[str, str]:
    """JCP2022 id -> name, from perturbation_control, falling back to the built-in control names."""
    names = dict(POSITIVE_CONTROLS)
    names[CONTROL_ID] = CONTROL_NAME
    if self.perturbation_control is not None:
      pc = self.perturbation_control.dropna(subset=['Metadata_JCP2022', 'Metadata_Name'])
      names.update(zip(pc['Metadata_JCP2022'], pc['Metadata_Name']))
    return names


def _unique(table: pd.DataFrame, keys: list[str], where: str) -> pd.DataFrame:
  """Drops exact duplicate rows; raises if two rows give one key different values."""
  table = table.drop_duplicates()
  clash = table.duplicated(subset=keys, keep=False)
  if clash.any():
    row = table[clash].iloc[0]
    raise JumpDataError(f'{where}: {dict(row[keys])} appears with different values')
  return table.reset_index(drop=True)


def read_metadata(directory: str) -> Metadata:
  """Reads ``plate``, ``well`` and (if present) ``compound`` and ``perturbation_control``."""
  tables = {}
  for name, columns in {**REQUIRED, **OPTIONAL}.items():
    path = find_table(directory, name)
    if path is None:
      if name in REQUIRED:
        raise JumpDataError(f'{directory} has no {name}.csv, {name}.csv.gz or {name}.parquet '
                            f'(--metadata is the datasets repo\'s metadata/ folder)')
      continue
    table = read_table(path)
    require_columns(table, columns, path)
    tables[name] = table
  for col in REQUIRED['plate']:
    if tables['plate'][col].isna().any():
      raise JumpDataError(f'plate table: column {col} has empty values')
  tables['plate'] = _unique(tables['plate'][list(REQUIRED['plate'])],
                            ['Metadata_Source', 'Metadata_Plate'], 'plate table')
  well = tables['well'][list(REQUIRED['well'])]
  unusable = well[['Metadata_Plate', 'Metadata_Well']].isna().any(axis=1)
  if unusable.any():      # no plate or well ID: such a row cannot describe any image
    tables['well_rows_without_ids'] = int(unusable.sum())
    well = well[~unusable]
  well = well.assign(Metadata_Well=normalise_well(well['Metadata_Well']))
  tables['well'] = _unique(well, ['Metadata_Source', 'Metadata_Plate', 'Metadata_Well'],
                           'well table')
  return Metadata(**tables)
