r"""Builds the JUMP-CP site index (which sites, labels, local files) and the list of keys to fetch.

  python data_prep/jump_index.py --root=MIRROR --metadata=datasets/metadata --out=index.parquet

MIRROR mirrors s3://cellpainting-gallery/ (at least cpg0016-jump/<source>/workspace/load_data_csv/);
--metadata is the metadata/ folder of github.com/jump-cellpainting/datasets. The defaults select the
paper's subset. Writes the index, INDEX.keys.txt (bucket keys of every image and illumination file
the selection needs, one per line) and INDEX.report.json (what each selection step dropped).
"""
from __future__ import annotations

import json
import logging

from absl import flags
from tqdm import tqdm

from csarm_jax import cli
from csarm_jax.data import jump
from csarm_jax.data.jump.index import PAPER_EXCLUDED_BATCHES, Selection

_DEFAULT = Selection()
FLAGS = flags.FLAGS
flags.DEFINE_string('root', None, 'Local folder that mirrors s3://cellpainting-gallery/.',
                    required=True)
flags.DEFINE_string('metadata', None, "The datasets repo's metadata/ folder (plate, well, ...).",
                    required=True)
flags.DEFINE_string('out', None, 'Index Parquet file to write.', required=True)
flags.DEFINE_string('keys_out', None,
                    'Object-key list (default: OUT without .parquet + .keys.txt).')
flags.DEFINE_list('sources', list(_DEFAULT.sources), 'Sources to read.')
flags.DEFINE_list('plate_types', list(_DEFAULT.plate_types), 'Metadata_PlateType values to keep.')
flags.DEFINE_list('exclude_batches', list(PAPER_EXCLUDED_BATCHES), 'Batches to drop.')
flags.DEFINE_list('classes', list(_DEFAULT.classes), 'JCP2022 ids of the classes, in label order.')
flags.DEFINE_string('control_id', _DEFAULT.control_id, 'JCP2022 id of the negative control.')
flags.DEFINE_integer('max_rare_position_images', _DEFAULT.max_rare_position_images,
                     'Drop (class compound, well) positions with at most this many images in a '
                     'source (0: keep all).')


def main(argv):
  del argv
  selection = Selection(sources=tuple(FLAGS.sources), plate_types=tuple(FLAGS.plate_types),
                        exclude_batches=tuple(FLAGS.exclude_batches), classes=tuple(FLAGS.classes),
                        control_id=FLAGS.control_id,
                        max_rare_position_images=FLAGS.max_rare_position_images)
  metadata = jump.read_metadata(FLAGS.metadata)
  index, report = jump.build_index(FLAGS.root, metadata, selection,
                                   progress=lambda files: tqdm(files, unit='plate'))
  stem = FLAGS.out[:-len('.parquet')] if FLAGS.out.endswith('.parquet') else FLAGS.out
  keys_out = FLAGS.keys_out or stem + '.keys.txt'
  jump.write_index(FLAGS.out, index, jump.make_info(selection, metadata, report, FLAGS.root))
  keys = jump.object_keys(index)
  with open(keys_out, 'w') as f:
    f.writelines(k + '\n' for k in keys)
  with open(stem + '.report.json', 'w') as f:
    json.dump(report, f, indent=1)
  logging.info('selection: %s', json.dumps(report))
  print(f"{report['selected_sites']} sites on {report['selected_plates']} plates -> {FLAGS.out}; "
        f'{len(keys)} object keys -> {keys_out}')


if __name__ == '__main__':
  cli.run(main)
