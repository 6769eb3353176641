"""Presets of the synthetic benchmark: ``preset(name)`` for 'tiny' | 'quickstart' | 'calibrated' |
'large'.

Every preset has the same fields (so each is overridable from the command line); presets differ in
size only, except 'calibrated': quickstart's size with weaker lab-level and stronger batch-level
technical effects and its class signal set so that the study's own ERM scores near the paper's
JUMP-CP figures (~0.94 on new plates of its training batches, ~0.86 on new batches of its labs,
lower across labs; measured in README.md "Results"). Technical effects are drawn hierarchically:
a source's value, a batch's deviation from it, a plate's deviation from that, so shifts are
largest between sources and smallest between plates.
``effects.strength`` scales all of them at once (0: every plate imaged identically).
"""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from csarm_jax import nested
from csarm_jax.data import store_writer
from csarm_jax.data.synthetic import layout

PRESETS = ('tiny', 'quickstart', 'calibrated', 'large')


# Technical effects drawn per lab (source) and per acquisition batch.
LAB_EFFECTS = ('gain_source_sd', 'offset_source', 'gamma_source_sd', 'bleed_source', 'blur_source',
               'vignetting')
BATCH_EFFECTS = ('gain_batch_sd', 'stain_shift_batch', 'offset_batch_sd', 'gamma_batch_sd',
                 'blur_batch_sd', 'density_batch_sd')
# 'calibrated': every effect at this strength, lab-level ones scaled by LAB and batch-level ones
# by BATCH, this class signal; chosen by trials of the study's ERM (quickstart CNN, 240 updates;
# BENCHMARKS.md, "Calibrating the synthetic benchmark").
CALIBRATED = {'strength': 0.35, 'lab': 0.6, 'batch': 2.5, 'phenotype_strength': 1.0}


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = ''                   # the preset this config started from (recorded, not used)
  c.image_size = 64               # stored image height = width, pixels
  c.dtype = 'uint8'               # pixel type of the store: 'uint8' | 'uint16'
  c.shard_items = 64              # images per shard file of the store: the unit of parallel work
  c.compression = store_writer.DEFAULT_COMPRESSION   # a key of store_writer.COMPRESSIONS
  c.tile = 0                      # side of an image's stored tiles (divides image_size); 0: auto

  c.layout = ml_collections.ConfigDict()
  c.layout.num_sources = 3        # labs (source_1, source_2, ...); leave-one-source-out needs >= 3
  c.layout.batches_per_source = 3   # acquisition batches per source
  c.layout.plates_per_batch = 3   # 384-well COMPOUND plates per batch
  # Wells of each positive control per plate (JUMP: 4, columns 01/24).
  c.layout.wells_per_class = 4
  c.layout.control_wells = 16     # DMSO wells per plate (JUMP compound plates: ~16-32)
  c.layout.sites_per_well = 4     # imaged sites (fields of view) per well
  c.layout.label_shift_alpha = 0.0  # > 0: each plate's positive-control wells drawn from a
                                    # Dirichlet(alpha) class mix; 0: balanced plates

  c.cells = ml_collections.ConfigDict()
  c.cells.per_site = 12.0         # mean number of cells in a DMSO site (Poisson)
  c.cells.nucleus_radius = 3.2    # mean DMSO nucleus radius, pixels
  c.cells.cell_to_nucleus = 2.3   # cell-body radius / nucleus radius of a DMSO cell
  c.cells.size_sd = 0.12          # cell-to-cell log-sd of nucleus and cell size
  c.cells.intensity_sd = 0.2      # cell-to-cell log-sd of each channel's stain intensity
  c.cells.phenotype_strength = 1.0  # scales every class phenotype (0: all classes look like DMSO)
  c.cells.well_effect_sd = 0.15   # well-to-well log-sd of the phenotype strength
  c.cells.source_effect = 0.2     # per-source phenotype strength factor ~ U(1 - x, 1 + x)

  c.effects = ml_collections.ConfigDict()
  c.effects.strength = 1.0        # scales every technical effect below (0: none)
  c.effects.gain_source_sd = 0.35   # log-sd of per-channel gain between sources
  c.effects.gain_batch_sd = 0.15  # ... between batches of a source
  c.effects.gain_plate_sd = 0.05  # ... between plates of a batch
  c.effects.gain_site_sd = 0.03   # ... between site positions of a plate (exposure jitter)
  c.effects.stain_shift_batch = 0.3  # one random channel per batch scaled by exp(U(-x, x))
  # Per-channel background offset ~ U(0, x) per source (full scale 1).
  c.effects.offset_source = 0.08
  c.effects.offset_batch_sd = 0.01  # batch-to-batch sd of the offset
  c.effects.gamma_source_sd = 0.15  # log-sd of the per-channel gamma non-linearity between sources
  c.effects.gamma_batch_sd = 0.05   # ... between batches
  c.effects.bleed_source = 0.15   # ER<->RNA bleed-through ~ U(0, x) per source; other pairs x / 4
  c.effects.blur_source = 0.8     # PSF sigma ~ U(0, x) pixels per source
  c.effects.blur_batch_sd = 0.2   # focus: extra blur |N(0, x)| pixels per batch
  c.effects.vignetting = 0.3      # radial illumination fall-off at the corners ~ U(0, x) per source
  c.effects.illumination_plate_sd = 0.06  # sd of a plate's linear illumination tilt
  c.effects.photons = 300.0       # photons at full scale (shot noise); log-sd 0.3 between sources
  c.effects.read_noise = 0.01     # Gaussian read-noise sd (full scale 1)
  c.effects.density_batch_sd = 0.1  # log-sd of the cell density between batches (seeding)
  return c


