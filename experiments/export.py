r"""Export a run's best checkpoint as a self-contained inference checkpoint.

  python experiments/export.py --workdir=runs/quickstart --out=exports/quickstart
"""
from absl import flags

from csarm_jax import cli
from csarm_jax import inference
from csarm_jax.training.loop import quiet_library_logs
from csarm_jax.training.workdir import writable_dir

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a finished (or running) training run.')
_OUT = flags.DEFINE_string('out', None, 'Directory to write the export to.')
_WHICH = flags.DEFINE_enum('which', 'selected', ['selected', 'best', 'latest'],
                           'Checkpoint to export; selected = what the run evaluated (best by '
                           'validation loss if it had validation plates, else the latest).')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  del argv
  quiet_library_logs()
  writable_dir(_OUT.value, '--out')
  path = inference.export(_WORKDIR.value, _OUT.value, _WHICH.value)
  print(f'exported {_WORKDIR.value} ({_WHICH.value}) to {path}')


if __name__ == '__main__':
  cli.run(main)
