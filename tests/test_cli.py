"""The entry points' error contract (csarm_jax.cli): one line, exit status 1, --debug for the
traceback; bugs keep theirs."""
import errno
import os
import re
import subprocess
import sys

import pytest

from csarm_jax import cli
from csarm_jax.data.contexts import ContextError

ROOT = os.path.join(os.path.dirname(__file__), '..')


def entry_point(script, *args, env=None):
  """Runs ``script`` (relative to the repository) in a subprocess: (exit status, stderr)."""
  out = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True,
                       text=True, env={**os.environ, 'PYTHONPATH': ROOT, **(env or {})},
                       timeout=300)
  return out.returncode, out.stderr


def _run(error, argv=('prog',)):
  def main(_):
    raise error
  cli.run(main, list(argv))


@pytest.mark.parametrize('error, line', [
    (ContextError('plate P1: no control images'), 'error: plate P1: no control images'),
    (KeyError("unknown synthetic config field 'x'"), "error: unknown synthetic config field 'x'"),
    (KeyError('mean'), "error: missing key 'mean'"),
    (OSError(errno.EACCES, 'Permission denied', '/ro/fold.json'),
     'error: permission denied: /ro/fold.json'),
    (FloatingPointError('training diverged by step 3'), 'error: training diverged by step 3'),
    (ValueError('first line\nsecond line'), 'error: first line; second line'),
])
def test_user_errors_end_in_one_line_and_status_1(capsys, error, line):
  with pytest.raises(SystemExit) as exit_:
    _run(error)
  assert exit_.value.code == 1
  assert capsys.readouterr().err.strip() == line


def test_debug_flag_and_environment_show_the_traceback(monkeypatch):
  with pytest.raises(ContextError):
    _run(ContextError('plate P1'), ['prog', '--debug'])
  monkeypatch.setenv(cli.DEBUG_ENV, '1')
  with pytest.raises(ContextError):
    _run(ContextError('plate P1'))


def test_a_bug_keeps_its_traceback():
  with pytest.raises(ZeroDivisionError):
    _run(ZeroDivisionError('division by zero'))


def test_unknown_config_key_is_one_line_naming_the_flag(tmp_path):
  code, err = entry_point('experiments/train.py', '--config=experiments/configs/quickstart.py',
                          '--config.train.max_epoch=3', f'--workdir={tmp_path}/run')
  assert code == 1
  assert err.strip().splitlines() == [
      'error: --config.train.max_epoch: unknown config key \'max_epoch\'; Did you mean '
      '"max_epochs" instead of "max_epoch"?']
  assert not os.path.exists(tmp_path / 'run')


def _member(store, **spec):
  """An export as far as the compatibility check reads it."""
  from csarm_jax import inference, methods
  from csarm_jax.data.normalization import NormStats
  from csarm_jax.evaluation.protocol import Protocol
  spec = {'store_kind': store.kind, 'channels': store.channels, 'crop_size': 8,
          'classes': [{'id': i, 'name': n} for i, n in zip(store.class_ids, store.class_names)],
          'eval': {'num_perturbed': 4, 'num_controls': 4, 'seed': 0, 'too_few': 'replace'}, **spec}
  return inference.Predictor('exports/m', None, None, methods.get('cs_arm_bn'),
                             NormStats(mean=None, std=None), spec, Protocol.from_spec(spec))


@pytest.mark.parametrize('spec, line', [
    ({'channels': ['Mito', 'AGP', 'RNA', 'ER', 'DNA']},
     r"error: exports/m vs store .*: trained on channels "
     r"\['Mito', 'AGP', 'RNA', 'ER', 'DNA'\], but the store has "
     r"\['DNA', 'ER', 'RNA', 'AGP', 'Mito'\]$"),
    ({'store_kind': 'features'}, 'error: exports/m vs store .*: trained on features, the store '
                                 'holds images$'),
])
def test_an_export_that_does_not_fit_the_store_is_one_line(store_path, capsys, spec, line):
  from csarm_jax import inference
  from csarm_jax.data import open_store
  store = open_store(store_path)
  with pytest.raises(SystemExit):
    cli.run(lambda _: inference.predict_plates([_member(store, **spec)], store), ['predict'])
  assert re.match(line, capsys.readouterr().err.strip())


@pytest.mark.parametrize('script, args, line', [
    ('data_prep/make_synthetic.py', ['--preset=tiny', '--layout.num_sources=0', '--out={out}'],
     'error: synthetic config field layout.num_sources: must be >= 1'),
    ('data_prep/make_synthetic.py', ['--preset=tiny', '--out={out}'], 'error: {out} is not empty'),
    ('experiments/export.py', ['--workdir={out}', '--out={out}'],
     'error: {out}/checkpoints holds no checkpoint to export'),
    ('experiments/predict.py', ['--export={out}/none', '--store={out}', '--out={out}'],
     'error: {out}/none/inference.json is missing'),
    # An unwritable --out or workdir (a file where a folder should be: as root, chmod stops no
    # write) is named before any work: before the missing export, the empty workdir, the store.
    ('experiments/predict.py', ['--export={out}/none', '--store={out}', '--out={out}/model.json/p'],
     'error: --out {out}/model.json/p is not writable (not a directory)'),
    ('experiments/export.py', ['--workdir={out}', '--out={out}/model.json/e'],
     'error: --out {out}/model.json/e is not writable (not a directory)'),
    ('experiments/train.py', ['--config=experiments/configs/quickstart.py',
                              '--config.store={out}/none', '--workdir={out}/model.json/run'],
     'error: workdir {out}/model.json/run is not writable (not a directory)'),
    ('experiments/predict.py', ['--export={out}/none', '--store={out}', '--out={out}',
                                '--contexts_per_step=0'],
     'error: flag --contexts_per_step=0: 0 is not a positive integer'),
    ('data_prep/jump_index.py', ['--root={out}', '--metadata={out}', '--out={out}/index.parquet'],
     'error: {out} has no plate.csv, plate.csv.gz or plate.parquet'),
    ('data_prep/jump_convert.py', ['--index={out}/none.parquet', '--out={out}/store'],
     'error: {out}/none.parquet is not a readable index Parquet file'),
])
def test_entry_points_report_bad_input_in_one_line(tmp_path, script, args, line):
  out = tmp_path / 'out'
  out.mkdir()
  for name in ('model.json', 'config.json', 'normalization.json', 'fold.json'):
    (out / name).write_text('{}')                  # a workdir (or non-empty folder) without a run
  args = [a.format(out=out) for a in args]
  code, err = entry_point(script, *args)
  assert code == 1, err
  assert len(err.strip().splitlines()) == 1 and err.startswith(line.format(out=out)), err
