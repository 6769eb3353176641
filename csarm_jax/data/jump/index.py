"""The site index: which JUMP sites to convert, with labels, local paths and bucket keys.

``build_index`` reads every load_data file of the selected sources and applies ``Selection`` (by
default the paper's: sources 3 and 8, COMPOUND plates, source_3 batches CP_33..CP_36 out, the 8
positive controls as classes, DMSO as controls, (compound, well) positions with <= 36 images per
source dropped). Every row it drops is counted in the report under the step that dropped it.

The index is a Parquet file, one row per site, ordered by (source, batch, plate, well, site): the
store's ``Metadata_*`` columns (strings), ``Metadata_Plate_ID`` (``source_batch_plate``, the
domain), ``Metadata_Sample_ID``, ``Metadata_Compound``, ``label`` (class position, -1 for
controls), ``is_control``, and per channel ``path_<Ch>``/``key_<Ch>`` (+
``illum_path_<Ch>``/``illum_key_<Ch>``).
Its Parquet key-value metadata (``INFO_KEY``) holds the classes, control id, selection and report.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from csarm_jax.data.constants import CHANNELS, CONTROL_ID, POSITIVE_CONTROLS
from csarm_jax.data.jump.load_data import (IMAGE_KINDS, SITE_KEYS, find_load_data, key_column,
                                           path_column, read_load_data)
from csarm_jax.data.jump.metadata import Metadata
from csarm_jax.data.jump.tables import JumpDataError, natural_site_order

log = logging.getLogger(__name__)
INFO_KEY = b'csarm_jax.jump_index'
PAPER_EXCLUDED_BATCHES = ('CP_33_all_Phenix1', 'CP_34_mix_Phenix1', 'CP_35_all_Phenix1',
                          'CP_36_all_Phenix1')


@dataclass(frozen=True)
class Selection:
  """Which sites to keep; the defaults reproduce the paper's subset of cpg0016."""
  sources: tuple[str, ...] = ('source_3', 'source_8')
  plate_types: tuple[str, ...] = ('COMPOUND',)
  exclude_batches: tuple[str, ...] = PAPER_EXCLUDED_BATCHES
  classes: tuple[str, ...] = tuple(jcp for jcp, _ in POSITIVE_CONTROLS)   # label order
  control_id: str = CONTROL_ID
  # (class compound, well) positions with at most this many images in a source are dropped, as the
  # paper does to remove layout oddities; 0 keeps all. Controls are not filtered (as the paper).
  max_rare_position_images: int = 36


def _file_columns() -> list[str]:
  return [f(ch, kind) for kind in IMAGE_KINDS for ch in CHANNELS for f in (path_column, key_column)]


def _drop(table: pd.DataFrame, keep: pd.Series, report: dict[str, Any], step: str) -> pd.DataFrame:
  report[step] = report.get(step, 0) + int((~keep).sum())
  return table[keep]


def _filter_plate_sites(sites: pd.DataFrame, metadata: Metadata, selection: Selection,
                        report: dict[str, Any]) -> pd.DataFrame:
  """The selection steps that need one plate's rows only (so plates can be filtered as read)."""
  report['site_rows'] = report.get('site_rows', 0) + len(sites)
  sites = _drop(sites, sites['Metadata_Source'].isin(selection.sources), report, 'other_source')
  # Duplicate site rows (monorepo#45): keep the first; count those that even disagree on files.
  duplicated = sites.duplicated(subset=list(SITE_KEYS), keep='first')
  fully = sites.duplicated(subset=list(SITE_KEYS) + _file_columns(), keep='first')
  report['conflicting_duplicate_site_rows'] = (report.get('conflicting_duplicate_site_rows', 0)
                                               + int((duplicated & ~fully).sum()))
  sites = _drop(sites, ~duplicated, report, 'duplicate_site_rows')
  sites = sites.merge(metadata.plate.drop(columns='Metadata_Batch'), how='left',
                      on=['Metadata_Source', 'Metadata_Plate'])
  sites = _drop(sites, sites['Metadata_PlateType'].notna(), report, 'plate_not_in_plate_table')
  sites = _drop(sites, sites['Metadata_PlateType'].isin(selection.plate_types), report,
                'plate_type_not_selected')
  sites = _drop(sites, ~sites['Metadata_Batch'].isin(selection.exclude_batches), report,
                'batch_excluded')
  sites = sites.merge(metadata.well, how='left',
                      on=['Metadata_Source', 'Metadata_Plate', 'Metadata_Well'])
  sites = _drop(sites, sites['Metadata_JCP2022'].notna(), report, 'well_not_in_well_table')
  keep = sites['Metadata_JCP2022'].isin(selection.classes + (selection.control_id,))
  return _drop(sites, keep, report, 'other_compound')


