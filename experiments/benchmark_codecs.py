r"""Which store codec and tile to use: size and crop-read speed, on the benchmark content or yours.

  PYTHONPATH=. python experiments/benchmark_codecs.py \
      --layouts=zstd:180,lz4hc:180,lz4hc:108,none:180
  PYTHONPATH=. python experiments/benchmark_codecs.py --source=/data/jump_store --num_images=1024

Copies whole plates (at least ``--num_images`` images) of ``--source`` -- by default a fresh loader
benchmark store of 540x540x5 uint8 cell-like images -- into one store per layout
(``compression:tile``; tile 0: ``store_writer.tile_side``), then reads training batches
(``--contexts`` contexts of N perturbed + K controls, random crops and flips:
``pipeline.read_contexts``, the pipeline's own read) from each layout in turn, ``--rounds``
times, alternating the order. Taking the layouts in turn within one process makes their figures
comparable on a shared, noisy host, which separate benchmark runs are not. Prints JSON: host, per
layout the compression ratio, encode and decode speed in images per CPU-second (user + system, all
threads), median and per round.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags

import benchmark_loader
from bench_common import disk_bytes, host_info
from csarm_jax import data
from csarm_jax.data import contexts as ctx_lib
from csarm_jax.data import pipeline, store_writer
from csarm_jax.data.buffers import BufferPool

flags.DEFINE_string('source', None, 'Store to sample (default: a loader benchmark store).')
flags.DEFINE_integer('num_images', 1024, 'Images to copy: whole plates, at least this many.')
flags.DEFINE_list('layouts', ['zstd:0', 'lz4hc:0', 'lz4:0', 'none:0'], 'compression:tile pairs.')
flags.DEFINE_integer('perturbed', 64, 'Perturbed images per context (N).')
flags.DEFINE_integer('controls', 128, 'Control images per context (K).')
flags.DEFINE_integer('contexts', 8, 'Contexts per batch.')
flags.DEFINE_integer('crop_size', 256, 'Random crop side (at most the image side).')
flags.DEFINE_integer('rounds', 8, 'Batches read from each layout, in turn.')
FLAGS = flags.FLAGS


def _cpu() -> float:
  return time.process_time()         # user + system, all threads


def copy_plates(source: data.ImageStore, out: str, num_images: int, compression: str,
                tile: int) -> float:
  """Copies whole plates of ``source`` (at least ``num_images`` images) into a store at ``out``
  with another layout; returns the encode speed in images per CPU-second."""
  table = source.table
  counts = table.groupby('Metadata_Plate', sort=True).size()
  plates = counts.index[:int(np.searchsorted(counts.cumsum().to_numpy(), num_images)) + 1]
  table = table[table['Metadata_Plate'].isin(plates)].reset_index(drop=True)
  rows, table['row'] = table['row'].to_numpy(), np.arange(len(table))
  array = store_writer.create_array(out, len(table), source.item_shape, source.manifest['dtype'],
                                 compression=compression, tile=tile or None)
  spent, step = 0.0, store_writer.shard_items_of(array)
  for start in range(0, len(table), step):
    items = source.read(rows[start:start + step])
    before = _cpu()
    array[start:start + len(items)].write(items).result()
    spent += _cpu() - before
  manifest = {**source.manifest, 'num_items': len(table), 'num_unused_rows': 0}
  store_writer.write_metadata(out, table, manifest)
  return len(table) / max(spent, 1e-9)


def read_speed(store: data.ImageStore, index: ctx_lib.PlateIndex, seed: int,
               pool: BufferPool) -> float:
  """Images per CPU-second reading one training batch (crops and flips) from ``store`` into a
  recycled buffer, as the pipeline does."""
  rngs = [np.random.default_rng([seed, i]) for i in range(FLAGS.contexts)]
  contexts = [ctx_lib.training_context(index, rng, FLAGS.perturbed, FLAGS.controls) for rng in rngs]
  before = _cpu()
  batch = pipeline.read_contexts(store, contexts, FLAGS.crop_size, rngs, pool=pool)
  return batch['mask'].size / max(_cpu() - before, 1e-9)


def main(argv):
  del argv
  root = tempfile.mkdtemp(prefix='csarm_codecs_')
  try:
    source_path = FLAGS.source
    if source_path is None:
      source_path = os.path.join(root, 'source')
      benchmark_loader.make_benchmark_store(source_path, FLAGS.num_images, compression='none')
    source = data.open_store(source_path)
    layouts, stores = [], {}
    for layout in FLAGS.layouts:
      compression, tile = layout.split(':')
      path = os.path.join(root, layout.replace(':', '_'))
      encode = copy_plates(source, path, FLAGS.num_images, compression, int(tile))
      store = data.open_store(path)
      disk = disk_bytes(path)
      name = f"{compression}:{store.array.chunk_layout.read_chunk.shape[1]}"
      stores[name] = store
      layouts.append({'layout': name, 'images': len(store.table),
                      'compression_ratio': round(
                          np.prod(store.array.shape)
                          * store.array.dtype.numpy_dtype.itemsize / disk, 3),
                      'encode_images_per_cpu_s': round(encode, 1), 'read_images_per_cpu_s': []})
    first = next(iter(stores.values()))
    plates = sorted(first.table['Metadata_Plate'].unique())
    index = ctx_lib.index_plates(first.table, plates, num_classes=len(first.class_ids))
    pool = BufferPool(1)                      # each round's batch is dropped before the next
    read_speed(first, index, FLAGS.rounds, pool)   # untimed: the buffer's pages fault in once
    for r in range(FLAGS.rounds):
      for entry in (layouts if r % 2 == 0 else layouts[::-1]):
        speed = read_speed(stores[entry['layout']], index, r, pool)
        entry['read_images_per_cpu_s'].append(round(speed, 1))
    for entry in layouts:
      entry['read_images_per_cpu_s_median'] = float(np.median(entry['read_images_per_cpu_s']))
    print(json.dumps({
        'benchmark': 'codecs', 'host': host_info(('numpy', 'tensorstore')),
        'source': FLAGS.source or 'loader benchmark store (540x540x5 uint8, cell-like + noise)',
        'item_shape': list(source.item_shape), 'dtype': source.manifest['dtype'],
        'batch': {'contexts': FLAGS.contexts, 'perturbed': FLAGS.perturbed,
                  'controls': FLAGS.controls, 'crop_size': FLAGS.crop_size, 'flips': True},
        'layouts': layouts}, indent=1))
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
