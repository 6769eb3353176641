"""Resumable, parallel conversion of a JUMP site index into an image store, with a QC report.

Array row ``i`` holds index row ``i``. The unit of work is one shard (``shard_items`` consecutive
rows): a worker reads and preprocesses its sites, writes the whole shard in one write (tensorstore
writes a shard file atomically, so it is complete or absent), then records the shard in the ledger
(``convert/ledger/<shard>.json``: the sites written, every problem found). No two workers touch a
shard. A skipped site's row stays zero and is absent from the table; the manifest declares such rows
(``num_unused_rows``) and ``qc_report.csv`` lists each with its reason -- nothing is a silent hole.

``convert/run.json``, written first, records the index checksum, the options and the resolved item
shape. A later run with the same index and options continues with the shards the ledger lacks, and
one that finds the manifest (written last) writes nothing; different options are refused unless
``overwrite``. The result depends only on the index and the options, not on the worker count or on
how often the run was interrupted: stores are byte-identical.

Size policy: each site is centre-cropped to one (H, W) after downsampling; by default a square whose
side is the smallest downsampled height or width found by probing the first readable image of every
plate (e.g. 512 for source_3 at 1080 -> 540 together with source_8 at 1024 -> 512). Sites smaller
than the crop are skipped (``too-small``), never padded. Clipping thresholds are computed on the
whole downsampled image, before the crop, as in the reference.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import tensorstore as ts
from tqdm import tqdm

from csarm_jax import nested
from csarm_jax.data import store as store_lib
from csarm_jax.data import store_writer
from csarm_jax.data.constants import CHANNELS
from csarm_jax.data.jump.files import FileProblem, read_illum, read_tiff, tiff_shape
from csarm_jax.data.jump.index import read_index
from csarm_jax.data.jump.load_data import key_column, path_column
from csarm_jax.data.jump.preprocess import (SCALE_MAX, center_crop, downsampled_size,
                                            preprocess_channel)

log = logging.getLogger(__name__)

RUN_KEY = 'convert/run.json'
LEDGER_PREFIX = 'convert/ledger/'
QC_KEY = 'qc_report.csv'
QC_COLUMNS = ('row', 'Metadata_Sample_ID', 'channel', 'issue', 'detail', 'action', 'file', 'key')
SKIPPED, KEPT = 'site skipped', 'kept'
TABLE_EXTRAS = ('Metadata_Plate_ID', 'Metadata_Sample_ID', 'Metadata_Compound')


class ConvertError(RuntimeError):
  """A conversion that cannot start or continue (names the store and the reason)."""


@dataclass(frozen=True)
class ConvertOptions:
  downsample: int = 2                    # integer shrink factor (2: the paper's x0.5)
  clip_percentile: float = 99.99         # per-channel clipping threshold
  dtype: str = 'uint8'                   # or 'uint16'
  illum: bool = False                    # divide by the plate's Illum<Ch>.npy (the paper did not)
  crop: tuple[int, int] | None = None    # (H, W) after downsampling; None: see the module docstring
  shard_items: int = 64                  # sites per shard = per work unit
  compression: str = store_writer.DEFAULT_COMPRESSION   # store codec: a key of store.COMPRESSIONS
  tile: int = 0                          # side of the stored tiles (divides the crop); 0: auto

  def __post_init__(self):
    if self.dtype not in SCALE_MAX:
      raise ValueError(f'dtype {self.dtype!r}: expected one of {sorted(SCALE_MAX)}')
    if self.downsample < 1 or self.shard_items < 1:
      raise ValueError('downsample and shard_items must be positive')
    if not 0 < self.clip_percentile <= 100:
      raise ValueError(f'clip_percentile {self.clip_percentile} is not in (0, 100]')
    if self.compression not in store_writer.COMPRESSIONS:
      raise ValueError(f'compression {self.compression!r}: expected one of '
                       f'{sorted(store_writer.COMPRESSIONS)}')
    if self.crop is not None and (len(self.crop) != 2 or min(self.crop) < 1):
      raise ValueError(f'crop {self.crop}: expected (height, width) > 0')


@dataclass(frozen=True)
class ShardJob:
  out: str
  shard: int
  first_row: int
  sites: list[dict[str, Any]]
  options: ConvertOptions
  item_shape: tuple[int, int, int]


# --- one site -------------------------------------------------------------------------------------

def _issue(site: dict[str, Any], channel: str, kind: str, detail: str, action: str = SKIPPED,
           file: str = '', key: str = '') -> dict[str, Any]:
  return {'row': int(site['row']), 'Metadata_Sample_ID': site['Metadata_Sample_ID'],
          'channel': channel, 'issue': kind, 'detail': detail, 'action': action, 'file': file,
          'key': key}


def _read_channels(site: dict[str, Any], kind: str, reader, issues: list) -> dict[str, np.ndarray]:
  arrays = {}
  for ch in CHANNELS:
    path, key = site[path_column(ch, kind)], site[key_column(ch, kind)]
    try:
      arrays[ch] = reader(path)
    except FileProblem as p:
      issues.append(_issue(site, ch, p.kind if kind == 'Orig' else f'illum-{p.kind}', p.detail,
                           file=path, key=key))
  return arrays


def process_site(site: dict[str, Any], options: ConvertOptions, crop: tuple[int, int],
                 illum_reader=read_illum) -> tuple[np.ndarray | None, tuple[int, int] | None, list]:
  """(the (H, W, 5) image or None if skipped, the source (height, width), the problems found)."""
  issues: list[dict[str, Any]] = []
  raws = _read_channels(site, 'Orig', read_tiff, issues)
  illums = _read_channels(site, 'Illum', illum_reader, issues) if options.illum else {}
  shapes = {ch: a.shape for ch, a in raws.items()}
  if len(set(shapes.values())) > 1:
    issues.append(_issue(site, '', 'shape-mismatch', f'channels differ in size: {shapes}'))
  if len(set(shapes.values())) != 1:
    return None, None, issues
  (h, w), factor = next(iter(shapes.values())), options.downsample
  if h != w:
    issues.append(_issue(site, '', 'non-square', f'{h}x{w}', KEPT))
  if h % factor or w % factor:
    issues.append(_issue(site, '', 'odd-size', f'{h}x{w} is not divisible by {factor}', KEPT))
  bad_illum = {ch: a.shape for ch, a in illums.items() if a.shape != (h, w)}
  if bad_illum:
    issues.append(_issue(site, '', 'illum-shape', f'illumination {bad_illum} vs image {h}x{w}'))
  small = downsampled_size(h, factor) < crop[0] or downsampled_size(w, factor) < crop[1]
  if small:
    issues.append(_issue(site, '', 'too-small', f'{h}x{w} downsampled by {factor} is smaller than '
                         f'the crop {crop[0]}x{crop[1]}'))
  if any(i['action'] == SKIPPED for i in issues):
    return None, (h, w), issues
  channels = []
  for ch in CHANNELS:
    try:
      channels.append(preprocess_channel(raws[ch], illums.get(ch), factor, options.clip_percentile,
                                         options.dtype))
    except ValueError as e:   # too few non-zero pixels: a zero clipping threshold
      issues.append(_issue(site, ch, 'zero-filled', str(e), file=site[path_column(ch)],
                           key=site[key_column(ch)]))
  if len(channels) < len(CHANNELS):
    return None, (h, w), issues
  return center_crop(np.stack(channels, axis=-1), *crop), (h, w), issues


# --- one shard (runs in a worker) -----------------------------------------------------------------

def _ledger_key(shard: int) -> str:
  return f'{LEDGER_PREFIX}{shard:08d}.json'


def _cached_illum_reader():
  cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

  def read(path: str) -> np.ndarray:
    if path not in cache:
      cache[path] = read_illum(path)
      if len(cache) > 4 * len(CHANNELS):
        cache.popitem(last=False)
    return cache[path]
  return read


def convert_shard(job: ShardJob) -> dict[str, Any]:
  """Converts, writes and records one shard; returns its ledger entry."""
  images = np.zeros((len(job.sites), *job.item_shape), job.options.dtype)
  written, issues = [], []
  illum_reader = _cached_illum_reader()
  for i, site in enumerate(job.sites):
    image, size, site_issues = process_site(site, job.options, job.item_shape[:2], illum_reader)
    issues += site_issues
    if image is not None:
      images[i] = image
      written.append([int(site['row']), *size])
  array = store_lib.open_array(job.out, write=True)
  array[job.first_row:job.first_row + len(job.sites)].write(images).result()
  entry = {'shard': job.shard, 'sites': written, 'issues': issues}
  store_lib.kvstore(job.out).write(_ledger_key(job.shard),
                                    json.dumps(entry, sort_keys=True).encode()).result()
  return entry


def _execute(jobs: Iterable[ShardJob], workers: int) -> Iterator[dict[str, Any]]:
  """Ledger entries of ``jobs`` as they finish; at most 2 x workers shards in flight."""
  if workers == 1:
    yield from map(convert_shard, jobs)
    return
  pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'))
  pending: set[futures.Future] = set()
  try:
    for job in jobs:
      pending.add(pool.submit(convert_shard, job))
      if len(pending) >= 2 * workers:
        done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
        yield from (f.result() for f in done)
    for f in futures.as_completed(pending):
      yield f.result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


# --- the whole run --------------------------------------------------------------------------------

def _read_json(kv: ts.KvStore, key: str) -> Any:
  raw = kv.read(key).result()
  return json.loads(bytes(raw.value)) if raw.state == 'value' else None


def _exists(kv: ts.KvStore, key: str) -> bool:
  return kv.read(key).result().state == 'value'


def _prefix_range(prefix: str) -> ts.KvStore.KeyRange:
  return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))


def _clear(kv: ts.KvStore) -> None:
  """Deletes what a conversion writes (the manifest first: the store is no longer complete)."""
  for key in (store_lib.MANIFEST_NAME, store_lib.TABLE_NAME, QC_KEY):
    kv.delete_range(ts.KvStore.KeyRange(key, key + '\0')).result()
  for prefix in (store_lib.ARRAY_NAME + '/', 'convert/'):
    kv.delete_range(_prefix_range(prefix)).result()


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def probe_sizes(index: pd.DataFrame, tries: int = 3) -> dict[str, list[int]]:
  """Plate ID -> (height, width) of the first readable DNA image among its first ``tries`` sites."""
  sizes = {}
  for plate_id, group in index.groupby('Metadata_Plate_ID', sort=True):
    for path in group[path_column(CHANNELS[0])].head(tries):
      try:
        sizes[plate_id] = list(tiff_shape(path))
        break
      except FileProblem:
        continue
  return sizes


def auto_crop(sizes: dict[str, list[int]], factor: int) -> tuple[int, int]:
  """The square whose side is the smallest downsampled height or width among ``sizes``."""
  if not sizes:
    raise ConvertError('no plate has a readable image among its first sites: is the mirror there '
                       '(see the index\'s path_DNA column) and were the images fetched?')
  side = min(downsampled_size(n, factor) for hw in sizes.values() for n in hw)
  return side, side


def _site_records(index: pd.DataFrame, first: int, last: int) -> list[dict[str, Any]]:
  columns = ['Metadata_Sample_ID'] + [f(ch, kind) for kind in ('Orig', 'Illum') for ch in CHANNELS
                                      for f in (path_column, key_column)]
  records = index.iloc[first:last][columns].to_dict('records')
  for row, record in zip(range(first, last), records):
    record['row'] = row
  return records


def _ledger(kv: ts.KvStore) -> dict[int, dict[str, Any]]:
  keys = kv.list(_prefix_range(LEDGER_PREFIX)).result()
  entries = [json.loads(bytes(kv.read(k).result().value)) for k in sorted(keys)]
  return {e['shard']: e for e in entries}


def qc_counts(num_sites: int, entries: Iterable[dict[str, Any]]) -> dict[str, Any]:
  """Sites written/skipped, problems by kind (one per bad file or site), notes by kind (per site).
  """
  written, problems, notes = 0, collections.Counter(), collections.Counter()
  for entry in entries:
    written += len(entry['sites'])
    for issue in entry['issues']:
      (problems if issue['action'] == SKIPPED else notes)[issue['issue']] += 1
  return {'sites': num_sites, 'written': written, 'skipped': num_sites - written,
          'problems': dict(sorted(problems.items())), 'notes': dict(sorted(notes.items()))}


def qc_line(counts: dict[str, Any], report: str) -> str:
  fmt = lambda c: ', '.join(f'{k} {v}' for k, v in c.items()) or 'none'
  return (f"QC: {counts['written']}/{counts['sites']} sites written, {counts['skipped']} skipped; "
          f"problems: {fmt(counts['problems'])}; notes: {fmt(counts['notes'])}; details: {report}")


def _write_qc(kv: ts.KvStore, entries: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
  """Writes qc_report.csv from the ledger; returns its entries in shard order."""
  ordered = [entries[s] for s in sorted(entries)]
  qc = pd.DataFrame([i for e in ordered for i in e['issues']], columns=list(QC_COLUMNS))
  kv.write(QC_KEY, qc.to_csv(index=False).encode()).result()
  return ordered


def _refuse_too_few(out: str, kv: ts.KvStore, entries: dict[int, dict[str, Any]], num_sites: int,
                    min_written: float, report: str) -> None:
  """A conversion that wrote no site (or under ``min_written`` of them) fails without marking the
  store complete; its empty shards leave the ledger, so a re-run (files fetched) converts them."""
  counts = qc_counts(num_sites, [entries[s] for s in sorted(entries)])
  if counts['written'] >= max(1, math.ceil(min_written * num_sites)):
    return
  _write_qc(kv, entries)
  for shard, entry in entries.items():
    if not entry['sites']:
      kv.delete_range(ts.KvStore.KeyRange(_ledger_key(shard), _ledger_key(shard) + '\0')).result()
  raise ConvertError(f'{out}: {counts["written"]} of {num_sites} sites written (at least '
                     f'{max(1, math.ceil(min_written * num_sites))} required), so the store is not '
                     f'marked complete; fetch the missing files and re-run. '
                     + qc_line(counts, report))


def _finalise(out: str, kv: ts.KvStore, index: pd.DataFrame, info: dict[str, Any],
              run: dict[str, Any], entries: dict[int, dict[str, Any]]) -> dict[str, Any]:
  """Writes qc_report.csv, the table and (last) the manifest from the ledger."""
  ordered = _write_qc(kv, entries)
  # (row, source height, source width) of every written site, in row order
  written = np.array([site for e in ordered for site in e['sites']], dtype=np.int64).reshape(-1, 3)
  table = index.iloc[written[:, 0]][list(store_lib.ID_COLUMNS) + list(TABLE_EXTRAS)
                                    + ['is_control', 'label']].reset_index(drop=True)
  table['is_control'] = table['is_control'].astype(bool)
  table['label'] = table['label'].astype(np.int64)
  table['row'] = written[:, 0]
  table['source_height'], table['source_width'] = written[:, 1], written[:, 2]
  counts = qc_counts(len(index), ordered)
  created_by = {'tool': 'csarm_jax.data.jump.convert', 'command': run['command'],
                'index': {'path': run['index_path'], 'sha256': run['request']['index_sha256']},
                'options': run['request']['options'], 'crop': run['item_shape'][:2],
                'probed_source_sizes': run['probed_source_sizes'], 'qc': counts}
  manifest = store_writer.make_manifest(
      CHANNELS, run['request']['options']['dtype'], run['item_shape'], len(index),
      [tuple(c) for c in info['classes']], info['control_id'], created_by,
      num_unused_rows=len(index) - len(table))
  store_writer.write_metadata(out, table, manifest)
  return counts


def _source_sizes(index: pd.DataFrame, sizes: dict[str, list[int]]) -> dict[str, list[str]]:
  source_of = (index.drop_duplicates('Metadata_Plate_ID')
               .set_index('Metadata_Plate_ID')['Metadata_Source'])
  by_source = collections.defaultdict(set)
  for plate_id, (h, w) in sizes.items():
    by_source[source_of[plate_id]].add(f'{h}x{w}')
  return {s: sorted(v) for s, v in sorted(by_source.items())}


def _with_new_defaults(request: dict[str, Any]) -> dict[str, Any]:
  """A saved request with options added since it was written at their defaults, so an older
  interrupted run still resumes (its array keeps the layout it was created with)."""
  defaults = json.loads(json.dumps(dataclasses.asdict(ConvertOptions())))
  return {**request, 'options': nested.with_defaults(request['options'], defaults)}


def _same_run(request: dict[str, Any], saved: dict[str, Any]) -> bool:
  """Whether a request continues a saved run: the same index and options, whatever codec or tiles
  it asks for (the run keeps the ones it started with)."""
  strip = lambda r: {**r, 'options': {k: v for k, v in r['options'].items()
                                      if k not in store_writer.LAYOUT_OPTIONS}}
  return strip(json.loads(json.dumps(request))) == strip(_with_new_defaults(saved))


def convert_sites(index_path: str, out: str, options: ConvertOptions = ConvertOptions(),
                  workers: int = 1, overwrite: bool = False, command: str = '',
                  progress: bool = True, min_written: float = 0.0) -> dict[str, Any]:
  """Converts (or continues converting) the sites of an index into the store at ``out``.

  Returns the QC counts; logs the QC summary line. See the module docstring for the guarantees.
  Raises ConvertError, leaving the store incomplete, if no site (or fewer than the fraction
  ``min_written`` of them) could be written.
  """
  index, info = read_index(index_path)
  if index.empty:
    raise ConvertError(f'{index_path} selects no sites')
  kv = store_lib.kvstore(out)
  request = {'index_sha256': file_sha256(index_path), 'options': dataclasses.asdict(options)}
  if overwrite:
    _clear(kv)
  run = _read_json(kv, RUN_KEY)
  if run is None:
    if _exists(kv, store_lib.MANIFEST_NAME) or _exists(kv, store_lib.ARRAY_NAME + '/zarr.json'):
      raise ConvertError(f'{out} already holds a store this converter did not start; '
                         f'pass overwrite (--overwrite) or another output')
    sizes = probe_sizes(index)
    crop = tuple(options.crop) if options.crop else auto_crop(sizes, options.downsample)
    for side in crop:   # a bad tile fails before anything is written
      store_writer.tile_side(side, len(CHANNELS), options.tile or None)
    run = {'request': request, 'item_shape': [*crop, len(CHANNELS)], 'num_items': len(index),
           'command': command, 'index_path': index_path,
           'probed_source_sizes': _source_sizes(index, sizes)}
    kv.write(RUN_KEY, json.dumps(run, indent=1, sort_keys=True).encode()).result()
    run = _read_json(kv, RUN_KEY)     # as a resumed run will see it (key order included)
  elif not _same_run(request, run['request']):
    raise ConvertError(f'{out} was started from another index or with other options '
                       f"({run['request']}); pass overwrite (--overwrite) or another output")

  report = f'{store_lib.url(out)}{QC_KEY}'
  if _exists(kv, store_lib.MANIFEST_NAME):
    counts = qc_counts(len(index), _ledger(kv).values())
    log.info('%s is complete; nothing to do. %s', out, qc_line(counts, report))
    return counts
  item_shape = tuple(run['item_shape'])
  started = _with_new_defaults(run['request'])['options']
  try:
    store_lib.open_array(out)
  except store_lib.StoreError:
    store_writer.create_array(out, len(index), item_shape, options.dtype,
                              shard_items=options.shard_items,
                              compression=started['compression'], tile=started['tile'] or None)
  entries = _ledger(kv)
  size = options.shard_items
  num_shards = -(-len(index) // size)
  todo = [s for s in range(num_shards) if s not in entries]
  jobs = (ShardJob(out, s, s * size,
                   _site_records(index, s * size, min((s + 1) * size, len(index))),
                   options, item_shape) for s in todo)
  done_sites = sum(min(size, len(index) - s * size) for s in entries)
  log.info('converting %d sites in %d shards (%d already done) with %d worker(s) into %s',
           len(index), num_shards, len(entries), workers, out)
  with tqdm(total=len(index), initial=done_sites, unit='site', disable=not progress) as bar:
    for entry in _execute(jobs, workers):
      entries[entry['shard']] = entry
      bar.update(min(size, len(index) - entry['shard'] * size))
  _refuse_too_few(out, kv, entries, len(index), min_written, report)
  counts = _finalise(out, kv, index, info, run, entries)
  log.info(qc_line(counts, report))
  return counts