def _finish_index(sites: pd.DataFrame, metadata: Metadata, selection: Selection,
                  report: dict[str, Any]) -> pd.DataFrame:
  """The source-wide position filter, then IDs, names, labels and the row order."""
  if selection.max_rare_position_images > 0:
    position = ['Metadata_Source', 'Metadata_JCP2022', 'Metadata_Well']
    count = sites.groupby(position)['Metadata_Site'].transform('size')
    rare = (sites['Metadata_JCP2022'].isin(selection.classes)
            & (count <= selection.max_rare_position_images))
    sites = _drop(sites, ~rare, report, 'rare_position')
  index = sites.copy()
  plate_id = (index['Metadata_Source'] + '_' + index['Metadata_Batch'] + '_'
              + index['Metadata_Plate'])
  index['Metadata_Plate_ID'] = plate_id
  index['Metadata_Sample_ID'] = (plate_id + '_' + index['Metadata_Well'] + '_'
                                 + index['Metadata_Site'])
  names = metadata.compound_names()
  index['Metadata_Compound'] = (index['Metadata_JCP2022'].map(lambda j: names.get(j, j))
                                .astype('str'))
  label_of = {jcp: i for i, jcp in enumerate(selection.classes)}
  index['label'] = index['Metadata_JCP2022'].map(lambda j: label_of.get(j, -1)).astype('int64')
  index['is_control'] = (index['Metadata_JCP2022'] == selection.control_id).to_numpy()
  index = index.sort_values(list(SITE_KEYS), key=lambda c: natural_site_order(c)
                            if c.name == 'Metadata_Site' else c, kind='stable')
  columns = list(SITE_KEYS) + ['Metadata_JCP2022', 'Metadata_PlateType', 'Metadata_Plate_ID',
                               'Metadata_Sample_ID', 'Metadata_Compound', 'label', 'is_control']
  index = index[columns + _file_columns() + ['load_data']].reset_index(drop=True)

  report['selected_sites'] = len(index)
  report['selected_plates'] = int(index['Metadata_Plate_ID'].nunique())
  report['sites_per_class'] = {jcp: int((index['Metadata_JCP2022'] == jcp).sum())
                               for jcp in selection.classes}
  report['control_sites'] = int(index['is_control'].sum())
  report['sites_with_illum'] = int((index[path_column(CHANNELS[0], 'Illum')] != '').sum())
  return index


def select_sites(sites: pd.DataFrame, metadata: Metadata, selection: Selection
                 ) -> tuple[pd.DataFrame, dict[str, Any]]:
  """Applies ``selection`` to normalised load_data rows; returns (index, report of counts)."""
  report: dict[str, Any] = {}
  sites = _filter_plate_sites(sites, metadata, selection, report)
  return _finish_index(sites, metadata, selection, report), report


def build_index(root: str, metadata: Metadata, selection: Selection = Selection(),
                progress: Callable[[Iterable], Iterable] = lambda x: x
                ) -> tuple[pd.DataFrame, dict[str, Any]]:
  """Reads the selected sources' load_data files under the mirror ``root`` and selects sites.

  Plates are filtered as they are read, so memory holds the selected sites, not all of cpg0016.
  """
  files, empty = find_load_data(root, selection.sources)
  if not files:
    raise JumpDataError(f'no load_data files for {list(selection.sources)} under {root}')
  for folder in empty:
    log.warning('no load_data file in %s', folder)
  report: dict[str, Any] = {'load_data_files': len(files),
                            'plate_folders_without_load_data': len(empty),
                            'well_table_rows_without_ids': metadata.well_rows_without_ids}
  kept = [_filter_plate_sites(read_load_data(f, root), metadata, selection, report)
          for f in progress(files)]
  return _finish_index(pd.concat(kept, ignore_index=True), metadata, selection, report), report


def classes_with_names(selection: Selection, metadata: Metadata) -> list[tuple[str, str]]:
  names = metadata.compound_names()
  return [(jcp, names.get(jcp, jcp)) for jcp in selection.classes]


def write_index(path: str, index: pd.DataFrame, info: dict[str, Any]) -> None:
  """Writes the index Parquet with ``info`` (classes, control_id, selection, report) inside."""
  table = pa.Table.from_pandas(index, preserve_index=False)
  meta = dict(table.schema.metadata or {})
  meta[INFO_KEY] = json.dumps(info, sort_keys=True).encode()
  pq.write_table(table.replace_schema_metadata(meta), path)


def read_index(path: str) -> tuple[pd.DataFrame, dict[str, Any]]:
  """(index table, info) from a file written by ``write_index``."""
  try:
    table = pq.read_table(path)
  except (OSError, pa.ArrowInvalid) as e:
    raise JumpDataError(f'{path} is not a readable index Parquet file: {e}') from None
  raw = (table.schema.metadata or {}).get(INFO_KEY)
  if raw is None:
    raise JumpDataError(f'{path} is not a JUMP site index (written by data_prep/jump_index.py)')
  return table.to_pandas(), json.loads(raw)


def make_info(selection: Selection, metadata: Metadata, report: dict[str, Any], root: str
              ) -> dict[str, Any]:
  return {'classes': [list(c) for c in classes_with_names(selection, metadata)],
          'control_id': selection.control_id, 'selection': dataclasses.asdict(selection),
          'report': report, 'root': root}


def object_keys(index: pd.DataFrame) -> list[str]:
  """Sorted bucket keys of every image and illumination file the index needs."""
  keys = set()
  for kind in IMAGE_KINDS:
    for ch in CHANNELS:
      keys.update(index[key_column(ch, kind)])
  keys.discard('')
  return sorted(keys)
