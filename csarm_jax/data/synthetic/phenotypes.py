"""Class phenotypes: each positive control as changes to interpretable cell parameters.

Phenomenological, not biological claims (after jump_data.md section 6.2). A phenotype is a dict of
parameters; DMSO is ``BASE``. A class's values are reached at strength 1 and interpolated (log-scale
for multiplicative parameters) at other strengths, so strength 0 is DMSO for every class.
"""
from __future__ import annotations

import math

BASE = {
    'count': 1.0,          # cell count multiplier
    'nucleus': 1.0,        # nucleus radius multiplier
    'nucleus_elong': 0.25,  # mean nucleus axis ratio - 1
    'cell': 1.0,           # cell-body radius multiplier
    'cell_elong': 0.35,    # mean cell axis ratio - 1
    'dna': 1.0,            # DNA stain intensity
    'er': 1.0,             # ER stain intensity
    'rna': 1.0,            # RNA stain intensity (nucleoli, cytoplasm)
    'agp_ring': 1.0,       # membrane (AGP) ring intensity
    'agp_fibres': 1.0,     # actin stress-fibre texture intensity
    'mito': 1.0,           # Mito stain intensity
    'mito_scale': 1.0,     # length scale of the mitochondrial network (small: fragmented)
    'binucleate': 0.03,    # probability that a cell has two nuclei
    'vacuoles': 0.0,       # dark vacuoles per cell (ER, RNA)
    'vesicles': 0.0,       # intensity of bright punctate vesicles (ER, AGP)
    'protrusions': 0.0,    # intensity of AGP protrusions at the cell poles
}
ADDITIVE = frozenset({'binucleate', 'vacuoles', 'vesicles', 'protrusions'})

# Label id (constants.POSITIVE_CONTROLS order) -> parameters that differ from DMSO.
CLASSES = (
    {'nucleus': 0.78, 'dna': 1.7},                                  # TC-S-7004: small bright nuclei
    {'cell': 1.3, 'agp_ring': 0.4},                                 # dexamethasone: large, flat
    {'agp_fibres': 0.1, 'cell_elong': 0.1, 'nucleus_elong': 0.3},   # LY2109761: round, no fibres
    {'nucleus': 1.35, 'binucleate': 0.6, 'count': 0.6},             # AMG900: big, 2 nuclei, fewer
    {'count': 0.65, 'mito': 0.45, 'mito_scale': 0.5},               # FK-866: fewer cells, dim
                                                                    # fragmented Mito
    {'vacuoles': 3.0, 'er': 0.8},                                   # quinidine: vacuoles
    {'cell_elong': 3.5, 'protrusions': 1.0},                        # NVS-PAK1-1: elongated
    {'vesicles': 1.0},                                              # aloxistatin: ER/AGP vesicles
)


def phenotype(label: int, strength: float) -> dict[str, float]:
  """Parameters of class ``label`` (-1: DMSO) expressed at ``strength``."""
  params = dict(BASE)
  if label >= 0:
    for name, value in CLASSES[label].items():
      base = BASE[name]
      params[name] = (base + strength * (value - base) if name in ADDITIVE
                      else base * math.exp(strength * math.log(value / base)))
  return params
