"""Data parallelism over contexts: the current form of pmap (jit + NamedSharding on a 'data' mesh).

Contexts, not images, are split across devices: each device runs its share of a step's contexts
under vmap, so BatchNorm statistics stay per context and are never pooled across devices. The
state is replicated; XLA inserts the gradient all-reduce. Multi-host: every process feeds the
contexts of its local devices (the pipeline builds each process's share) and ``global_batch``
assembles the global array; run setup made once (``from_lead_process``) reaches every process.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'


def make_mesh(devices: list | None = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def context_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def check_contexts_divide(num_contexts: int, mesh: Mesh, field: str = 'contexts_per_step') -> None:
  if num_contexts % mesh.size:
    raise ValueError(f'{field}={num_contexts} must be a multiple of the number of devices '
                     f'({mesh.size}): contexts are split evenly across devices')


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's contexts (leading axis) into global arrays sharded over contexts."""
  sharding = context_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def from_lead_process(name: str, produce: Callable[[], str]) -> str:
  """``produce()`` run on process 0 only; its text (or its failure) reaches every process.

  A collective: every process calls it at the same point, whatever it sees on its own disk, so
  none waits for a peer that skipped it; workdirs need not be shared between hosts. ``name`` says
  what failed, on the other processes.
  """
  if jax.process_count() == 1:
    return produce()
  text, error = '', None
  if jax.process_index() == 0:
    try:
      text = produce()
    except Exception as e:       # re-raised below, after telling the other processes
      error = e
  payload = np.frombuffer(text.encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(
      np.int64(-1 if error is not None else payload.size)))
  if error is not None:
    raise error
  if size < 0:
    raise RuntimeError(f'{name} failed on process 0 (see its log)')
  if size == 0:
    return ''
  mine = payload if jax.process_index() == 0 else np.zeros(size, np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(mine))).decode()


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None, enabled: bool = False) -> bool:
  """Starts jax.distributed when asked by config or by the environment.

  ``enabled`` (config) or ``CSARM_DISTRIBUTED=1`` turns it on; arguments left None are taken from
  JAX's own auto-detection (TPU VMs, SLURM, ``JAX_COORDINATOR_ADDRESS`` etc.). Returns whether it
  ran.
  """
  if not (enabled or os.environ.get('CSARM_DISTRIBUTED') == '1'):
    return False
  if jax.distributed.is_initialized():
    return True
  # Must run before anything starts a JAX backend. CPU hosts need gloo for cross-process
  # collectives.
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  return True
