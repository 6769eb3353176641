"""A run's guards: resuming with another model, a failed config check, damaged checkpoints, the
metrics of a resumed run, a full disk."""
import errno
import json
import logging
import os
import re
import shutil
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import orbax.checkpoint as ocp
import pytest
from tensorboardX.proto import event_pb2

from csarm_jax.training import checkpoint, experiment, loop
from csarm_jax.training import workdir as workdir_lib
from run_fixture import latest_state, tiny_config
from test_cli import entry_point


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


def test_an_unwritable_workdir_is_named_at_once_and_left_as_it_was(store_path, tmp_path,
                                                                    monkeypatch):
  def denied(dir):                    # as root no chmod denies a write: have the write fail
    raise PermissionError(errno.EACCES, 'Permission denied', os.path.join(dir, 'tmpxyz'))
  monkeypatch.setattr(tempfile, 'TemporaryFile', denied)
  with pytest.raises(OSError, match=r'^workdir .*/new is not writable \(permission denied\)$'):
    loop.train_and_evaluate(tiny_config(store_path), str(tmp_path / 'new'))
  assert not os.path.exists(tmp_path / 'new')
  with pytest.raises(OSError, match=r'^--out .*/out is not writable \(permission denied\)$'):
    workdir_lib.writable_dir(str(tmp_path / 'out'), '--out')


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


def _flip(workdir, rel, offset):
  with open(os.path.join(workdir, rel), 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 0x10]))


def _saved_steps(workdir, states):
  ckpt = checkpoint.Checkpoints(workdir)
  for step, state in states.items():
    ckpt.save(checkpoint.LATEST, step, state, {'epoch': step}, {'step': step}, {})
  ckpt.wait()
  ckpt.close()


def _restore(workdir, target, **kwargs):
  ckpt = checkpoint.Checkpoints(workdir)
  try:
    return ckpt.restore(checkpoint.LATEST, target, **kwargs)
  finally:
    ckpt.close()


def test_a_bit_flipped_checkpoint_is_caught_by_its_digest_and_the_previous_one_used(tmp_path,
                                                                                   caplog):
  rng = np.random.default_rng(0)
  states = {s: {'w': jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
                'step': jnp.asarray(s, jnp.int32)} for s in (1, 2)}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        states[1])
  clean = str(tmp_path / 'clean')
  _saved_steps(clean, states)
  state, data, meta = _restore(clean, target)          # a clean checkpoint: the bytes saved
  chex.assert_trees_all_equal(state, states[2])
  assert (data, meta) == ({'epoch': 2}, {'step': 2})
  # Find a bit whose flip orbax restores without complaint, to other values (most bits of an
  # array file's compressed chunks; those of headers and keys raise). Each try in a fresh copy:
  # tensorstore may cache what it read.
  data_dir = os.path.join('checkpoints', 'latest', '2', 'state', 'ocdbt.process_0', 'd')
  files = sorted(os.listdir(os.path.join(clean, data_dir)),
                 key=lambda n: -os.path.getsize(os.path.join(clean, data_dir, n)))
  tries = [(os.path.join(data_dir, n), size * k // 4) for n in files
           for size in [os.path.getsize(os.path.join(clean, data_dir, n))] for k in (2, 3, 1)]
  for i, (rel, offset) in enumerate(tries):
    shutil.copytree(clean, tmp_path / f'try{i}')
    _flip(tmp_path / f'try{i}', rel, offset)
    try:
      ckpt = checkpoint.Checkpoints(str(tmp_path / f'try{i}'))
      ckpt._restore_step(checkpoint.LATEST, 2, target)
    except checkpoint.DigestMismatch:
      break                                     # orbax restored it; only the digest saw
    except Exception:                           # noqa: BLE001 -- orbax noticed: not this bit
      pass
    finally:
      ckpt.close()
  else:
    raise AssertionError('no flipped bit restored silently')
  flipped = str(tmp_path / 'flipped')
  shutil.copytree(clean, flipped)
  _flip(flipped, rel, offset)
  with caplog.at_level(logging.WARNING):
    state, data, _ = _restore(flipped, target, move_damaged=True)     # as a resuming run does
  chex.assert_trees_all_equal(state, states[1])
  assert data == {'epoch': 1}
  assert re.search(r'checkpoint .*latest/2 \(step 2\) is damaged \(DigestMismatch: the restored '
                   r'state differs from the one saved .*\); moved to .*damaged/latest_2; using '
                   r'step 1 instead', caplog.text)
  assert os.listdir(os.path.join(flipped, 'checkpoints', 'damaged')) == ['latest_2']


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
  # TensorBoard: the resumed writer's SessionLog START at step 5 has readers drop the first
  # attempt's events from step 5 on (step 5's loss was written, then replayed).
  events = _events(tmp_path / 'tensorboard')
  starts = [e.step for e in events if e.HasField('session_log') and
            e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [5]
  loss_steps = [e.step for e in events for v in e.summary.value if v.tag == 'train/loss']
  assert sorted(loss_steps) == [1, 2, 3, 4, 5, 5, 6]


def _events(directory):
  """Every event of the TensorBoard files in ``directory``, oldest file first (TFRecord framing:
  length, its crc, the Event proto, its crc)."""
  events = []
  for name in sorted(os.listdir(directory)):
    data = open(os.path.join(directory, name), 'rb').read()
    at = 0
    while at < len(data):
      length = int.from_bytes(data[at:at + 8], 'little')
      events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
      at += 12 + length + 4
  return events


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


def test_export_prints_no_orbax_info_lines(finished, tmp_path):
  workdir, _, _ = finished
  code, err = entry_point('experiments/export.py', f'--workdir={workdir}', f'--out={tmp_path}/e')
  assert code == 0, err
  assert not [line for line in err.splitlines() if re.match(r'I\d{4} ', line)], err
