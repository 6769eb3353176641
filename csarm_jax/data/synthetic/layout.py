"""The experiment's hierarchy and IDs: source > batch > plate > 384-well layout > site.

IDs look like JUMP's (each source has its own batch and plate naming style, one of them all-digit
plate IDs), every ID is a string. Positive controls fill columns 01 and 24 (then 02, 23, ... if a
plate holds more than 32 of them), as on JUMP compound plates; DMSO wells are spread over the rest.
"""
from __future__ import annotations

import datetime

import ml_collections
import numpy as np
import pandas as pd

from csarm_jax.data import constants
from csarm_jax.data.synthetic import keys

ROWS, COLS = 'ABCDEFGHIJKLMNOP', 24                     # 384-well plate: A01 .. P24
NUM_CLASSES = len(constants.POSITIVE_CONTROLS)
INDEX_COLUMNS = ('source_index', 'batch_index', 'plate_index', 'well_index', 'site_index')
EXTRA_COLUMNS = ('Metadata_Compound',)                  # besides store.COLUMNS


def well_id(index: int) -> str:
  """Row-major well index 0..383 -> 'A01' .. 'P24'."""
  return f'{ROWS[index // COLS]}{index % COLS + 1:02d}'


def positive_control_wells(count: int) -> list[int]:
  """Well indices for ``count`` positive-control wells: columns 01, 24, 02, 23, ... top to bottom.
  """
  columns = [c for pair in zip(range(COLS // 2), range(COLS - 1, COLS // 2 - 1, -1)) for c in pair]
  return [r * COLS + c for c in columns for r in range(len(ROWS))][:count]


def control_wells(count: int, taken: list[int]) -> list[int]:
  """``count`` DMSO wells spread evenly (row-major) over the wells not ``taken``."""
  free = [w for w in range(len(ROWS) * COLS) if w not in set(taken)]
  if not count:
    return []
  return [free[i] for i in np.linspace(0, len(free) - 1, count).round().astype(int)]


def source_name(s: int) -> str:
  return f'source_{s + 1}'


def batch_name(s: int, b: int) -> str:
  day = datetime.date(2021, 8, 2) + datetime.timedelta(weeks=b + 13 * s)
  return (f'CP_{25 + b}_all_Phenix1',                  # Phenix-like
          f'J{b + 1}',                                  # ImageXpress-like
          f'{day:%Y_%m_%d}_U2OS_48_hr_run{b + 1}',      # CV8000-like
          f'{day:%Y%m%d}_Run{b + 1}')[s % 4]


def plate_name(s: int, b: int, number: int) -> str:
  """``number``: the plate's running index over the whole experiment (keeps plate IDs unique)."""
  day = datetime.date(2021, 8, 2) + datetime.timedelta(weeks=b + 13 * s)
  return (f'BR{121331 + number:08d}', f'A{1170380 + number}', f'Dest{day:%y%m%d}-{160150 + number}',
          f'{1053601756 + number}')[s % 4]


def plate_classes(plan: ml_collections.ConfigDict, seed: int, s: int, b: int, p: int) -> np.ndarray:
  """The class of each positive-control well of a plate (``plan``: config.layout), in
  ``positive_control_wells`` order.

  Balanced plates share their source's layout (each class ``wells_per_class`` times); with
  ``label_shift_alpha > 0`` each plate draws its class mix from Dirichlet(alpha).
  """
  count = NUM_CLASSES * plan.wells_per_class
  if plan.label_shift_alpha > 0:
    rng = keys.rng(seed, keys.LAYOUT, s, b, p)
    mix = rng.dirichlet(np.full(NUM_CLASSES, float(plan.label_shift_alpha)))
    return rng.permutation(np.repeat(np.arange(NUM_CLASSES), rng.multinomial(count, mix)))
  balanced = np.repeat(np.arange(NUM_CLASSES), plan.wells_per_class)
  return keys.rng(seed, keys.LAYOUT, s).permutation(balanced)


def build_table(config: ml_collections.ConfigDict, seed: int) -> pd.DataFrame:
  """One row per image in array order (source, batch, plate, well, site): the store's columns,
  ``EXTRA_COLUMNS`` and the generator's ``INDEX_COLUMNS`` (integers; not written to the store)."""
  lay = config.layout
  poscon = positive_control_wells(NUM_CLASSES * lay.wells_per_class)
  dmso = control_wells(lay.control_wells, poscon)
  wells = np.array(sorted(poscon + dmso))
  sites = np.arange(lay.sites_per_well)
  plates, number = [], 0
  for s in range(lay.num_sources):
    for b in range(lay.batches_per_source):
      for p in range(lay.plates_per_batch):
        label_of_well = dict.fromkeys(dmso, -1)
        label_of_well.update(zip(poscon, plate_classes(lay, seed, s, b, p).tolist()))
        labels = np.array([label_of_well[w] for w in wells])
        plates.append(pd.DataFrame({
            'Metadata_Source': source_name(s), 'Metadata_Batch': batch_name(s, b),
            'Metadata_Plate': plate_name(s, b, number),
            'Metadata_Well': np.repeat([well_id(w) for w in wells], len(sites)),
            'Metadata_Site': np.tile([str(i + 1) for i in sites], len(wells)),
            'label': np.repeat(labels, len(sites)),
            'source_index': s, 'batch_index': b, 'plate_index': p,
            'well_index': np.repeat(wells, len(sites)), 'site_index': np.tile(sites, len(wells))}))
        number += 1
  table = pd.concat(plates, ignore_index=True)
  ids = np.array([constants.CONTROL_ID] + [i for i, _ in constants.POSITIVE_CONTROLS], dtype=object)
  names = np.array([constants.CONTROL_NAME] + [n for _, n in constants.POSITIVE_CONTROLS],
                   dtype=object)
  table['Metadata_JCP2022'] = ids[table['label'] + 1]
  table['Metadata_Compound'] = names[table['label'] + 1]
  table['Metadata_PlateType'] = 'COMPOUND'
  table['is_control'] = table['label'] < 0
  table['row'] = np.arange(len(table), dtype=np.int64)
  table['label'] = table['label'].astype(np.int64)
  return table
