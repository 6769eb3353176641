"""A run's guards: resuming with another model, a failed config check, damaged checkpoints, the
metrics of a resumed run, a full disk."""
import errno
import json
import logging
import os
import re
import shutil

import chex
import ml_collections
import orbax.checkpoint as ocp
import pytest

from csarm_jax.training import checkpoint, experiment, loop
from run_fixture import latest_state, tiny_config


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


def _truncate(directory):
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


def test_a_damaged_checkpoint_is_named_moved_aside_and_the_previous_one_resumed(
    finished, tmp_path, caplog):
  workdir, config, _ = finished
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  steps = sorted(int(s) for s in os.listdir(os.path.join(copy, 'checkpoints', 'latest'))
                 if s.isdigit())
  assert steps == [5, 6]                      # two retained: one to fall back to
  shutil.rmtree(os.path.join(copy, 'checkpoints', 'best'))   # resume, not just re-evaluate
  _truncate(os.path.join(copy, 'checkpoints', 'latest', '6', 'state'))
  with caplog.at_level(logging.WARNING):
    loop.train_and_evaluate(config, copy)
  assert re.search(r'checkpoint .*latest/6 \(step 6\) is damaged .* moved to .*damaged/latest_6; '
                   r'using step 5 instead', caplog.text)
  assert os.path.isdir(os.path.join(copy, 'checkpoints', 'damaged', 'latest_6'))
  chex.assert_trees_all_equal(latest_state(copy, config).params,
                              latest_state(workdir, config).params)
  # Nothing left to fall back to: one error naming the step and where it went.
  _truncate(os.path.join(copy, 'checkpoints', 'latest', '6', 'state'))
  shutil.rmtree(os.path.join(copy, 'checkpoints', 'latest', '5'))
  with pytest.raises(checkpoint.CheckpointError, match=r'latest/6 \(step 6\) is damaged and no '
                                                      r'earlier one is kept'):
    loop.train_and_evaluate(config, copy)


def test_a_resumed_run_marks_the_resume_point_and_drops_replayed_metrics(finished, tmp_path):
  workdir, config, _ = finished
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.checkpoint_every_steps = 100          # saves at evaluations only: steps 2, 4, 6

  def crash(step):
    if step == 6:
      raise KeyboardInterrupt                        # step 5 logged, then lost with step 6
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config, str(tmp_path), on_step=crash)
  loop.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [l['step'] for l in lines if 'train/loss' in l] == list(range(1, 7))   # once each
  marks = [l for l in lines if l.get('resumed')]
  assert [(m['step'], m['dropped_records']) for m in marks] == [(4, 1)]
  assert [l['step'] for l in lines].index(4) < lines.index(marks[0])


def test_a_full_disk_names_the_place_and_the_latest_good_step(store_path, tmp_path, monkeypatch):
  config = tiny_config(store_path)
  save = ocp.CheckpointManager.save

  def full(self, step, *args, **kwargs):
    if step == 3:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', full)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'no space left on the disk of .*checkpoints; the latest good '
                           r'checkpoint is step 2'):
    loop.train_and_evaluate(config, str(tmp_path))
