"""DANN and Deep CORAL: gradient reversal, the CORAL penalty against numpy, domain contexts, and
tiny runs that train and evaluate in both the transductive and the non-transductive mode."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from csarm_jax import inference, methods, models
from csarm_jax.study import runner as study
from csarm_jax.data import domains as domain_lib, open_store
from csarm_jax.data.contexts import index_plates
from csarm_jax.methods.domain import (DANN, coral_penalty, domain_cross_entropy, ganin_lambda,
                                      reverse_gradient)
from csarm_jax.training import experiment, loop
from run_fixture import tiny_config


coral = jax.jit(coral_penalty, static_argnums=3)


def numpy_coral(x, domain, mask, min_group=2):
  """DomainBed's CORAL, pair by pair: mean squared mean and (unbiased) covariance differences."""
  groups = [x[(domain == d) & (mask > 0)] for d in np.unique(domain[(mask > 0) & (domain >= 0)])]
  groups = [g for g in groups if len(g) >= min_group]
  pairs = [(a, b) for i, a in enumerate(groups) for b in groups[i + 1:]]
  if not pairs:
    return 0.0
  value = lambda a, b: (np.mean((a.mean(0) - b.mean(0)) ** 2) +
                        np.mean((np.cov(a, rowvar=False) - np.cov(b, rowvar=False)) ** 2))
  return float(np.mean([value(a, b) for a, b in pairs]))


def test_coral_penalty_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 6)) * rng.uniform(0.5, 2, 6) + rng.normal(size=6)
  domain = np.array([3] * 5 + [0] * 6 + [7] * 4 + [9] + [-1] * 4)
  x[domain == 7] = 1.5 * x[domain == 7] + 1.0       # a clearly shifted domain
  mask = (domain >= 0).astype(np.float32)
  mask[4] = 0.0                                     # a padded row of domain 3: left out
  got = coral(jnp.asarray(x, jnp.float32), jnp.asarray(domain), jnp.asarray(mask))
  np.testing.assert_allclose(got, numpy_coral(x, domain, mask), rtol=1e-4)
  assert float(got) > 0.1
  # min_group 5 leaves only domain 0 (6 rows) and domain 3 (4 real rows < 5): one group, no pair
  assert float(coral(jnp.asarray(x), jnp.asarray(domain), jnp.asarray(mask), 5)) == 0.0


def test_coral_is_zero_for_identical_domains():
  x = np.random.default_rng(1).normal(size=(8, 5)).astype(np.float32)
  features = jnp.asarray(np.concatenate([x, x[::-1], x[[2, 0, 1, 3, 4, 5, 7, 6]]]))
  domain = jnp.asarray(np.repeat([0, 1, 2], 8))
  value = coral(features, domain, jnp.ones(24))
  assert abs(float(value)) < 1e-6
  shifted = coral(features.at[8:16].add(1.0), domain, jnp.ones(24))
  assert float(shifted) > 0.1


def test_coral_is_finite_with_a_singleton_group():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
  domain = jnp.asarray([0, 0, 0, 0, 1, 1, 1, 1, 5])          # domain 5 holds one image
  value, grad = jax.jit(jax.value_and_grad(coral_penalty))(x, domain, jnp.ones(9))
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(value, coral(x[:8], domain[:8], jnp.ones(8)), rtol=1e-6)
  assert np.all(grad[8] == 0)                                # the singleton is left out
  only_one = coral(x, jnp.asarray([0] * 8 + [1]), jnp.ones(9))
  assert float(only_one) == 0.0                              # one usable group: no pair


def _domain_model():
  model = models.create('domain_head', 3, backbone='cnn', num_domains=4, width=4, num_stages=2)
  x = jax.random.normal(jax.random.key(0), (10, 8, 8, 5))
  return model, models.init_variables(model, jax.random.key(1), x), x


