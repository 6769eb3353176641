"""The grain input pipeline: fixed-shape batches of contexts, deterministic and resumable.

    train = training_batches(store, fold.train, num_perturbed=64, num_controls=128,
                             contexts_per_batch=8, crop_size=256, seed=0)
    batch = next(train)                  # dict of numpy arrays, leading context axis C
    state = train.get_state()            # JSON-serialisable; train.set_state(state) resumes exactly
    for batch in evaluation_batches(store, fold.test, num_perturbed=64, num_controls=128): ...

Batch contract (M = N + K rows per context; real rows first -- perturbed, then controls -- then
padding):

    images      (C, M, h, w, ch) uint8/uint16 crops   or (C, M, D) float32 for feature stores
    flip_w      (C, M) bool     image stores: crops still to be flipped along w (horizontally),
                                on the accelerator (``augment.flip_w_on_device``, by the train step)
    labels      (C, M) int32    class id of labelled rows; -1 for controls, unlabelled rows, padding
    mask        (C, M) float32  1 for real rows (perturbed and controls), 0 for padding
    is_control  (C, M) bool
    plate       (C,)   int32    index into ``Batches.plates``; -1 for mixed contexts and padding
    rows        (C, M) int64    store rows; -1 for padding
    domain      (C, M) int32    domain id of each row, -1 for padding (sampling 'domains' only)

Images stay integers: normalise on the accelerator with ``normalization.normalize``. Vertical
flips are applied on the host (a crop's rows read in reverse order cost nothing); horizontal flips
are left to the accelerator (``flip_w``): on the host a reversed w axis is a copy one pixel at a
time, which made the loader ~20 % slower (BENCHMARKS.md section 2).

Every context is a pure function of (seed, global context index): training contexts draw from
``np.random.default_rng([seed, index])``, evaluation contexts are fixed up front. So the order
grain's threads finish in does not matter, an iterator state is just the next batch number, and with
``process_count`` P each process builds contexts p*C/P ... (p+1)*C/P - 1 of every global batch: the
union over processes is the single-process batch, and a state restores under any P.

Each grain element is one process-local batch, whose crops tensorstore reads concurrently, copying
out only the crops (``ImageStore.read_crops``); grain's threads (``num_threads``) prepare several
batches at once, up to ``prefetch_buffer_size`` (default: one per thread) being read or ready.
Image memory is recycled (``buffers.BufferPool``): a batch's buffer is reused once nothing
references the batch any more. Resident memory is about (prefetch_buffer_size + 2) batches.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from csarm_jax.data import augment, domains as domain_lib
from csarm_jax.data.buffers import BufferPool
from csarm_jax.data import contexts as ctx_lib
from csarm_jax.data.contexts import Context

Batch = dict[str, np.ndarray]
SAMPLINGS = ('plate', 'mixed', 'domains')   # how training contexts are drawn
                                             # (Method.train_sampling)
_ENDLESS = 2 ** 60            # the batches of an "endless" iterator


def read_contexts(store, contexts: Sequence[Context], crop_size: int | None,
                  rngs: Sequence[np.random.Generator] | None = None, flips: bool = True,
                  pool: BufferPool | None = None, defer_flip_w: bool = True) -> Batch:
  """Stacks equal-size contexts into a batch, reading all their crops in one store read: the one
  preprocessing path of training, evaluation and prediction.

  ``rngs`` (one per context) given: random crops (and flips), for training; None: centre crops.
  ``crop_size=None``: the largest square (the whole image if square). Feature stores are read
  whole. Padding rows are zeros. ``pool``: where a batch without padding gets its image memory.
  Horizontal flips are returned as ``flip_w`` for the accelerator (see the module's contract);
  ``defer_flip_w=False``: applied here too, and ``flip_w`` is all False.
  """
  rows = np.stack([c.rows for c in contexts])
  real = rows >= 0
  if store.kind == 'images':
    height, width = store.item_shape[:2]
    windows = augment.concatenate([
        augment.crop_windows(c.num_real, height, width, crop_size,
                              None if rngs is None else rngs[i], flips)
        for i, c in enumerate(contexts)])
    out = None
    if pool is not None and real.all():
      out = pool.empty((rows.size, windows.size, windows.size, store.item_shape[-1]), store.dtype)
    flip_w = np.zeros(rows.shape, bool)
    if defer_flip_w:
      flip_w[real] = windows.flip_w
      windows = dataclasses.replace(windows, flip_w=np.zeros_like(windows.flip_w))
    items = store.read_crops(rows[real], windows, out)
  else:
    items = store.read(rows[real])
  if real.all():
    images = items.reshape(*rows.shape, *items.shape[1:])
  else:
    images = np.zeros((*rows.shape, *items.shape[1:]), items.dtype)
    images[real] = items
  out = {'images': images, 'labels': np.stack([c.labels for c in contexts]),
         'mask': real.astype(np.float32), 'is_control': np.stack([c.is_control for c in contexts]),
         'plate': np.array([c.plate for c in contexts], np.int32), 'rows': rows}
  if contexts[0].domain is not None:
    out['domain'] = np.stack([c.domain for c in contexts])
  if store.kind == 'images':
    out['flip_w'] = flip_w
  return out


class Batches:
  """An iterator of batches whose position is a checkpointable state.

  ``plates``: the plate list ``batch['plate']`` indexes; ``report``: what was skipped or sampled
  with replacement/padding (also logged); ``len()``: number of batches (None: endless).
  """

  def __init__(self, build: Callable[[int], grain.IterDataset], num_batches: int | None,
               fingerprint: str, plates: tuple[str, ...], report: dict[str, Any]):
    self._build, self._num_batches, self._fingerprint = build, num_batches, fingerprint
    self.plates, self.report = plates, report
    self._next, self._iterator = 0, None

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> Batch:
    if self._num_batches is not None and self._next >= self._num_batches:
      raise StopIteration
    if self._iterator is None:
      self._iterator = iter(self._build(self._next))
    batch = next(self._iterator)
    self._next += 1
    return batch

  def __len__(self) -> int:
    if self._num_batches is None:
      raise TypeError('an endless training iterator has no length (give num_batches)')
    return self._num_batches

  def get_state(self) -> dict[str, Any]:
    return {'next_batch': self._next, 'fingerprint': self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get('fingerprint') != self._fingerprint:
      raise ValueError('iterator state was saved by a pipeline with other settings (seed, context '
                       f'sizes, crop or plates): fingerprint {state.get("fingerprint")} != '
                       f'{self._fingerprint}')
    self._next, self._iterator = int(state['next_batch']), None


def _fingerprint(settings: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _check_sharding(contexts_per_batch: int, process_index: int, process_count: int) -> None:
  if contexts_per_batch % process_count or not 0 <= process_index < process_count:
    raise ValueError(f'contexts_per_batch {contexts_per_batch} must be divisible by process_count '
                     f'{process_count}, and process_index {process_index} in [0, {process_count})')


def _local_batches(contexts_of: Callable[[list[int]], Batch], start: int, stop: int,
                   contexts_per_batch: int, process_index: int, process_count: int,
                   num_threads: int, prefetch_buffer_size: int) -> grain.IterDataset:
  """This process's share of global batches [start, stop): contexts_of(global context indices)."""
  local = contexts_per_batch // process_count

  def local_batch(step: int) -> Batch:
    first = int(step) * contexts_per_batch + process_index * local
    return contexts_of(list(range(first, first + local)))

  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
  return grain.MapDataset.range(start, stop).map(local_batch).to_iter_dataset(options)


def _read_ahead(num_threads: int, prefetch_buffer_size: int | None) -> int:
  """Batches grain keeps in flight (being read or ready); None: one per thread, as grain runs
  at most this many threads."""
  return num_threads if prefetch_buffer_size is None else prefetch_buffer_size


def _batch_pool(prefetch_buffer_size: int) -> BufferPool:
  """Image memory for the batches in flight: being read or ready (the prefetch buffer) and held
  by the consumer (the current batch, and the previous one while the device copies it)."""
  return BufferPool(prefetch_buffer_size + 2)


def training_batches(store, plates: Sequence[str], *, num_perturbed: int = 64,
                     num_controls: int = 128, contexts_per_batch: int = 8,
                     crop_size: int | None = 256, flips: bool = True, sampling: str = 'plate',
                     too_few: str = 'replace', seed: int = 0, num_batches: int | None = None,
                     process_index: int = 0, process_count: int = 1, skip_bad: bool = False,
                     num_threads: int = 2, prefetch_buffer_size: int | None = None,
                     domain_of: dict[str, int] | None = None,
                     unlabelled_plates: Sequence[str] = (), num_unlabelled: int = 0,
                     domains_per_context: int = 4, defer_flip_w: bool = True) -> Batches:
  """Endless (or ``num_batches``) training batches of C = ``contexts_per_batch`` contexts.

  sampling 'plate': each context is one uniformly drawn plate's N perturbed + K controls (K = 0:
  ARM-BN); 'mixed' (ERM/AdaBN): N labelled images from any training plates, no controls (K must be
  0); 'domains' (DANN, Deep CORAL): N labelled images from ``domains_per_context`` domains, plus
  ``num_unlabelled`` images of ``unlabelled_plates`` (labels -1), each row's domain id
  (``domain_of``: plate -> id) in ``batch['domain']`` (see ``domains``). See ``contexts`` for
  sampling and bad-input rules. ``defer_flip_w``: leave horizontal flips to the training step
  (``batch['flip_w']``, the default) or apply them on the host (slower; for other consumers).
  """
  _check_sharding(contexts_per_batch, process_index, process_count)
  ctx_lib.check_too_few(too_few)           # at start, not when a short plate is first drawn
  if sampling not in SAMPLINGS:
    raise ValueError(f'sampling must be one of {SAMPLINGS}, got {sampling!r}')
  if sampling != 'plate' and num_controls:
    raise ValueError(f"sampling {sampling!r} draws no controls: set num_controls=0 (got "
                     f"{num_controls})")
  if sampling == 'domains' and domain_of is None:
    raise ValueError("sampling 'domains' needs domain_of (plate -> domain id)")
  if num_perturbed < 1:
    raise ValueError(f'num_perturbed must be >= 1, got {num_perturbed}')
  index = ctx_lib.index_plates(store.table, plates, num_classes=len(store.class_ids),
                               require_controls=num_controls > 0, skip_bad=skip_bad, part='train')
  if sampling == 'plate':
    too_few_plates = ctx_lib.too_few_report(index, num_perturbed, num_controls)
    sample = lambda rng: ctx_lib.training_context(index, rng, num_perturbed, num_controls, too_few)
  elif sampling == 'mixed':
    total = len(index.all_perturbed[0])
    too_few_plates = {'(all plates)': {'perturbed': total}} if total < num_perturbed else {}
    sample = lambda rng: ctx_lib.mixed_context(index, rng, num_perturbed, too_few)
  else:
    sample, too_few_plates = _domain_sampler(store, index, domain_of, unlabelled_plates,
                                             num_perturbed, num_unlabelled, domains_per_context,
                                             too_few, skip_bad)
  report = ctx_lib.index_report('training', index, too_few_plates, too_few,
                       num_perturbed_images=int(sum(len(r) for r in index.perturbed)))

  prefetch_buffer_size = _read_ahead(num_threads, prefetch_buffer_size)
  pool = _batch_pool(prefetch_buffer_size)

  def contexts_of(indices: list[int]) -> Batch:
    rngs = [np.random.default_rng([seed, g]) for g in indices]
    return read_contexts(store, [sample(rng) for rng in rngs], crop_size, rngs, flips, pool,
                         defer_flip_w)

  # The key stays 'mode' so that iterator states saved before the rename still match.
  settings = dict(what='training', mode=sampling, N=num_perturbed, K=num_controls,
                  C=contexts_per_batch, crop=crop_size, flips=flips, too_few=too_few, seed=seed,
                  plates=list(index.plates))
  if sampling == 'domains':       # only here, so that other methods' saved states still match
    settings.update(domains=sorted(domain_of.items()), unlabelled=sorted(unlabelled_plates),
                    U=num_unlabelled, D=domains_per_context)
  stop = num_batches if num_batches is not None else _ENDLESS
  build = lambda start: _local_batches(contexts_of, start, stop, contexts_per_batch, process_index,
                                       process_count, num_threads, prefetch_buffer_size)
  return Batches(build, num_batches, _fingerprint(settings), index.plates, report)


def _domain_sampler(store, index, domain_of, unlabelled_plates, num_perturbed, num_unlabelled,
                    domains_per_context, too_few, skip_bad):
  """(context sampler, report of short domains) of sampling 'domains'."""
  labelled = domain_lib.pools(index, domain_of, labelled=True)
  unlabelled = ()
  if num_unlabelled:
    if not unlabelled_plates:
      raise ValueError('num_unlabelled > 0 needs unlabelled_plates')
    held_out = ctx_lib.index_plates(store.table, unlabelled_plates,
                                    num_classes=len(store.class_ids), require_controls=False,
                                    require_labels=False, skip_bad=skip_bad, part='unlabelled')
    unlabelled = domain_lib.pools(held_out, domain_of, labelled=False)
  short = {}
  for what, group, n in (('labelled', labelled, num_perturbed),
                         ('unlabelled', unlabelled, num_unlabelled)):
    share = -(-n // max(1, min(domains_per_context, len(group))))
    short.update({f'{what} domain {p.domain}': {'perturbed': len(p.rows)}
                  for p in group if len(p.rows) < share})
  sample = lambda rng: domain_lib.domain_context(labelled, unlabelled, rng, num_perturbed,
                                                 num_unlabelled, domains_per_context, too_few)
  return sample, short


def evaluation_batches(store, plates: Sequence[str], *, num_perturbed: int = 64,
                       num_controls: int = 128, contexts_per_batch: int = 8,
                       crop_size: int | None = 256, seed: int = 1234,
                       chunking: str = 'consecutive', label_shift_alpha: float | None = None,
                       too_few: str = 'replace', max_images_per_plate: int | None = None,
                       require_labels: bool = True, process_index: int = 0,
                       process_count: int = 1, skip_bad: bool = False, num_threads: int = 2,
                       prefetch_buffer_size: int | None = None) -> Batches:
  """Evaluation batches over ``plates``: centre crops of the contexts of
  ``contexts.evaluation_plan`` (every perturbed image once, or label-shift contexts when
  ``label_shift_alpha`` is given), the last batch padded with fully-masked contexts.
  ``require_labels=False`` admits unlabelled perturbed images (label -1), for prediction."""
  plan = ctx_lib.evaluation_plan(
      store.table, plates, num_classes=len(store.class_ids), num_perturbed=num_perturbed,
      num_controls=num_controls, contexts_per_batch=contexts_per_batch, seed=seed,
      chunking=chunking, label_shift_alpha=label_shift_alpha, too_few=too_few,
      max_images_per_plate=max_images_per_plate, require_labels=require_labels, skip_bad=skip_bad)
  return read_plan(store, plan, contexts_per_batch, crop_size, process_index, process_count,
                   num_threads, prefetch_buffer_size)


def read_plan(store, plan: ctx_lib.Plan, contexts_per_batch: int, crop_size: int | None,
              process_index: int = 0, process_count: int = 1, num_threads: int = 2,
              prefetch_buffer_size: int | None = None) -> Batches:
  """A plan's contexts read in order as batches of ``contexts_per_batch`` (centre crops), this
  process's share of each."""
  _check_sharding(contexts_per_batch, process_index, process_count)
  contexts = plan.contexts
  num_batches = len(contexts) // contexts_per_batch
  if num_batches * contexts_per_batch != len(contexts):
    raise ValueError(f'the plan has {len(contexts)} contexts, not a multiple of '
                     f'{contexts_per_batch} contexts per batch')
  digest = hashlib.sha256()
  for c in contexts:
    digest.update(c.rows.tobytes())
  settings = dict(what='evaluation', C=contexts_per_batch, crop=crop_size,
                  rows=digest.hexdigest(), plates=list(plan.plates))
  prefetch_buffer_size = _read_ahead(num_threads, prefetch_buffer_size)
  pool = _batch_pool(prefetch_buffer_size)
  contexts_of = lambda indices: read_contexts(store, [contexts[g] for g in indices], crop_size,
                                              pool=pool)
  build = lambda start: _local_batches(contexts_of, start, num_batches, contexts_per_batch,
                                       process_index, process_count, num_threads,
                                       prefetch_buffer_size)
  return Batches(build, num_batches, _fingerprint(settings), plan.plates, plan.report)


def whole_plates(store, plates: Sequence[str], *, chunk_size: int = 256,
                 require_controls: bool = True, require_labels: bool = True,
                 skip_bad: bool = False) -> ctx_lib.Plan:
  """``contexts.whole_plate_plan`` of ``plates``: each plate's images and controls as contexts of
  ``chunk_size`` rows, to stream with ``read_chunks``."""
  return ctx_lib.whole_plate_plan(store.table, plates, num_classes=len(store.class_ids),
                                  chunk_size=chunk_size, require_controls=require_controls,
                                  require_labels=require_labels, skip_bad=skip_bad)


def read_chunks(store, chunks: Sequence[Context], crop_size: int | None = 256
                ) -> Iterator[Batch]:
  """Fixed-size contexts (e.g. one plate's chunks of a ``whole_plates`` plan) read one at a
  time, centre-cropped, without the context axis: memory bounded by one chunk."""
  for chunk in chunks:
    batch = read_contexts(store, [chunk], crop_size)
    yield {k: v[0] for k, v in batch.items()}
