"""Embeddings + TVN end to end: a trained run's penultimate features as a feature store (checked
against the model applied directly), then a linear classifier trained on them after TVN."""
import os
import subprocess
import sys

import numpy as np
import pytest

from csarm_jax import adaptation, models
from csarm_jax.data import normalization, open_store
from csarm_jax.data.store import ID_COLUMNS
from csarm_jax.training import ConfigError, embeddings, experiment, loop
from csarm_jax.training.workdir import restore_run
from run_fixture import tiny_config, write_run_store
from store_fixture import write_store

ROOT = os.path.join(os.path.dirname(__file__), '..')


@pytest.fixture(scope='module')
def store_path(tmp_path_factory):
  return write_run_store(tmp_path_factory.mktemp('store') / 'store')


@pytest.fixture(scope='module', params=['erm', 'cs_arm_bn'])
def trained(request, store_path, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp(request.param))
  loop.train_and_evaluate(tiny_config(store_path, request.param), workdir)
  return request.param, workdir


def _direct_features(workdir, store, plate, crop):
  """Penultimate features of one plate's images, computed here: centre crops, the run's
  normalisation, then running averages (ERM) or one pass of the whole plate (CS-ARM-BN)."""
  variables, spec, _, _ = restore_run(workdir)
  model = models.from_spec(spec['model'])
  table = store.table[store.table['Metadata_Plate'] == plate]
  rows = table['row'].to_numpy()
  off = (store.item_shape[0] - crop) // 2
  x = normalization.normalize(store.read(rows)[:, off:off + crop, off:off + crop],
                              normalization.NormStats.load(os.path.join(workdir,
                                                                        'normalization.json')))
  if spec['method'] == 'erm':
    _, features = model.apply(variables, x, norm='running', return_features=True)
  else:
    stats = adaptation.adapt(model, variables, x)   # perturbed + controls
    _, features = adaptation.predict(model, variables, stats, x, return_features=True)
  return rows, np.asarray(features)


def test_embed_writes_a_feature_store_of_the_models_features(trained, store_path, tmp_path):
  method, workdir = trained
  out = str(tmp_path / 'embeddings')
  if method == 'cs_arm_bn':         # through the entry point
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments/embed.py'),
                           f'--workdir={workdir}', f'--store={store_path}', f'--out={out}'],
                          capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': ROOT},
                          timeout=300)
    assert done.returncode == 0, done.stderr
  else:
    embeddings.embed_run(workdir, store_path, out)
  images, features = open_store(store_path), open_store(out)
  assert features.kind == 'features' and features.item_shape == (8,)   # the CNN's width
  want = images.table.sort_values('row').reset_index(drop=True)
  got = features.table
  assert got['is_control'].sum() == want['is_control'].sum() > 0       # controls embedded too
  np.testing.assert_array_equal(got['image_row'], want['row'])
  np.testing.assert_array_equal(got['row'], np.arange(len(want)))
  for column in (*ID_COLUMNS, 'label', 'is_control'):
    np.testing.assert_array_equal(got[column].to_numpy(), want[column].to_numpy())
  for plate in sorted(want['Metadata_Plate'].unique())[:2]:
    rows, direct = _direct_features(workdir, images, plate, crop=8)
    stored = features.read(got.set_index('image_row').loc[rows, 'row'].to_numpy())
    np.testing.assert_allclose(stored, direct, rtol=1e-4, atol=1e-5)


def test_linear_classifier_on_tvn_embeddings_trains_and_evaluates(trained, store_path, tmp_path):
  method, workdir = trained
  if method != 'erm':
    pytest.skip('one featurizer suffices')
  out = str(tmp_path / 'embeddings')         # built on first use by config.features.from_run
  config = tiny_config(out, 'erm')
  config.features.from_run = workdir
  config.model.name, config.model.options = 'linear', {}
  config.data.tvn.update(enabled=True, domain='plate', fit_on='train')
  run = str(tmp_path / 'run')
  os.makedirs(run)
  exp = experiment.build(config, run)
  t = exp.store.table
  train = t['Metadata_Plate'].isin(exp.fold.train) & (t['label'] >= 0)
  x = exp.store.read(t.loc[train, 'row'])
  assert exp.store.kind == 'features' and x.shape[1] == exp.model.in_features
  np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)        # TVN's final standardisation
  np.testing.assert_allclose(x.std(0), 1, atol=1e-3)
  assert open_store(out).manifest['created_by']['model'] == os.path.abspath(workdir)
  result = loop.train_and_evaluate(config, run)
  test = result['evaluations']['test.chunks']
  assert test['num_images'] > 0 and 0 <= test['accuracy'] <= 1
  assert np.isfinite(test['accuracy'])


def test_tvn_on_a_plate_without_enough_controls_is_refused(tmp_path):
  path = str(tmp_path / 'features')
  write_store(path, sources=('source_1', 'source_2', 'source_3'), controls_per_plate=1,
              item_shape=(6,), dtype='float32')
  config = tiny_config(path, 'erm')
  config.model.name, config.model.options = 'linear', {}
  config.data.tvn.enabled = True
  with pytest.raises(ConfigError, match=r'config.data.tvn: TVN: plate source_1_B0_P0 has 1 '
                                        r'control images.*at least 2'):
    experiment.build(config, str(tmp_path))


def test_tvn_needs_a_feature_store(store_path, tmp_path):
  config = tiny_config(store_path, 'erm')
  config.data.tvn.enabled = True
  with pytest.raises(ConfigError, match='config.data.tvn.enabled: TVN normalises embeddings'):
    experiment.build(config, str(tmp_path))



def test_embeddings_config_is_a_tvn_classifier_on_a_runs_embeddings():
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  from configs import embeddings as embeddings_config
  for variant, model in ((None, 'linear'), ('mlp', 'mlp')):
    c = embeddings_config.get_config(variant)
    assert (c.method, c.model.name, c.synthetic.preset) == ('erm', model, None)
    assert c.data.tvn.enabled and (c.data.tvn.domain, c.data.tvn.fit_on) == ('plate', 'all')
    assert (c.features.from_run, c.store) == ('runs/qs_erm', 'data/quickstart_embeddings')
    models.create(c.model.name, 8, in_features=16, **c.model.options)
