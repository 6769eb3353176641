r"""Writes the synthetic Cell Painting benchmark as an image store.

  python data_prep/make_synthetic.py --preset=quickstart --out=/data/synthetic_quickstart
  python data_prep/make_synthetic.py --preset=tiny --out=/tmp/tiny --seed=1 \
      --layout.num_sources=3 --effects.strength=1.5 --workers=2

Every field of the preset is a flag named by its dotted path (``--image_size``,
``--layout.label_shift_alpha``, ``--cells.phenotype_strength``, ``--effects.gain_source_sd``, ...;
``--helpfull`` lists them with each preset's value); a field flag left unset keeps the preset's
value. Fields are documented in csarm_jax/data/synthetic/config.py. An interrupted run resumes when
rerun with the same flags.
"""
from __future__ import annotations

from absl import app, flags

from csarm_jax import cli
from csarm_jax.data import synthetic

PRESET = flags.DEFINE_enum('preset', 'quickstart', synthetic.PRESETS, 'Which preset to start from.')
OUT = flags.DEFINE_string('out', None, 'Output directory (absent or empty; or an interrupted run).',
                          required=True)
SEED = flags.DEFINE_integer('seed', 0, 'Random seed: same seed and fields, same bytes.')
WORKERS = flags.DEFINE_integer('workers', None, 'Worker processes (default: CPU count).')

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def _define_field_flags() -> list[str]:
  """One flag per preset field, default None (= keep the preset's value)."""
  by_preset = {name: synthetic.fields(synthetic.preset(name)) for name in synthetic.PRESETS}
  names = [n for n in by_preset['tiny'] if n != 'preset']
  for name in names:
    values = ', '.join(f'{p}={by_preset[p][name]!r}' for p in synthetic.PRESETS)
    _DEFINE[type(by_preset['tiny'][name])](name, None, f'Preset field ({values}).')
  return names


FIELD_FLAGS = _define_field_flags()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  overrides = {name: flags.FLAGS[name].value for name in FIELD_FLAGS
               if flags.FLAGS[name].value is not None}
  config = synthetic.with_overrides(synthetic.preset(PRESET.value), overrides)
  out = synthetic.generate(config, OUT.value, seed=SEED.value, workers=WORKERS.value)
  print(f'wrote {out} (preset {PRESET.value}, seed {SEED.value}, overrides {overrides or "none"})')


if __name__ == '__main__':
  cli.run(main)
