"""Domains for domain-adaptation methods (DANN, Deep CORAL) and their training contexts.

A domain is a plate, a batch or a source (``by``), read from the store table; the run's domains are
counted from the plates it trains on (and, transductively, the held-out plates whose images join
training unlabelled), never fixed in advance. Domain ids index the sorted domain names.

A domain context draws D domains uniformly (without replacement) and an equal share of N labelled
images from each, so every domain in it has several images (Deep CORAL's covariances need >= 2);
transductive contexts add U unlabelled images (label -1) the same way from the held-out domains.
Rows: labelled, then unlabelled, then padding (``too_few='pad'``); no controls.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pandas as pd

from csarm_jax.data.contexts import Context, ContextError, PlateIndex, _context, _draw

COLUMNS = {'plate': 'Metadata_Plate', 'batch': 'Metadata_Batch', 'source': 'Metadata_Source'}


def plate_domains(table: pd.DataFrame, plates: Sequence[str], by: str) -> dict[str, str]:
  """{plate: its domain name} for ``plates``; a plate spanning two domains is an error."""
  if by not in COLUMNS:
    raise ContextError(f'domains by {by!r}: choose one of {sorted(COLUMNS)}')
  column = COLUMNS[by]
  if column not in table.columns:
    raise ContextError(f'domains by {by}: the table lacks column {column}')
  used = table['Metadata_Plate'].isin(plates)
  pairs = pd.DataFrame({'plate': table.loc[used, 'Metadata_Plate'],
                        'domain': table.loc[used, column].astype(str)}).drop_duplicates()
  split = pairs['plate'].duplicated(keep=False)
  if split.any():
    raise ContextError(f'plate {pairs.loc[split, "plate"].iloc[0]} has several values in column '
                       f'{column}')
  return dict(zip(pairs['plate'], pairs['domain']))


def domain_names(table: pd.DataFrame, plates: Sequence[str], by: str) -> tuple[str, ...]:
  """The sorted domains of ``plates``: their ids are positions in this tuple."""
  return tuple(sorted(set(plate_domains(table, plates, by).values())))


@dataclasses.dataclass(frozen=True)
class Pool:
  """The perturbed store rows of one domain (and their labels; -1 when used unlabelled)."""
  domain: int
  rows: np.ndarray
  labels: np.ndarray


def pools(index: PlateIndex, domain_of: dict[str, int], labelled: bool) -> tuple[Pool, ...]:
  """``index``'s perturbed rows grouped by domain id (``domain_of``: plate -> id)."""
  grouped: dict[int, list[int]] = {}
  for p, plate in enumerate(index.plates):
    grouped.setdefault(domain_of[plate], []).append(p)
  out = []
  for d, members in sorted(grouped.items()):
    rows = np.concatenate([index.perturbed[p] for p in members])
    labels = (np.concatenate([index.labels[p] for p in members]) if labelled
              else np.full(len(rows), -1, np.int32))
    out.append(Pool(d, rows, labels))
  return tuple(out)


def _draw_pools(pools_: tuple[Pool, ...], rng: np.random.Generator, n: int, per_context: int,
                too_few: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(rows, labels, domain ids) of n images, an equal share from each of ``per_context`` pools."""
  if n == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32)
  k = min(per_context, len(pools_))
  chosen = rng.choice(len(pools_), k, replace=False)
  rows, labels, domains = [], [], []
  for i, pool in enumerate(pools_[j] for j in chosen):
    take = _draw(rng, len(pool.rows), n // k + (i < n % k), too_few)
    rows.append(pool.rows[take])
    labels.append(pool.labels[take])
    domains.append(np.full(len(take), pool.domain, np.int32))
  return np.concatenate(rows), np.concatenate(labels), np.concatenate(domains)


def domain_context(labelled: tuple[Pool, ...], unlabelled: tuple[Pool, ...],
                   rng: np.random.Generator, num_perturbed: int, num_unlabelled: int,
                   domains_per_context: int, too_few: str = 'replace') -> Context:
  """N labelled images from ``domains_per_context`` training domains, then U unlabelled ones from
  as many held-out domains (see the module doc)."""
  parts = [_draw_pools(labelled, rng, num_perturbed, domains_per_context, too_few),
           _draw_pools(unlabelled, rng, num_unlabelled, domains_per_context, too_few)]
  rows, labels, domains = (np.concatenate(a) for a in zip(*parts))
  size = num_perturbed + num_unlabelled
  ctx = _context(-1, rows, labels, np.zeros(0, np.int64), size)
  domain = np.full(size, -1, np.int32)
  domain[:len(domains)] = domains
  return dataclasses.replace(ctx, domain=domain)
