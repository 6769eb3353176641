"""A run's workdir before training starts: check that it can be written, refuse to resume it with
another model, and leave no empty workdir behind when the config check fails.

``model.json`` and ``config.json`` describe the checkpoints beside them (export reads them), so a
run resumed with another model, method, crop, channels or optimizer must stop before rewriting
them -- with the changed fields named, not with orbax's shape error from deep inside a restore.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
import ml_collections

from csarm_jax import models, nested
from csarm_jax.data import normalization
from csarm_jax.training import checkpoint
from csarm_jax.training.experiment import ConfigError, saved_optimizer
from csarm_jax.training.state import abstract_state

SPEC, CONFIG = 'model.json', 'config.json'
NORMALIZATION, FOLD = 'normalization.json', 'fold.json'
SELECTED = 'selected'        # the state a run evaluated: best by validation loss, else latest
# Spec fields that may change on resume: the evaluation protocol (re-scoring a trained model).
MUTABLE_SPEC = ('eval.',)
# Config fields, beyond the spec, that fix the checkpointed state's structure.
FIXED_CONFIG = ('optimizer.name',)


def writable_dir(path: str, what: str) -> str:
  """Creates ``path`` and writes (and deletes) a file there, so that an unwritable place (``what``
  names it: a flag, 'workdir') fails at once in one line -- not after the work. Tried, not asked
  of ``os.access``: as root, permission bits say little."""
  try:
    os.makedirs(path, exist_ok=True)
    tempfile.TemporaryFile(dir=path).close()
  except OSError as e:
    raise OSError(f'{what} {path} is not writable ({(e.strerror or str(e)).lower()})') from e
  return path


def has_checkpoints(workdir: str) -> bool:
  """True when ``workdir/checkpoints`` holds a saved step of any kind."""
  root = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(root) and any(
      name.isdigit() for kind in os.listdir(root) if os.path.isdir(os.path.join(root, kind))
      for name in os.listdir(os.path.join(root, kind)))


def _saved(workdir: str, name: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_resume(workdir: str, config_record: dict[str, Any], spec: dict[str, Any]) -> None:
  """Raises ConfigError naming every field in which ``spec`` (model.json) or the state-shaping
  config fields differ from those of the checkpoints already in ``workdir``."""
  if not has_checkpoints(workdir):
    return
  changed, spec = [], json.loads(json.dumps(spec))        # as read back from model.json
  saved_spec = _saved(workdir, SPEC)
  if saved_spec is not None:
    changed += [(f'model.json:{k}', a, b) for k, a, b in nested.differences(saved_spec, spec)
                if not k.startswith(MUTABLE_SPEC)]
  saved_config = _saved(workdir, CONFIG)
  if saved_config is not None:
    changed += [(f'config.{k}', a, b) for k, a, b in nested.differences(saved_config, config_record)
                if k in FIXED_CONFIG]
  if changed:
    raise ConfigError(
        f'{workdir} holds checkpoints of another model; changed: '
        + ', '.join(f'{k} {a!r} -> {b!r}' for k, a, b in changed)
        + '. Use a new workdir, or the config that made it')


@contextlib.contextmanager
def removed_on_failure(workdir: str) -> Iterator[None]:
  """Creates ``workdir`` (checked writable); if it did not exist before and the body raises,
  removes it again."""
  existed = os.path.exists(workdir)
  try:
    writable_dir(workdir, 'workdir')
    yield
  except BaseException:
    if not existed:
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def read_json(path: str) -> Any:
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing')
  with open(path) as f:
    return json.load(f)


def restore_run(workdir: str, which: str = SELECTED
                ) -> tuple[dict[str, Any], dict[str, Any], normalization.NormStats, dict[str, Any]]:
  """(variables, model spec, normalisation, provenance) of a run's checkpoint (``which``: see
  ``inference.export``)."""
  if which not in (SELECTED, checkpoint.BEST, checkpoint.LATEST):
    raise ValueError(f'which must be selected, best or latest, got {which!r}')
  if not has_checkpoints(workdir):      # before orbax creates its folders there
    raise FileNotFoundError(f'{workdir}/checkpoints holds no checkpoint to export (has the run '
                            f'saved one yet?)')
  spec = read_json(os.path.join(workdir, SPEC))
  config = ml_collections.ConfigDict(read_json(os.path.join(workdir, CONFIG)))
  norm = normalization.NormStats.load(os.path.join(workdir, NORMALIZATION))
  model = models.from_spec(spec['model'])
  tx = saved_optimizer(config, spec['model'])
  target = abstract_state(model, tx, models.example_input(model, spec['crop_size']),
                          jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  ckpt = checkpoint.Checkpoints(workdir)
  try:
    fold = read_json(os.path.join(workdir, FOLD))
    prefer_best = which == checkpoint.BEST or (which == SELECTED and bool(fold.get('validation')))
    restored = ckpt.restore_selected(target, prefer_best=prefer_best)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'{workdir}/checkpoints holds no checkpoint to export')
  state, _, meta, which = restored
  provenance = {'workdir': os.path.abspath(workdir), 'checkpoint': which, 'step': int(state.step),
                'best_val_loss': meta.get('best_val_loss'), 'fold': fold,
                'config': config.to_dict()}
  return {'params': state.params, 'batch_stats': state.batch_stats}, spec, norm, provenance
