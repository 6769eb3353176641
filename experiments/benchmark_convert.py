r"""Conversion throughput on synthetic full-size JUMP TIFFs (1080x1080 uint16, Opera Phenix layout).

  PYTHONPATH=. python experiments/benchmark_convert.py --plates=2 --sites_per_plate=20 --workers=1,2

Writes a temporary mirror (5 TIFFs of ~2.3 MB per site), indexes it, then converts it once per store
codec and worker count into a fresh store (uint8, x0.5, 99.99 % clip, crop = 540). Prints JSON:
host, shapes, the time of one site in-process (TIFF reads vs image math), and per codec and worker
count the wall time of the whole conversion with sites/s overall and per worker, with and without
the worker start-up (spawned processes import csarm_jax, hence jax: measured separately), and the
CPU seconds per site (user + system, workers included), which a shared host's load does not
inflate. The TIFFs are in the page cache when read, so the figures exclude disk/network reads.
"""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import tempfile
import time
from concurrent import futures

import numpy as np
import pandas as pd
import tifffile
from absl import app, flags

from bench_common import disk_bytes, host_info
from csarm_jax.data import jump
from csarm_jax.data.constants import CHANNELS, CONTROL_ID, POSITIVE_CONTROLS
from csarm_jax.data.jump import convert as convert_lib
from csarm_jax.data.jump import files, preprocess

FLAGS = flags.FLAGS
flags.DEFINE_integer('plates', 2, 'Plates to generate.')
flags.DEFINE_integer('sites_per_plate', 20, 'Sites per plate (9 per well).')
flags.DEFINE_integer('size', 1080, 'Raw image side.')
flags.DEFINE_list('workers', ['1', '2'], 'Worker counts to time.')
flags.DEFINE_integer('shard_items', 4, 'Sites per shard.')
flags.DEFINE_list('compressions', [jump.ConvertOptions.compression], 'Store codecs to time.')
flags.DEFINE_string('tmp', None, 'Folder for the temporary mirror (default: the system temp dir).')

PHENIX_CH = {'DNA': 5, 'ER': 4, 'RNA': 3, 'AGP': 2, 'Mito': 1}


def _images(rng, size):
  """Cell-painting-like 16-bit planes: smooth background, bright blobs, shot noise."""
  yy, xx = np.mgrid[:size, :size] / size
  background = 400 + 200 * np.cos(3 * xx) * np.sin(2 * yy)
  for _ in CHANNELS:
    image = background + rng.normal(0, 30, (size, size))
    for cy, cx in rng.integers(0, size, (40, 2)):
      y0, x0 = max(cy - 15, 0), max(cx - 15, 0)
      image[y0:cy + 15, x0:cx + 15] += rng.uniform(2000, 20000)
    yield np.clip(image, 0, 65535).astype(np.uint16)


def write_mirror(root: str, plates: int, sites_per_plate: int, size: int) -> str:
  """A source_3-like mirror and metadata; returns the metadata folder."""
  rng = np.random.default_rng(0)
  compounds = [CONTROL_ID] + [jcp for jcp, _ in POSITIVE_CONTROLS]
  plate_rows, well_rows = [], []
  for p in range(plates):
    plate, batch = f'BR{p:08d}', 'CP59'
    folder = (f'cpg0016-jump/source_3/images/{batch}/images/'
              f'{plate}__2021-01-01T00_00_00-Measurement1/Images')
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    rows = []
    for s in range(sites_per_plate):
      well_index, site = divmod(s, 9)
      row, col = well_index // 24, well_index % 24
      well = f'{"ABCDEFGHIJKLMNOP"[row]}{col + 1:02d}'
      load = {'Metadata_Source': 'source_3', 'Metadata_Batch': batch, 'Metadata_Plate': plate,
              'Metadata_Well': well, 'Metadata_Site': str(site + 1)}
      for ch, image in zip(CHANNELS, _images(rng, size)):
        name = f'r{row + 1:02d}c{col + 1:02d}f{site + 1:02d}p01-ch{PHENIX_CH[ch]}sk1fk1fl1.tiff'
        tifffile.imwrite(os.path.join(root, folder, name), image)
        load[f'URL_Orig{ch}'] = f's3://cellpainting-gallery/{folder}/{name}'
      rows.append(load)
      if site == 0:
        well_rows.append({'Metadata_Source': 'source_3', 'Metadata_Plate': plate,
                          'Metadata_Well': well,
                          'Metadata_JCP2022': compounds[well_index % len(compounds)]})
    load_dir = os.path.join(root, f'cpg0016-jump/source_3/workspace/load_data_csv/{batch}/{plate}')
    os.makedirs(load_dir, exist_ok=True)
    pd.DataFrame(rows).to_csv(os.path.join(load_dir, 'load_data.csv'), index=False)
    plate_rows.append({'Metadata_Source': 'source_3', 'Metadata_Batch': batch,
                       'Metadata_Plate': plate, 'Metadata_PlateType': 'COMPOUND'})
  metadata = os.path.join(root, 'metadata')
  os.makedirs(metadata)
  pd.DataFrame(plate_rows).to_csv(os.path.join(metadata, 'plate.csv'), index=False)
  pd.DataFrame(well_rows).to_csv(os.path.join(metadata, 'well.csv'), index=False)
  return metadata


