"""Plates that cannot form a context and images holding NaN or inf: found at start-up, skipped and
counted (or refused) in training, validation, final evaluation and prediction; never scored."""
import json
import math
import os

import numpy as np
import pytest

from csarm_jax import data, inference
from csarm_jax.data import normalization, open_store, plate_check
from csarm_jax.data.contexts import ContextError
from csarm_jax.training import loop
from run_fixture import tiny_config
from store_fixture import write_store

SOURCES = ('source_1', 'source_2', 'source_3')


def damaged_store(path, keep=None, nonfinite=(), **kwargs):
  """A run-sized store whose table keeps only rows where ``keep(table)`` holds, and whose items at
  ``nonfinite`` rows ({row: value}) hold NaN or inf in feature 0."""
  kwargs = {'sources': SOURCES, 'batches_per_source': 2, 'plates_per_batch': 2,
            'perturbed_per_plate': 8, 'controls_per_plate': 6, 'item_shape': (12, 12, 5), **kwargs}
  table, _ = write_store(path, **kwargs)
  array = data.open_array(str(path), write=True)
  for row, value in dict(nonfinite).items():
    item = array[row].read().result()
    item[..., 0] = value
    array[row].write(item).result()
  if keep is not None:
    kept = table[keep(table)].reset_index(drop=True)
    store = open_store(str(path))
    manifest = {**store.manifest, 'num_unused_rows': len(table) - len(kept)}
    data.write_metadata(str(path), kept, manifest)
  return str(path), table


def _bad_plates(t):
  """source_1_B0_P0 without controls, source_1_B0_P1 without perturbed images, source_1_B1_P0
  reduced to one image, source_2_B0_P0 without perturbed images."""
  p = t['Metadata_Plate']
  return ~(((p == 'source_1_B0_P0') & t['is_control']) |
           (p.isin(['source_1_B0_P1', 'source_2_B0_P0']) & ~t['is_control']) |
           ((p == 'source_1_B1_P0') & (t.groupby('Metadata_Plate').cumcount() > 0)))


def test_check_parts_skips_and_counts_plates_that_cannot_form_a_context(tmp_path):
  path, _ = damaged_store(tmp_path, keep=_bad_plates)
  store = open_store(path)
  test = ['source_1_B0_P0', 'source_1_B0_P1', 'source_1_B1_P0', 'source_1_B1_P1']
  checked = plate_check.check_parts(store, {'test': (test, True), 'train': (['source_2_B0_P1'],
                                                                            False)})
  assert checked.parts == {'test': ('source_1_B1_P1',), 'train': ('source_2_B0_P1',)}
  reasons = checked.report['skipped_plates']['test']
  assert sorted(reasons) == test[:3] and 'no control' in reasons['source_1_B0_P0']
  assert 'no perturbed' in reasons['source_1_B0_P1']
  assert checked.report['num_skipped_plates'] == 3
  assert set(checked.store.table['Metadata_Plate']) >= {'source_1_B1_P1', 'source_2_B0_P1'}
  # without controls required (ARM-BN's test rule), the control-less plates are usable
  relaxed = plate_check.check_parts(store, {'test': (test, False)})
  assert relaxed.parts['test'] == ('source_1_B0_P0', 'source_1_B1_P0', 'source_1_B1_P1')
  with pytest.raises(ContextError, match='plate source_1_B0_P0 of the test part cannot form a '
                                         'context: no control images .*; HINT'):
    plate_check.check_parts(store, {'test': (test, True)}, skip_bad=False, hint='HINT')
  with pytest.raises(ContextError, match='no plate of the test part can form a context'):
    plate_check.check_parts(store, {'test': (test[:3], True)})


