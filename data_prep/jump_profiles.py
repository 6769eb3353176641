r"""Turns JUMP well-level CellProfiler profiles into a features store for the wells of a site index.

  python data_prep/jump_profiles.py --index=index.parquet --root=MIRROR --out=PROFILES_STORE

MIRROR holds cpg0016-jump/<source>/workspace/profiles/<batch>/<plate>/<plate>.parquet for the
index's plates. Features with NaN/inf, zero variance (overall or within any --variance_groups group)
or float32 overflow are dropped; PROFILES_STORE/profiles_report.json lists them and every well or
plate without a profile.
"""
from __future__ import annotations

import sys

from absl import flags
from tqdm import tqdm

from csarm_jax import cli
from csarm_jax.data import jump
from csarm_jax.data.jump import profiles as profiles_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('index', None, 'Index Parquet from data_prep/jump_index.py.', required=True)
flags.DEFINE_string('root', None, 'Local folder that mirrors s3://cellpainting-gallery/.',
                    required=True)
flags.DEFINE_string('out', None, 'Features store path.', required=True)
flags.DEFINE_list('variance_groups', ['Metadata_Source'], 'Drop features constant within any group '
                  'of these columns (the paper: per source).')
flags.DEFINE_integer('shard_items', 4096, 'Wells per shard.')
flags.DEFINE_bool('overwrite', False, 'Replace a store already at --out.')


def main(argv):
  del argv
  index, info = jump.read_index(FLAGS.index)
  table, features, names, report = profiles_lib.build_profiles(
      index, FLAGS.root, FLAGS.variance_groups, progress=lambda p: tqdm(p, unit='plate'))
  created_by = {'tool': 'csarm_jax.data.jump.profiles', 'command': ' '.join(sys.argv),
                'index': FLAGS.index, 'variance_groups': FLAGS.variance_groups}
  profiles_lib.write_feature_store(FLAGS.out, table, features, names, info, report, created_by,
                                   shard_items=FLAGS.shard_items, overwrite=FLAGS.overwrite)
  print(profiles_lib.report_line(report), '->', FLAGS.out)


if __name__ == '__main__':
  cli.run(main)