@pytest.mark.parametrize('scale', [0.3])
def test_gradient_reversal_negates_the_featurizers_gradient(scale):
  model, variables, x = _domain_model()
  domain, mask = jnp.arange(10) % 4, jnp.ones(10)

  def domain_loss(params, reverse):
    v = {**variables, 'params': params}
    _, features = model.apply(v, x, norm='context', return_features=True)
    if reverse:
      features = reverse_gradient(features, jnp.float32(scale))
    logits = model.apply(v, features, method='domain_logits')
    return domain_cross_entropy(logits, domain, mask)

  grad = jax.jit(jax.grad(domain_loss), static_argnums=1)
  plain, reversed_ = grad(variables['params'], False), grad(variables['params'], True)
  assert float(jnp.abs(plain['backbone']['conv0']['kernel']).max()) > 1e-6
  jax.tree.map(lambda r, p: np.testing.assert_allclose(r, -scale * p, rtol=1e-5, atol=1e-8),
               reversed_['backbone'], plain['backbone'])
  jax.tree.map(lambda r, p: np.testing.assert_allclose(r, p, rtol=1e-6),
               reversed_['domain_head'], plain['domain_head'])
  # DANN.loss is that reversed loss weighted; the class head gets no gradient from it
  dann = DANN(weight=0.5)

  def dann_loss(params):
    v = {**variables, 'params': params}
    _, features = model.apply(v, x, norm='context', return_features=True)
    return dann.loss(model, v, features, domain, mask, jnp.float32(0.5))
  weighted = jax.jit(jax.grad(dann_loss))(variables['params'])
  np.testing.assert_allclose(weighted['backbone']['conv0']['kernel'],
                             -0.5 * plain['backbone']['conv0']['kernel'], rtol=1e-5, atol=1e-8)
  assert not np.any(weighted['backbone']['head']['kernel'])


def test_dann_and_coral_train_their_own_models_in_the_study():
  groups = study.training_groups(['erm', 'adabn', 'dann', 'coral'])
  assert groups == {'erm': ['erm', 'adabn'], 'dann': ['dann'], 'coral': ['coral']}


def test_ganin_schedule():
  p = jnp.linspace(0, 1, 11)
  lam = ganin_lambda(p)
  assert float(lam[0]) == 0.0 and float(lam[-1]) > 0.99 and np.all(np.diff(lam) > 0)
  np.testing.assert_allclose(lam[5], 2 / (1 + np.exp(-5)) - 1, rtol=1e-6)


def test_domain_contexts_cover_several_domains(store_path):
  store = open_store(store_path)
  table = store.table
  plates = sorted(set(table['Metadata_Plate']))
  train, held_out = plates[:6], plates[6:]
  names = domain_lib.domain_names(table, plates, 'batch')
  assert len(names) == 6 and names == tuple(sorted(set(table['Metadata_Batch'])))
  ids = {n: i for i, n in enumerate(names)}
  domain_of = {p: ids[b] for p, b in domain_lib.plate_domains(table, plates, 'batch').items()}
  index = index_plates(table, train, num_classes=len(store.class_ids))
  held = index_plates(table, held_out, num_classes=len(store.class_ids), require_controls=False)
  labelled = domain_lib.pools(index, domain_of, labelled=True)
  unlabelled = domain_lib.pools(held, domain_of, labelled=False)
  ctx = domain_lib.domain_context(labelled, unlabelled, np.random.default_rng(0), 8, 6, 2)
  by_row = table.set_index('row')
  assert len(ctx.rows) == 14 and (ctx.rows >= 0).all() and not ctx.is_control.any()
  first, rest = ctx.rows[:8], ctx.rows[8:]
  assert by_row.loc[first, 'Metadata_Plate'].isin(train).all()
  assert by_row.loc[rest, 'Metadata_Plate'].isin(held_out).all()
  np.testing.assert_array_equal(ctx.labels[:8], by_row.loc[first, 'label'])
  assert (ctx.labels[8:] == -1).all()
  np.testing.assert_array_equal(ctx.domain, [ids[b] for b in by_row.loc[ctx.rows,
                                                                        'Metadata_Batch']])
  assert sorted(np.unique(ctx.domain[:8], return_counts=True)[1]) == [4, 4]
  assert sorted(np.unique(ctx.domain[8:], return_counts=True)[1]) == [3, 3]


def _tiny(store_path, method, transductive=True):
  c = tiny_config(store_path, method)
  c.domain.update(by='plate', transductive=transductive, domains_per_context=2)
  c.train.update(max_epochs=2)
  return c