def time_one_site(index: pd.DataFrame, repeats: int = 5) -> dict[str, float]:
  """Median seconds for one site in-process: reading 5 TIFFs, and the image math."""
  reads, maths = [], []
  for _, site in index.head(repeats).iterrows():
    start = time.perf_counter()
    raws = [files.read_tiff(site[f'path_{ch}']) for ch in CHANNELS]
    middle = time.perf_counter()
    channels = [preprocess.preprocess_channel(r, None, 2, 99.99, 'uint8') for r in raws]
    preprocess.center_crop(np.stack(channels, -1), 540, 540)
    reads.append(middle - start)
    maths.append(time.perf_counter() - middle)
  return {'read_5_tiffs_s': statistics.median(reads), 'image_math_s': statistics.median(maths)}


def worker_startup_seconds(workers: int) -> float:
  """Seconds to spawn ``workers`` processes that import the converter (as a conversion does)."""
  start = time.perf_counter()
  with futures.ProcessPoolExecutor(workers,
                                   mp_context=multiprocessing.get_context('spawn')) as pool:
    list(pool.map(convert_lib.qc_counts, [0] * workers, [[]] * workers))
  return time.perf_counter() - start


def _cpu_seconds() -> float:
  """User + system CPU seconds of this process and its finished children."""
  usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
  return sum(u.ru_utime + u.ru_stime for u in usage)


def main(argv):
  del argv
  tmp = tempfile.mkdtemp(prefix='jump_bench_', dir=FLAGS.tmp)
  try:
    root = os.path.join(tmp, 'mirror')
    start = time.perf_counter()
    metadata_dir = write_mirror(root, FLAGS.plates, FLAGS.sites_per_plate, FLAGS.size)
    generate_s = time.perf_counter() - start
    metadata = jump.read_metadata(metadata_dir)
    selection = jump.Selection(sources=('source_3',), max_rare_position_images=0)
    index, report = jump.build_index(root, metadata, selection)
    index_path = os.path.join(tmp, 'index.parquet')
    jump.write_index(index_path, index, jump.make_info(selection, metadata, report, root))
    results = {
        'benchmark': 'jump_convert', 'host': host_info(('numpy', 'tifffile', 'tensorstore')),
        'shapes': {'raw': [FLAGS.size, FLAGS.size], 'raw_dtype': 'uint16',
                   'channels': len(CHANNELS),
                   'stored': [FLAGS.size // 2, FLAGS.size // 2, len(CHANNELS)],
                   'stored_dtype': 'uint8',
                   'sites': len(index), 'plates': FLAGS.plates, 'shard_items': FLAGS.shard_items},
        'generate_mirror_s': round(generate_s, 2),
        'one_site_in_process': {k: round(v, 4) for k, v in time_one_site(index).items()},
        'runs': []}
    for compression, workers in itertools.product(FLAGS.compressions, map(int, FLAGS.workers)):
      out = os.path.join(tmp, f'store_{compression}_{workers}')
      options = jump.ConvertOptions(shard_items=FLAGS.shard_items, compression=compression)
      cpu_before = _cpu_seconds()
      start = time.perf_counter()
      convert_lib.convert_sites(index_path, out, options, workers=workers, progress=False)
      wall = time.perf_counter() - start
      cpu = _cpu_seconds() - cpu_before        # workers are counted once they have exited
      startup = worker_startup_seconds(workers) if workers > 1 else 0.0
      steady = len(index) / max(wall - startup, 1e-9)
      results['runs'].append({'compression': compression, 'workers': workers,
                              'wall_s': round(wall, 2),
                              'sites_per_s': round(len(index) / wall, 2),
                              'sites_per_s_per_worker': round(len(index) / wall / workers, 2),
                              'worker_startup_s': round(startup, 2),
                              'sites_per_s_excluding_startup': round(steady, 2),
                              'sites_per_s_per_worker_excluding_startup':
                                  round(steady / workers, 2),
                              'cpu_s_per_site': round(cpu / len(index), 4),
                              'store_bytes': disk_bytes(out)})
    print(json.dumps(results, indent=1))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
