"""Folds over plates: which plates train, validate and test.

    folds = make_folds(table, kind='source')                      # leave-one-source-out
    folds = make_folds(table, kind='batch', num_folds=5, seed=0)  # leave-batches-out k-fold
    folds = make_folds(table, kind='plate', num_folds=5, validation_by='plate')
    folds[0].save(workdir / 'fold.json'); Fold.load(workdir / 'fold.json')

Every fold partitions the table's plates into train / validation / test; a plate is never in two
parts, because whole groups (sources, batches or plates) are assigned. The k-fold kinds shuffle the
sorted groups with ``seed`` and cut them into ``num_folds`` near-equal parts (GroupKFold with
shuffling). Validation holds out ``ceil(validation_fraction * n)`` of the fold's n training batches
(or plates), at least one, drawn with a per-fold seed -- the reference's inner GroupShuffleSplit
with test_size=0.15 over batches. ``validation_fraction=0`` gives no validation part; any other
empty part raises an error naming the fold and the part.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
from etils import epath

SPLIT_KINDS = {'source': 'Metadata_Source', 'batch': 'Metadata_Batch', 'plate': 'Metadata_Plate'}
VALIDATION_BY = {'batch': 'Metadata_Batch', 'plate': 'Metadata_Plate'}
PARTS = ('train', 'validation', 'test', 'in_domain', 'unseen_batches')
OPTIONAL_PARTS = ('in_domain', 'unseen_batches')   # held-out plates of the training sources
_PLURAL = {'source': 'sources', 'batch': 'batches', 'plate': 'plates'}


class SplitError(ValueError):
  """A split that cannot be made: too few groups, an empty part, a missing column."""


@dataclass(frozen=True)
class Fold:
  """One fold: plate IDs per part (sorted), a readable description and the settings that made it."""
  name: str
  description: str
  train: tuple[str, ...]
  validation: tuple[str, ...]
  test: tuple[str, ...]
  settings: dict[str, Any] = field(default_factory=dict)
  in_domain: tuple[str, ...] = ()        # unseen plates of the training batches
  unseen_batches: tuple[str, ...] = ()   # unseen batches of the training sources

  def to_json(self) -> str:
    return json.dumps(asdict(self), indent=2)

  @classmethod
  def from_json(cls, text: str) -> Fold:
    raw = json.loads(text)
    missing = [k for k in ('name', 'description') + PARTS
               if k not in raw and k not in OPTIONAL_PARTS]
    if missing:
      raise SplitError(f'fold JSON lacks keys {missing}')
    fold = cls(name=raw['name'], description=raw['description'],
               **{p: tuple(raw.get(p, ())) for p in PARTS}, settings=raw.get('settings', {}))
    _check_disjoint(fold)
    return fold

  def save(self, path: str | epath.Path) -> None:
    epath.Path(path).write_text(self.to_json())

  @classmethod
  def load(cls, path: str | epath.Path) -> Fold:
    return cls.from_json(epath.Path(path).read_text())


def _check_disjoint(fold: Fold) -> None:
  for i, a in enumerate(PARTS):
    for b in PARTS[i + 1:]:
      both = sorted(set(getattr(fold, a)) & set(getattr(fold, b)))
      if both:
        raise SplitError(f'fold {fold.name}: plate {both[0]} is in both {a} and {b}')


def _plates_of(table: pd.DataFrame, column: str, groups) -> tuple[str, ...]:
  return tuple(sorted(table.loc[table[column].isin(groups), 'Metadata_Plate'].unique()))


def _hold_out(table: pd.DataFrame, train_plates: tuple[str, ...], name: str, by: str,
              fraction: float, rng: np.random.Generator, part: str = 'validation'):
  """Splits the training plates into (train, held out) by whole batches or plates."""
  if fraction == 0:
    return train_plates, ()
  column = VALIDATION_BY[by]
  sub = table[table['Metadata_Plate'].isin(train_plates)]
  units = np.sort(sub[column].unique())
  n_held = max(1, math.ceil(fraction * len(units)))
  if n_held >= len(units):
    raise SplitError(f'fold {name}: part train would be empty: holding out {n_held} of its '
                     f'{len(units)} {_PLURAL[by]} for {part} leaves none to train on')
  held = _plates_of(sub, column, rng.choice(units, n_held, replace=False))
  return tuple(p for p in train_plates if p not in set(held)), held


def make_folds(table: pd.DataFrame, kind: str = 'source', num_folds: int | None = None,
               validation_by: str = 'batch', validation_fraction: float = 0.15,
               in_domain_fraction: float = 0.0, unseen_batches_fraction: float = 0.0,
               seed: int = 0, sources: Sequence[str] | None = None) -> list[Fold]:
  """Folds over the table's plates (see the module docstring).

  kind: 'source' (leave-one-source-out: one fold per source, ``num_folds`` must be None),
  'batch' or 'plate' (k-fold over batches or plates, ``num_folds`` >= 2).
  After validation, ``unseen_batches_fraction`` of the remaining training batches and then
  ``in_domain_fraction`` of the remaining training plates are held out as extra test parts, so one
  trained model is also scored on new batches and new plates of the labs it was trained on.
  ``sources`` restricts every part to the plates of these sources (None: all), e.g. the paper's
  within-source setting on source_3 of a store that holds sources 3 and 8.
  """
  if kind not in SPLIT_KINDS:
    raise SplitError(f'kind must be one of {sorted(SPLIT_KINDS)}, got {kind!r}')
  if validation_by not in VALIDATION_BY:
    raise SplitError(f'validation_by must be one of {sorted(VALIDATION_BY)}, got {validation_by!r}')
  for what, value in (('validation_fraction', validation_fraction),
                      ('in_domain_fraction', in_domain_fraction),
                      ('unseen_batches_fraction', unseen_batches_fraction)):
    if not 0 <= value < 1:
      raise SplitError(f'{what} must be in [0, 1), got {value}')
  absent = [c for c in set(SPLIT_KINDS.values()) if c not in table.columns]
  if absent:
    raise SplitError(f'the table lacks columns {sorted(absent)}')
  if sources is not None:
    unknown = sorted(set(sources) - set(table['Metadata_Source']))
    if unknown or not len(sources):
      raise SplitError(f'sources {list(sources)}: {unknown or "none"} not in column '
                       f'Metadata_Source (it holds {sorted(table["Metadata_Source"].unique())})')
    table = table[table['Metadata_Source'].isin(sources)]
  column = SPLIT_KINDS[kind]
  groups = np.sort(table[column].unique())
  if len(groups) < 2:
    raise SplitError(f'column {column} holds {len(groups)} distinct value(s): a {kind} split needs '
                     f'at least 2')
  if kind == 'source':
    if num_folds is not None:
      raise SplitError('leave-one-source-out makes one fold per source; leave num_folds unset')
    test_groups = [[g] for g in groups]
  else:
    if num_folds is None or not 2 <= num_folds <= len(groups):
      raise SplitError(f'num_folds must be in [2, {len(groups)}] ({len(groups)} values of '
                       f'{column}), got {num_folds}')
    shuffled = np.random.default_rng(seed).permutation(groups)
    test_groups = [sorted(part) for part in np.array_split(shuffled, num_folds)]

  settings = {'kind': kind, 'num_folds': len(test_groups), 'validation_by': validation_by,
              'validation_fraction': validation_fraction, 'in_domain_fraction': in_domain_fraction,
              'unseen_batches_fraction': unseen_batches_fraction, 'seed': seed}
  if sources is not None:
    settings['sources'] = sorted(sources)
  all_plates = tuple(sorted(table['Metadata_Plate'].unique()))
  folds = []
  for i, held in enumerate(test_groups):
    name = f'{kind}={held[0]}' if kind == 'source' else f'{kind}-fold{i}of{len(test_groups)}'
    test = _plates_of(table, column, held)
    rest = tuple(p for p in all_plates if p not in set(test))
    train, validation = _hold_out(table, rest, name, validation_by, validation_fraction,
                                  np.random.default_rng([seed, i]))
    train, unseen_batches = _hold_out(table, train, name, 'batch', unseen_batches_fraction,
                                      np.random.default_rng([seed, i, 1]), 'unseen_batches')
    train, in_domain = _hold_out(table, train, name, 'plate', in_domain_fraction,
                                 np.random.default_rng([seed, i, 2]), 'in_domain')
    what = (f'source {held[0]}' if kind == 'source'
            else f'{len(held)} of {len(groups)} {_PLURAL[kind]}')
    description = (f'test: {what} ({len(test)} plates); validation: {len(validation)} plates '
                   f'({validation_fraction:.0%} of the training {_PLURAL[validation_by]}); '
                   f'train: {len(train)} plates')
    if unseen_batches or in_domain:
      description += (f'; held out: {len(unseen_batches)} plates of unseen training-source '
                      f'batches, {len(in_domain)} unseen plates of training batches')
    fold = Fold(name, description, train, validation, test, dict(settings, fold_index=i),
                in_domain, unseen_batches)
    for part in ('train', 'validation', 'test'):
      if not getattr(fold, part) and not (part == 'validation' and validation_fraction == 0):
        raise SplitError(f'fold {name}: part {part} is empty')
    _check_disjoint(fold)
    folds.append(fold)
  return folds
