r"""Writes hand-crafted profiles of an image store's images as a features store (the synthetic
benchmark's stand-in for CellProfiler profiles; see csarm_jax/data/synthetic/profiles.py).

  python data_prep/make_synthetic.py --preset=quickstart --out=data/quickstart
  python data_prep/synthetic_profiles.py --images=data/quickstart --level=well \
      --out=data/quickstart_profiles

--level=image: one row per image (the image store's table); well: one row per well, the median of
its sites' features. Per channel: intensity statistics, texture (gradient energy, local variance,
co-occurrence statistics) and shape proxies (foreground fraction, boundary, local maxima); then
the correlations between channels.
"""
from __future__ import annotations

from absl import app, flags

from csarm_jax import cli
from csarm_jax.data.synthetic import profiles

IMAGES = flags.DEFINE_string('images', None, 'Image store to profile.', required=True)
OUT = flags.DEFINE_string('out', None, 'Output directory (absent or empty).', required=True)
LEVEL = flags.DEFINE_enum('level', 'image', profiles.LEVELS, 'One row per image or per well.')
CHUNK = flags.DEFINE_integer('chunk_size', 256, 'Images read and profiled at a time.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  out = profiles.write(IMAGES.value, OUT.value, level=LEVEL.value, chunk_size=CHUNK.value)
  print(f'wrote {out} ({LEVEL.value} profiles of {IMAGES.value})')


if __name__ == '__main__':
  cli.run(main)
