"""The synthetic benchmark: determinism, the store it writes, its layout and its effect structure.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from csarm_jax import data
from csarm_jax.data import store as store_lib
from csarm_jax.data import synthetic
from csarm_jax.data.synthetic import effects, layout, writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**overrides):
  return synthetic.with_overrides(synthetic.preset('tiny'), overrides)


def _contents(path):
  store = data.open_store(str(path))
  return store.read(np.arange(store.manifest['num_items'])), store.table


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp('tiny')
  synthetic.generate(_tiny(), str(path), seed=0, workers=1, progress=False)
  return path


def test_same_seed_same_bytes_with_any_number_of_workers(tiny, tmp_path):
  synthetic.generate(_tiny(), str(tmp_path / 'two'), seed=0, workers=2, progress=False)
  synthetic.generate(_tiny(), str(tmp_path / 'other'), seed=1, workers=1, progress=False)
  images, table = _contents(tiny)
  images_two, table_two = _contents(tmp_path / 'two')
  images_other, _ = _contents(tmp_path / 'other')
  np.testing.assert_array_equal(images_two, images)
  assert table_two.equals(table)
  assert (images_other != images).mean() > 0.5


def test_store_hierarchy_ids_and_layout(tiny):
  config = _tiny()
  store = data.open_store(str(tiny))
  t = store.table
  assert store.item_shape == (32, 32, 5) and store.channels == list(data.CHANNELS)
  assert store.class_ids == [i for i, _ in data.POSITIVE_CONTROLS]
  for col in store_lib.ID_COLUMNS:
    assert t[col].map(type).eq(str).all(), col
  assert (t['Metadata_PlateType'] == 'COMPOUND').all()
  assert t.groupby('Metadata_Source')['Metadata_Batch'].nunique().eq(2).all()
  assert t.groupby('Metadata_Batch')['Metadata_Plate'].nunique().eq(2).all()
  assert t['Metadata_Source'].nunique() == 3
  assert t['Metadata_Well'].str.fullmatch(r'[A-P](0[1-9]|1\d|2[0-4])').all()
  assert t.groupby(['Metadata_Plate', 'Metadata_Well'])['Metadata_Site'].nunique().eq(2).all()
  poscon = t[~t['is_control']]
  assert poscon['Metadata_Well'].str[1:].isin(['01', '24']).all()        # JUMP control columns
  for plate, g in t.groupby('Metadata_Plate'):
    assert (g['Metadata_JCP2022'] == data.CONTROL_ID).sum() == 4 * 2, plate  # control_wells x sites
    counts = g.loc[g['label'] >= 0, 'label'].value_counts()
    assert sorted(counts.index) == list(range(8)) and counts.eq(1 * 2).all(), plate   # balanced
  names = dict(data.POSITIVE_CONTROLS)
  assert (poscon['Metadata_Compound'] == poscon['Metadata_JCP2022'].map(names)).all()
  made_by = store.manifest['created_by']
  assert made_by['tool'] == writer.TOOL and made_by['preset'] == 'tiny'
  assert made_by['seed'] == 0 and made_by['config'] == config.to_dict() and made_by['version']


def test_wells_are_jump_style():
  assert layout.well_id(0) == 'A01' and layout.well_id(383) == 'P24' and layout.well_id(24) == 'B01'
  spill = [layout.well_id(w) for w in layout.positive_control_wells(34)][15:]
  assert spill == ['P01', 'A24', 'B24'] + [f'{r}24' for r in 'CDEFGHIJKLMNOP'] + ['A02', 'B02']
  taken = layout.positive_control_wells(32)
  dmso = layout.control_wells(64, taken)
  assert len(set(dmso)) == 64 and not set(dmso) & set(taken)


def test_class_changes_cells_only_never_the_acquisition():
  """Same row, same plate: a DMSO and a treated image are identical when phenotypes are off."""
  args = dict(seed=0, row=5, source=1, batch=0, plate=1, well=30, site=1)
  off, on = _tiny(**{'cells.phenotype_strength': 0.0}), _tiny()
  for label in range(8):
    np.testing.assert_array_equal(synthetic.render_image(off, label=label, **args),
                                  synthetic.render_image(off, label=-1, **args))
  assert all((synthetic.render_image(on, label=label, **args) !=
              synthetic.render_image(on, label=-1, **args)).any() for label in range(8))


def test_acquisition_depends_on_plate_and_vanishes_at_strength_zero():
  config = _tiny()
  a, b = (effects.site_acquisition(config, 0, 0, 0, p, 0) for p in (0, 1))
  assert not np.allclose(a.gain, b.gain) and not np.allclose(a.illumination, b.illumination)
  flat = [effects.site_acquisition(_tiny(**{'effects.strength': 0.0}), 0, s, 1, p, 1)
          for s, p in ((0, 0), (1, 1))]
  for acq in flat:
    np.testing.assert_array_equal(acq.gain, np.ones(5))
    np.testing.assert_array_equal(acq.bleed, np.eye(5))
    assert acq.blur == 0 and (acq.offset == 0).all() and (acq.gamma == 1).all()
    assert (acq.illumination == 1).all() and np.isinf(acq.photons)


def test_controls_vary_more_between_sources_than_between_plates(tmp_path):
  """Per-channel log mean of each plate's DMSO images: sources differ far more than plates."""
  config = _tiny(**{'layout.num_sources': 4, 'layout.sites_per_well': 1, 'cells.per_site': 4.0})
  synthetic.generate(config, str(tmp_path), seed=3, workers=1, progress=False)
  images, t = _contents(tmp_path)
  assert t['Metadata_Plate'].str.isdigit().any()        # the 4th source's all-digit plate IDs ...
  assert t['Metadata_Plate'].map(type).eq(str).all()    # ... stay strings through the store
  controls = t[t['is_control']]
  plate_means = controls.groupby('Metadata_Plate')['row'].apply(
      lambda rows: np.log(images[rows.to_numpy()].mean((0, 1, 2)) + 1.0))
  plate_source = controls.groupby('Metadata_Plate')['Metadata_Source'].first()
  by_source = {s: np.stack(plate_means[plate_source == s]) for s in plate_source.unique()}
  between = np.stack([m.mean(0) for m in by_source.values()]).var(0).mean()
  within = np.mean([m.var(0).mean() for m in by_source.values()])
  assert between > 4 * within, (between, within)


