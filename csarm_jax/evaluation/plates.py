"""Evaluation under test-time adaptation: the evaluation contexts regrouped by plate.

The contexts arrive in plate order (``data.pipeline.evaluation_batches``: a plate's chunks or
label-shift contexts are consecutive). Complete plates are stacked into (P, T, M, ...) arrays --
P plates of at most T contexts, both padded with fully-masked contexts (P to a multiple of the
devices, T to a power of two to bound recompilation) -- and adapted by ``csarm_jax.tta`` in one
compiled call, plates in parallel over the devices (continual mode: every plate in one call, in
order). One process only: a plate's contexts must all be on the host that stacks them.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import jax
import numpy as np

from csarm_jax import parallel, tta

KEYS = ('images', 'labels', 'mask', 'is_control', 'rows')


def plate_groups(batches: Iterable[dict[str, np.ndarray]], group_size: int | None
                 ) -> Iterator[list[tuple[int, list[dict[str, np.ndarray]]]]]:
  """Groups of ``group_size`` (None: all) complete plates, each (plate id, its contexts)."""
  group: list[tuple[int, list[dict[str, np.ndarray]]]] = []
  done: set[int] = set()
  for local in batches:
    for c, plate in enumerate(np.asarray(local['plate'])):
      if plate < 0:                                       # a padding context
        continue
      if not group or group[-1][0] != plate:
        if plate in done:
          raise ValueError(f'evaluation contexts of plate index {plate} are not consecutive')
        if group and group_size and len(group) == group_size:
          yield group
          group = []
        done.add(int(plate))
        group.append((int(plate), []))
      group[-1][1].append({k: np.array(local[k][c]) for k in KEYS})
  if group:
    yield group


def stack_plates(group: list[tuple[int, list[dict[str, np.ndarray]]]], num_plates: int
                 ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(P, T, M, ...) arrays of a group (padding: rows -1, mask 0) and the plate ids (P,)."""
  longest = max(len(contexts) for _, contexts in group)
  t = 1 << (longest - 1).bit_length()
  first = group[0][1][0]
  out = {k: np.zeros((num_plates, t) + v.shape, v.dtype) for k, v in first.items()}
  out['rows'][:] = -1
  out['labels'][:] = -1
  ids = np.zeros(num_plates, np.int32)
  for p, (plate, contexts) in enumerate(group):
    ids[p] = plate
    for i, context in enumerate(contexts):
      for k, v in context.items():
        out[k][p, i] = v
  return out, ids


def adapt_contexts(model, method, preprocess, mesh, variables: dict[str, Any],
                   batches: Iterable[dict[str, np.ndarray]], plates_per_step: int
                   ) -> Iterator[dict[str, np.ndarray]]:
  """Per group of ``plates_per_step`` plates (a multiple of the devices): the kept rows' store
  rows, logits, labels and context numbers (in the order the contexts arrived)."""
  if jax.process_count() > 1:
    raise ValueError('test-time adaptation evaluates on one process (its plates are stacked '
                     'on one host); run it without jax.distributed')
  algo = method.test_time
  step = tta.compile_adapt_plates(model, algo, mesh, preprocess, logits_only=True)
  with jax.transfer_guard('allow'):      # the seed: a deliberate scalar transfer
    key = jax.device_put(jax.random.key(algo.seed), parallel.replicated(mesh))
  offset = 0
  for group in plate_groups(batches, None if algo.continual else plates_per_step):
    size = len(group) if algo.continual else plates_per_step
    batch, ids = stack_plates(group, size)
    x, mask, is_control, ids = jax.device_put(
        (batch['images'], batch['mask'], batch['is_control'], ids), tta.plate_sharding(algo, mesh))
    logits = jax.device_get(step(variables, x, method.weights(mask, is_control),
                                 mask * ~is_control, key, ids))
    keep = (batch['mask'] > 0) & ~batch['is_control']
    numbers = np.zeros(keep.shape[:2], np.int64)
    for p, (_, contexts) in enumerate(group):
      numbers[p, :len(contexts)] = offset + np.arange(len(contexts))
      offset += len(contexts)
    yield {'rows': batch['rows'][keep], 'logits': logits[keep], 'labels': batch['labels'][keep],
           'context': np.broadcast_to(numbers[:, :, None], keep.shape)[keep]}


def labelled_loss(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
  """(summed cross-entropy, count) over rows with a label, as the evaluation step reports it."""
  labelled = labels >= 0
  z = logits[labelled].astype(np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
  return float(-log_p[np.arange(len(z)), labels[labelled]].sum()), int(labelled.sum())
