"""JUMP index -> image store: pixels against a numpy oracle, QC, resuming, idempotence, workers."""
import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

from csarm_jax.data import constants, jump, open_store
from csarm_jax.data import store as store_lib
from csarm_jax.data.jump import convert as convert_lib
from jump_fixture import CHANNELS, build_mirror

SELECTION = jump.Selection(sources=('source_3', 'source_8', 'source_10'),
                           max_rare_position_images=1)
OPTIONS = jump.ConvertOptions(clip_percentile=98.0, shard_items=4)   # 24 sites -> 6 shards
SKIPPED = {   # sample -> problem; every other selected site must be written
    'source_3_CP59_BR00000001_A01_2': 'missing',
    'source_8_J1_1053601756_C01_2': 'zero-filled',
    'source_8_J1_1053601756_D01_1': 'truncated',
    'source_10_2021_08_03_U2OS_48_hr_run12_Dest210726-160150_A01_2': 'unreadable',
    'source_10_2021_08_03_U2OS_48_hr_run12_Dest210726-160150_B01_2': 'zero-filled',
}
CROP = (10, 10)     # the smallest downsampled side: source_8's 22x20 -> 11x10


@pytest.fixture(scope='module')
def mirror(tmp_path_factory):
  return build_mirror(tmp_path_factory.mktemp('jump'))


def _write_index(mirror, path, selection=SELECTION):
  metadata = jump.read_metadata(mirror.metadata)
  index, report = jump.build_index(mirror.root, metadata, selection)
  jump.write_index(str(path), index, jump.make_info(selection, metadata, report, mirror.root))
  return str(path)


@pytest.fixture(scope='module')
def index_path(mirror, tmp_path_factory):
  return _write_index(mirror, tmp_path_factory.mktemp('index') / 'index.parquet')


def _convert(index_path, out, options=OPTIONS, **kwargs):
  return jump.convert_sites(index_path, str(out), options, command='test', progress=False, **kwargs)


@pytest.fixture(scope='module')
def converted(index_path, tmp_path_factory):
  out = tmp_path_factory.mktemp('store')
  counts = _convert(index_path, out)
  return out, counts


def _tree(path):
  return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), 'rb').read()
          for d, _, names in os.walk(path) for f in names}


def _oracle(raw, illum, percentile, dtype, crop):
  """Independent numpy: explicit libvips sampling, a full sort for the threshold, a centre crop."""
  channels = []
  for ch in CHANNELS:
    h, w = raw[ch].shape
    rows = np.arange(1, h, 2) if h % 2 == 0 else np.arange(0, h, 2)
    cols = np.arange(1, w, 2) if w % 2 == 0 else np.arange(0, w, 2)
    x = raw[ch][np.ix_(rows, cols)].astype(np.float64)
    if illum is not None:
      x = x / illum[ch].astype(np.float64)[np.ix_(rows, cols)]
    n = max(1, int(np.around(x.size * (100 - percentile) / 100)))
    top = np.iinfo(dtype).max
    channels.append(np.floor(np.minimum(x * (top / np.sort(x.ravel())[-n]), top)).astype(dtype))
  image = np.stack(channels, axis=-1)
  top, left = (image.shape[0] - crop[0]) // 2, (image.shape[1] - crop[1]) // 2
  return image[top:top + crop[0], left:left + crop[1]]


def _assert_pixels(store, mirror, options, illum=False):
  images = store.read(store.table['row'].to_numpy())
  for image, (_, site) in zip(images, store.table.iterrows()):
    key = tuple(site[['Metadata_Source', 'Metadata_Plate', 'Metadata_Well', 'Metadata_Site']])
    functions = mirror.illum[key[:2]] if illum else None
    expected = _oracle(mirror.raw[key], functions, options.clip_percentile, options.dtype,
                       store.item_shape[:2])
    np.testing.assert_array_equal(image, expected, err_msg=site['Metadata_Sample_ID'])


