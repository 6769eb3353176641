"""Context samplers against the table they index: plates, counts, coverage, label shift, errors."""
import numpy as np
import pandas as pd
import pytest

from csarm_jax.data import contexts as cx

NUM_CLASSES = 8


def _table(plates):
  """plates: {name: (num_perturbed, num_controls)}; labels cycle over the classes; rows shuffled
  so that nothing depends on table order."""
  rows = []
  for plate, (n_pert, n_ctrl) in plates.items():
    rows += [{'Metadata_Plate': plate, 'is_control': False, 'label': i % NUM_CLASSES}
             for i in range(n_pert)]
    rows += [{'Metadata_Plate': plate, 'is_control': True, 'label': -1} for _ in range(n_ctrl)]
  table = pd.DataFrame(rows)
  table['row'] = np.arange(len(table)) * 3 + 100            # store rows need not be 0..n-1
  return table.sample(frac=1, random_state=0)


PLATES = {'P0': (40, 30), 'P1': (25, 12), 'P2': (64, 20), 'P3': (80, 50)}
TABLE = _table(PLATES)
BY_ROW = TABLE.set_index('row')


def _index(plates=tuple(PLATES), table=TABLE, **kw):
  return cx.index_plates(table, list(plates), num_classes=NUM_CLASSES, **kw)


def _check_rows(ctx, index):
  """Real rows belong to the context's plate, with the table's labels and control flags."""
  real = ctx.rows >= 0
  info = BY_ROW.loc[ctx.rows[real]]
  if ctx.plate >= 0:
    assert (info['Metadata_Plate'] == index.plates[ctx.plate]).all()
  np.testing.assert_array_equal(ctx.is_control[real], info['is_control'])
  np.testing.assert_array_equal(ctx.labels[real], np.where(info['is_control'], -1, info['label']))
  assert (ctx.labels[~real] == -1).all() and not ctx.is_control[~real].any()
  # layout: real rows first, perturbed before controls
  assert real[:ctx.num_real].all() and not ctx.is_control[:(~ctx.is_control & real).sum()].any()


def test_training_context_is_one_plate_with_n_labelled_and_k_controls():
  index = _index(['P0', 'P3'])
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(30):
    ctx = cx.training_context(index, rng, num_perturbed=24, num_controls=16)
    _check_rows(ctx, index)
    assert len(ctx.rows) == 40 and ctx.num_real == 40
    assert (~ctx.is_control).sum() == 24 and ctx.is_control.sum() == 16
    assert len(np.unique(ctx.rows)) == 40                  # enough images: no replacement
    seen.add(ctx.plate)
  assert seen == {0, 1}
  assert cx.too_few_report(index, 24, 16) == {}


def test_exactly_n_is_not_with_replacement():
  index = _index(['P2'])                                    # 64 perturbed, 20 controls
  ctx = cx.training_context(index, np.random.default_rng(1), 64, 20)
  assert len(np.unique(ctx.rows)) == 84
  assert cx.too_few_report(index, 64, 20) == {}


@pytest.mark.parametrize('too_few', ['replace', 'pad'])
def test_too_few_images_is_reported_and_repeats_or_pads(too_few):
  index = _index(['P1'])                                    # 25 perturbed, 12 controls
  assert cx.too_few_report(index, 32, 16) == {'P1': {'perturbed': 25, 'controls': 12}}
  ctx = cx.training_context(index, np.random.default_rng(2), 32, 16, too_few=too_few)
  _check_rows(ctx, index)
  pert, ctrl = ctx.rows[~ctx.is_control & (ctx.rows >= 0)], ctx.rows[ctx.is_control]
  assert set(pert) == set(index.perturbed[0]) and set(ctrl) == set(index.controls[0])  # all, once+
  if too_few == 'replace':
    assert len(pert) == 32 and len(ctrl) == 16 and ctx.num_real == 48
  else:
    assert len(pert) == 25 and len(ctrl) == 12 and ctx.num_real == 37 and len(ctx.rows) == 48


