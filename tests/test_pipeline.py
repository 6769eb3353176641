"""The pipeline on a small store: batch contract, crops, determinism, resume, process shares,
normalisation statistics against numpy."""
import copy
import dataclasses
import itertools
import weakref

import jax
import numpy as np
import pytest

from csarm_jax import data
from csarm_jax.data import augment
from store_fixture import write_store

CROP = 16
KW = dict(num_perturbed=6, num_controls=4, contexts_per_batch=4, crop_size=CROP, num_threads=2)


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  path = tmp_path_factory.mktemp('store')
  table, items = write_store(path, perturbed_per_plate=14, controls_per_plate=6)
  store = data.open_store(str(path))
  return store, items, data.make_folds(store.table, 'source', validation_fraction=0)[0]


def _variants(image):
  """Every crop/flip training may produce from one image (the oracle for random_crop_flip)."""
  h, w = image.shape[:2]
  for y, x in itertools.product(range(h - CROP + 1), range(w - CROP + 1)):
    window = image[y:y + CROP, x:x + CROP]
    yield window
    yield window[:, ::-1]
    yield window[::-1]
    yield window[::-1, ::-1]


def _is_crop_of(crop, image):
  return any(np.array_equal(crop, v) for v in _variants(image))


def test_random_crop_flip_and_center_crop_against_slicing():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 2 ** 16 - 1, (40, 20, 24, 3), dtype=np.uint16)
  crops = augment.random_crop_flip(images, CROP, np.random.default_rng(1))
  assert crops.shape == (40, CROP, CROP, 3) and crops.dtype == np.uint16
  kinds = set()
  for crop, image in zip(crops, images):
    for k, v in enumerate(_variants(image)):
      if np.array_equal(crop, v):
        kinds.add(k % 4)
        break
    else:
      raise AssertionError('a crop that is no window/flip of its image')
  assert kinds == {0, 1, 2, 3}                                  # all four flip states occur
  np.testing.assert_array_equal(augment.center_crop(images, CROP), images[:, 2:18, 4:20])
  no_flip = augment.random_crop_flip(images, 20, np.random.default_rng(2), flips=False)
  assert any(np.array_equal(no_flip[i], images[i, :, x:x + 20]) for i in range(3) for x in range(5))
  with pytest.raises(ValueError, match='crop size 21 does not fit images of 20x24'):
    augment.center_crop(images, 21)


@pytest.mark.parametrize('compression, tile', [('lz4hc', None), ('zstd', None), ('lz4', None),
                                               ('none', None), ('lz4hc', 5), ('none', 4)])
def test_store_windows_equal_numpy_windows(tmp_path, compression, tile):
  # Tiled images: a crop crosses tile borders and must still read back exactly.
  _, items = write_store(tmp_path, compression=compression, tile=tile)
  store = data.open_store(str(tmp_path))
  assert store.array.chunk_layout.read_chunk.shape == (1, tile or 20, tile or 20, 5)
  rows = np.array([5, 0, 5, 33, 79])
  for rng in (np.random.default_rng(3), None):
    windows = augment.crop_windows(len(rows), 20, 20, CROP, rng)
    expected = augment.apply_windows(items[rows], windows)
    np.testing.assert_array_equal(store.read_crops(rows, windows), expected)
    out = np.full(expected.shape, 7, np.uint8)
    assert store.read_crops(rows, windows, out) is out
    np.testing.assert_array_equal(out, expected)
  flipped = augment.Windows(np.array([1, 2]), np.array([3, 0]), np.array([True, False]),
                            np.array([True, True]), CROP)
  np.testing.assert_array_equal(store.read_crops(rows[:2], flipped)[0],
                                items[5, 1:17, 3:19][::-1, ::-1])
  with pytest.raises(ValueError, match=r'out is uint8 \(2, 16, 16, 5\), the crops are uint8 \(5'):
    store.read_crops(rows, flipped, np.empty((2, CROP, CROP, 5), np.uint8))


