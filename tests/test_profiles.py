"""Profiles + MLP: the synthetic features store, feature standardisation, MLP dropout, and the
profiles config end to end on the tiny benchmark."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from csarm_jax import methods, models, training
from csarm_jax.data import handcrafted, open_store, store as store_lib, synthetic
from csarm_jax.data.synthetic import profiles
from csarm_jax.training import experiment, loop
from store_fixture import write_store

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'experiments'))
from configs import profiles as profiles_config  # noqa: E402


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """The tiny benchmark's image store and its image-level profiles."""
  root = tmp_path_factory.mktemp('profiles')
  images = synthetic.ensure(str(root / 'images'), 'tiny', workers=1, progress=False)
  out = profiles.write(images, str(root / 'image_profiles'), level='image', progress=False)
  return images, out


# ------------------------------------------------------------------------------------------------
# An independent, loop-based oracle of handcrafted.image_features for one image.

def _oracle_channel(x):
  """The per-channel statistics of one (H, W) channel in [0, 1], in PER_CHANNEL order."""
  h, w = x.shape
  values = x.ravel()
  quantiles = [np.quantile(values, q) for q in handcrafted.QUANTILES]
  gradient = np.mean((x[1:] - x[:-1]) ** 2) + np.mean((x[:, 1:] - x[:, :-1]) ** 2)
  padded = np.pad(x, 1, mode='symmetric')
  local = [np.var(padded[i:i + 3, j:j + 3]) for i in range(h) for j in range(w)]
  levels = handcrafted.LEVELS
  q = np.minimum(np.floor(x * levels), levels - 1).astype(int)
  glcm = np.zeros((levels, levels))
  for i in range(h):
    for j in range(w):
      for di, dj in ((0, 1), (1, 0)):
        if i + di < h and j + dj < w:
          glcm[q[i, j], q[i + di, j + dj]] += 1
          glcm[q[i + di, j + dj], q[i, j]] += 1
  p = glcm / glcm.sum()
  a, b = np.indices(p.shape)
  mu = np.sum(a * p)
  var = np.sum((a - mu) ** 2 * p)
  haralick = [np.sum((a - b) ** 2 * p), np.sum(p / (1 + abs(a - b))), np.sum(p ** 2),
              -sum(v * np.log(v) for v in p.ravel() if v > 0),
              np.sum((a - mu) * (b - mu) * p) / var if var > 0 else 0.0]
  fg = x > (np.quantile(values, 0.5) + np.quantile(values, 0.99)) / 2
  edge = np.pad(fg, 1, mode='edge')
  xe = np.pad(x, 1, mode='edge')
  boundary = peaks = 0
  for i in range(h):
    for j in range(w):
      if fg[i, j]:
        boundary += not (edge[i, j + 1] and edge[i + 2, j + 1] and edge[i + 1, j]
                         and edge[i + 1, j + 2])
        peaks += x[i, j] >= xe[i:i + 3, j:j + 3].max()
  area = fg.sum()
  shape = [area / x.size, x[fg].mean() if area else 0.0, boundary / area if area else 0.0,
           peaks / x.size]
  return [values.mean(), values.std(), *quantiles, gradient, np.mean(local), *haralick, *shape]


def _oracle(image):
  x = image.astype(np.float64) / 255
  channels = range(x.shape[-1])
  corr = [np.corrcoef(x[..., a].ravel(), x[..., b].ravel())[0, 1]
          for a in channels for b in channels if a < b]
  return np.array([v for c in channels for v in _oracle_channel(x[..., c])] + corr)


def test_image_features_equal_a_loop_oracle(tiny):
  images = open_store(tiny[0])
  for row in (0, 101):
    image = images.read([row])
    got = handcrafted.image_features(image, 255)[0]
    np.testing.assert_allclose(got, _oracle(image[0]), rtol=2e-4, atol=2e-5)


def test_image_profiles_store_matches_the_image_store(tiny):
  images, features = open_store(tiny[0]), open_store(tiny[1])
  n = len(images.table)
  assert features.kind == 'features' and features.dtype == 'float32'
  assert features.item_shape == (len(handcrafted.feature_names(images.channels)),)
  assert features.channels == handcrafted.feature_names(images.channels)
  pd.testing.assert_frame_equal(features.table, images.table)
  assert features.manifest['classes'] == images.manifest['classes']
  values = features.read(np.arange(n))
  assert values.shape == (n, 105) and values.dtype == np.float32 and np.isfinite(values).all()
  for row in (5, 200):                                   # row i profiles image i
    np.testing.assert_array_equal(values[row],
                                  handcrafted.image_features(images.read([row]), 255)[0])
  assert features.manifest['created_by']['images_created_by'] == images.manifest['created_by']


