r"""Every fold x seed of a config, then mean +- std per evaluation.

  python experiments/cross_validate.py --config=experiments/configs/quickstart.py \
      --workdir=runs/cv --seeds=0,1,2 --folds=0,2

Without --folds, every fold of the config's split. Each run trains in WORKDIR/fold<i>_seed<s>
(finished runs are reused, unfinished ones resume); the table goes to WORKDIR/cross_validation.csv.
"""
import os

from absl import flags
from ml_collections import config_flags

from csarm_jax import cli
from csarm_jax.training import cross_validation

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Root directory of the runs.')
_FOLDS = flags.DEFINE_list('folds', None, 'Fold indices (default: all).')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds per fold.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  folds = None if _FOLDS.value is None else [int(f) for f in _FOLDS.value]
  runs = cross_validation.run(_CONFIG.value, _WORKDIR.value, folds, [int(s) for s in _SEEDS.value])
  runs.to_csv(os.path.join(_WORKDIR.value, 'cross_validation_runs.csv'), index=False)
  summary = cross_validation.summarize(runs)
  summary.to_csv(os.path.join(_WORKDIR.value, 'cross_validation.csv'))
  print(summary.to_string(float_format=lambda v: f'{v:.3f}'))


if __name__ == '__main__':
  cli.run(main)
