"""Context samplers: which store rows form each context. Pure numpy, no image I/O.

A context is a set of images that share BatchNorm statistics: N perturbed (labelled) images of one
plate pooled with K DMSO controls of the same plate (K = 0: ARM-BN). Every sampler returns
``Context`` index arrays of a fixed layout: real rows first -- perturbed, then controls -- then
padding (row -1, label -1, mask 0) up to N + K rows.

    index = index_plates(store.table, fold.train, num_classes=len(store.class_ids))
    ctx   = training_context(index, rng, num_perturbed=64, num_controls=128)  # one random plate
    ctx   = mixed_context(index, rng, num_perturbed=64)       # ERM/AdaBN: any plates, no controls
    ctxs  = evaluation_contexts(index, 64, 128, seed=1234)    # every perturbed image exactly once
    ctxs  = label_shift_contexts(index, 64, 128, alpha=0.5, seed=5678)
    ctxs  = whole_plate_contexts(index)                       # one variable-size context per plate

An evaluation decides once what it reads: ``evaluation_plan`` / ``whole_plate_plan`` index the
plates, report what was skipped or short, and return every fixed-size context in reading order
(padding included); ``pipeline`` only reads a plan.

Sampling is without replacement. A plate with fewer than N perturbed or K control images gives each
of them once, topped up by draws with replacement (``too_few='replace'``, the reference's choice)
or by masked padding (``too_few='pad'``, which keeps duplicates out of the statistics);
``too_few_report`` lists those plates so callers log them -- it is never silent. Unlike the
reference, a plate with exactly N images is sampled without replacement.

Randomness: training samplers take a ``np.random.Generator`` (the pipeline derives one per context
from (seed, context index)); evaluation samplers derive one per plate from (seed, plate ID), so a
plate's contexts do not change when other plates are added or removed.
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
from absl import logging

TOO_FEW = ('replace', 'pad')
REQUIRED_COLUMNS = ('Metadata_Plate', 'is_control', 'label', 'row')


class ContextError(ValueError):
  """Input a sampler cannot use: a plate without controls or perturbed images, a bad label, ..."""


@dataclass(frozen=True)
class PlateIndex:
  """Store rows per plate, in ascending row order (so samples do not depend on table order).

  ``skipped_plates`` (plate -> reason) and ``skipped_rows`` (plate -> count of perturbed rows with
  an unusable label) record what ``index_plates(skip_bad=True)`` left out.
  """
  plates: tuple[str, ...]
  perturbed: tuple[np.ndarray, ...]       # int64 store rows
  labels: tuple[np.ndarray, ...]          # int32 class ids of the perturbed rows (-1: unlabelled)
  controls: tuple[np.ndarray, ...]        # int64 store rows of the DMSO controls
  skipped_plates: dict[str, str] = field(default_factory=dict)
  skipped_rows: dict[str, int] = field(default_factory=dict)

  @functools.cached_property
  def all_perturbed(self) -> tuple[np.ndarray, np.ndarray]:
    """(rows, labels) of every perturbed image, concatenated over plates."""
    return np.concatenate(self.perturbed), np.concatenate(self.labels)


@dataclass(frozen=True)
class Context:
  """One context's index arrays, all of length M: store rows (-1: padding), class ids (-1: control
  or padding), control flags; ``plate`` indexes ``PlateIndex.plates`` (-1: mixed or padding);
  ``domain``: each row's domain id (-1: padding), for domain-adaptation methods only."""
  plate: int
  rows: np.ndarray
  labels: np.ndarray
  is_control: np.ndarray
  domain: np.ndarray | None = None

  @property
  def num_real(self) -> int:
    return int((self.rows >= 0).sum())


def padding_context(size: int) -> Context:
  """A fully-masked context (fills the last evaluation batch)."""
  return Context(-1, np.full(size, -1, np.int64), np.full(size, -1, np.int32), np.zeros(size, bool))


def _context(plate: int, rows: np.ndarray, labels: np.ndarray, controls: np.ndarray,
             size: int | None) -> Context:
  n, k = len(rows), len(controls)
  size = n + k if size is None else size
  out = padding_context(size)
  out.rows[:n], out.rows[n:n + k] = rows, controls
  out.labels[:n] = labels
  out.is_control[n:n + k] = True
  return Context(plate, out.rows, out.labels, out.is_control)


