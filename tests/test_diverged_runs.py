"""A diverged run through each training entry point (train.py, cross_validate.py, reproduce.py):
one ``error:`` line and exit status 1, the diverged state kept for a post-mortem, and no NaN in any
file the run wrote."""
import glob
import json
import os

import pytest

from csarm_jax.training import checkpoint
from csarm_jax.training.metrics_log import MetricsLog
from test_cli import entry_point

TESTS = os.path.dirname(os.path.abspath(__file__))
# The warmup's first update has learning rate 0, so step 1 is finite and saved; step 2 explodes.
CONFIG = '''
import sys
sys.path.insert(0, {tests!r})
from run_fixture import tiny_config


def experiment():
  c = tiny_config({store!r})
  c.optimizer.update(learning_rate=1e30, warmup_steps=2)
  c.train.update(max_epochs=1, steps_per_epoch=2)
  return c


def get_config():
  {body}
'''
BODIES = {
    'experiments/train.py': 'return experiment()',
    'experiments/cross_validate.py': 'return experiment()',
    'experiments/reproduce.py': ('from configs import reproduce\n'
                                 "  c = reproduce.get_config('quick')\n"
                                 '  c.experiment, c.methods, c.seeds = experiment(), '
                                 "['cs_arm_bn'], [0]\n"
                                 '  c.benchmark_seeds = (0,)  # a fixture store: one realisation\n'
                                 '  return c'),
}
RUN_DIR = {'experiments/train.py': '', 'experiments/cross_validate.py': 'fold0_seed0',
           'experiments/reproduce.py': 'runs/images/base/seed0/cs_arm_bn/fold0_seed0'}
EXTRA = {'experiments/cross_validate.py': ['--folds=0', '--seeds=0']}


def _strict_json(path):
  def refuse(token):
    raise ValueError(f'{path} holds {token}')
  if path.endswith('.jsonl'):
    return [json.loads(line, parse_constant=refuse) for line in open(path)]
  return json.load(open(path), parse_constant=refuse)


@pytest.mark.parametrize('script', sorted(BODIES))
def test_a_diverged_run_ends_in_one_line_keeps_its_state_and_writes_no_nan(store_path, tmp_path,
                                                                           script):
  config = tmp_path / 'diverging.py'
  config.write_text(CONFIG.format(tests=TESTS, store=store_path, body=BODIES[script]))
  workdir = tmp_path / 'run'
  code, err = entry_point(script, f'--config={config}', f'--workdir={workdir}',
                          *EXTRA.get(script, []), env={'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'})
  assert code == 1, err
  errors = [line for line in err.splitlines() if line.startswith('error:')]   # beside the logs
  assert 'Traceback' not in err and errors == err.strip().splitlines()[-1:], err
  assert errors[0].startswith('error: training diverged by step 2: '), err
  run = os.path.join(workdir, RUN_DIR[script])
  ckpt = checkpoint.Checkpoints(run)
  try:
    assert ckpt.latest_step(checkpoint.DIVERGED) == 2       # kept for a post-mortem ...
    assert ckpt.latest_step(checkpoint.LATEST) == 1         # ... and what a re-run resumes from
  finally:
    ckpt.close()
  written = [p for p in glob.glob(f'{workdir}/**/*', recursive=True)
             if p.endswith(('.json', '.jsonl', '.csv')) and '/checkpoints/' not in p]
  assert os.path.join(run, 'metrics.jsonl') in written
  for path in written:
    if path.endswith('.csv'):
      assert 'nan' not in open(path).read().lower(), path
    else:
      _strict_json(path)


def test_a_nonfinite_metric_is_logged_as_null(tmp_path):
  log = MetricsLog(str(tmp_path))
  log.write(3, {'loss': float('nan'), 'grad_norm': float('inf'), 'accuracy': 0.5}, 'train')
  log.close()
  [record] = _strict_json(str(tmp_path / 'metrics.jsonl'))
  assert record['train/loss'] is None and record['train/grad_norm'] is None
  assert record['train/accuracy'] == 0.5 and record['step'] == 3
