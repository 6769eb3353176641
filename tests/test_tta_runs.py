"""Test-time adaptation methods run from configs: a finished ERM run adapted plate by plate."""
import os

import numpy as np
import pandas as pd
import pytest

from csarm_jax.evaluation import protocol
from csarm_jax.evaluation.step import compiled_eval_step
from csarm_jax.training import experiment, loop
from run_fixture import tiny_config


@pytest.fixture(scope='module')
def erm_run(store_path, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('erm'))
  loop.train_and_evaluate(tiny_config(store_path, 'erm'), workdir)
  return workdir


def adapt(store_path, workdir, source, method, **settings):
  config = tiny_config(store_path, method)
  config.tta.source, config.tta.settings = source, settings
  return config, loop.train_and_evaluate(config, workdir)


def _predictions(workdir, name='test.chunks'):
  return pd.read_parquet(os.path.join(workdir, 'eval', f'{name}.predictions.parquet'))


def test_tent_without_steps_is_adabn_on_the_source_model(store_path, erm_run, tmp_path):
  adapt(store_path, str(tmp_path / 'tent'), erm_run, 'tent', steps=0)
  tent = _predictions(str(tmp_path / 'tent'))
  exp = experiment.build(tiny_config(store_path, 'adabn'), erm_run)
  variables = loop.restore_variables(exp, erm_run)
  eval_step = compiled_eval_step(exp.model, exp.method, exp.preprocess, exp.mesh)
  adabn, _ = protocol.evaluate(exp, eval_step, variables, exp.fold.test, exp.protocol)
  assert list(tent['row']) == list(adabn['row'])                 # each test image once, in order
  np.testing.assert_allclose(tent['prob_0'], adabn['prob_0'], rtol=1e-5, atol=1e-6)
  erm = _predictions(erm_run)                                     # ERM's running averages differ
  assert not np.allclose(erm['prob_0'], adabn['prob_0'], atol=1e-4)


def test_roid_continual_and_deyo_episodic_adapt_every_test_image(store_path, erm_run, tmp_path):
  frozen = _predictions(erm_run)
  for method, settings in (('roid', {'continual': True}), ('deyo', {'plpd_threshold': -1.0})):
    workdir = str(tmp_path / method)
    config, results = adapt(store_path, workdir, erm_run, method, **settings)
    assert results['method'] == method and 'test.chunks' in results['evaluations']
    frame = _predictions(workdir)
    assert sorted(frame['row']) == sorted(frozen['row'])
    assert np.isfinite(frame['prob_0']).all()
    assert not np.allclose(frame.set_index('row')['prob_0'], frozen.set_index('row')['prob_0'],
                           atol=1e-4)


@pytest.mark.parametrize('field,value,message', [
    ('source', None, 'config.tta.source: tent adapts a trained model'),
    ('source', '/nonexistent', 'model.json is missing'),
    ('settings', {'margin': 1.0}, 'config.tta.settings: .*unknown'),
])
def test_adaptation_configs_fail_at_start_naming_the_field(store_path, erm_run, tmp_path, field,
                                                           value, message):
  config = tiny_config(store_path, 'tent')
  config.tta.source = erm_run
  config.tta[field] = value
  with pytest.raises(experiment.ConfigError, match=message):
    loop.train_and_evaluate(config, str(tmp_path))