def index_plates(table: pd.DataFrame, plates: Sequence[str], *, num_classes: int,
                 require_controls: bool = True, require_labels: bool = True,
                 skip_bad: bool = False, part: str = 'plates',
                 allow_empty: bool = False) -> PlateIndex:
  """Groups ``table`` rows of ``plates`` into perturbed and control store rows per plate.

  Errors (``ContextError``, naming the plate or column) for: an empty plate list (``part`` names it
  in the message, e.g. 'train'), a missing column, a plate absent from the table, a plate without
  perturbed images, a plate without controls (if ``require_controls``), a perturbed row whose label
  is not a class id in [0, num_classes) (-1 allowed unless ``require_labels``). With ``skip_bad``
  the last three skip the plate or rows instead and record them in the index (``allow_empty``:
  even every plate, for a start-up check that reports them all).
  """
  if len(plates) == 0:
    raise ContextError(f'the {part} part has no plates (an empty split)')
  absent = [c for c in REQUIRED_COLUMNS if c not in table.columns]
  if absent:
    raise ContextError(f'the table lacks columns {absent}')
  if len(set(plates)) != len(plates):
    raise ContextError(f'the {part} plate list repeats plates')
  sub = table.loc[table['Metadata_Plate'].isin(plates), list(REQUIRED_COLUMNS)].sort_values('row')
  groups = dict(tuple(sub.groupby('Metadata_Plate', sort=False)))
  missing = [p for p in plates if p not in groups]
  if missing:
    raise ContextError(f'plate {missing[0]} of the {part} part is not in the table '
                       f'({len(missing)} such plates)')
  lowest = -1 if not require_labels else 0
  kept, perturbed, labels, controls = [], [], [], []
  skipped_plates, skipped_rows = {}, {}

  def bad(plate: str, problem: str, rows: bool = False) -> None:
    if not skip_bad:
      raise ContextError(f'plate {plate}: {problem}')
    if not rows:
      skipped_plates[plate] = problem

  for plate in plates:
    g = groups[plate]
    ctrl = g['is_control'].to_numpy(bool)
    lab = g['label'].to_numpy()
    wrong = ~ctrl & ((lab < lowest) | (lab >= num_classes))
    if wrong.any():
      bad(plate, f'{int(wrong.sum())} perturbed rows have a label outside '
                 f'[{lowest}, {num_classes}) in column label (e.g. {lab[wrong][0]})', rows=True)
      skipped_rows[plate] = int(wrong.sum())
    pert = ~ctrl & ~wrong
    if not pert.any():
      bad(plate, 'no perturbed images (column is_control is True for all its usable rows)')
      continue
    if require_controls and not ctrl.any():
      bad(plate, 'no control images (column is_control is False for all its rows)')
      continue
    rows = g['row'].to_numpy(np.int64)
    kept.append(plate)
    perturbed.append(rows[pert])
    labels.append(lab[pert].astype(np.int32))
    controls.append(rows[ctrl])
  if not kept and not allow_empty:
    raise ContextError(f'every plate of the {part} part was skipped: {skipped_plates}')
  return PlateIndex(tuple(kept), tuple(perturbed), tuple(labels), tuple(controls),
                    skipped_plates, skipped_rows)


def too_few_report(index: PlateIndex, num_perturbed: int, num_controls: int) -> dict[str, dict]:
  """Plates with fewer than ``num_perturbed`` perturbed or ``num_controls`` control images:
  {plate: {'perturbed': count, 'controls': count}} -- their contexts repeat or pad images."""
  return {p: {'perturbed': len(r), 'controls': len(c)}
          for p, r, c in zip(index.plates, index.perturbed, index.controls)
          if len(r) < num_perturbed or len(c) < num_controls}


def index_report(what: str, index: PlateIndex, too_few: dict[str, dict] | None = None,
                 too_few_mode: str = 'replace', **extra) -> dict[str, Any]:
  """Logs (warning) and returns what was skipped and which plates have too few images."""
  too_few = too_few or {}
  report = {'plates': len(index.plates), 'skipped_plates': index.skipped_plates,
            'skipped_rows': index.skipped_rows, 'too_few': too_few, 'too_few_mode': too_few_mode,
            **extra}
  if index.skipped_plates:
    logging.warning('%s: skipped %d plates: %s', what, len(index.skipped_plates),
                    index.skipped_plates)
  if index.skipped_rows:
    logging.warning('%s: skipped %d perturbed rows with unusable labels, per plate: %s', what,
                    sum(index.skipped_rows.values()), index.skipped_rows)
  if too_few:
    logging.warning('%s: %d plates have too few images for a full context (their contexts %s): %s',
                    what, len(too_few), 'repeat images' if too_few_mode == 'replace' else
                    'are padded', too_few)
  return report


def check_too_few(too_few: str) -> None:
  if too_few not in TOO_FEW:
    raise ContextError(f'too_few must be one of {TOO_FEW}, got {too_few!r}')