def test_arm_bn_contexts_have_no_controls():
  index = _index(['P0'], require_controls=False)
  ctx = cx.training_context(index, np.random.default_rng(3), 16, 0)
  assert len(ctx.rows) == 16 and not ctx.is_control.any()


def test_mixed_contexts_span_plates_without_controls():
  index = _index(['P0', 'P1', 'P2'], require_controls=False)
  rng = np.random.default_rng(4)
  allowed = set(np.concatenate(index.perturbed))
  plates_per_context = []
  for _ in range(10):
    ctx = cx.mixed_context(index, rng, 32)
    _check_rows(ctx, index)
    assert ctx.plate == -1 and len(ctx.rows) == 32 and not ctx.is_control.any()
    assert set(ctx.rows) <= allowed and len(np.unique(ctx.rows)) == 32
    plates_per_context.append(BY_ROW.loc[ctx.rows, 'Metadata_Plate'].nunique())
  assert max(plates_per_context) > 1


@pytest.mark.parametrize('chunking', ['consecutive', 'balanced'])
def test_evaluation_covers_every_perturbed_image_once(chunking):
  index = _index()
  contexts = cx.evaluation_contexts(index, 16, 10, seed=1234, chunking=chunking)
  covered = []
  for ctx in contexts:
    _check_rows(ctx, index)
    n_pert = int((~ctx.is_control & (ctx.rows >= 0)).sum())
    assert len(ctx.rows) == 26 and 1 <= n_pert <= 16 and ctx.is_control.sum() == 10
    assert len(np.unique(ctx.rows[ctx.is_control])) == 10     # every plate has >= 10 controls
    covered += list(ctx.rows[~ctx.is_control & (ctx.rows >= 0)])
  expected = TABLE.loc[~TABLE['is_control'], 'row']
  assert sorted(covered) == sorted(expected)                 # each exactly once
  sizes = [int((~c.is_control & (c.rows >= 0)).sum()) for c in contexts if c.plate == 1]
  assert sizes == ([16, 9] if chunking == 'consecutive' else [13, 12])   # P1: 25 images
  # fixed permutation: same seed, same contexts; a plate's contexts do not depend on other plates
  alone = cx.evaluation_contexts(_index(['P1']), 16, 10, seed=1234, chunking=chunking)
  p1 = [c.rows for c in contexts if c.plate == 1]
  np.testing.assert_array_equal(np.stack(p1), np.stack([c.rows for c in alone]))
  other = cx.evaluation_contexts(index, 16, 10, seed=99, chunking=chunking)
  assert any((a.rows != b.rows).any() for a, b in zip(contexts, other))


def test_evaluation_subset_is_a_prefix_of_the_fixed_permutation():
  index = _index()
  full = cx.evaluation_contexts(index, 4, 2, seed=7)
  capped = cx.evaluation_contexts(index, 4, 2, seed=7, max_images_per_plate=6)
  for p in range(len(index.plates)):
    rows = lambda cs: np.concatenate([c.rows[~c.is_control & (c.rows >= 0)]
                                      for c in cs if c.plate == p])
    kept = rows(capped)
    assert len(kept) == min(6, len(index.perturbed[p]))
    np.testing.assert_array_equal(kept, rows(full)[:len(kept)])     # same order, first images


def test_whole_plate_contexts_hold_the_whole_plate():
  index = _index()
  for ctx, (plate, (n_pert, n_ctrl)) in zip(cx.whole_plate_contexts(index), PLATES.items()):
    _check_rows(ctx, index)
    assert len(ctx.rows) == ctx.num_real == n_pert + n_ctrl
    assert sorted(ctx.rows) == sorted(TABLE.loc[TABLE['Metadata_Plate'] == plate, 'row'])


def _class_counts(ctx):
  return np.bincount(ctx.labels[~ctx.is_control & (ctx.rows >= 0)], minlength=NUM_CLASSES)


