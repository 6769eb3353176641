"""TVN of a feature store's rows, held in memory: what a run on embeddings trains and evaluates on.

    store = tvn_store(store, plates, fit_plates=fold.train, standardize_plates=fold.train)

Feature stores fit in memory, so the plates' rows are read once, transformed (``tvn``) and served
from a ``MemoryStore``: the same table rows (restricted to ``plates``), the same ``row`` indices,
items of the TVN's k components. Domains are plates or batches, each standardised and whitened
with its own controls; the scaler, PCA and target covariance are fitted on the controls of
``fit_plates``; the final standardisation on the labelled perturbed rows of
``standardize_plates`` (a fold's training images).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
import tensorstore as ts

from csarm_jax.data.store import ImageStore
from csarm_jax.features import tvn

DOMAINS = {'plate': 'Metadata_Plate', 'batch': 'Metadata_Batch'}


@dataclasses.dataclass
class MemoryStore(ImageStore):
  """A store whose items are ``items`` in memory (``array`` views them); pickles with them."""
  items: np.ndarray | None = None

  def __getstate__(self):
    return {'path': self.path, 'manifest': self.manifest, 'table': self.table,
            'items': self.items}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.array = ts.array(self.items)


def in_memory(store: ImageStore, items: np.ndarray, table, **manifest: Any) -> MemoryStore:
  """``store`` with ``table`` and new (N, ...) ``items`` indexed by its ``row`` column (the manifest
  updated with ``manifest``'s keys, e.g. ``channels``)."""
  manifest = {**store.manifest, 'item_shape': list(items.shape[1:]), 'num_items': len(items),
              'num_unused_rows': len(items) - len(table), **manifest}
  return MemoryStore(store.path, manifest, table, ts.array(items), items)


def tvn_store(store: ImageStore, plates: Sequence[str], fit_plates: Sequence[str],
              standardize_plates: Sequence[str], domain: str = 'plate',
              ridge: float = tvn.RIDGE) -> MemoryStore:
  """The TVN of the rows of ``plates`` (see the module doc); raises ValueError naming a domain
  with fewer than ``tvn.MIN_CONTROLS`` controls."""
  if store.kind != 'features':
    raise ValueError(f'{store.path}: TVN normalises feature vectors, the store holds {store.kind}')
  if domain not in DOMAINS:
    raise ValueError(f'domain must be one of {sorted(DOMAINS)}, got {domain!r}')
  table = store.table[store.table['Metadata_Plate'].isin(plates)].reset_index(drop=True)
  codes, names = np.unique(table[DOMAINS[domain]].to_numpy(), return_inverse=True)[::-1]
  is_control = table['is_control'].to_numpy()
  tvn.check_controls(tvn.control_counts(codes, is_control, len(names)), names, what=domain)
  fit_rows = table['Metadata_Plate'].isin(fit_plates).to_numpy()
  num_fit = int((fit_rows & is_control).sum())
  if num_fit < tvn.MIN_CONTROLS:
    raise ValueError(f'TVN: the fit plates hold {num_fit} control images; the scaler and PCA '
                     f'need at least {tvn.MIN_CONTROLS}')
  x = store.read(table['row'].to_numpy())
  k = min(x.shape[1], num_fit - 1)
  params = jax.jit(tvn.fit, static_argnums=3, static_argnames='ridge')(
      *tvn.group_controls(x, codes, is_control, len(names), fit_rows), k, ridge=ridge)
  final = (table['Metadata_Plate'].isin(standardize_plates) & (table['label'] >= 0)).to_numpy()
  params = jax.jit(tvn.standardize_on)(params, x, codes, final.astype(np.float32))
  y = np.asarray(jax.jit(tvn.apply)(params, x, codes))
  if not np.isfinite(y).all():
    raise FloatingPointError(f'{store.path}: TVN produced NaN or inf (degenerate controls?)')
  items = np.zeros((store.manifest['num_items'], k), np.float32)
  items[table['row'].to_numpy()] = y
  return in_memory(store, items, table, channels=[f'tvn_{i}' for i in range(k)])