def _check_batch(batch, store, items, c, m, train):
  assert batch['images'].shape == (c, m, CROP, CROP, 5) and batch['images'].dtype == np.uint8
  assert batch['labels'].shape == (c, m) and batch['labels'].dtype == np.int32
  assert batch['mask'].dtype == np.float32 and batch['is_control'].dtype == bool
  assert batch['plate'].shape == (c,) and batch['plate'].dtype == np.int32
  assert batch['rows'].dtype == np.int64
  table = store.table.set_index('row')
  for i, j in np.ndindex(c, m):
    row = batch['rows'][i, j]
    if row < 0:
      assert batch['mask'][i, j] == 0 and batch['labels'][i, j] == -1
      assert not batch['images'][i, j].any() and not batch['is_control'][i, j]
      continue
    assert batch['mask'][i, j] == 1
    assert batch['labels'][i, j] == table.loc[row, 'label']
    assert batch['is_control'][i, j] == table.loc[row, 'is_control']
    if train:
      image = batch['images'][i, j]
      assert _is_crop_of(image[:, ::-1] if batch['flip_w'][i, j] else image, items[row])
    else:
      np.testing.assert_array_equal(batch['images'][i, j], items[row, 2:18, 2:18])


def test_horizontal_flips_are_left_to_the_device(written):
  """read_contexts reads each crop with its vertical flip and returns the horizontal one, which
  ``flip_w_on_device`` applies: together exactly the windows drawn from the same generators."""
  store, items, fold = written
  index = data.index_plates(store.table, fold.train, num_classes=len(store.class_ids))
  rngs = [np.random.default_rng([7, i]) for i in range(6)]
  contexts = [data.training_context(index, rng, 6, 4) for rng in rngs]
  saved = copy.deepcopy(rngs)                       # the generators' states after sampling
  batch = data.read_contexts(store, contexts, CROP, rngs)
  windows = augment.concatenate([augment.crop_windows(c.num_real, 20, 20, CROP, rng)
                                 for c, rng in zip(contexts, copy.deepcopy(saved))])
  rows = batch['rows'].ravel()
  expected = augment.apply_windows(items[rows], windows).reshape(batch['images'].shape)
  flip_w = batch['flip_w']
  assert flip_w.dtype == bool and flip_w.shape == rows.reshape(6, -1).shape
  np.testing.assert_array_equal(flip_w.ravel(), windows.flip_w)
  assert flip_w.any() and not flip_w.all() and windows.flip_h.any()
  np.testing.assert_array_equal(np.asarray(augment.flip_w_on_device(batch['images'], flip_w)),
                                expected)
  on_host = data.read_contexts(store, contexts, CROP, saved, defer_flip_w=False)
  np.testing.assert_array_equal(on_host['images'], expected)
  assert not on_host['flip_w'].any()
  centre = data.read_contexts(store, contexts, CROP)
  assert not centre['flip_w'].any()


def test_training_batches_follow_the_contract(written):
  store, items, fold = written
  train = data.training_batches(store, fold.train, seed=0, **KW)
  batch = next(train)
  _check_batch(batch, store, items, 4, 10, train=True)
  plates = store.table.set_index('row').loc[batch['rows'][batch['rows'] >= 0].ravel(),
                                            'Metadata_Plate'].to_numpy().reshape(4, 10)
  assert (plates == np.asarray(train.plates)[batch['plate']][:, None]).all()   # one plate each
  assert set(train.plates) == set(fold.train)


def test_mixed_and_feature_batches(tmp_path):
  table, items = write_store(tmp_path, item_shape=(7,), dtype='float32')
  store = data.open_store(str(tmp_path))
  batch = next(data.training_batches(store, sorted(set(table['Metadata_Plate'])), sampling='mixed',
                                     **dict(KW, num_controls=0)))
  assert batch['images'].shape == (4, 6, 7) and batch['images'].dtype == np.float32
  np.testing.assert_array_equal(batch['images'], items[batch['rows']])
  assert (batch['plate'] == -1).all() and not batch['is_control'].any()
  with pytest.raises(ValueError, match="sampling 'mixed' draws no controls"):
    data.training_batches(store, ['source_1_B0_P0'], sampling='mixed', **KW)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_deterministic_and_resumes_exactly(written):
  store, _, fold = written
  first = _take(data.training_batches(store, fold.train, seed=5, **KW), 5)
  assert (first[0]['rows'] != first[1]['rows']).any()              # batches are fresh draws
  _assert_same(first, _take(data.training_batches(store, fold.train, seed=5, **KW), 5))
  other = next(data.training_batches(store, fold.train, seed=6, **KW))
  assert (other['rows'] != first[0]['rows']).any()
  it = data.training_batches(store, fold.train, seed=5, **KW)
  _take(it, 3)
  state = it.get_state()
  assert state['next_batch'] == 3
  resumed = data.training_batches(store, fold.train, seed=5, **KW)
  resumed.set_state(state)
  _assert_same(first[3:], _take(resumed, 2))
  with pytest.raises(ValueError, match='fingerprint'):
    data.training_batches(store, fold.train, seed=6, **KW).set_state(state)
  finite = data.training_batches(store, fold.train, seed=5, num_batches=2, **KW)
  assert len(finite) == 2 and len(list(finite)) == 2