def test_nonfinite_rows_are_found_skipped_and_named(tmp_path):
  path, table = damaged_store(tmp_path, item_shape=(6,), dtype='float32',
                              nonfinite={3: np.inf, 10: np.nan})     # a perturbed row, a control
  store = open_store(path)
  plates = sorted(table['Metadata_Plate'].unique())
  rows, channel = plate_check.nonfinite_rows(store, table['row'])
  assert rows.tolist() == [3, 10] and channel.tolist() == [0, 0]
  checked = plate_check.check_parts(store, {'test': (plates, True)})
  assert checked.report['nonfinite_rows'] == {'source_1_B0_P0': 2}
  assert checked.report['num_skipped_rows'] == 2
  assert not checked.store.table['row'].isin([3, 10]).any()
  assert len(checked.store.table) == len(table) - 2 and len(store.table) == len(table)
  with pytest.raises(ContextError, match=r'plate source_1_B0_P0: row 3 \(well D01\) holds NaN or '
                                         r'inf in f0 \(2 such rows\)'):
    plate_check.check_parts(store, {'test': (plates, True)}, skip_bad=False)
  # Integer images cannot hold NaN: nothing is read.
  ints = open_store(damaged_store(tmp_path / 'ints')[0])
  assert plate_check.nonfinite_rows(ints, ints.table['row'])[0].size == 0


def test_normalisation_names_a_nonfinite_channel_as_such(tmp_path):
  path, table = damaged_store(tmp_path, item_shape=(6,), dtype='float32', nonfinite={3: np.nan})
  with pytest.raises(ValueError, match='channel f0 holds NaN or inf'):
    normalization.compute_normalization(open_store(path), table['row'])


def test_a_run_skips_bad_plates_everywhere_and_reports_them(tmp_path):
  path, _ = damaged_store(tmp_path / 'store', keep=_bad_plates)
  config = tiny_config(path)
  results = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  skipped = results['skipped']
  assert sorted(skipped['skipped_plates']['test']) == [
      'source_1_B0_P0', 'source_1_B0_P1', 'source_1_B1_P0']
  assert skipped['num_skipped_plates'] == 4          # and source_2_B0_P0 in its part
  assert results['evaluations']['test.chunks']['num_images'] == 8    # source_1_B1_P1 only
  saved = json.load(open(tmp_path / 'run' / 'results.json'))
  assert saved['skipped'] == skipped
  member = inference.load(inference.export(str(tmp_path / 'run'), str(tmp_path / 'export')))
  images, _, report = inference.predict_plates([member], open_store(path), contexts_per_step=4)
  assert sorted(report['skipped_plates']['predict']) == [
      'source_1_B0_P0', 'source_1_B0_P1', 'source_1_B1_P0', 'source_2_B0_P0']
  assert 'source_1_B1_P1' in set(images['Metadata_Plate'])
  with pytest.raises(ValueError, match='contexts_per_step must be >= 1, got 0'):
    inference.predict_plates([member], open_store(path), contexts_per_step=0)
  config.data.skip_bad_plates = False               # refused at start, before any work
  with pytest.raises(ContextError, match='cannot form a context.*skip_bad_plates=true'):
    loop.train_and_evaluate(config, str(tmp_path / 'refused'))
  assert not os.path.exists(tmp_path / 'refused')


def test_a_feature_run_never_scores_nonfinite_rows(tmp_path):
  # inf in a test perturbed row, NaN in a test control and in a training feature.
  path, table = damaged_store(tmp_path / 'store', item_shape=(6,), dtype='float32',
                              nonfinite={3: np.inf, 10: np.nan, 145: np.nan})
  config = tiny_config(path)
  config.model.name, config.model.options = 'mlp', {'hidden': 8, 'num_layers': 1}
  results = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['skipped']['nonfinite_rows'] == {
      'source_1_B0_P0': 2, table.loc[145, 'Metadata_Plate']: 1}
  test = results['evaluations']['test.chunks']
  assert test['num_images'] == 4 * 8 - 1 and math.isfinite(test['mean_entropy'])
  text = open(tmp_path / 'run' / 'eval' / 'test.chunks.metrics.json').read()
  assert 'NaN' not in text and 'Infinity' not in text
  member = inference.load(inference.export(str(tmp_path / 'run'), str(tmp_path / 'export')))
  images, _, report = inference.predict_plates([member], open_store(path))
  assert report['num_skipped_rows'] == 3 and not images['row'].isin([3, 10, 145]).any()
  assert np.isfinite(images.filter(like='prob_').to_numpy()).all()
