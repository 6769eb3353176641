r"""Converts the sites of a JUMP index into the image store (resumable, parallel, with a QC report).

  python data_prep/jump_convert.py --index=index.parquet --out=STORE --workers=16

Per site: the five 16-bit TIFFs, optional illumination correction (--illum), x1/--downsample nearest
sampling, clipping at --clip_percentile per channel, scaling to --dtype, channels in canonical order
(DNA, ER, RNA, AGP, Mito), centre crop to --crop (default: a square of the smallest downsampled side
found). Re-run the same command after an interruption to continue; a finished store is left
untouched. STORE/qc_report.csv lists every bad file and every skipped site.
"""
from __future__ import annotations

import sys

from absl import app, flags

from csarm_jax import cli
from csarm_jax.data import store_writer
from csarm_jax.data.jump import convert as convert_lib

_DEFAULT = convert_lib.ConvertOptions()
FLAGS = flags.FLAGS
flags.DEFINE_string('index', None, 'Index Parquet from data_prep/jump_index.py.', required=True)
flags.DEFINE_string('out', None, 'Store path (local folder or tensorstore kvstore URL).',
                    required=True)
flags.DEFINE_integer('workers', 1, 'Worker processes (one shard at a time each).')
flags.DEFINE_integer('downsample', _DEFAULT.downsample,
                     'Integer shrink factor (2: the paper\'s x0.5).')
flags.DEFINE_float('clip_percentile', _DEFAULT.clip_percentile, 'Per-channel clipping percentile.')
flags.DEFINE_enum('dtype', _DEFAULT.dtype, ['uint8', 'uint16'], 'Stored pixel type.')
flags.DEFINE_bool('illum', _DEFAULT.illum, 'Divide by the plate\'s illumination functions.')
flags.DEFINE_list('crop', [], 'Crop after downsampling: H,W or one side; empty: the smallest side.')
flags.DEFINE_integer('shard_items', _DEFAULT.shard_items, 'Sites per shard (the unit of work).')
flags.DEFINE_enum('compression', _DEFAULT.compression, list(store_writer.COMPRESSIONS),
                  'Store codec (blosc + bitshuffle): lz4hc decodes fastest of the compressed ones; '
                  'zstd may be smaller on your content; none reads fastest (local SSD).')
flags.DEFINE_integer('tile', _DEFAULT.tile, 'Side of the tiles an image is stored in (a '
                     'crop decodes only the tiles it touches); must divide the crop; 0: auto.')
flags.DEFINE_float('min_written', 0.0, 'Fail, leaving the store incomplete, if fewer than this '
                   'fraction of the sites (and in any case if no site) could be written.')
flags.DEFINE_bool('overwrite', False, 'Delete a store already at --out (or started with other '
                  'options) and start again.')


def main(argv):
  del argv
  crop = tuple(int(c) for c in FLAGS.crop)
  crop = crop * 2 if len(crop) == 1 else crop
  if len(crop) not in (0, 2):
    raise app.UsageError('--crop takes H,W or a single side')
  options = convert_lib.ConvertOptions(
      downsample=FLAGS.downsample, clip_percentile=FLAGS.clip_percentile, dtype=FLAGS.dtype,
      illum=FLAGS.illum, crop=crop or None, shard_items=FLAGS.shard_items,
      compression=FLAGS.compression, tile=FLAGS.tile)
  convert_lib.convert_sites(FLAGS.index, FLAGS.out, options, workers=FLAGS.workers,
                            overwrite=FLAGS.overwrite, command=' '.join(sys.argv),
                            min_written=FLAGS.min_written)   # logs the QC line


if __name__ == '__main__':
  cli.run(main)
