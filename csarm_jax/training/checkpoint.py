"""Orbax checkpoints of a run: ``latest`` (resume), ``best`` (by validation loss) and ``diverged``
(the state that produced a NaN/inf loss, for post-mortems; never resumed from).

Each checkpoint holds five items: ``state`` (the TrainState pytree: parameters, running BN averages,
optimizer state, step), ``data`` (the training iterator's state), ``meta`` (loop bookkeeping --
epoch, early-stopping counters, history), ``config`` (the run's config, a record: runs resume
from the config they are given, and the loop logs the keys that changed since) and ``digest`` (the
sha256 of the state's bytes: a flipped bit in an array file restores without any error from
orbax, so every restore recomputes it and treats a mismatch as a damaged checkpoint).
Restores go through an abstract target carrying the *current* shardings, so a checkpoint written on
8 devices restores on 1 (orbax otherwise refuses a topology change). A state saved with fields the
TrainState no longer has (``rng``, dropped unread) restores too: those fields are read and
discarded, with a warning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

LATEST, BEST, DIVERGED = 'latest', 'best', 'diverged'
DAMAGED = 'damaged'           # unreadable steps moved aside by a resuming run


class CheckpointError(OSError):
  """A checkpoint that cannot be read or written; the message names it and what to do."""


class DigestMismatch(CheckpointError):
  """A restored state whose bytes differ from those saved (a corrupted array file)."""


def state_digest(state: Any) -> str:
  """sha256 over the dtype, shape and bytes of every leaf of a replicated state, in tree order
  (each process hashes its own copy; a replicated state's copies are identical)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(state):
    x = np.asarray(jax.device_get(leaf.addressable_data(0) if isinstance(leaf, jax.Array)
                                  else leaf))
    digest.update(f'{x.dtype}{x.shape}'.encode())
    digest.update(np.ascontiguousarray(x).tobytes())
  return digest.hexdigest()


def _free_suffix(path: str) -> int:
  """0 if ``path`` is free, else the first n for which ``path.n`` is."""
  n = 0
  while os.path.exists(path + (f'.{n}' if n else '')):
    n += 1
  return n


def _no_space(error: BaseException | None) -> bool:
  """Whether ``error`` or one of its causes is a full disk (ENOSPC)."""
  while error is not None:
    if getattr(error, 'errno', None) == errno.ENOSPC or 'No space left' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class Checkpoints:
  """``save(which, step, state, data, meta, config)`` / ``restore(which, abstract_state)``."""

  def __init__(self, workdir: str, keep_latest: int = 2):
    root = self._root = os.path.join(os.path.abspath(workdir), 'checkpoints')
    # Every item's handler is declared, so restoring some items never warns about the others.
    manager = lambda name, keep: ocp.CheckpointManager(
        os.path.join(root, name),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler(),
                       'digest': ocp.JsonCheckpointHandler()})
    # DIVERGED: a state whose loss became NaN/inf, kept apart so that resuming uses the last good
    # one
    self._managers = {LATEST: manager(LATEST, keep_latest), BEST: manager(BEST, 1),
                      DIVERGED: manager(DIVERGED, 1)}

  def latest_step(self, which: str = LATEST) -> int | None:
    return self._managers[which].latest_step()

  def save(self, which: str, step: int, state: Any, data: dict[str, Any], meta: dict[str, Any],
           config: dict[str, Any]) -> None:
    manager = self._managers[which]
    if manager.latest_step() == step:          # already saved (e.g. SIGTERM right after a save)
      return
    with self._disk_full_named():
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 data=ocp.args.JsonSave(data),
                                                 meta=ocp.args.JsonSave(meta),
                                                 config=ocp.args.JsonSave(config),
                                                 digest=ocp.args.JsonSave(
                                                     {'sha256': state_digest(state)})))

  @contextlib.contextmanager
  def _disk_full_named(self):
    """A full disk while saving: one message naming the place and the step a re-run resumes at."""
    try:
      yield
    except Exception as e:
      if not _no_space(e):
        raise
      good = self._managers[LATEST]
      with contextlib.suppress(Exception):     # saves already under way may still complete
        good.wait_until_finished()
      good.reload()
      raise CheckpointError(f'no space left on the disk of {self._root}; the latest good '
                            f'checkpoint is step {good.latest_step()} (free space, then re-run to '
                            f'resume from it)') from e

  def restore(self, which: str, abstract_state: Any, step: int | None = None,
              move_damaged: bool = False) -> tuple[Any, dict[str, Any], dict[str, Any]] | None:
    """(state, data, meta) of the given (default: newest intact) step, or None if there is none.

    A step that cannot be read (truncated or corrupted files) is reported by step and skipped for
    the one before it; ``move_damaged`` (a run about to write new checkpoints) moves it aside to
    ``checkpoints/damaged/`` so that it is neither resumed from nor mistaken for a saved step.
    """
    manager = self._managers[which]
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    for i, s in enumerate(steps):
      try:
        return self._restore_step(which, s, abstract_state)
      except Exception as e:       # noqa: BLE001 -- any unreadable step is reported the same way
        fallback = steps[i + 1] if i + 1 < len(steps) else None
        self._damaged(which, s, e, move_damaged, fallback)
    return None

  def _restore_step(self, which: str, step: int, abstract_state: Any):
    manager = self._managers[which]
    digested = 'digest' in (manager.item_metadata(step) or {})   # absent: saved before digests
    restore = lambda target: manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(), **({'digest': ocp.args.JsonRestore()} if digested else {})))
    dropped = _dropped_fields(manager, step, abstract_state)
    if not dropped:          # (states with dropped fields predate digests)
      restored = restore(abstract_state)
      if digested and state_digest(restored['state']) != restored['digest']['sha256']:
        raise DigestMismatch('the restored state differs from the one saved (sha256 of its '
                             'bytes): an array file is corrupted')
      return restored['state'], restored['data'], restored['meta']
    logging.warning('%s checkpoint %d holds state fields this version dropped, ignored: %s',
                    which, step, sorted(dropped))
    names = [f.name for f in dataclasses.fields(abstract_state)]
    sharding = jax.tree.leaves(abstract_state)[0].sharding
    target = {**{n: getattr(abstract_state, n) for n in names},
              **{k: jax.tree.map(
                  lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), v)
                 for k, v in dropped.items()}}
    restored = restore(target)
    state = type(abstract_state)(**{n: restored['state'][n] for n in names})
    return state, restored['data'], restored['meta']

  def _damaged(self, which: str, step: int, error: Exception, move: bool, fallback: int | None):
    path = os.path.join(self._root, which, str(step))
    aside = os.path.join(self._root, DAMAGED, f'{which}_{step}')
    aside += ''.join(f'.{n}' for n in [_free_suffix(aside)] if n)
    if move:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.replace(path, aside)
      self._managers[which].reload()
    where = f'moved to {aside}' if move else f'move it aside (mv {path} {aside}) to stop this check'
    if fallback is None:
      raise CheckpointError(f'checkpoint {path} (step {step}) is damaged and no earlier one is '
                            f'kept ({type(error).__name__}: {str(error).splitlines()[0][:200]}); '
                            f'{where}')
    logging.warning('checkpoint %s (step %d) is damaged (%s: %s); %s; using step %d instead',
                    path, step, type(error).__name__, str(error).splitlines()[0][:200], where,
                    fallback)

  def saved_config(self, which: str = LATEST) -> dict[str, Any] | None:
    """The config saved with the newest ``which`` checkpoint (None: none, or saved without one)."""
    manager, step = self._managers[which], self.latest_step(which)
    if step is None or 'config' not in (manager.item_metadata(step) or {}):
      return None
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']

  def restore_selected(self, abstract_state: Any, prefer_best: bool = True):
    """(state, data, meta, which) of the best checkpoint (if preferred and present) or the
    latest; None if the run has none."""
    which = BEST if prefer_best and self.latest_step(BEST) is not None else LATEST
    restored = self.restore(which, abstract_state)
    return None if restored is None else (*restored, which)

  def wait(self) -> None:
    with self._disk_full_named():
      for manager in self._managers.values():
        manager.wait_until_finished()

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()


def _dropped_fields(manager: ocp.CheckpointManager, step: int,
                    abstract_state: Any) -> dict[str, Any]:
  """Top-level fields of the saved state that the (dataclass) target lacks, with their metadata:
  checkpoints written before a field was removed (TrainState.rng)."""
  if not dataclasses.is_dataclass(abstract_state):
    return {}
  saved = manager.item_metadata(step)['state']
  saved = getattr(saved, 'tree', saved)
  names = {f.name for f in dataclasses.fields(abstract_state)}
  return {k: v for k, v in saved.items() if k not in names} if isinstance(saved, dict) else {}