def test_store_matches_the_oracle(converted, mirror):
  out, counts = converted
  store = open_store(str(out))
  assert store.item_shape == (*CROP, 5) and store.channels == list(constants.CHANNELS)
  assert store.manifest['dtype'] == 'uint8'
  assert store.class_ids == [c for c, _ in constants.POSITIVE_CONTROLS]
  assert len(store.table) == 19 and counts['written'] == 19 and counts['skipped'] == 5
  assert not set(store.table['Metadata_Sample_ID']) & set(SKIPPED)
  _assert_pixels(store, mirror, OPTIONS)
  sizes = store.table.groupby('Metadata_Source')[['source_height', 'source_width']].first()
  assert sizes.loc['source_8'].tolist() == [22, 20] and sizes.loc['source_10'].tolist() == [27, 27]
  index, _ = jump.read_index(store.manifest['created_by']['index']['path'])
  rows = store.table['row'].to_numpy()
  assert (index['Metadata_Sample_ID'].to_numpy()[rows] == store.table['Metadata_Sample_ID']).all()
  assert store.manifest['created_by']['probed_source_sizes'] == {
      'source_10': ['27x27'], 'source_3': ['24x24'], 'source_8': ['22x20']}


def test_skipped_sites_are_declared_and_reported(converted):
  out, counts = converted
  store = open_store(str(out))
  assert store.manifest['num_unused_rows'] == 5
  qc = pd.read_csv(out / convert_lib.QC_KEY, keep_default_na=False)
  skipped = qc[qc['action'] == convert_lib.SKIPPED]
  assert dict(zip(skipped['Metadata_Sample_ID'], skipped['issue'])) == SKIPPED
  assert (skipped['file'] != '').all() and skipped['key'].str.startswith('cpg0016-jump/').all()
  unused = sorted(set(range(24)) - set(store.table['row']))
  assert sorted(skipped['row']) == unused and not store.read(unused).any()    # zero rows
  notes = qc[qc['action'] == convert_lib.KEPT]
  assert (set(notes.loc[notes['issue'] == 'non-square', 'Metadata_Sample_ID'].str[:8])
          == {'source_8'})
  assert set(notes.loc[notes['issue'] == 'odd-size', 'Metadata_Sample_ID'].str[:9]) == {'source_10'}
  assert counts['problems'] == {'missing': 1, 'truncated': 1, 'unreadable': 1, 'zero-filled': 2}
  assert counts['notes'] == {'non-square': 12, 'odd-size': 4}
  line = convert_lib.qc_line(counts, 'qc_report.csv')
  assert line.startswith('QC: 19/24 sites written, 5 skipped; problems: missing 1, truncated 1')


def test_interrupted_run_resumes_to_the_same_bytes(converted, index_path, tmp_path, monkeypatch):
  reference, _ = converted
  out = tmp_path / 'store'
  real = convert_lib.convert_shard
  calls = []

  def crash_after_two(job):
    if len(calls) == 2:
      raise KeyboardInterrupt('killed')       # what an interrupt looks like to the loop
    calls.append(job.shard)
    return real(job)
  monkeypatch.setattr(convert_lib, 'convert_shard', crash_after_two)
  with pytest.raises(KeyboardInterrupt):
    _convert(index_path, out)
  assert len(os.listdir(out / 'convert' / 'ledger')) == 2
  assert not (out / store_lib.MANIFEST_NAME).exists()
  with pytest.raises(store_lib.StoreError, match='incomplete'):
    open_store(str(out))
  calls.clear()
  monkeypatch.setattr(convert_lib, 'convert_shard',
                      lambda job: calls.append(job.shard) or real(job))
  # Another codec or tiling asked for on resume (e.g. a new default): the run keeps its own.
  _convert(index_path, out, dataclasses.replace(OPTIONS, compression='none', tile=4))
  assert calls == [2, 3, 4, 5]                  # only the shards the ledger lacked
  assert _tree(out) == _tree(reference)


