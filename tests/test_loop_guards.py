"""The training loop's profiling switch and its transfer guard."""
import glob
import os

import numpy as np
import pytest

from csarm_jax import parallel
from csarm_jax.training import loop
from run_fixture import tiny_config


def _short(store_path):
  config = tiny_config(store_path, 'arm_bn')
  config.train.update(max_epochs=1, steps_per_epoch=3, checkpoint_every_steps=0)
  config.eval.final_evaluation = False
  return config


def test_profile_steps_write_a_trace(store_path, tmp_path):
  config = _short(store_path)
  config.train.profile_steps = 1
  loop.train_and_evaluate(config, str(tmp_path))
  traces = glob.glob(str(tmp_path / 'profile' / '**' / '*.xplane.pb'), recursive=True)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  config.train.profile_steps = 0
  loop.train_and_evaluate(config, str(tmp_path / 'off'))
  assert not os.path.exists(tmp_path / 'off' / 'profile')


def test_the_transfer_guard_stops_an_implicit_transfer_in_the_step(store_path, tmp_path,
                                                                   monkeypatch):
  # A batch left on the host reaches the jitted step by an implicit transfer: refused.
  monkeypatch.setattr(parallel, 'global_batch', lambda local, mesh: {k: np.asarray(v)
                                                                     for k, v in local.items()})
  with pytest.raises(Exception, match='Disallowed host-to-device transfer'):
    loop.train_and_evaluate(_short(store_path), str(tmp_path))