def test_calibrated_is_quickstart_sized_with_batch_shifts_larger_relative_to_lab_shifts():
  quick, calibrated = synthetic.preset('quickstart'), synthetic.preset('calibrated')
  synthetic.validate(calibrated)
  changed = {k for k, v in synthetic.fields(calibrated).items()
             if synthetic.fields(quick)[k] != v}
  assert changed <= {'preset', 'cells.phenotype_strength'} | {f'effects.{f}' for f in (
      'strength', *synthetic.config.LAB_EFFECTS, *synthetic.config.BATCH_EFFECTS)}

  def log_gain_variances(config):
    """(between-lab, between-batch-within-lab) variance of the plates' log gains."""
    gains = np.log([[effects.plate_acquisition(config, 0, s, b, 0).gain for b in range(6)]
                    for s in range(12)])                  # (lab, batch, channel)
    return gains.mean(1).var(0).mean(), gains.var(1).mean()
  (lab_q, batch_q), (lab_c, batch_c) = map(log_gain_variances, (quick, calibrated))
  assert lab_c < lab_q / 4 and batch_c / lab_c > 3 * batch_q / lab_q, (lab_q, batch_q, lab_c,
                                                                         batch_c)


def test_dirichlet_label_shift_changes_the_class_mix_per_plate():
  def mixes(config):
    t = layout.build_table(config, 0)
    poscon = t[t['label'] >= 0]
    return poscon.groupby('Metadata_Plate')['label'].value_counts().unstack(fill_value=0)

  balanced = mixes(_tiny(**{'layout.wells_per_class': 4}))
  assert (balanced.to_numpy() == 4 * 2).all()
  shifted = mixes(_tiny(**{'layout.wells_per_class': 4, 'layout.label_shift_alpha': 0.3}))
  assert (shifted.sum(axis=1) == 8 * 4 * 2).all()               # every plate keeps its 32 wells
  assert (shifted.to_numpy() != 4 * 2).any(axis=1).all()         # ... but none is balanced
  assert len({tuple(row) for row in shifted.to_numpy()}) == len(shifted)   # and all differ


