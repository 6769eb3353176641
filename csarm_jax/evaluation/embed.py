"""A trained model's penultimate features of every image of a store, written as a feature store.

    table, features, report = embed(model, variables, method, norm, rule, store)
    write_embeddings(out, model, variables, method, norm, rule, store, source='runs/erm')

Every image of the plates, controls included, gets one embedding under the method's test-time
rule applied to its whole plate (``protocol.whole_plate_predictions``): running averages (ERM), or
the statistics of the plate's images, with its controls for the methods that use them, streamed
exactly. The feature store holds the image store's table rows, renumbered 0..N-1 (``image_row``:
the row in the image store), their float32 features and the manifest, written last: the store
format's features kind, in which embeddings computed elsewhere can be written too.
"""
from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Sequence

import numpy as np
import pandas as pd

from csarm_jax import parallel
from csarm_jax.data import plate_check, store_writer
from csarm_jax.evaluation import protocol


def embed(model, variables, method, norm, rule: protocol.Protocol, store,
          plates: Sequence[str] | None = None, skip_bad: bool = True, chunk_size: int = 256,
          where: str = '') -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
  """(table rows, their penultimate features (N, F) float32, skip report) of every image of
  ``plates`` (default: all); ``variables`` replicated on the default mesh, ``rule`` gives the
  centre crop. ``where`` names the model in errors."""
  if not method.whole_plate:
    raise ValueError(f'{where}: {method.name} has no whole-plate statistics to embed with '
                     f'(test-time adaptation or a context net); embed a run of a BatchNorm method')
  if tuple(norm.channels) != tuple(store.channels):
    raise ValueError(f'{where} was trained on channels {list(norm.channels)}, {store.path} has '
                     f'{store.channels}')
  if store.kind == 'images' and rule.crop_size > min(store.item_shape[:2]):
    raise ValueError(f'{where} takes {rule.crop_size}-pixel crops, the images of {store.path} are '
                     f'{store.item_shape[0]}x{store.item_shape[1]}')
  plates = sorted(store.table['Metadata_Plate'].unique()) if plates is None else list(plates)
  checked = plate_check.check_parts(store, {'predict': (plates, method.eval_controls)},
                                    require_labels=False, skip_bad=skip_bad,
                                    hint='skip_bad=True (embed.py: no --noskip_bad) skips them')
  run = types.SimpleNamespace(store=checked.store, model=model, method=method, norm=norm,
                              mesh=parallel.make_mesh())     # what whole-plate evaluation reads
  rule = dataclasses.replace(rule, require_labels=False, chunk_size=chunk_size)
  frame = protocol.whole_plate_predictions(run, variables, checked.parts['predict'], rule,
                                           with_features=True).sort_values('row')
  features = frame.filter(regex=r'^feature_\d+$').to_numpy(np.float32)
  if not np.isfinite(features).all():
    raise FloatingPointError(f'{where}: features of {store.path} are NaN or inf')
  return frame[list(store.table.columns)].reset_index(drop=True), features, checked.report


def write_embeddings(out: str, model, variables, method, norm, rule: protocol.Protocol, store,
                     source: str, plates: Sequence[str] | None = None, skip_bad: bool = True,
                     overwrite: bool = False) -> dict[str, Any]:
  """Writes ``embed``'s features of ``store`` as a feature store at ``out`` (see the module doc);
  ``source`` (the run or export) is recorded in the manifest. Returns the skip report."""
  table, features, report = embed(model, variables, method, norm, rule, store, plates, skip_bad,
                                  where=source)
  table = table.assign(image_row=table['row'], row=np.arange(len(table)))
  array = store_writer.create_array(out, len(table), (features.shape[1],), 'float32',
                                    shard_items=4096, delete_existing=overwrite)
  array.write(features).result()
  created_by = {'tool': 'csarm_jax.evaluation.embed', 'model': os.path.abspath(source),
                'method': method.name, 'images': store.path, 'statistics': 'whole plate',
                'skipped': report}
  manifest = store_writer.make_manifest(
      [f'feature_{i}' for i in range(features.shape[1])], 'float32', (features.shape[1],),
      len(table), [(c['id'], c['name']) for c in store.manifest['classes']],
      store.manifest['control_id'], created_by)
  store_writer.write_metadata(out, table, manifest)
  return report
