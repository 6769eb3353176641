"""The image store: round trip, URLs, pickling, and validation errors that name the fault."""
import json
import pickle

import numpy as np
import pandas as pd
import pytest

from csarm_jax import data
from csarm_jax.data import store as store_lib
from csarm_jax.data import store_writer
from store_fixture import write_store


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  path = tmp_path_factory.mktemp('store')
  table, items = write_store(path, shard_items=16)
  return path, table, items


def test_round_trip_any_order_with_repeats(written):
  path, table, items = written
  store = data.open_store(str(path))
  rows = np.array([5, 3, 5, len(table) - 1, 0])
  np.testing.assert_array_equal(store.read(rows), items[rows])
  assert store.read([]).shape == (0, *items.shape[1:])
  assert store.class_ids == [c for c, _ in data.POSITIVE_CONTROLS]
  assert store.kind == 'images' and store.item_shape == items.shape[1:]


def test_file_url_and_pickle(written):
  path, _, items = written
  store = data.open_store('file://' + str(path))
  clone = pickle.loads(pickle.dumps(store))
  np.testing.assert_array_equal(clone.read([7]), items[[7]])


def test_sharded_layout_one_file_per_shard(written):
  path, table, _ = written
  store = data.open_store(str(path))
  assert store_writer.shard_items_of(store.array) == 16
  shard_files = list((path / store_lib.ARRAY_NAME / 'c').rglob('*'))
  assert len([f for f in shard_files if f.is_file()]) == -(-len(table) // 16)


def test_tile_side_known_answers():
  # 5 channels: the largest divisor <= 192 whose tile holds a multiple of 8 elements of blosc's
  # typesize (2 bytes for uint8 and uint16: blosc bitshuffles it), else the largest divisor <= 192,
  # else (under 48, a prime side) the whole side.
  known = {16: 16, 20: 20, 50: 50, 64: 64, 192: 192, 200: 100, 201: 67, 256: 128, 270: 135,
           300: 100, 512: 128, 540: 180, 541: 541, 1000: 100, 1080: 180, 2 * 5 * 41: 82,
           4 * 47: 188, 2 * 193: 386, 3 * 5 * 7: 105}
  assert {side: store_writer.tile_side(side, 5) for side in known} == known
  # 2 uint8 channels: 150² x 2 = 45,000 bytes is 22,500 byte pairs, not a multiple of 8.
  assert store_writer.tile_side(300, 2) == 100 and store_writer.tile_side(300, 8) == 150
  assert store_writer.tile_side(300, 2, dtype='uint16') == 150
  assert [store_writer.blosc_typesize(d) for d in ('uint8', 'uint16', 'float32')] == [2, 2, 4]
  assert store_writer.tile_side(512, 5, 64) == 64
  with pytest.raises(store_lib.StoreError,
                     match='tile 100 must be a positive divisor of the image side 512'):
    store_writer.tile_side(512, 5, 100)


def test_default_tiles_are_bitshuffled(tmp_path):
  # blosc stores a tile it cannot bitshuffle (not a multiple of 8 elements) as shuffled-off bytes:
  # on images with a random low bit and smooth high bits that is over twice as large.
  rng = np.random.default_rng(0)
  ramp = np.add.outer(np.arange(540), np.arange(540)) // 16
  images = (ramp[None, :, :, None] * 2 + rng.integers(0, 2, (2, 540, 540, 5))).astype(np.uint8)
  sizes = {}
  default = store_writer.tile_side(540, 5)
  for tile in (default, 135):                              # 180: 162,000 elements; 135: 91,125
    path = str(tmp_path / str(tile))
    array = store_writer.create_array(path, 2, (540, 540, 5), 'uint8', tile=tile)
    array[...].write(images).result()
    sizes[tile] = sum(f.stat().st_size for f in (tmp_path / str(tile)).rglob('*') if f.is_file())
    array = store_lib.open_array(path)
    np.testing.assert_array_equal(array.read().result(), images)
    blosc = array.codec.to_json()['codecs'][0]['configuration']['codecs'][1]['configuration']
    assert blosc['typesize'] == 2 and blosc['shuffle'] == 'bitshuffle', blosc
  assert default == 180 and sizes[default] * 2 < sizes[135], sizes
  with pytest.raises(store_lib.StoreError, match='tile 7'):
    store_writer.create_array('/nonexistent/never/written', 4, (20, 20, 5), 'uint8', tile=7)


def test_feature_store(tmp_path):
  table, items = write_store(tmp_path, item_shape=(7,), dtype='float32')
  store = data.open_store(str(tmp_path))
  assert store.kind == 'features'
  np.testing.assert_array_equal(store.read([2, 1]), items[[2, 1]])


def _rewrite(path, table=None, manifest=None):
  if table is not None:
    table.to_parquet(path / store_lib.TABLE_NAME, index=False)
  if manifest is not None:
    (path / store_lib.MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize('corrupt, message', [
    (lambda t, m: t.assign(Metadata_Plate=np.arange(len(t))), 'Metadata_Plate must hold strings'),
    (lambda t, m: t.drop(columns='label'), r"lacks columns \['label'\]"),
    (lambda t, m: t.assign(row=0),
     'duplicates .*: 160 rows, e.g. plate source_1_B0_P0 well A01: row = 0'),
    (lambda t, m: t.assign(row=t.row + 1), "row must index the array's 160 items, but 1 rows, "
                                           'e.g. plate source_2_B1_P1 well D02: row = 160'),
    (lambda t, m: t.assign(row=t.row.astype(float)),
     'column row must hold integers, found dtype float64'),
    (lambda t, m: t.assign(label=np.where(t.label == 3, 9, t.label)),
     r'class id in \[0, 8\), but 16 rows, e.g. plate source_1_B0_P0 well D01: label = 9'),
    (lambda t, m: t.assign(is_control=t.is_control.astype(str)), 'is_control must be boolean'),
    (lambda t, m: t.iloc[:-1], 'silently lost'),
    (lambda t, m: t.assign(label=np.where(t.label >= 0, (t.label + 1) % 8, -1)), 'label disagrees'),
    (lambda t, m: t.assign(is_control=True), 'is_control'),
    (lambda t, m: t.assign(Metadata_Batch=[str(i) for i in range(len(t))]), 'unique'),
    (lambda t, m: m.update(channels=['DNA']), 'channel/feature names'),
    (lambda t, m: m.update(dtype='uint16'), 'dtype'),
    (lambda t, m: m.update(format_version=99), 'format_version'),
    (lambda t, m: m.pop('classes'), r"lacks keys \['classes'\]"),
])
def test_validation_names_the_fault(tmp_path, corrupt, message):
  table, _ = write_store(tmp_path)
  manifest = json.loads((tmp_path / store_lib.MANIFEST_NAME).read_text())
  result = corrupt(table, manifest)
  if isinstance(result, pd.DataFrame):
    _rewrite(tmp_path, table=result)
  else:
    _rewrite(tmp_path, manifest=manifest)
  with pytest.raises(data.StoreError, match=message):
    data.open_store(str(tmp_path))


def test_missing_parts_are_named(tmp_path):
  with pytest.raises(data.StoreError, match='manifest.json is missing'):
    data.open_store(str(tmp_path))
  write_store(tmp_path)
  (tmp_path / store_lib.TABLE_NAME).unlink()
  with pytest.raises(data.StoreError, match='metadata.parquet is missing'):
    data.open_store(str(tmp_path))
