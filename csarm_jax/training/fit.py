"""Choosing the context micro-batch so the compiled training step fits the device's memory.

With ``data.contexts_per_microbatch`` unset, the first call of :func:`fitted_train_step`'s step
compiles (never runs) the step for the real state and batch, all contexts at once first, then
fewer at a time, and keeps the first whose XLA buffer plan fits a share (``MEMORY_FRACTION``) of
what one device holds. A backend that does not report its memory (CPU) keeps all contexts at once.
The update does not depend on the choice beyond float rounding (micro-batched steps accumulate
the same gradients), so one config trains on a 16 GB TPU chip and an 80 GB GPU alike.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
from absl import logging

MEMORY_FRACTION = 0.9      # of a device's memory the step may plan for; the rest: batches in
                           # flight, metrics, the evaluation step's buffers

GiB = 2 ** 30


def planned_bytes(compiled) -> int:
  """Peak bytes per device in XLA's plan: arguments + outputs - donated aliases + temporaries."""
  mem = compiled.memory_analysis()
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes +
          mem.temp_size_in_bytes)


def device_memory_budget(mesh, fraction: float = MEMORY_FRACTION) -> int | None:
  """Bytes the step may plan for on each of the mesh's devices; None if the backend won't say."""
  stats = mesh.devices.flat[0].memory_stats()
  limit = (stats or {}).get('bytes_limit')
  return int(limit * fraction) if limit else None


def candidates(contexts: int, num_devices: int) -> list[int]:
  """Contexts per micro-batch to try, largest first: divisors of ``contexts`` that are multiples
  of ``num_devices`` (every device keeps an equal share of each micro-batch)."""
  return [b for b in range(contexts, 0, -1) if contexts % b == 0 and b % num_devices == 0]


def choose_microbatch(plan: Callable[[int], float], contexts: int, num_devices: int,
                      budget: int) -> int:
  """The largest candidate micro-batch ``b`` with ``plan(b) <= budget``, else a ValueError."""
  tried = []
  for b in candidates(contexts, num_devices):
    need = plan(b)
    tried.append(f'{b}: {need / GiB:.2f}')
    if need <= budget:
      return b
  raise ValueError(f'the training step does not fit the device: it plans for more than '
                   f'{budget / GiB:.2f} GiB per device at every micro-batch (contexts per '
                   f'micro-batch: GiB -- {", ".join(tried)}); set model.remat=True, or use fewer '
                   f'images per context or smaller crops')


def fitted_train_step(build: Callable[[int | None], Callable], mesh,
                      contexts_per_microbatch: int | None, budget: int | None) -> Callable:
  """The compiled step, ``build(contexts_per_microbatch)``; when that is None and ``budget`` is
  known, the micro-batch is chosen at the first call (from its arguments' shapes) to fit it."""
  if contexts_per_microbatch or budget is None:
    return build(contexts_per_microbatch)
  chosen: list[Callable] = []

  def step(state, batch):
    if not chosen:
      contexts = batch['labels'].shape[0]
      plan = lambda b: _plan(build(None if b == contexts else b), state, batch)
      b = choose_microbatch(plan, contexts, mesh.size, budget)
      logging.info('training step: %d of %d contexts per micro-batch fit the %.2f GiB per '
                   'device it may plan for', b, contexts, budget / GiB)
      chosen.append(build(None if b == contexts else b))
    return chosen[0](state, batch)
  return step


def _plan(step: Callable, state, batch) -> float:
  """``planned_bytes`` of ``step`` compiled for these arguments; inf where the compiler itself
  refuses the program for lack of memory (TPU compiles check the plan against the chip)."""
  try:
    return planned_bytes(step.lower(state, batch).compile())
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower():
      return math.inf
    raise