def test_ensure_reuses_resumes_and_refuses(tiny, tmp_path, monkeypatch):
  manifest = tiny / 'manifest.json'
  before = manifest.stat().st_mtime_ns
  assert synthetic.ensure(str(tiny), 'tiny', seed=0, progress=False) == str(tiny)
  assert manifest.stat().st_mtime_ns == before
  # How images are stored is not what they are: another codec or tiling reuses the store.
  assert synthetic.ensure(str(tiny), 'tiny', seed=0, compression='none', tile=16, shard_items=8,
                          progress=False) == str(tiny)
  assert manifest.stat().st_mtime_ns == before
  with pytest.raises(FileExistsError, match='seed: wanted 1, found 0'):
    synthetic.ensure(str(tiny), 'tiny', seed=1, progress=False)
  with pytest.raises(FileExistsError, match='effects.strength'):
    synthetic.ensure(str(tiny), 'tiny', seed=0, effects={'strength': 2.0}, progress=False)
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='not empty'):
    synthetic.ensure(str(foreign), 'tiny', progress=False)

  # Interrupted after 3 shards, then resumed: the same bytes as an uninterrupted run.
  real_write, calls = writer._write_shard, []

  def failing(shard):
    if len(calls) == 3:
      raise KeyboardInterrupt
    calls.append(shard)
    return real_write(shard)

  monkeypatch.setattr(writer, '_write_shard', failing)
  resumed = tmp_path / 'resumed'
  with pytest.raises(KeyboardInterrupt):
    synthetic.ensure(str(resumed), 'tiny', compression='zstd', workers=1, progress=False)
  assert json.loads((resumed / writer.PROGRESS_NAME).read_text())['done'] == [0, 1, 2]
  with pytest.raises(FileExistsError, match='interrupted run'):
    synthetic.ensure(str(resumed), 'tiny', seed=5, workers=1, progress=False)
  progress = json.loads((resumed / writer.PROGRESS_NAME).read_text())
  del progress['fingerprint']['config']['tile']      # as written before the field existed
  (resumed / writer.PROGRESS_NAME).write_text(json.dumps(progress))
  written = []
  monkeypatch.setattr(writer, '_write_shard', lambda s: written.append(s) or real_write(s))
  synthetic.ensure(str(resumed), 'tiny', workers=1, progress=False)   # asks for the default codec
  assert 0 not in written and not (resumed / writer.PROGRESS_NAME).exists()
  np.testing.assert_array_equal(_contents(resumed)[0], _contents(tiny)[0])
  # ... and kept the codec its array was created with, which the manifest records.
  assert synthetic.preset('tiny').compression != 'zstd'
  assert "'zstd'" in repr(data.open_store(str(resumed)).array.codec.to_json())
  assert store_lib.read_manifest(str(resumed))['created_by']['config']['compression'] == 'zstd'


def test_config_errors_name_the_field():
  with pytest.raises(KeyError, match='layout.num_plates'):
    _tiny(**{'layout.num_plates': 3})
  with pytest.raises(TypeError):
    _tiny(**{'layout.num_sources': 'three'})
  with pytest.raises(ValueError, match='effects.gain_source_sd'):
    synthetic.validate(_tiny(**{'effects.gain_source_sd': -0.1}))
  with pytest.raises(ValueError, match='layout.control_wells'):
    synthetic.validate(_tiny(**{'layout.control_wells': 0}))
  with pytest.raises(ValueError, match='unknown synthetic preset'):
    synthetic.preset('huge')


def test_cli_on_tiny_with_an_override(tmp_path):
  out = tmp_path / 'cli'
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'data_prep', 'make_synthetic.py'), '--preset=tiny',
       f'--out={out}', '--seed=2', '--workers=1', '--layout.num_sources=4',
       '--effects.strength=0.5'],
      capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  store = data.open_store(str(out))
  assert store.table['Metadata_Source'].nunique() == 4
  config = store.manifest['created_by']['config']
  assert config['layout']['num_sources'] == 4 and config['effects']['strength'] == 0.5
  assert config['image_size'] == 32 and store.manifest['created_by']['seed'] == 2
  assert re.search(r'overrides .*layout\.num_sources', result.stdout)
