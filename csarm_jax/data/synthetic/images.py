"""One image of the benchmark from what it depicts: its plate, well, site and class.

    cells (phenotype of the class, expressed at the well's strength) -> clean channels
    -> the plate's acquisition at that site position -> quantised to the store's dtype
"""
from __future__ import annotations

import functools

import ml_collections
import numpy as np

from csarm_jax.data.synthetic import effects, keys, phenotypes, render


def phenotype_strength(config: ml_collections.ConfigDict, seed: int, source: int, batch: int,
                       plate: int, well: int) -> float:
  """The well's phenotype strength: global x mild per-source factor x well random effect."""
  c = config.cells
  source_factor = keys.rng(seed, keys.SOURCE_BIOLOGY, source).uniform(1 - c.source_effect,
                                                                       1 + c.source_effect)
  well_rng = keys.rng(seed, keys.WELL, source, batch, plate, well)
  well_factor = np.exp(well_rng.normal(0, c.well_effect_sd))
  return float(c.phenotype_strength * source_factor * well_factor)


def render_image(config: ml_collections.ConfigDict, seed: int, row: int, source: int, batch: int,
                 plate: int, well: int, site: int, label: int,
                 acquisition: effects.Acquisition | None = None) -> np.ndarray:
  """Image ``row`` of the store, (H, W, 5) in the store's dtype. ``label`` -1: a DMSO control.

  The class enters only through the cells' phenotype; the acquisition (``acquisition``: the
  plate's, if already drawn) is the plate's at site position ``site``, whatever the well holds.
  """
  params = phenotypes.phenotype(label, phenotype_strength(config, seed, source, batch, plate, well))
  acq = effects.site_acquisition(config, seed, source, batch, plate, site, plate=acquisition)
  rng = keys.rng(seed, keys.IMAGE, row)
  clean = render.render_cells(params, config.cells, config.image_size, acq.density, rng)
  return np.round(effects.apply(clean, acq, rng) * np.iinfo(config.dtype).max).astype(config.dtype)


def render_rows(config: ml_collections.ConfigDict, seed: int, index: np.ndarray,
                first_row: int) -> np.ndarray:
  """Images of consecutive rows from ``first_row``; ``index`` holds their ``layout.INDEX_COLUMNS``
  and label, one row each."""
  plate_of = functools.lru_cache(maxsize=4)(
      lambda s, b, p: effects.plate_acquisition(config, seed, s, b, p))
  return np.stack([render_image(config, seed, first_row + i, s, b, p, w, site, label,
                                acquisition=plate_of(s, b, p))
                   for i, (s, b, p, w, site, label) in enumerate(index.tolist())])