def test_recycled_batch_memory_is_never_overwritten_while_referenced(written):
  # The pipeline reuses a batch's image memory once nothing references it. Kept batches (more than
  # its pool holds), views of them and JAX arrays made from them must keep their content.
  store, _, fold = written
  copies = [{k: v.copy() for k, v in b.items()}
            for b in _take(data.training_batches(store, fold.train, seed=7, **KW), 12)]
  it = data.training_batches(store, fold.train, seed=7, **KW)
  recycled = weakref.ref(next(it)['images'].base)    # dropped at once
  _take(it, 3)
  assert recycled() is not None                      # its buffer stayed in the pool
  it.set_state({**it.get_state(), 'next_batch': 0})
  kept = _take(it, 10)
  on_device = jax.device_put(next(it)['images'])
  view = next(it)['images'][1]
  _take(it, 8)
  _assert_same(copies[:10], kept)
  np.testing.assert_array_equal(np.asarray(on_device), copies[10]['images'])
  np.testing.assert_array_equal(view, copies[11]['images'][1])


def _concat(shares):
  return {k: np.concatenate([s[k] for s in shares]) for k in shares[0]}


def test_process_shares_union_is_the_single_process_batch(written):
  store, _, fold = written
  single = _take(data.training_batches(store, fold.train, seed=2, **KW), 3)
  shares = [_take(data.training_batches(store, fold.train, seed=2, process_index=p, process_count=2,
                                        **KW), 3) for p in range(2)]
  for b in range(3):
    assert shares[0][b]['images'].shape[0] == 2
    _assert_same([single[b]], [_concat([shares[0][b], shares[1][b]])])
  ev = list(data.evaluation_batches(store, fold.test, **KW))
  ev_shares = [list(data.evaluation_batches(store, fold.test, process_index=p, process_count=4,
                                            **KW)) for p in range(4)]
  _assert_same(ev, [_concat([s[b] for s in ev_shares]) for b in range(len(ev))])
  with pytest.raises(ValueError, match='divisible by process_count 3'):
    data.training_batches(store, fold.train, process_count=3, **KW)


def test_evaluation_batches_cover_the_test_plates(written):
  store, items, fold = written
  ev = data.evaluation_batches(store, fold.test, **KW)
  batches = list(ev)
  # 4 test plates x ceil(14 / 6) = 12 contexts = 3 batches of 4; with C=5, 3 batches, 3 padding
  assert len(ev) == len(batches) == 3
  rows = []
  for batch in batches:
    _check_batch(batch, store, items, 4, 10, train=False)
    rows += list(batch['rows'][~batch['is_control'] & (batch['rows'] >= 0)])
  test_table = store.table[store.table['Metadata_Plate'].isin(fold.test)]
  assert sorted(rows) == sorted(test_table.loc[~test_table['is_control'], 'row'])
  assert ev.report['perturbed_images'] == ev.report['perturbed_images_served'] == len(rows) == 56
  subset = data.evaluation_batches(store, fold.test, max_images_per_plate=5, **KW)
  assert subset.report['perturbed_images_served'] == 4 * 5          # counted, not silent
  assert subset.report['perturbed_images'] == 56
  _assert_same(batches, list(data.evaluation_batches(store, fold.test, **KW)))
  padded = list(data.evaluation_batches(store, fold.test, **dict(KW, contexts_per_batch=5)))
  assert len(padded) == 3 and (padded[-1]['plate'][2:] == -1).all()
  assert not padded[-1]['mask'][2:].any() and (padded[-1]['mask'][:2].sum(1) > 0).all()


