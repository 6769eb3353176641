"""Folds over plates: disjoint parts, whole groups, reproducibility, JSON, errors naming the fault.
"""
import math

import pandas as pd
import pytest

from csarm_jax.data import splits


def _table(sources=3, batches=4, plates=3):
  rows = [{'Metadata_Source': f'S{s}', 'Metadata_Batch': f'S{s}_B{b}',
           'Metadata_Plate': f'S{s}_B{b}_P{p}', 'Metadata_Well': w}
          for s in range(sources) for b in range(batches) for p in range(plates)
          for w in ('A01', 'B02')]
  return pd.DataFrame(rows)


TABLE = _table()
ALL_PLATES = set(TABLE['Metadata_Plate'])
GROUPS = {'source': 'Metadata_Source', 'batch': 'Metadata_Batch', 'plate': 'Metadata_Plate'}
KINDS = [('source', None), ('batch', 4), ('plate', 5)]


def _column_of(plates, column):
  return set(TABLE.loc[TABLE['Metadata_Plate'].isin(plates), column])


@pytest.mark.parametrize('validation_by', ['batch', 'plate'])
@pytest.mark.parametrize('kind,num_folds', KINDS)
def test_parts_are_disjoint_whole_groups_and_cover_every_plate(kind, num_folds, validation_by):
  folds = splits.make_folds(TABLE, kind, num_folds, validation_by=validation_by, seed=3)
  tested = []
  for fold in folds:
    parts = [set(fold.train), set(fold.validation), set(fold.test)]
    assert all(parts)
    assert sum(map(len, parts)) == len(set.union(*parts)) == len(ALL_PLATES)   # disjoint, cover
    # whole groups: no test group also trains; no validation unit also trains
    column = GROUPS[kind]
    assert not _column_of(list(fold.test), column) & _column_of(list(fold.train), column)
    unit = GROUPS[validation_by]
    assert not _column_of(list(fold.validation), unit) & _column_of(list(fold.train), unit)
    train_units = _column_of(list(fold.train) + list(fold.validation), unit)
    assert len(_column_of(list(fold.validation), unit)) == math.ceil(0.15 * len(train_units))
    tested += fold.test
  assert sorted(tested) == sorted(ALL_PLATES)   # every plate is tested in exactly one fold


def test_leave_one_source_out_tests_exactly_one_source():
  folds = splits.make_folds(TABLE, 'source')
  assert [f.name for f in folds] == ['source=S0', 'source=S1', 'source=S2']
  for s, fold in enumerate(folds):
    assert _column_of(list(fold.test), 'Metadata_Source') == {f'S{s}'}
    assert f'S{s}' not in _column_of(list(fold.train) + list(fold.validation), 'Metadata_Source')


@pytest.mark.parametrize('kind,num_folds', KINDS)
def test_reproducible_by_seed(kind, num_folds):
  a = splits.make_folds(TABLE, kind, num_folds, seed=7)
  b = splits.make_folds(TABLE.sample(frac=1, random_state=1), kind, num_folds, seed=7)  # row order
  assert a == b
  c = splits.make_folds(TABLE, kind, num_folds, seed=8)
  assert [f.validation for f in a] != [f.validation for f in c]


def test_no_validation_when_fraction_is_zero():
  for fold in splits.make_folds(TABLE, 'plate', 3, validation_fraction=0):
    assert fold.validation == () and len(fold.train) + len(fold.test) == len(ALL_PLATES)


def test_json_round_trip_and_overlap_check(tmp_path):
  fold = splits.make_folds(TABLE, 'batch', 3, seed=1)[2]
  fold.save(tmp_path / 'fold.json')
  assert splits.Fold.load(tmp_path / 'fold.json') == fold
  broken = fold.to_json().replace(f'"{fold.validation[0]}"', f'"{fold.train[0]}"')
  with pytest.raises(splits.SplitError, match=f'plate {fold.train[0]} is in both train and'):
    splits.Fold.from_json(broken)


def test_errors_name_the_fault():
  with pytest.raises(splits.SplitError, match='Metadata_Source holds 1 distinct'):
    splits.make_folds(_table(sources=1), 'source')
  with pytest.raises(splits.SplitError, match=r'num_folds must be in \[2, 12\]'):
    splits.make_folds(TABLE, 'batch', 13)
  with pytest.raises(splits.SplitError, match='one fold per source'):
    splits.make_folds(TABLE, 'source', 3)
  # one training batch per fold: holding one out for validation empties the train part
  with pytest.raises(splits.SplitError, match='fold source=S0: part train would be empty'):
    splits.make_folds(_table(sources=2, batches=1), 'source')
  with pytest.raises(splits.SplitError, match=r"lacks columns \['Metadata_Batch'\]"):
    splits.make_folds(TABLE.drop(columns='Metadata_Batch'), 'plate', 3)


def test_held_out_parts_of_the_training_sources():
  folds = splits.make_folds(TABLE, kind='source', validation_fraction=0.25,
                            unseen_batches_fraction=0.34, in_domain_fraction=0.2, seed=3)
  for fold in folds:
    parts = {p: set(getattr(fold, p)) for p in splits.PARTS}
    assert set().union(*parts.values()) == ALL_PLATES
    assert sum(len(v) for v in parts.values()) == len(ALL_PLATES)         # disjoint
    by_plate = TABLE.drop_duplicates('Metadata_Plate').set_index('Metadata_Plate')
    batch_of, source_of = by_plate['Metadata_Batch'], by_plate['Metadata_Source']
    train_batches = set(batch_of[list(fold.train)])
    # unseen batches: whole batches none of whose plates train; in-domain: plates of training
    # batches
    assert fold.unseen_batches and not set(batch_of[list(fold.unseen_batches)]) & train_batches
    assert fold.in_domain and set(batch_of[list(fold.in_domain)]) <= train_batches
    assert (set(source_of[list(fold.in_domain + fold.unseen_batches)])
            <= set(source_of[list(fold.train)]))
    assert splits.Fold.from_json(fold.to_json()) == fold
  again = splits.make_folds(TABLE, kind='source', validation_fraction=0.25,
                            unseen_batches_fraction=0.34, in_domain_fraction=0.2, seed=3)
  assert again == folds
  plain = splits.make_folds(TABLE, kind='source', validation_fraction=0.25, seed=3)
  assert [f.validation for f in plain] == [f.validation for f in folds]   # extras do not move it
  with pytest.raises(splits.SplitError, match='in_domain_fraction must be in'):
    splits.make_folds(TABLE, in_domain_fraction=1.0)


def test_sources_restrict_every_part():
  folds = splits.make_folds(TABLE, kind='batch', num_folds=4, validation_by='plate', sources=['S1'])
  s1 = set(TABLE.loc[TABLE['Metadata_Source'] == 'S1', 'Metadata_Plate'])
  assert set().union(*(f.test for f in folds)) == s1
  for f in folds:
    assert set(f.train) | set(f.validation) | set(f.test) == s1
    assert f.settings['sources'] == ['S1']
  with pytest.raises(splits.SplitError, match=r"\['S9'\] not in column Metadata_Source"):
    splits.make_folds(TABLE, kind='plate', num_folds=2, sources=['S1', 'S9'])