def preset(name: str) -> ml_collections.ConfigDict:
  """The configuration of preset ``name`` (a fresh, unlocked ConfigDict)."""
  if name not in PRESETS:
    raise ValueError(f'unknown synthetic preset {name!r}; choose one of {PRESETS}')
  c = _base()
  c.preset = name
  if name == 'tiny':               # seconds to build: tests
    c.image_size = 32
    c.shard_items = 16
    c.layout.num_sources = 3        # leave-one-source-out keeps 2 training labs
    c.layout.batches_per_source = 2
    c.layout.plates_per_batch = 2
    c.layout.wells_per_class = 1
    c.layout.control_wells = 4
    c.layout.sites_per_well = 2
    c.cells.per_site = 5.0
    c.cells.nucleus_radius = 2.2
  elif name == 'calibrated':       # the quickstart size, shifts of JUMP-CP's size
    c.cells.phenotype_strength = CALIBRATED['phenotype_strength']
    c.effects.strength = CALIBRATED['strength']
    for field in LAB_EFFECTS:
      c.effects[field] *= CALIBRATED['lab']
    for field in BATCH_EFFECTS:
      c.effects[field] *= CALIBRATED['batch']
  elif name == 'large':            # one GPU/TPU host
    c.image_size = 192
    c.layout.num_sources = 4
    c.layout.batches_per_source = 4
    c.layout.plates_per_batch = 8
    c.layout.control_wells = 32
    c.layout.sites_per_well = 9
    c.cells.per_site = 80.0
    c.cells.nucleus_radius = 4.5
  return c


def fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every leaf field of ``config`` by dotted name ('layout.num_sources': 3, ...)."""
  return nested.flatten(config.to_dict())


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``overrides`` applied: dotted keys ('layout.num_sources') or nested
  dicts. Unknown fields raise KeyError; values of the wrong type raise TypeError."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in nested.flatten(overrides).items():
    *sections, name = key.split('.')
    target = config
    for section in sections:
      target = target.get(section)
      if not isinstance(target, ml_collections.ConfigDict):
        break
    if not isinstance(target, ml_collections.ConfigDict) or name not in target \
        or isinstance(target[name], ml_collections.ConfigDict):
      raise KeyError(f'unknown synthetic config field {key!r}')
    target[name] = value
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field whose value cannot make a benchmark."""
  lay = config.layout
  checks = [
      (config.image_size >= 16, 'image_size', 'must be >= 16 pixels'),
      (config.dtype in ('uint8', 'uint16'), 'dtype', "must be 'uint8' or 'uint16'"),
      (config.shard_items >= 1, 'shard_items', 'must be >= 1'),
      (config.compression in store_writer.COMPRESSIONS, 'compression',
       f'must be one of {sorted(store_writer.COMPRESSIONS)}'),
      (config.tile == 0 or (config.tile > 0 and config.image_size % config.tile == 0), 'tile',
       'must be 0 (auto) or a divisor of image_size'),
      (layout.NUM_CLASSES * lay.wells_per_class + lay.control_wells
       <= len(layout.ROWS) * layout.COLS,
       'layout.control_wells', f'{layout.NUM_CLASSES} x wells_per_class + control_wells must fit '
       'a 384-well plate'),
      (config.cells.cell_to_nucleus >= 1, 'cells.cell_to_nucleus', 'must be >= 1'),
  ]
  checks += [(lay[name] >= 1, f'layout.{name}', 'must be >= 1 (every plate needs controls and '
              'every class)') for name in ('num_sources', 'batches_per_source', 'plates_per_batch',
                                           'wells_per_class', 'control_wells', 'sites_per_well')]
  checks += [(config.cells[name] > 0, f'cells.{name}', 'must be > 0')
             for name in ('per_site', 'nucleus_radius')]
  checks += [(value >= 0, name, 'must be >= 0') for name, value in fields(config).items()
             if name.split('.')[0] in ('layout', 'cells', 'effects')]
  for ok, field, message in checks:
    if not ok:
      raise ValueError(f'synthetic config field {field}: {message}')