def _draw(rng: np.random.Generator, n: int, k: int, too_few: str) -> np.ndarray:
  """k positions in range(n) without replacement, or (n < k) all n topped up per ``too_few``."""
  if n >= k:
    return rng.choice(n, k, replace=False)
  check_too_few(too_few)
  every = rng.permutation(n)
  return every if too_few == 'pad' else np.concatenate([every, rng.integers(0, n, k - n)])


def training_context(index: PlateIndex, rng: np.random.Generator, num_perturbed: int,
                     num_controls: int, too_few: str = 'replace') -> Context:
  """A uniformly drawn plate's ``num_perturbed`` labelled images and ``num_controls`` controls."""
  p = int(rng.integers(len(index.plates)))
  take = _draw(rng, len(index.perturbed[p]), num_perturbed, too_few)
  ctrl = _draw(rng, len(index.controls[p]), num_controls, too_few)
  return _context(p, index.perturbed[p][take], index.labels[p][take], index.controls[p][ctrl],
                  num_perturbed + num_controls)


def mixed_context(index: PlateIndex, rng: np.random.Generator, num_perturbed: int,
                  too_few: str = 'replace') -> Context:
  """``num_perturbed`` labelled images drawn across all plates, no controls (ERM/AdaBN training)."""
  rows, labels = index.all_perturbed
  take = _draw(rng, len(rows), num_perturbed, too_few)
  return _context(-1, rows[take], labels[take], np.zeros(0, np.int64), num_perturbed)


def plate_rng(seed: int, plate: str) -> np.random.Generator:
  """A generator keyed by (seed, plate ID): independent of which other plates are evaluated."""
  return np.random.default_rng([seed, zlib.crc32(plate.encode())])


