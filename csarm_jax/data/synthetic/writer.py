"""Writes a synthetic benchmark as a complete image store, in parallel and resumably.

Work units are the store's shards: a worker renders a shard's images and writes the whole shard.
Every image's randomness comes from streams keyed by what it depicts (see ``keys``), so the bytes
depend on the config and seed only -- not on the number of workers. The table and manifest are
written last (via ``store_writer.write_metadata``); until then ``synthetic_progress.json`` in the
output directory lists the finished shards, and a rerun with the same config and seed resumes from
it.
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
from typing import Any

import ml_collections
import numpy as np
import tqdm

from csarm_jax import __version__, nested
from csarm_jax.data import constants, store, store_writer
from csarm_jax.data.synthetic import config as config_lib
from csarm_jax.data.synthetic import images, layout

TOOL = 'csarm_jax.data.synthetic'
PROGRESS_NAME = 'synthetic_progress.json'


def _fingerprint(config: ml_collections.ConfigDict, seed: int) -> dict[str, Any]:
  """What identifies a generated store: the full config and the seed, as JSON would hold them."""
  return json.loads(json.dumps({'config': config.to_dict(), 'seed': int(seed)}))


_WORKER: dict[str, Any] = {}


def _start_worker(config, seed, out, index) -> None:
  _WORKER.update(config=config, seed=seed, index=index, array=store.open_array(out, write=True))


def _write_shard(shard: int) -> int:
  w = _WORKER
  size = w['config'].shard_items
  start, stop = shard * size, min((shard + 1) * size, len(w['index']))
  rendered = images.render_rows(w['config'], w['seed'], w['index'][start:stop], start)
  w['array'][start:stop].write(rendered).result()
  return shard


# ------------------------------------------------------------------------------------------------
# Output directory state

def _local(out: str) -> str:
  if '://' in out and not out.startswith('file://'):
    raise ValueError(f'the synthetic generator writes to a local directory, got {out!r} '
                     '(generate locally, then copy the directory to the bucket)')
  return os.path.abspath(os.path.expanduser(out.removeprefix('file://')))


def _read_progress(out: str) -> dict[str, Any] | None:
  path = os.path.join(out, PROGRESS_NAME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_progress(out: str, fingerprint: dict[str, Any], done: set[int]) -> None:
  path = os.path.join(out, PROGRESS_NAME)
  with open(path + '.tmp', 'w') as f:
    json.dump({'fingerprint': fingerprint, 'done': sorted(done)}, f)
  os.replace(path + '.tmp', path)


# How images are stored, not what they are.
STORAGE_FIELDS = ('shard_items',) + store_writer.LAYOUT_OPTIONS


def _without(fingerprint: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
  config = {k: v for k, v in (fingerprint.get('config') or {}).items() if k not in fields}
  return {**fingerprint, 'config': config}


def _content(fingerprint: dict[str, Any]) -> dict[str, Any]:
  """The fingerprint without the storage fields: two stores with equal content are one benchmark."""
  return _without(fingerprint, STORAGE_FIELDS)


def _with_new_fields(fingerprint: dict[str, Any]) -> dict[str, Any]:
  """A fingerprint written before a config field existed, with that field at its preset value
  (so an older interrupted run still resumes; its array keeps the layout it was created with)."""
  saved = fingerprint.get('config') or {}
  if saved.get('preset') not in config_lib.PRESETS:
    return fingerprint
  defaults = json.loads(json.dumps(config_lib.preset(saved['preset']).to_dict()))
  return {**fingerprint, 'config': nested.with_defaults(saved, defaults)}


def _describe(out: str, want: dict[str, Any], have: dict[str, Any], what: str) -> str:
  diff = [f'{key}: wanted {w!r}, found {h!r}' for key, w, h in nested.differences(want, have)]
  return (f'{out} already holds {what} made with a different config or seed '
          f'({"; ".join(diff[:5])}{"; ..." if len(diff) > 5 else ""}); choose another directory '
          'or delete it')


# ------------------------------------------------------------------------------------------------
# Public API

def generate(config: ml_collections.ConfigDict, out: str, seed: int = 0, workers: int | None = None,
             progress: bool = True) -> str:
  """Writes the benchmark described by ``config`` (from ``preset()``) as a store at ``out``.

  ``out`` must be absent or empty, or hold an interrupted run of the same config and seed (which
  is resumed). ``workers``: processes (default: CPU count); 1 renders in this process. Returns
  ``out``.
  """
  config_lib.validate(config)
  out = _local(out)
  fingerprint = _fingerprint(config, seed)
  if os.path.exists(os.path.join(out, store.MANIFEST_NAME)):
    raise FileExistsError(f'{out} already holds a complete store; use synthetic.ensure() to reuse '
                          'it or choose another directory')
  state = _read_progress(out)
  if state is not None:
    saved = _with_new_fields(state['fingerprint'])
    layout_free = lambda f: _without(f, store_writer.LAYOUT_OPTIONS)
    if layout_free(saved) != layout_free(fingerprint):
      raise FileExistsError(_describe(out, fingerprint, saved, 'an interrupted run'))
    fingerprint = saved     # a resumed run keeps the codec and tiles its array was created with
  if state is None and os.path.isdir(out) and os.listdir(out):
    raise FileExistsError(f'{out} is not empty and is not an interrupted synthetic run; choose an '
                          'empty or new directory')

  table = layout.build_table(config, seed)
  index = table[list(layout.INDEX_COLUMNS) + ['label']].to_numpy(np.int64)
  item_shape = (config.image_size, config.image_size, len(constants.CHANNELS))
  num_shards = -(-len(table) // config.shard_items)
  if state is None:
    os.makedirs(out, exist_ok=True)
    store_writer.create_array(out, len(table), item_shape, config.dtype,
                              shard_items=config.shard_items, compression=config.compression,
                              tile=config.tile or None)
    done: set[int] = set()
    _write_progress(out, fingerprint, done)
  else:
    done = set(state['done'])
  todo = [s for s in range(num_shards) if s not in done]
  workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))

  bar = tqdm.tqdm(total=len(table), unit='img', desc=f'synthetic -> {out}', disable=not progress)
  bar.update(sum(min(config.shard_items, len(table) - s * config.shard_items) for s in done))

  def finished(shard: int) -> None:
    done.add(shard)
    _write_progress(out, fingerprint, done)
    bar.update(min(config.shard_items, len(table) - shard * config.shard_items))

  frozen = ml_collections.FrozenConfigDict(config)
  if workers == 1:
    _start_worker(frozen, seed, out, index)
    for shard in todo:
      finished(_write_shard(shard))
    _WORKER.clear()
  else:
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn'), initializer=_start_worker,
        initargs=(frozen, seed, out, index)) as pool:
      futures = [pool.submit(_write_shard, s) for s in todo]
      try:
        for future in concurrent.futures.as_completed(futures):
          finished(future.result())
      except BaseException:              # stop at the first failure; finished shards are kept
        for future in futures:
          future.cancel()
        raise
  bar.close()

  created_by = {'tool': TOOL, 'version': __version__, 'preset': config.preset, **fingerprint}
  manifest = store_writer.make_manifest(constants.CHANNELS, config.dtype, item_shape, len(table),
                                 constants.POSITIVE_CONTROLS, constants.CONTROL_ID, created_by)
  columns = list(store.COLUMNS) + list(layout.EXTRA_COLUMNS)
  store_writer.write_metadata(out, table[columns].reset_index(drop=True), manifest)
  os.remove(os.path.join(out, PROGRESS_NAME))
  return out


def ensure(out: str, preset_name: str, seed: int = 0, workers: int | None = None,
           progress: bool = True, **overrides: Any) -> str:
  """``out`` holding preset ``preset_name`` (with ``overrides``) at ``seed``: reused if complete,
  generated (or resumed) if not. Raises FileExistsError if ``out`` holds anything else.

  ``overrides``: config fields, dotted (``**{'layout.num_sources': 4}``) or nested
  (``layout={'num_sources': 4}``).
  """
  config = config_lib.with_overrides(config_lib.preset(preset_name), overrides)
  local = _local(out)
  if not os.path.exists(os.path.join(local, store.MANIFEST_NAME)):
    return generate(config, local, seed=seed, workers=workers, progress=progress)
  made_by = store.read_manifest(local).get('created_by', {})
  want = _fingerprint(config, seed)
  have = {'config': made_by.get('config'), 'seed': made_by.get('seed')}
  # Any codec or tiling will do.
  if made_by.get('tool') != TOOL or _content(have) != _content(want):
    raise FileExistsError(_describe(local, _content(want), _content(have), 'a store'))
  store.open_store(local)                        # validates array, table and manifest
  return local