def test_whole_plates_stream_in_fixed_chunks(written):
  store, items, fold = written
  plan = data.whole_plates(store, fold.test[:2], chunk_size=8)
  assert plan.plates == tuple(fold.test[:2]) and len(plan.contexts) == 6   # 20 rows: 3 chunks each
  second = [c for c in plan.contexts if c.plate == 1]
  chunks = list(data.read_chunks(store, second, crop_size=CROP))
  assert len(chunks) == 3 and all(c['images'].shape == (8, CROP, CROP, 5) for c in chunks)
  rows = np.concatenate([c['rows'] for c in chunks])
  table = store.table[store.table['Metadata_Plate'] == fold.test[1]].sort_values('row')
  in_order = np.concatenate([table.loc[~table['is_control'], 'row'],    # perturbed, then controls
                             table.loc[table['is_control'], 'row']])
  np.testing.assert_array_equal(rows[:20], in_order)
  assert (rows[20:] == -1).all() and chunks[-1]['mask'].sum() == 4
  np.testing.assert_array_equal(chunks[0]['images'], items[rows[:8], 2:18, 2:18])


def test_bad_plates_in_the_pipeline_are_reported(written):
  store, _, fold = written
  table = store.table.copy()
  drop = (table['Metadata_Plate'] == fold.train[0]) & table['is_control']
  broken = dataclasses.replace(store, table=table[~drop])
  with pytest.raises(data.ContextError, match=f'plate {fold.train[0]}: no control images'):
    data.training_batches(broken, fold.train, **KW)
  train = data.training_batches(broken, fold.train, skip_bad=True, **KW)
  assert fold.train[0] not in train.plates and fold.train[0] in train.report['skipped_plates']
  few = data.training_batches(store, fold.train, **dict(KW, num_perturbed=20))
  assert few.report['too_few'] == {p: {'perturbed': 14, 'controls': 6} for p in fold.train}


@pytest.mark.parametrize('dtype', ['uint8', 'uint16', 'float32'])
def test_normalization_matches_numpy(tmp_path, dtype):
  shape = (7,) if dtype == 'float32' else (12, 10, 5)
  table, items = write_store(tmp_path, item_shape=shape, dtype=dtype, seed=3)
  if dtype != 'float32':                       # make channels differ, so a mixed-up axis fails
    items = items // np.arange(1, 6, dtype=dtype)
    array = data.open_array(str(tmp_path), write=True)
    array[...].write(items).result()
  store = data.open_store(str(tmp_path))
  rows = table.loc[~table['is_control'] & table['Metadata_Plate'].str.startswith('source_1'), 'row']
  stats = data.compute_normalization(store, rows.to_numpy(), chunk_size=5)
  x = items[rows].astype(np.float64)
  if dtype != 'float32':
    x = x / np.iinfo(dtype).max
  axes = tuple(range(x.ndim - 1))
  np.testing.assert_allclose(stats.mean, x.mean(axes), rtol=1e-6)
  np.testing.assert_allclose(stats.std, x.std(axes), rtol=1e-6)
  assert stats.num_images == len(rows)
  batch = items[rows[:3]]
  np.testing.assert_allclose(jax.jit(data.normalize)(batch, stats),
                             (x[:3] - x.mean(axes)) / x.std(axes), rtol=1e-4, atol=1e-5)
  stats.save(tmp_path / 'normalization.json')
  loaded = data.NormStats.load(tmp_path / 'normalization.json')
  np.testing.assert_array_equal(loaded.mean, stats.mean)
  assert (loaded.kind, loaded.channels, loaded.max_value) == (stats.kind, stats.channels,
                                                              stats.max_value)
  capped = data.compute_normalization(store, rows.to_numpy(), max_images=10, seed=1)
  assert capped.num_images == 10 and not np.array_equal(capped.mean, stats.mean)
  again = data.compute_normalization(store, rows.to_numpy(), max_images=10, seed=1)
  np.testing.assert_array_equal(capped.mean, again.mean)
