"""The codec benchmark's store copy (what it measures on) and its command line, on a tiny store."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd

from csarm_jax import data
from store_fixture import write_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import benchmark_codecs  # noqa: E402


def test_copy_keeps_whole_plates_and_their_pixels(tmp_path):
  table, items = write_store(tmp_path / 'source')        # 8 plates of 20 images
  source = data.open_store(str(tmp_path / 'source'))
  benchmark_codecs.copy_plates(source, str(tmp_path / 'copy'), 30, 'zstd', 4)
  copy = data.open_store(str(tmp_path / 'copy'))
  plates = sorted(table['Metadata_Plate'].unique())[:2]   # 30 images need two whole plates
  expected = table[table['Metadata_Plate'].isin(plates)].reset_index(drop=True)
  pd.testing.assert_frame_equal(copy.table.drop(columns='row'), expected.drop(columns='row'),
                                check_dtype=False)
  np.testing.assert_array_equal(copy.read(copy.table['row']), items[expected['row']])
  assert copy.array.chunk_layout.read_chunk.shape[1] == 4


def test_command_line_reports_every_layout(tmp_path):
  write_store(tmp_path / 'source')
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, 'experiments', 'benchmark_codecs.py'),
       f'--source={tmp_path / "source"}', '--num_images=40', '--layouts=none:0,lz4hc:4',
       '--perturbed=4', '--controls=4', '--contexts=2', '--crop_size=16', '--rounds=2'],
      env=env, capture_output=True, text=True, check=True).stdout
  layouts = json.loads(out)['layouts']
  assert [x['layout'] for x in layouts] == ['none:20', 'lz4hc:4']
  assert [x['images'] for x in layouts] == [40, 40]
  # Uniform random bytes do not compress: uncompressed, the ratio is 1 less the index and table;
  # blosc's headers on 80-byte tiles only add to that.
  none, lz4hc = (x['compression_ratio'] for x in layouts)
  assert 0.8 < none < 1.0 and lz4hc < none, layouts
  assert all(len(x['read_images_per_cpu_s']) == 2 for x in layouts)
