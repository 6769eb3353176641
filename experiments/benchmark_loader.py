"""Loader benchmark: how fast the pipeline serves CS-ARM-BN training contexts, and at what memory.

    PYTHONPATH=. python experiments/benchmark_loader.py --store_sizes=512,2048 --num_batches=6

Builds stores of 540x540x5 uint8 images (the paper's layout; synthetic content: smooth cell-like
blobs plus noise, so they compress like microscopy rather than like random bytes), then serves
training contexts (N perturbed + K controls of one plate, random 256 crops and flips) through
``training_batches`` and prints JSON: host, shapes, images/s (controls counted, per core and per
CPU-second), single-thread per-context latency (sampling; the pipeline's cropped read; for
comparison, a whole-image read then numpy crops) and resident memory (RSS) sampled while serving --
for each store size, to show it does not grow with the store, each store compression and tile
side (0: the store's default tiling; 540: one chunk per image, the layout before tiles) and each
placement of the horizontal flips (``--flip_w=device,host --rounds=4``: left to the accelerator,
the default, or applied on the host as before; alternated in one process).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bench_common import disk_bytes, host_info
from csarm_jax import data
from csarm_jax.data import augment
from csarm_jax.data import contexts as ctx_lib
from csarm_jax.data import pipeline

IMAGE_SHAPE = (540, 540, 5)
WARMUP_BATCHES = 4   # untimed: grain's threads, tensorstore and the batch-buffer pool start up


def _rss_mb() -> float:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


class _PeakRss:
  """Samples the resident set size every 20 ms in a thread; ``peak`` in MiB."""

  def __enter__(self):
    self.peak, self._stop = _rss_mb(), threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    while not self._stop.wait(0.02):
      self.peak = max(self.peak, _rss_mb())

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def _templates(rng: np.random.Generator, count: int) -> np.ndarray:
  """Cell-like images: Gaussian blobs of varied size and brightness per channel, on a dim field."""
  h, w, c = IMAGE_SHAPE
  yy, xx = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
  out = np.empty((count, h, w, c), np.uint8)
  for k in range(count):
    img = np.full((h, w, c), 12.0, np.float32)
    for _ in range(40):
      cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(6, 18)
      blob = np.outer(np.exp(-0.5 * ((yy - cy) / r) ** 2), np.exp(-0.5 * ((xx - cx) / r) ** 2))
      img += blob[..., None] * rng.uniform(20, 120, c).astype(np.float32)
    out[k] = np.clip(img, 0, 247)
  return out


def make_benchmark_store(path: str, num_images: int, plate_size: tuple[int, int] = (96, 160),
                         seed: int = 0, shard_items: int = 64,
                         compression: str = data.DEFAULT_COMPRESSION,
                         tile: int = 0) -> dict[str, Any]:
  """A store of ``num_images`` 540x540x5 uint8 images in plates of (perturbed, controls) images."""
  rng = np.random.default_rng(seed)
  templates, noise = _templates(rng, 12), rng.integers(0, 8, (4, *IMAGE_SHAPE), dtype=np.uint8)
  per_plate = sum(plate_size)
  rows = []
  for i in range(num_images):
    plate, j = divmod(i, per_plate)
    control = j >= plate_size[0]
    label = -1 if control else j % len(data.POSITIVE_CONTROLS)
    rows.append({'Metadata_Source': 'source_bench', 'Metadata_Batch': f'batch_{plate // 4}',
                 'Metadata_Plate': f'plate_{plate}', 'Metadata_Well': f'W{j:03d}',
                 'Metadata_Site': '1',
                 'Metadata_JCP2022': (data.CONTROL_ID if control
                                      else data.POSITIVE_CONTROLS[label][0]),
                 'Metadata_PlateType': 'COMPOUND', 'is_control': control, 'label': label})
  table = pd.DataFrame(rows)
  table['row'] = np.arange(num_images)
  array = data.create_array(path, num_images, IMAGE_SHAPE, 'uint8', shard_items=shard_items,
                            compression=compression, tile=tile or None)
  start_time, pending = time.perf_counter(), []
  for start in range(0, num_images, shard_items):
    n = min(shard_items, num_images - start)
    block = np.empty((n, *IMAGE_SHAPE), np.uint8)
    for b in range(n):
      shift = tuple(rng.integers(0, 540, 2))
      block[b] = np.roll(templates[rng.integers(len(templates))], shift, axis=(0, 1))
      block[b] += noise[rng.integers(len(noise))]
    pending.append(array[start:start + n].write(block))   # a few shards encode concurrently
    if len(pending) > 2:
      pending.pop(0).result()
  for future in pending:
    future.result()
  write_s = time.perf_counter() - start_time
  manifest = data.make_manifest(data.CHANNELS, 'uint8', IMAGE_SHAPE, num_images,
                                data.POSITIVE_CONTROLS, data.CONTROL_ID,
                                {'tool': 'experiments/benchmark_loader.py', 'seed': seed})
  data.write_metadata(path, table, manifest)
  disk = disk_bytes(path)
  return {'num_images': num_images, 'compression': compression,
          'tile': int(array.chunk_layout.read_chunk.shape[1]),
          'plates': int(table['Metadata_Plate'].nunique()),
          'write_images_per_s': round(num_images / write_s, 1),
          'disk_mib': round(disk / 2 ** 20, 1),
          'compression_ratio': round(float(num_images * np.prod(IMAGE_SHAPE) / disk), 2)}


def _latency(store, plates, num_perturbed, num_controls, crop_size, repeats,
             defer_flip_w=True) -> dict[str, float]:
  """Single-thread time per context: sampling, the pipeline's cropped read, and for comparison a
  read of the whole images followed by numpy crops."""
  index = ctx_lib.index_plates(store.table, plates, num_classes=len(store.class_ids))
  times = {'sample_ms': [], 'read_crops_ms': [], 'whole_read_then_numpy_crop_ms': []}
  for r in range(repeats):
    rng = np.random.default_rng([1, r])
    t0 = time.perf_counter()
    context = ctx_lib.training_context(index, rng, num_perturbed, num_controls)
    t1 = time.perf_counter()
    pipeline.read_contexts(store, [context], crop_size, [rng], defer_flip_w=defer_flip_w)
    t2 = time.perf_counter()
    augment.random_crop_flip(store.read(context.rows), crop_size, rng)
    t3 = time.perf_counter()
    for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
      times[key].append(dt)
  return {key: round(1e3 * float(np.median(v)), 1) for key, v in times.items()}


def _serve(store, plates, num_perturbed, num_controls, contexts_per_batch, crop_size, num_batches,
           num_threads, defer_flip_w=True) -> dict[str, Any]:
  batches = data.training_batches(store, plates, num_perturbed=num_perturbed,
                                  num_controls=num_controls, contexts_per_batch=contexts_per_batch,
                                  crop_size=crop_size, seed=0, num_threads=num_threads,
                                  defer_flip_w=defer_flip_w)
  rss_before = _rss_mb()
  with _PeakRss() as rss:
    first = next(batches)
    shapes = {k: list(v.shape) for k, v in first.items()}
    dtype = str(first['images'].dtype)
    del first                                     # held, it would keep a buffer from the pool
    for _ in range(WARMUP_BATCHES - 1):
      next(batches)
    cpu0, t0 = time.process_time(), time.perf_counter()   # CPU: user + system, all threads
    images = 0
    for _ in range(num_batches):
      images += int(next(batches)['mask'].sum())
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
  return {'batch_shapes': shapes, 'images_dtype': dtype, 'num_threads': num_threads,
          'images_served': images, 'wall_s': round(wall, 2),
          'images_per_s': round(images / wall, 1),
          'images_per_cpu_s': round(images / cpu, 1), 'cpu_utilisation': round(cpu / wall, 2),
          'rss_before_mib': round(rss_before, 1), 'rss_peak_mib': round(rss.peak, 1),
          'rss_serving_increment_mib': round(rss.peak - rss_before, 1),
          'rss_after_mib': round(_rss_mb(), 1)}


FLIP_W = {'device': True, 'host': False}   # where horizontal flips go -> defer_flip_w


def loader_benchmark(store_sizes: Sequence[int] = (512, 2048),
                     compressions: Sequence[str] = (data.DEFAULT_COMPRESSION,),
                     tiles: Sequence[int] = (0,), num_perturbed: int = 64,
                     num_controls: int = 128, contexts_per_batch: int = 8, crop_size: int = 256,
                     num_batches: int = 6, num_threads: int = 2, latency_repeats: int = 5,
                     workdir: str | None = None, keep_stores: bool = False,
                     flip_w: Sequence[str] = ('device',), rounds: int = 1) -> dict[str, Any]:
  """Builds one store per (compression, tile, size) under ``workdir`` (a temporary directory by
  default), serves ``num_batches`` batches from each with horizontal flips left to the
  accelerator ('device', the pipeline's default) and/or applied on the host ('host'), in turn
  ``rounds`` times (the order alternating), and returns the figures as a JSON-ready dict: per
  store and flip placement, each round's figures and the median images/s per core."""
  cores = len(os.sched_getaffinity(0))
  result = {
      'benchmark': 'loader',
      'host': host_info(('numpy', 'tensorstore', 'grain')),
      'settings': {'image_shape': list(IMAGE_SHAPE), 'dtype': 'uint8', 'crop_size': crop_size,
                   'flips': True, 'num_perturbed': num_perturbed, 'num_controls': num_controls,
                   'contexts_per_batch': contexts_per_batch, 'num_batches': num_batches,
                   'num_threads': num_threads, 'warmup_batches': WARMUP_BATCHES,
                   'flip_w': list(flip_w), 'rounds': rounds,
                   'store': 'zarr3, 64 images/shard, tile x tile chunks'},
      'stores': [],
  }
  root = workdir or tempfile.mkdtemp(prefix='csarm_loader_bench_')
  try:
    for compression, tile, size in itertools.product(compressions, tiles, store_sizes):
      path = os.path.join(root, f'store_{compression}_{tile}_{size}')
      built = make_benchmark_store(path, size, compression=compression, tile=tile)
      runs = {name: [] for name in flip_w}
      for r in range(rounds):
        for name in (flip_w if r % 2 == 0 else flip_w[::-1]):
          defer_flip_w = FLIP_W[name]
          store = data.open_store(path)
          plates = sorted(store.table['Metadata_Plate'].unique())
          served = _serve(store, plates, num_perturbed, num_controls, contexts_per_batch,
                          crop_size, num_batches, num_threads, defer_flip_w)
          served['images_per_s_per_core'] = round(served['images_per_s'] / cores, 1)
          if r == 0:
            served['context_latency_single_thread'] = _latency(
                store, plates, num_perturbed, num_controls, crop_size, latency_repeats,
                defer_flip_w)
          runs[name].append(served)
          del store
      built['flip_w'] = {name: {
          'median_images_per_s_per_core': float(np.median(
              [s['images_per_s_per_core'] for s in served])),
          'median_images_per_cpu_s': float(np.median([s['images_per_cpu_s'] for s in served])),
          'rounds': served} for name, served in runs.items()}
      result['stores'].append(built)
      if not keep_stores:
        shutil.rmtree(path)
  finally:
    if workdir is None and not keep_stores:
      shutil.rmtree(root, ignore_errors=True)
  return result


if __name__ == '__main__':
  from absl import app, flags

  flags.DEFINE_list('store_sizes', ['512', '2048'], 'images per store (one run per size)')
  flags.DEFINE_list('compressions', [data.DEFAULT_COMPRESSION],
                    'store compressions to compare (keys of csarm_jax.data.COMPRESSIONS)')
  flags.DEFINE_list('tiles', ['0'], 'tile sides to compare (0: the default; 540: whole images)')
  flags.DEFINE_integer('num_perturbed', 64, 'perturbed images per context (N)')
  flags.DEFINE_integer('num_controls', 128, 'control images per context (K)')
  flags.DEFINE_integer('contexts_per_batch', 8, 'contexts per batch (C)')
  flags.DEFINE_integer('crop_size', 256, 'random crop size')
  flags.DEFINE_integer('num_batches', 6,
                       'timed batches per store (after WARMUP_BATCHES untimed ones)')
  flags.DEFINE_integer('num_threads', 2, 'grain reader threads (batches prepared at once)')
  flags.DEFINE_list('flip_w', ['device'], f'where horizontal flips go, in turn: {list(FLIP_W)}')
  flags.DEFINE_integer('rounds', 1, 'serving runs per --flip_w value and store, alternating')
  flags.DEFINE_string('workdir', None, 'where to build the stores (default: a temporary directory)')
  flags.DEFINE_bool('keep_stores', False, 'keep the stores after the run')
  FLAGS = flags.FLAGS

  def main(argv):
    del argv
    print(json.dumps(loader_benchmark(
        [int(s) for s in FLAGS.store_sizes], FLAGS.compressions, [int(t) for t in FLAGS.tiles],
        FLAGS.num_perturbed, FLAGS.num_controls,
        FLAGS.contexts_per_batch, FLAGS.crop_size, FLAGS.num_batches, FLAGS.num_threads,
        workdir=FLAGS.workdir, keep_stores=FLAGS.keep_stores, flip_w=FLAGS.flip_w,
        rounds=FLAGS.rounds), indent=2))

  app.run(main)