_KILLED_RUN = """
import os, signal, sys
from csarm_jax.data import jump
from csarm_jax.data.jump import convert as convert_lib
real, done = convert_lib.convert_shard, []
def die_after_two(job):
  if len(done) == 2:
    os.kill(os.getpid(), signal.SIGKILL)      # no handler, no finally: as the OOM killer does
  done.append(job.shard)
  return real(job)
convert_lib.convert_shard = die_after_two
jump.convert_sites(sys.argv[1], sys.argv[2],
                   jump.ConvertOptions(clip_percentile=98.0, shard_items=4),
                   command='test', progress=False)
"""


def test_sigkilled_run_resumes_to_the_same_bytes(converted, index_path, tmp_path):
  reference, counts = converted
  out = tmp_path / 'store'
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  killed = subprocess.run([sys.executable, '-c', _KILLED_RUN, index_path, str(out)], env=env,
                          capture_output=True, text=True)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert len(os.listdir(out / 'convert' / 'ledger')) == 2
  assert _convert(index_path, out) == counts
  assert _tree(out) == _tree(reference)


def test_rerun_of_a_finished_store_writes_nothing(converted, index_path, monkeypatch):
  out, counts = converted
  before = {p: (os.stat(out / p).st_mtime_ns, data) for p, data in _tree(out).items()}
  monkeypatch.setattr(convert_lib, 'convert_shard', lambda job: pytest.fail('converted again'))
  assert _convert(index_path, out) == counts
  assert {p: (os.stat(out / p).st_mtime_ns, data) for p, data in _tree(out).items()} == before


def test_two_workers_write_the_same_store(converted, index_path, tmp_path):
  reference, _ = converted
  _convert(index_path, tmp_path / 'store', workers=2)
  assert _tree(tmp_path / 'store') == _tree(reference)


def test_other_options_are_refused_until_overwrite(index_path, mirror, tmp_path):
  out = tmp_path / 'store'
  counts = _convert(index_path, out)
  # A run recorded before an option existed resumes as if it had asked for that option's default.
  run_json = out / convert_lib.RUN_KEY
  run = json.loads(run_json.read_text())
  del run['request']['options']['tile']
  run_json.write_text(json.dumps(run))
  assert _convert(index_path, out) == counts
  with pytest.raises(jump.ConvertError, match='other options'):
    _convert(index_path, out, dataclasses.replace(OPTIONS, downsample=1, tile=8))
  uint16 = jump.ConvertOptions(clip_percentile=98.0, shard_items=4, dtype='uint16')
  with pytest.raises(jump.ConvertError, match='other options'):
    _convert(index_path, out, uint16)
  _convert(index_path, out, uint16, overwrite=True)
  store = open_store(str(out))
  assert store.manifest['dtype'] == 'uint16'
  _assert_pixels(store, mirror, uint16)
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / store_lib.MANIFEST_NAME).write_text('{}')
  with pytest.raises(jump.ConvertError, match='did not start'):
    _convert(index_path, foreign)


def test_sites_smaller_than_the_crop_are_skipped_not_padded(index_path, tmp_path):
  options = jump.ConvertOptions(clip_percentile=98.0, shard_items=4, crop=(12, 12))
  _convert(index_path, tmp_path / 'store', options)
  store = open_store(str(tmp_path / 'store'))
  assert set(store.table['Metadata_Source']) == {'source_3', 'source_10'}
  qc = pd.read_csv(tmp_path / 'store' / convert_lib.QC_KEY, keep_default_na=False)
  too_small = qc[qc['issue'] == 'too-small']
  assert len(too_small) == 12 and too_small['Metadata_Sample_ID'].str.startswith('source_8').all()


