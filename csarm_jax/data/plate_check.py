"""The start-up check of every plate a run (or a prediction) will use, so that one bad plate never
costs a run: unusable rows and plates that cannot form a context are found before any work, then
skipped with a counted report (logged, and written to the results) -- or refused.

    checked = check_parts(store, {'train': (plates, True), 'test': (plates, True)})
    checked.store     # the store without the unusable rows (the very same store if there are none)
    checked.parts     # the usable plates of each part
    checked.report    # what was skipped and why, with counts

Unusable rows: items holding NaN or inf (float stores: feature vectors; integer images cannot),
which would make the statistics of their context and its predictions NaN; perturbed rows whose
label is not a class where labels are required. A plate cannot form a context when it has no usable
perturbed image, or no control for a method that normalises with them (a plate reduced to one image
lacks one or the other). The rules are those of ``contexts.index_plates``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from csarm_jax.data import contexts as ctx_lib
from csarm_jax.data.contexts import ContextError

NONFINITE = 'every image holds NaN or inf'
MANDATORY = ('train', 'test', 'predict')      # parts that may not end up empty


@dataclasses.dataclass(frozen=True)
class Checked:
  store: Any
  parts: dict[str, tuple[str, ...]]
  report: dict[str, Any]


def nonfinite_rows(store, rows: Sequence[int], max_bytes: int = 1 << 27
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(rows, index of the first non-finite channel or feature of each) of the items at ``rows``
  holding NaN or inf; nothing for integer stores. Streams at most ``max_bytes`` at a time."""
  rows = np.sort(np.asarray(rows, np.int64))
  dtype = np.dtype(store.manifest['dtype'])
  if not np.issubdtype(dtype, np.floating) or rows.size == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  step = max(1, max_bytes // (int(np.prod(store.item_shape)) * dtype.itemsize))
  bad, channel = [], []
  for start in range(0, len(rows), step):
    chunk = rows[start:start + step]
    x = store.read(chunk)
    finite = np.isfinite(x).reshape(len(chunk), -1, x.shape[-1]).all(axis=1)   # (n, channels)
    hit = ~finite.all(axis=1)
    bad.append(chunk[hit])
    channel.append(np.argmin(finite[hit], axis=1))
  return np.concatenate(bad), np.concatenate(channel)


def _refuse(what: str, hint: str) -> None:
  raise ContextError(f'{what}; {hint}' if hint else what)


def check_parts(store, parts: Mapping[str, tuple[Sequence[str], bool]], *,
                require_labels: bool = True, skip_bad: bool = True, hint: str = '') -> Checked:
  """Checks the plates of each part (``{part: (plates, controls required)}``); see the module doc.

  ``skip_bad=False`` raises ``ContextError`` at the first problem instead (``hint`` says how to
  skip). Raises too when a mandatory part (train, test, predict) has no usable plate left.
  """
  table = store.table
  plates_used = [p for plates, _ in parts.values() for p in plates]
  used = table['Metadata_Plate'].isin(plates_used).to_numpy()
  bad, channel = nonfinite_rows(store, table.loc[used, 'row'])
  by_row = table.set_index('row')
  if len(bad) and not skip_bad:
    first = by_row.loc[bad[0]]
    _refuse(f'plate {first["Metadata_Plate"]}: row {bad[0]} (well {first.get("Metadata_Well")}) '
            f'holds NaN or inf in {store.channels[channel[0]]} ({len(bad)} such rows)', hint)
  nonfinite = {str(k): int(v) for k, v in
               by_row.loc[bad, 'Metadata_Plate'].value_counts().sort_index().items()}
  table = table[~table['row'].isin(bad)]
  present = set(table['Metadata_Plate'])
  keep = [table.loc[~table['Metadata_Plate'].isin(plates_used), 'row'].to_numpy()]
  usable, skipped_plates, skipped_rows = {}, {}, {}
  for part, (plates, need_controls) in parts.items():
    skipped = {p: NONFINITE for p in plates if p not in present}
    rest = [p for p in plates if p not in skipped]
    kept: tuple[str, ...] = ()
    if rest:
      index = ctx_lib.index_plates(table, rest, num_classes=len(store.class_ids),
                                   require_controls=need_controls, require_labels=require_labels,
                                   skip_bad=True, part=part, allow_empty=True)
      skipped.update(index.skipped_plates)
      skipped_rows.update(index.skipped_rows)
      keep += list(index.perturbed) + list(index.controls)
      kept = index.plates
    if skipped:
      if not skip_bad:
        plate, reason = next(iter(skipped.items()))
        _refuse(f'plate {plate} of the {part} part cannot form a context: {reason} '
                f'({len(skipped)} such plates in the part)', hint)
      skipped_plates[part] = skipped
    if plates and not kept and part in MANDATORY:
      raise ContextError(f'no plate of the {part} part can form a context: {skipped}')
    usable[part] = kept
  if skipped_rows and not skip_bad:
    plate, n = next(iter(skipped_rows.items()))
    _refuse(f'plate {plate}: {n} perturbed rows have no class label (column label)', hint)
  report = {'skipped_plates': skipped_plates, 'nonfinite_rows': nonfinite,
            'unlabelled_rows': skipped_rows,
            'num_skipped_plates': sum(len(s) for s in skipped_plates.values()),
            'num_skipped_rows': len(bad) + sum(skipped_rows.values())}
  _log(report)
  rows = np.concatenate(keep)
  if len(rows) < len(table) or len(bad):
    store = dataclasses.replace(store, table=table[table['row'].isin(rows)])
  return Checked(store, usable, report)


def _log(report: dict[str, Any]) -> None:
  for part, skipped in report['skipped_plates'].items():
    logging.warning('skipped %d plates of the %s part that cannot form a context: %s',
                    len(skipped), part, skipped)
  if report['nonfinite_rows']:
    logging.warning('skipped %d images holding NaN or inf, per plate: %s',
                    sum(report['nonfinite_rows'].values()), report['nonfinite_rows'])
  if report['unlabelled_rows']:
    logging.warning('skipped %d perturbed images without a class label, per plate: %s',
                    sum(report['unlabelled_rows'].values()), report['unlabelled_rows'])


def check_fold(store, fold, method, skip_bad: bool = True, hint: str = ''):
  """(store, fold, report): ``check_parts`` over every part of a run's fold under ``method``'s
  rules (training contexts with controls if it trains with them; the others its test-time rule).
  Emptied optional parts (validation, in-domain, unseen batches) are dropped from the fold."""
  parts = {'train': (fold.train, method.train_controls)}
  for part in ('validation', 'test', 'in_domain', 'unseen_batches'):
    parts[part] = (getattr(fold, part), method.eval_controls)
  checked = check_parts(store, parts, skip_bad=skip_bad, hint=hint)
  if checked.parts == {part: tuple(plates) for part, (plates, _) in parts.items()}:
    return checked.store, fold, checked.report
  return checked.store, dataclasses.replace(fold, **checked.parts), checked.report