def test_transductive_batches_feed_held_out_images_unlabelled(store_path, tmp_path):
  for transductive in (True, False):
    c = _tiny(store_path, 'coral', transductive)
    (tmp_path / str(transductive)).mkdir()
    exp = experiment.build(c, str(tmp_path / str(transductive)))
    batch = next(loop._train_batches(exp))
    plate_of = exp.store.table.set_index('row')['Metadata_Plate']
    plates = plate_of.loc[batch['rows'].ravel()].to_numpy().reshape(batch['rows'].shape)
    labelled = batch['labels'] >= 0
    assert np.isin(plates[labelled], exp.fold.train).all()
    unlabelled = (batch['labels'] < 0) & (batch['mask'] > 0)
    assert not batch['is_control'].any()
    if transductive:
      assert np.isin(plates[unlabelled], experiment.held_out_plates(exp.fold)).all()
      assert np.isin(exp.fold.test, plates[unlabelled]).any()   # test-plate images, label -1
      assert unlabelled.sum() == labelled.sum()
      assert len(exp.domains) == len(exp.fold.train) + len(experiment.held_out_plates(exp.fold))
    else:
      assert not unlabelled.any() and exp.domains == tuple(sorted(exp.fold.train))
    ids = {n: i for i, n in enumerate(exp.domains)}
    np.testing.assert_array_equal(batch['domain'], np.vectorize(ids.get)(plates))


def test_the_domain_head_has_its_own_learning_rate(store_path, tmp_path):
  c = _tiny(store_path, 'dann')
  c.optimizer.learning_rate = 1e-2
  exp = experiment.build(c, str(tmp_path))
  params = models.init_variables(exp.model, jax.random.key(0), exp.example_input)['params']
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(exp.tx.update)(grads, exp.tx.init(params), params)   # Adam's first: -lr
  np.testing.assert_allclose(updates['domain_head']['out']['bias'], -1e-4, rtol=1e-3)
  np.testing.assert_allclose(updates['backbone']['head']['bias'], -1e-2, rtol=1e-3)


def test_config_errors_name_the_domain_field(store_path, tmp_path):
  c = _tiny(store_path, 'coral')
  c.domain.domains_per_context = 4                 # 4 images over 4 domains: 1 each < min_group
  with pytest.raises(experiment.ConfigError, match='config.domain.domains_per_context'):
    experiment.check_config(c)
  c = _tiny(store_path, 'dann')
  c.domain.settings = {'schedule': 'linear'}
  with pytest.raises(experiment.ConfigError, match="config.domain.settings: schedule"):
    experiment.check_config(c)
  c.domain.settings = {'weigth': 1.0}
  with pytest.raises(experiment.ConfigError, match=r"dann: unknown settings \['weigth'\]"):
    experiment.check_config(c)
  c = _tiny(store_path, 'dann')
  c.domain.by = 'well'
  with pytest.raises(experiment.ConfigError, match='config.domain.by'):
    experiment.check_config(c)


@pytest.mark.parametrize('method, transductive', [('dann', True), ('coral', False)])
def test_a_tiny_run_trains_and_evaluates_like_erm(store_path, tmp_path, method, transductive):
  c = _tiny(store_path, method, transductive)
  if method == 'dann':
    c.domain.settings = {'schedule': 'ganin'}
  results = loop.train_and_evaluate(c, str(tmp_path))
  spec = json.load(open(tmp_path / 'model.json'))
  assert spec['domain']['transductive'] is transductive and results['domain'] == spec['domain']
  assert spec['model']['name'] == ('domain_head' if method == 'dann' else 'cnn')
  assert methods.get(method).eval_norm == 'running'
  log = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  domain_losses = [r['train/domain_loss'] for r in log if 'train/domain_loss' in r]
  assert domain_losses and np.all(np.isfinite(domain_losses)) and max(domain_losses) > 0
  for name, result in results['evaluations'].items():
    assert np.isfinite(result['loss']) and 0 <= result['accuracy'] <= 1, name
  evaluated = pd.read_parquet(tmp_path / 'eval' / 'test.chunks.predictions.parquet')
  assert len(evaluated) > 0
  if method == 'dann':          # the export predicts as the evaluation did (the domain head unused)
    member = inference.load(inference.export(str(tmp_path), str(tmp_path / 'export')))
    assert 'domain_head' in member.variables['params']
    fold = json.load(open(tmp_path / 'fold.json'))
    images, _ = inference.predict_store([member], open_store(c.store), plates=fold['test'],
                                        contexts_per_step=4)
    merged = images.merge(evaluated, on='row', suffixes=('', '_eval'))
    assert len(merged) == len(evaluated) == len(images)
    np.testing.assert_allclose(merged['prob_0'], merged['prob_0_eval'], rtol=1e-5, atol=1e-6)