def test_illumination_correction(mirror, tmp_path):
  index_path = _write_index(mirror, tmp_path / 'index.parquet',
                            jump.Selection(sources=('source_3', 'source_8'),
                                           max_rare_position_images=1))
  options = jump.ConvertOptions(clip_percentile=98.0, shard_items=4, illum=True, crop=(12, 12))
  _convert(index_path, tmp_path / 'store', options)
  store = open_store(str(tmp_path / 'store'))
  assert set(store.table['Metadata_Plate']) == {'BR00000001'} and len(store.table) == 7
  _assert_pixels(store, mirror, options, illum=True)
  qc = pd.read_csv(tmp_path / 'store' / convert_lib.QC_KEY, keep_default_na=False)
  no_illum = qc[qc['issue'] == 'illum-missing']
  assert set(no_illum['Metadata_Sample_ID'].str[:8]) == {'source_8'}
  assert (no_illum['detail'] == 'load_data lists no file').all()


def test_site_level_problems(tmp_path):
  rng = np.random.default_rng(3)
  site = {'row': 0, 'Metadata_Sample_ID': 's'}
  for ch in CHANNELS:
    image = rng.integers(1, 1000, (8, 8) if ch == 'ER' else (10, 10)).astype(np.uint16)
    path = str(tmp_path / f'{ch}.tif')
    tifffile.imwrite(path, image)
    np.save(tmp_path / f'{ch}.npy', np.ones((6, 6)))              # not the image's size
    site.update({f'path_{ch}': path, f'key_{ch}': '', f'illum_key_{ch}': '',
                 f'illum_path_{ch}': str(tmp_path / f'{ch}.npy')})
  image, size, issues = convert_lib.process_site(site, OPTIONS, (4, 4))
  assert image is None and size is None and [i['issue'] for i in issues] == ['shape-mismatch']

  site['path_ER'] = site['path_DNA']                               # sizes agree now
  options = jump.ConvertOptions(illum=True)
  image, size, issues = convert_lib.process_site(site, options, (4, 4))
  assert image is None and size == (10, 10) and [i['issue'] for i in issues] == ['illum-shape']

  sparse = np.zeros((10, 10), np.uint16)
  sparse[1, 1] = 7                                   # one lit pixel; the threshold takes the 3rd
  tifffile.imwrite(site['path_RNA'], sparse)
  image, _, issues = convert_lib.process_site(site, jump.ConvertOptions(clip_percentile=88.0),
                                              (4, 4))
  assert image is None and [(i['issue'], i['channel']) for i in issues] == [('zero-filled', 'RNA')]
  image, _, issues = convert_lib.process_site(site, jump.ConvertOptions(clip_percentile=99.0),
                                              (4, 4))
  assert image.shape == (4, 4, 5) and issues == [] and image[..., 2].max() == 255


def test_a_conversion_that_writes_nothing_fails_and_is_not_marked_complete(tmp_path):
  mirror = build_mirror(tmp_path / 'jump')
  index = _write_index(mirror, tmp_path / 'index.parquet')
  images = [os.path.join(d, f) for d, _, files in os.walk(mirror.root) for f in files
            if f.lower().endswith(('.tif', '.tiff'))]
  for path in images:                                  # not fetched yet
    os.rename(path, path + '.absent')
  options = dataclasses.replace(OPTIONS, crop=CROP)    # an explicit crop: nothing probed
  with pytest.raises(jump.ConvertError, match=r'0 of 24 sites written \(at least 1 required\), so '
                                              r'the store is not marked complete'):
    _convert(index, tmp_path / 'store', options)
  assert not os.path.exists(tmp_path / 'store' / store_lib.MANIFEST_NAME)
  assert os.path.exists(tmp_path / 'store' / convert_lib.QC_KEY)
  for path in images:                                  # fetched: the re-run converts them
    os.rename(path + '.absent', path)
  counts = _convert(index, tmp_path / 'store', options)
  assert counts['written'] == 24 - len(SKIPPED)
  assert len(open_store(str(tmp_path / 'store')).table) == counts['written']
  with pytest.raises(jump.ConvertError, match=r'19 of 24 sites written \(at least 20 required\)'):
    _convert(index, tmp_path / 'other', options, min_written=0.8)
