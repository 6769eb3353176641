"""ARM-CML: the context embedding is a function of the context as a set, and the context net's
parameters travel through training, checkpoints, export and prediction."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from csarm_jax import adaptation, inference, models
from csarm_jax.data import open_store
from csarm_jax.training import checkpoint, experiment, loop
from csarm_jax.training.state import abstract_state
from run_fixture import tiny_config

OPTIONS = {'backbone': 'cnn', 'width': 4, 'num_stages': 2, 'context_hidden': 4}


def test_permuting_the_context_permutes_only_the_outputs():
  model = models.create('arm_cml', 3, **OPTIONS)
  x = jax.random.normal(jax.random.key(0), (7, 8, 8, 5))
  mask = jnp.ones(7).at[-1].set(0.0)                            # a padded row
  variables = models.init_variables(model, jax.random.key(1), x)
  forward = jax.jit(lambda v, x, m: adaptation.context_forward(model, v, x, m))
  out = forward(variables, x, mask)
  perm = np.array([3, 0, 6, 1, 5, 2, 4])
  np.testing.assert_allclose(forward(variables, x[perm], mask[perm]), out[perm], rtol=1e-5,
                             atol=1e-6)
  padded = forward(variables, x.at[-1].set(100.0), mask)        # padding is no part of the context
  np.testing.assert_allclose(padded[:-1], out[:-1], rtol=1e-5, atol=1e-6)
  other = forward(variables, x.at[0].multiply(5.0), mask)       # the context does matter
  assert not np.allclose(other[1:-1], out[1:-1], rtol=1e-4, atol=1e-5)
  assert set(variables['params']) == {'context_net', 'backbone'}
  assert variables['params']['backbone']['conv0']['kernel'].shape[2] == 5 + 12


@pytest.fixture(scope='module')
def arm_cml_run(store_path, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('arm_cml'))
  config = tiny_config(store_path, 'cs_arm_cml')          # the method wraps the configured CNN
  config.model.options = {k: v for k, v in OPTIONS.items() if k != 'backbone'}
  return workdir, config, loop.train_and_evaluate(config, workdir)


def test_context_net_survives_save_restore_export_and_predict(arm_cml_run, tmp_path):
  workdir, config, _ = arm_cml_run
  out = inference.export(workdir, str(tmp_path / 'export'))
  member = inference.load(out)
  exported = member.variables['params']['context_net']
  exp = experiment.build(config, workdir)
  target = abstract_state(exp.model, exp.tx, exp.example_input,
                          jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  ckpt = checkpoint.Checkpoints(workdir)
  try:
    restored = ckpt.restore_selected(target, prefer_best=True)[0]
  finally:
    ckpt.close()
  chex.assert_trees_all_equal(exported, restored.params['context_net'])
  assert np.abs(exported['out']['bias']).max() > 0               # trained (initialised to 0)
  store = open_store(config.store)
  fold = json.load(open(os.path.join(workdir, 'fold.json')))
  images, _ = inference.predict_store([member], store, plates=fold['test'], contexts_per_step=4)
  evaluated = pd.read_parquet(os.path.join(workdir, 'eval', 'test.chunks.predictions.parquet'))
  merged = images.merge(evaluated, on='row', suffixes=('', '_eval'))
  assert len(merged) == len(evaluated) == len(images)
  np.testing.assert_allclose(merged['prob_0'], merged['prob_0_eval'], rtol=1e-5, atol=1e-6)
  # predictions depend on the exported context net: perturb it and they change
  member.variables['params']['context_net']['out']['bias'] = exported['out']['bias'] + 1.0
  changed, _ = inference.predict_store([member], store, plates=fold['test'], contexts_per_step=4)
  assert not np.allclose(changed['prob_0'].to_numpy(), images['prob_0'].to_numpy())


def test_tta_adapts_a_cs_arm_cml_model_with_its_controls(arm_cml_run, tmp_path):
  workdir, config, results = arm_cml_run
  assert json.load(open(os.path.join(workdir, 'model.json')))['model']['name'] == 'arm_cml'
  tta_config = tiny_config(config.store, 'deyo')
  tta_config.tta.source = workdir
  out = str(tmp_path / 'deyo')
  adapted = loop.train_and_evaluate(tta_config, out)
  assert set(adapted['evaluations']) == set(results['evaluations'])
  frame = pd.read_parquet(os.path.join(out, 'eval', 'test.chunks.predictions.parquet'))
  assert len(frame) == results['evaluations']['test.chunks']['num_images']
