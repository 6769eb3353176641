"""A run's guards: resuming with another model, a failed config check, damaged checkpoints, the
metrics of a resumed run, a full disk."""
import json
import os

import ml_collections
import pytest

from csarm_jax.training import experiment, loop
from run_fixture import tiny_config


@pytest.fixture(scope='module')
def finished(store_path, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config(store_path)
  return workdir, config, loop.train_and_evaluate(config, workdir)


def _read(workdir, *names):
  return [open(os.path.join(workdir, n), 'rb').read() for n in names]


def test_resuming_with_another_model_refuses_before_writing(finished):
  workdir, config, _ = finished
  before = _read(workdir, 'model.json', 'config.json')
  wider = ml_collections.ConfigDict(config.to_dict())
  wider.model.options = {'width': 8, 'num_stages': 2}
  wider.optimizer.name = 'sgd'
  with pytest.raises(experiment.ConfigError, match=r"changed: model.json:model.options.width 4 -> "
                                                   r"8, config.optimizer.name 'adam' -> 'sgd'"):
    loop.train_and_evaluate(wider, workdir)
  assert _read(workdir, 'model.json', 'config.json') == before


def test_a_failed_config_check_leaves_no_workdir(store_path, tmp_path):
  config = tiny_config(store_path)
  config.split.fold = 7
  with pytest.raises(experiment.ConfigError, match='split.fold'):
    loop.train_and_evaluate(config, str(tmp_path / 'new'))
  assert not os.path.exists(tmp_path / 'new')
