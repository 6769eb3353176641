"""The entry points' error contract (csarm_jax.cli): one line, exit status 1, --debug for the
traceback; bugs keep theirs."""
import errno
import os
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
