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

from csarm_jax import nested
from csarm_jax.training.experiment import ConfigError

SPEC, CONFIG = 'model.json', 'config.json'
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