def test_label_shift_follows_the_dirichlet_concentration():
  index = _index(['P3', 'P2'])                     # >= 8 images per class on both plates
  peaked = cx.label_shift_contexts(index, 8, 4, alpha=1e-3, seed=5678, num_classes=NUM_CLASSES)
  flat = cx.label_shift_contexts(index, 8, 4, alpha=1e4, seed=5678, num_classes=NUM_CLASSES)
  assert len(peaked) == len(flat) == 2 * NUM_CLASSES
  for ctx in peaked + flat:
    _check_rows(ctx, index)
    assert ctx.is_control.sum() == 4
  assert np.mean([_class_counts(c).max() / 8 for c in peaked]) > 0.9     # near single-class
  assert np.mean([_class_counts(c).max() for c in flat]) < 3             # near balanced (1 each)
  # rotation: over a plate's num_classes contexts every class gets the same total (= N)
  for plate in (0, 1):
    totals = sum(_class_counts(c) for c in peaked if c.plate == plate)
    np.testing.assert_array_equal(totals, np.full(NUM_CLASSES, 8))
  again = cx.label_shift_contexts(index, 8, 4, alpha=1e-3, seed=5678, num_classes=NUM_CLASSES)
  assert all((a.rows == b.rows).all() for a, b in zip(peaked, again))


def test_label_shift_gives_what_a_small_class_has():
  index = _index(['P1'])                           # 25 images: class 0 has 4, the others 3
  contexts = cx.label_shift_contexts(index, 24, 0, alpha=1e-3, seed=0, num_classes=NUM_CLASSES)
  for ctx in contexts:
    counts = _class_counts(ctx)
    assert counts.max() <= 4 and ctx.num_real == counts.sum() and len(ctx.rows) == 24


def test_bad_input_names_the_plate_or_column():
  table = _table({'ok': (10, 5), 'no_ctrl': (10, 0), 'no_pert': (0, 5)})
  with pytest.raises(cx.ContextError, match='plate no_ctrl: no control images'):
    _index(['ok', 'no_ctrl'], table)
  with pytest.raises(cx.ContextError, match='plate no_pert: no perturbed images'):
    _index(['no_pert'], table)
  assert _index(['no_ctrl'], table, require_controls=False).plates == ('no_ctrl',)
  with pytest.raises(cx.ContextError, match='plate missing of the train part is not in the table'):
    _index(['ok', 'missing'], table, part='train')
  with pytest.raises(cx.ContextError, match='the validation part has no plates'):
    _index([], table, part='validation')
  with pytest.raises(cx.ContextError, match=r"lacks columns \['is_control'\]"):
    _index(['ok'], table.drop(columns='is_control'))
  bad_label = table.copy()
  perturbed = (bad_label['Metadata_Plate'] == 'ok') & ~bad_label['is_control']
  bad_label.loc[perturbed, 'label'] = [9, -1] + [0] * 8
  with pytest.raises(cx.ContextError, match=r'plate ok: 2 perturbed rows have a label outside '
                                            r'\[0, 8\) in column label'):
    _index(['ok'], bad_label)
  with pytest.raises(cx.ContextError,
                     match=r'plate ok: 1 perturbed rows have a label outside \[-1, 8\)'):
    _index(['ok'], bad_label, require_labels=False)


def test_skipping_is_counted_never_silent():
  table = _table({'ok': (10, 5), 'no_ctrl': (10, 0), 'no_pert': (0, 5)})
  table.loc[(table['Metadata_Plate'] == 'ok') & ~table['is_control'], 'label'] = [9] * 3 + [1] * 7
  index = _index(['ok', 'no_ctrl', 'no_pert'], table, skip_bad=True)
  assert index.plates == ('ok',)
  assert set(index.skipped_plates) == {'no_ctrl', 'no_pert'}
  assert index.skipped_rows == {'ok': 3} and len(index.perturbed[0]) == 7
  with pytest.raises(cx.ContextError, match='every plate of the plates part was skipped'):
    _index(['no_ctrl'], table, skip_bad=True)
