"""A small random image store for tests: `write_store(path, ...)` -> (table, images)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from csarm_jax import data


def write_store(path, sources=('source_1', 'source_2'), batches_per_source=2, plates_per_batch=2,
                perturbed_per_plate=12, controls_per_plate=8, item_shape=(20, 20, 5), dtype='uint8',
                shard_items=16, seed=0, compression='lz4hc', tile=None):
  """Writes a store with every plate holding `perturbed_per_plate` labelled images (classes in
  turn) and `controls_per_plate` DMSO images; returns the table and the images in row order."""
  rng = np.random.default_rng(seed)
  rows = []
  for s in sources:
    for b in range(batches_per_source):
      for p in range(plates_per_batch):
        plate = f'{s}_B{b}_P{p}'
        for i in range(perturbed_per_plate + controls_per_plate):
          control = i >= perturbed_per_plate
          label = -1 if control else i % len(data.POSITIVE_CONTROLS)
          rows.append({'Metadata_Source': s, 'Metadata_Batch': f'{s}_B{b}', 'Metadata_Plate': plate,
                       'Metadata_Well': f'{"ABCDEFGHIJKLMNOP"[i % 16]}{i // 16 + 1:02d}',
                       'Metadata_Site': '1',
                       'Metadata_JCP2022': (data.CONTROL_ID if control
                                            else data.POSITIVE_CONTROLS[label][0]),
                       'Metadata_PlateType': 'COMPOUND', 'is_control': control, 'label': label})
  table = pd.DataFrame(rows)
  table['row'] = np.arange(len(table))
  if dtype == 'float32':
    items = rng.normal(size=(len(table), *item_shape)).astype(np.float32)
  else:
    items = rng.integers(0, np.iinfo(dtype).max, size=(len(table), *item_shape), dtype=dtype)
  array = data.create_array(str(path), len(table), item_shape, dtype, shard_items=shard_items,
                            compression=compression, tile=tile)
  for start in range(0, len(table), shard_items):
    stop = min(start + shard_items, len(table))         # tensorstore does not clamp slices
    array[start:stop].write(items[start:stop]).result()
  channels = data.CHANNELS if len(item_shape) == 3 else [f'f{i}' for i in range(item_shape[0])]
  manifest = data.make_manifest(channels, dtype, item_shape, len(table), data.POSITIVE_CONTROLS,
                                data.CONTROL_ID, {'tool': 'tests/store_fixture.py', 'seed': seed})
  data.write_metadata(str(path), table, manifest)
  return table, items