def test_well_profiles_are_medians_of_the_sites(tiny, tmp_path):
  images = open_store(tiny[0])
  wells = open_store(profiles.write(tiny[0], str(tmp_path / 'wells'), level='well',
                                    progress=False))
  per_image = open_store(tiny[1]).read(np.arange(len(images.table)))
  t = images.table
  assert len(wells.table) == len(t.drop_duplicates(['Metadata_Plate', 'Metadata_Well']))
  assert (wells.table['Metadata_Site'] == 'all').all()
  assert list(wells.table.columns) == list(t.columns)
  values = wells.read(np.arange(len(wells.table)))
  for i in (0, 17, len(wells.table) - 1):
    w = wells.table.iloc[i]
    sites = ((t['Metadata_Plate'] == w['Metadata_Plate'])
             & (t['Metadata_Well'] == w['Metadata_Well'])).to_numpy()
    assert t.loc[sites, 'label'].eq(w['label']).all()
    np.testing.assert_allclose(values[i], np.median(per_image[sites], axis=0), rtol=1e-6)


def test_ensure_reuses_matching_profiles_and_refuses_others(tiny, tmp_path):
  assert profiles.ensure(tiny[1], tiny[0], level='image') == tiny[1]
  with pytest.raises(FileExistsError, match='different level'):
    profiles.ensure(tiny[1], tiny[0], level='well')
  with pytest.raises(ValueError, match='holds features, not images'):
    profiles.write(tiny[1], str(tmp_path / 'x'))
  assert not os.path.exists(tmp_path / 'x')


def _accuracy(x, y, train):
  scale = x[train].std(0) + 1e-6
  z = (x - x[train].mean(0)) / scale
  clf = LogisticRegression(max_iter=2000).fit(z[train], y[train])
  return clf.score(z[~train], y[~train])


def test_profiles_carry_class_signal_and_batch_effects(tiny):
  table = open_store(tiny[1]).table
  x = open_store(tiny[1]).read(np.arange(len(table)))
  first_plate = table.groupby('Metadata_Batch')['Metadata_Plate'].transform('min')
  train = (table['Metadata_Plate'] == first_plate).to_numpy()      # plate 1 of each batch
  perturbed, controls = (table['label'] >= 0).to_numpy(), table['is_control'].to_numpy()
  # The class, on held-out plates of the same batches (chance 1/8).
  labels = table['label'].to_numpy()
  assert _accuracy(x[perturbed], labels[perturbed], train[perturbed]) > 0.4
  # The lab, from DMSO controls alone (no biology differs; chance 1/3).
  source = table['Metadata_Source'].to_numpy()
  assert _accuracy(x[controls], source[controls], train[controls]) > 0.9


# ------------------------------------------------------------------------------------------------
# Feature standardisation.