def evaluation_contexts(index: PlateIndex, num_perturbed: int, num_controls: int, seed: int,
                        chunking: str = 'consecutive', too_few: str = 'replace',
                        max_images_per_plate: int | None = None) -> list[Context]:
  """Every perturbed image of every plate exactly once, each context of size N + K.

  Per plate, in ``index.plates`` order: a seeded permutation of its perturbed images, cut into
  chunks of at most N -- 'consecutive' (the reference: N, N, ..., remainder) or 'balanced' (sizes
  differ by at most one, no tiny tail chunk) -- each joined by K freshly drawn controls of the
  plate. ``max_images_per_plate`` keeps only the first that many images of each plate's
  permutation (a fixed, seeded subset, e.g. for sweeps of tiny contexts that would otherwise cost a
  pass per image).
  """
  if chunking not in ('consecutive', 'balanced'):
    raise ContextError(f"chunking must be 'consecutive' or 'balanced', got {chunking!r}")
  out = []
  for p, plate in enumerate(index.plates):
    rng = plate_rng(seed, plate)
    order = rng.permutation(len(index.perturbed[p]))[:max_images_per_plate]
    n = len(order)
    num_chunks = -(-n // num_perturbed)
    if chunking == 'balanced':
      chunks = np.array_split(order, num_chunks)
    else:
      chunks = [order[i:i + num_perturbed] for i in range(0, n, num_perturbed)]
    for chunk in chunks:
      ctrl = _draw(rng, len(index.controls[p]), num_controls, too_few)
      out.append(_context(p, index.perturbed[p][chunk], index.labels[p][chunk],
                          index.controls[p][ctrl], num_perturbed + num_controls))
  return out


def label_shift_contexts(index: PlateIndex, num_perturbed: int, num_controls: int, alpha: float,
                         seed: int, num_classes: int, too_few: str = 'replace') -> list[Context]:
  """Contexts whose class mix is skewed by a Dirichlet(alpha) draw (as the reference's
  LabelShiftGroupBatchSampler).

  Per plate: proportions q ~ Dirichlet(alpha * 1) over the ``num_classes`` classes and counts
  c ~ Multinomial(N, q); context j of the plate's ``num_classes`` contexts asks for roll(c, j)[k]
  images of class k, so each class takes each share once. A class with fewer images on the plate
  than asked for gives all it has (the context is padded: it holds fewer than N perturbed images).
  Images are drawn without replacement within a context, independently across contexts; K fresh
  controls are added as in ``evaluation_contexts``. Small alpha: near single-class contexts; large
  alpha: near balanced.
  """
  if alpha <= 0:
    raise ContextError(f'alpha must be > 0, got {alpha}')
  out = []
  for p, plate in enumerate(index.plates):
    labels = index.labels[p]
    if (labels < 0).any():
      raise ContextError(f'plate {plate}: label-shift contexts need labels, '
                         f'{int((labels < 0).sum())} perturbed rows have label -1 in column label')
    rng = plate_rng(seed, plate)
    counts = rng.multinomial(num_perturbed, rng.dirichlet(np.full(num_classes, float(alpha))))
    by_class = [np.flatnonzero(labels == k) for k in range(num_classes)]
    for j in range(num_classes):
      wanted = np.roll(counts, j)
      take = np.concatenate([pool[rng.choice(len(pool), min(w, len(pool)), replace=False)]
                             for pool, w in zip(by_class, wanted)]).astype(np.int64)
      ctrl = _draw(rng, len(index.controls[p]), num_controls, too_few)
      out.append(_context(p, index.perturbed[p][take], labels[take], index.controls[p][ctrl],
                          num_perturbed + num_controls))
  return out


def whole_plate_contexts(index: PlateIndex) -> list[Context]:
  """One context per plate: all its perturbed images then all its controls (variable size)."""
  return [_context(p, index.perturbed[p], index.labels[p], index.controls[p], None)
          for p in range(len(index.plates))]


def chunk_context(context: Context, chunk_size: int) -> list[Context]:
  """A (large) context as consecutive contexts of ``chunk_size`` rows, the last one padded."""
  out = []
  for start in range(0, len(context.rows), chunk_size):
    n = min(chunk_size, len(context.rows) - start)
    chunk = padding_context(chunk_size)
    chunk.rows[:n] = context.rows[start:start + n]
    chunk.labels[:n] = context.labels[start:start + n]
    chunk.is_control[:n] = context.is_control[start:start + n]
    out.append(Context(context.plate, chunk.rows, chunk.labels, chunk.is_control))
  return out


@dataclass(frozen=True)
class Plan:
  """What an evaluation reads, decided once: fixed-size contexts in reading order (padding
  contexts included), ``plates`` that their ``plate`` field indexes, and ``report`` (what was
  skipped, short or left out; also logged)."""
  plates: tuple[str, ...]
  contexts: tuple[Context, ...]
  report: dict[str, Any]


def evaluation_plan(table: pd.DataFrame, plates: Sequence[str], *, num_classes: int,
                    num_perturbed: int, num_controls: int, contexts_per_batch: int, seed: int,
                    chunking: str = 'consecutive', label_shift_alpha: float | None = None,
                    too_few: str = 'replace', max_images_per_plate: int | None = None,
                    require_labels: bool = True, skip_bad: bool = False) -> Plan:
  """The contexts of an evaluation of ``plates``: ``evaluation_contexts`` (every perturbed image
  exactly once) or, ``label_shift_alpha`` given, ``label_shift_contexts``; then fully-masked
  contexts up to a multiple of ``contexts_per_batch``."""
  check_too_few(too_few)
  index = index_plates(table, plates, num_classes=num_classes, require_controls=num_controls > 0,
                       require_labels=require_labels, skip_bad=skip_bad, part='evaluation')
  if label_shift_alpha is None:
    contexts = evaluation_contexts(index, num_perturbed, num_controls, seed, chunking, too_few,
                                   max_images_per_plate)
  else:
    contexts = label_shift_contexts(index, num_perturbed, num_controls, label_shift_alpha, seed,
                                    num_classes, too_few=too_few)
  counts = {'num_contexts': len(contexts), 'perturbed_images': sum(len(p) for p in index.perturbed)}
  if label_shift_alpha is None:   # each image at most once (label-shift contexts may repeat them)
    counts['perturbed_images_served'] = sum(int(((c.rows >= 0) & ~c.is_control).sum())
                                            for c in contexts)
    if counts['perturbed_images_served'] < counts['perturbed_images']:   # max_images_per_plate
      logging.warning('evaluation: %d of %d perturbed images (max_images_per_plate=%s)',
                      counts['perturbed_images_served'], counts['perturbed_images'],
                      max_images_per_plate)
  report = index_report('evaluation', index, too_few_report(index, 0, num_controls), too_few,
                        **counts)
  padding = -len(contexts) % contexts_per_batch
  contexts += [padding_context(num_perturbed + num_controls)] * padding
  return Plan(index.plates, tuple(contexts), report)


def whole_plate_plan(table: pd.DataFrame, plates: Sequence[str], *, num_classes: int,
                     chunk_size: int, require_controls: bool = True, require_labels: bool = True,
                     skip_bad: bool = False) -> Plan:
  """Each plate's ``whole_plate_contexts`` cut into contexts of ``chunk_size`` rows (the last of
  each plate padded), plate after plate: stream a plate's chunks, e.g. into
  ``adaptation.plate_statistics``."""
  index = index_plates(table, plates, num_classes=num_classes, require_controls=require_controls,
                       require_labels=require_labels, skip_bad=skip_bad, part='evaluation')
  report = index_report('whole-plate evaluation', index)
  chunks = [c for plate in whole_plate_contexts(index) for c in chunk_context(plate, chunk_size)]
  return Plan(index.plates, tuple(chunks), report)
