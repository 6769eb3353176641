r"""Train and evaluate one run: experiments/train.py --config=CONFIG.py[:variant] --workdir=DIR

  python experiments/train.py --config=experiments/configs/quickstart.py --workdir=runs/quickstart
  python experiments/train.py --config=experiments/configs/jumpcp.py \
      --config.store=gs://bucket/jump_store --config.split.fold=1 --workdir=runs/s8_to_s3

Re-running with the same workdir resumes from its latest checkpoint. A thin wrapper over
csarm_jax.training.train_and_evaluate.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from csarm_jax import cli
from csarm_jax.training import Preempted, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and results go here.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except Preempted as e:
    logging.warning('%s', e)
    sys.exit(143)


if __name__ == '__main__':
  cli.run(main)