def test_standardisation_is_fitted_on_the_training_rows_only(tmp_path):
  path = str(tmp_path / 'store')
  table, items = write_store(path, sources=('source_1', 'source_2', 'source_3'),
                             perturbed_per_plate=8, controls_per_plate=6, item_shape=(6,),
                             dtype='float32')
  items[:, 1] += 3.0 * (table['Metadata_Source'] == 'source_1').to_numpy()   # a lab shift
  items[(table['label'] >= 0).to_numpy(), 4] = 2.5        # constant over perturbed rows
  store_lib.open_array(path, write=True).write(items).result()
  config = profiles_config.get_config('cs_arm_bn')
  config.store, config.synthetic.preset = path, None
  config.split.update(in_domain_fraction=0.0, validation_fraction=0.25)
  os.makedirs(tmp_path / 'run')
  exp = experiment.build(config, str(tmp_path / 'run'))
  train = (table['Metadata_Plate'].isin(exp.fold.train) & (table['label'] >= 0)).to_numpy()
  assert 'source_1' not in set(table.loc[train, 'Metadata_Source'])     # fold 0 tests source_1
  mean, std = items[train].astype(np.float64).mean(0), items[train].astype(np.float64).std(0)
  std[4] = 1.0                                            # centred only
  np.testing.assert_allclose(exp.norm.mean, mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(exp.norm.std, std, rtol=1e-6)
  assert abs(exp.norm.mean[1] - items[:, 1].mean()) > 0.5  # not the statistics of every row
  z = np.asarray(exp.preprocess(jnp.asarray(items[train])))
  np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
  assert np.isfinite(z).all()


# ------------------------------------------------------------------------------------------------
# MLP dropout.

def test_mlp_dropout_is_active_in_training_only():
  model = models.create('mlp', 3, in_features=6, hidden=32, num_layers=2, dropout=0.5)
  plain = models.create('mlp', 3, in_features=6, hidden=32, num_layers=2)
  x = jax.random.normal(jax.random.key(1), (10, 6))
  variables = models.init_variables(model, jax.random.key(0), x)
  run = lambda m, **kw: m.apply(variables, x, norm='context', **kw)
  evaluation = run(model)
  np.testing.assert_array_equal(evaluation, run(plain))          # no rng: deterministic
  np.testing.assert_array_equal(evaluation, run(model))
  a, b = (run(model, rngs={models.DROPOUT: jax.random.key(k)}) for k in (1, 2))
  assert not np.allclose(a, evaluation) and not np.allclose(a, b)
  np.testing.assert_array_equal(a, run(model, rngs={models.DROPOUT: jax.random.key(1)}))


def _feature_batch(num_contexts=4, rows=6, seed=0):
  rng = np.random.default_rng(seed)
  return {'images': rng.normal(size=(num_contexts, rows, 6)).astype(np.float32),
          'labels': rng.integers(0, 3, (num_contexts, rows)).astype(np.int32),
          'mask': np.ones((num_contexts, rows), np.float32),
          'is_control': np.zeros((num_contexts, rows), bool)}


@pytest.mark.parametrize('dropout', [0.0, 0.5])
def test_the_train_step_draws_dropout_masks_from_seed_and_step(dropout):
  model = models.create('mlp', 3, in_features=6, hidden=16, num_layers=1, dropout=dropout)
  tx = optax.sgd(0.1)
  state = training.create_state(model, tx, jax.random.key(0), jnp.zeros((2, 6)))
  batch = _feature_batch()
  loss = {}
  for name, seed, micro in (('a', 0, None), ('again', 0, None), ('micro', 0, 2), ('b', 1, None)):
    step = jax.jit(training.make_train_step(model, methods.get('cs_arm_bn'), tx, lambda x: x,
                                            micro, seed=seed))
    loss[name] = float(step(state, batch)[1]['loss'])
  assert loss['a'] == loss['again']
  np.testing.assert_allclose(loss['micro'], loss['a'], rtol=1e-5)   # same mask per context
  assert (loss['b'] != loss['a']) == (dropout > 0)


# ------------------------------------------------------------------------------------------------
# The profiles config end to end (the CI run of the profile path).

def _tiny_profiles_config(root, method):
  c = profiles_config.get_config(method)
  c.store, c.synthetic.images = str(root / 'profiles'), str(root / 'images')
  c.synthetic.preset = 'tiny'
  c.model.options.update(hidden=16)
  # tiny plates: 8 perturbed and 4 DMSO wells; the tests run on 4 devices
  c.data.update(num_perturbed=8 if c.data.contexts_per_step > 1 else 4, num_controls=4,
                contexts_per_step=4, num_threads=1)
  c.eval.update(num_perturbed=8, num_controls=4, contexts_per_step=4)
  c.train.update(max_epochs=2, steps_per_epoch=2, transfer_guard='disallow',
                 checkpoint_every_steps=2)
  return c


@pytest.mark.parametrize('method', ['erm', 'cs_arm_bn'])
def test_profiles_config_trains_and_evaluates_on_synthetic_profiles(tmp_path_factory, method):
  root = tmp_path_factory.getbasetemp() / 'profiles_e2e'      # one benchmark for both methods
  config = _tiny_profiles_config(root, method)
  workdir = str(tmp_path_factory.mktemp(method))
  results = loop.train_and_evaluate(config, workdir)
  store = open_store(config.store)
  assert store.kind == 'features' and (store.table['Metadata_Site'] == 'all').all()
  assert store.manifest['created_by']['level'] == 'well'
  tested = store.table[store.table['Metadata_Source'] == 'source_1']     # fold 0's test lab
  test = results['evaluations']['test.chunks']
  assert test['num_images'] == int((tested['label'] >= 0).sum())
  assert 0 <= test['accuracy'] <= 1 and np.isfinite(test['mean_entropy'])
  assert {'in_domain.chunks', 'validation.chunks'} <= set(results['evaluations'])
  with open(os.path.join(workdir, 'model.json')) as f:
    spec = json.load(f)
  assert spec['model']['name'] == 'mlp' and spec['model']['options']['dropout'] == 0.2
  assert spec['store_kind'] == 'features' and spec['method'] == method
