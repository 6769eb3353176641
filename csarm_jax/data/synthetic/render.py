"""Cells -> a clean five-channel image (DNA, ER, RNA, AGP, Mito), before any technical effect.

A site is a set of elliptical cells, each owning the pixels nearest to it in its own elliptical
metric (so neighbours share a boundary), with a nucleus (two for binucleate cells) and a Golgi blob.
Channels are built from masks, per-cell stain intensities and textures (Gaussian random fields):

* DNA: nuclei with chromatin texture;         * ER: perinuclear reticular texture in the cytoplasm;
* RNA: nucleoli + faint cytoplasm;            * AGP: membrane ring, stress fibres along the cell
* Mito: punctate network in the cytoplasm.      axis, Golgi; protrusions at the cell poles.
Vacuoles darken ER and RNA; vesicles are bright puncta in ER and AGP. Values are ~[0, 1] floats.
"""
from __future__ import annotations

import functools

import ml_collections
import numpy as np

FIBRE_ANGLES = np.linspace(0, np.pi, 4, endpoint=False)    # stress-fibre orientations rendered


@functools.lru_cache(maxsize=64)
def _kernel(size: int, scale: float, anisotropy: float = 1.0, angle: float = 0.0) -> np.ndarray:
  """Fourier transform of a Gaussian, sd ``scale`` px (``anisotropy`` x longer along ``angle``)."""
  fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
  along, across = fx * np.cos(angle) + fy * np.sin(angle), -fx * np.sin(angle) + fy * np.cos(angle)
  return np.exp(-2 * np.pi ** 2 * ((scale * anisotropy * along) ** 2 + (scale * across) ** 2)
                ).astype(np.float32)


def _smooth(images: np.ndarray, kernels: np.ndarray) -> np.ndarray:
  """Periodic convolution of (..., H, W) images with Fourier-space ``kernels``."""
  return np.fft.irfft2(np.fft.rfft2(images) * kernels, s=images.shape[-2:])


def _fields(rng: np.random.Generator, size: int,
            specs: list[tuple[float, float, float]]) -> np.ndarray:
  """Gaussian random fields, zero mean and unit sd, one per (scale, anisotropy, angle) spec."""
  white = rng.standard_normal((len(specs), size, size), dtype=np.float32)
  fields = _smooth(white, np.stack([_kernel(size, *spec) for spec in specs]))
  fields -= fields.mean(axis=(1, 2), keepdims=True)
  return (fields / (fields.std(axis=(1, 2), keepdims=True) + 1e-8)).astype(np.float32)


def _spots(points: np.ndarray, size: int, sigma: float) -> np.ndarray:
  """Gaussian spots of peak ~1 at ``points`` (K, 2) as (y, x); points outside are dropped."""
  image = np.zeros((size, size), np.float32)
  idx = np.round(points).astype(int)
  inside = ((idx >= 0) & (idx < size)).all(axis=1)
  np.add.at(image, (idx[inside, 0], idx[inside, 1]), 1.0)
  return np.minimum(_smooth(image, _kernel(size, sigma)) * (2 * np.pi * sigma ** 2), 1.0
                    ).astype(np.float32)


def _place(rng: np.random.Generator, count: int, size: int, min_distance: float,
           margin: float) -> np.ndarray:
  """Up to ``count`` centres (y, x), at least ``min_distance`` apart (rejection sampling)."""
  candidates = rng.uniform(-margin, size + margin, (30 * count + 30, 2))
  accepted = np.empty((count, 2))
  n = 0
  for c in candidates:
    if n == count:
      break
    if n == 0 or np.min(np.sum((accepted[:n] - c) ** 2, axis=1)) >= min_distance ** 2:
      accepted[n] = c
      n += 1
  return accepted[:n]


def _in_cells(rng, k: np.ndarray, centre, axes, cos, sin, inner: float, outer: float) -> np.ndarray:
  """``k[i]`` random points per cell i at elliptical radius in [inner, outer] -> (sum(k), 2)."""
  owner = np.repeat(np.arange(len(k)), k)
  rho = rng.uniform(inner, outer, len(owner))
  psi = rng.uniform(0, 2 * np.pi, len(owner))
  u, v = rho * axes[0][owner] * np.cos(psi), rho * axes[1][owner] * np.sin(psi)
  return np.stack([centre[owner, 0] + u * sin[owner] + v * cos[owner],
                   centre[owner, 1] + u * cos[owner] - v * sin[owner]], axis=1)


def render_cells(params: dict[str, float], cells: ml_collections.ConfigDict, size: int,
                 density: float, rng: np.random.Generator) -> np.ndarray:
  """A clean (size, size, 5) float32 image of one site with phenotype ``params``.

  ``density`` scales the expected cell count (a batch-level seeding effect).
  """
  r_nucleus = cells.nucleus_radius
  r_cell = r_nucleus * cells.cell_to_nucleus * params['cell']
  count = max(1, rng.poisson(cells.per_site * params['count'] * density))
  centre = _place(rng, count, size, 0.9 * r_cell, 0.5 * r_cell)
  n = len(centre)
  jitter = np.exp(rng.normal(0, cells.size_sd, n))
  rn = r_nucleus * params['nucleus'] * jitter
  rc = np.maximum(r_cell * jitter * np.exp(rng.normal(0, cells.size_sd / 2, n)), 1.4 * rn)
  cell_ratio = 1 + params['cell_elong'] * rng.uniform(0.5, 1.5, n)
  nucleus_ratio = 1 + params['nucleus_elong'] * rng.uniform(0.5, 1.5, n)
  theta = rng.uniform(0, np.pi, n)
  two = rng.random(n) < params['binucleate']
  rn_each = np.where(two, 0.8 * rn, rn)
  offset = rng.uniform(-0.15, 0.15, (n, 2)) * rc[:, None]        # nucleus off the cell centre
  golgi_angle = rng.uniform(0, 2 * np.pi, n)
  stain = np.exp(rng.normal(0, cells.intensity_sd, (n, 5))).astype(np.float32)
  # Per-cell geometry (float32 from here on: the per-pixel work dominates the cost).
  f32 = lambda a: np.asarray(a, np.float32)
  cos, sin = f32(np.cos(theta)), f32(np.sin(theta))
  a_cell, b_cell = f32(rc * np.sqrt(cell_ratio)), f32(rc / np.sqrt(cell_ratio))
  a_nuc, b_nuc = f32(rn_each * np.sqrt(nucleus_ratio)), f32(rn_each / np.sqrt(nucleus_ratio))
  separation = f32(np.where(two, 0.75 * rn_each, 0.0))
  golgi_u = f32((rn + 0.4 * r_nucleus) * np.cos(golgi_angle))
  golgi_v = f32((rn + 0.4 * r_nucleus) * np.sin(golgi_angle))

  # Each pixel belongs to the cell nearest in that cell's elliptical metric.
  grid = np.arange(size, dtype=np.float32) + 0.5
  dy = grid[None, :, None] - f32(centre[:, 0, None, None])
  dx = grid[None, None, :] - f32(centre[:, 1, None, None])
  u = dx * cos[:, None, None] + dy * sin[:, None, None]            # along the cell's major axis
  v = -dx * sin[:, None, None] + dy * cos[:, None, None]
  distance = np.sqrt((u / a_cell[:, None, None]) ** 2 + (v / b_cell[:, None, None]) ** 2)
  own = np.argmin(distance, axis=0)
  d1 = np.take_along_axis(distance, own[None], 0)[0]
  u_own, v_own = np.take_along_axis(u, own[None], 0)[0], np.take_along_axis(v, own[None], 0)[0]
  np.put_along_axis(distance, own[None], np.inf, 0)
  d2 = distance.min(axis=0)                                        # the runner-up cell's distance

  un, vn = u_own - f32(offset[:, 0])[own], v_own - f32(offset[:, 1])[own]
  d_nucleus = np.minimum(np.hypot((un - separation[own]) / a_nuc[own], vn / b_nuc[own]),
                         np.hypot((un + separation[own]) / a_nuc[own], vn / b_nuc[own]))
  cell = 0.5 - 0.5 * np.tanh((d1 - 1) / 0.12)                      # soft masks (logistic)
  nucleus = (0.5 - 0.5 * np.tanh((d_nucleus - 1) / 0.2)) * cell
  cytoplasm = cell * (1 - nucleus)
  boundary = np.maximum(np.exp(-((d1 - 1) / 0.1) ** 2), np.exp(-((d2 - d1) / 0.08) ** 2) * cell)
  perinuclear = np.clip(1.25 - d1, 0.15, 1.0)
  golgi = np.exp(-((u_own - golgi_u[own]) ** 2 + (v_own - golgi_v[own]) ** 2)
                 / f32(2 * (0.45 * r_nucleus) ** 2))

  # Textures: random fields (length scales relative to the nucleus) and spots.
  chromatin, reticulum, mito_net, *fibre_bins = _fields(
      rng, size, [(0.15 * r_nucleus, 1.0, 0.0), (0.3 * r_nucleus, 1.0, 0.0),
                  (0.3 * r_nucleus * params['mito_scale'], 1.0, 0.0)]
      + [(0.2 * r_nucleus, 6.0, a) for a in FIBRE_ANGLES])
  fibre_bins = np.stack(fibre_bins)
  nearest_bin = np.argmin(np.abs(np.angle(np.exp(2j * (theta[:, None] - FIBRE_ANGLES)))), axis=1)
  fibres = np.maximum(np.take_along_axis(fibre_bins, nearest_bin[own][None], 0)[0], 0)
  nucleus_centre = centre + np.stack([offset[:, 0] * sin + offset[:, 1] * cos,
                                      offset[:, 0] * cos - offset[:, 1] * sin], axis=1)
  nucleoli = _spots(_in_cells(rng, rng.integers(1, 5, n), nucleus_centre, (a_nuc, b_nuc), cos, sin,
                              0.0, 0.7), size, 0.25 * r_nucleus)
  holes = (_spots(_in_cells(rng, rng.poisson(params['vacuoles'], n), centre, (a_cell, b_cell), cos,
                            sin, 0.55, 0.85), size, 0.4 * r_nucleus) if params['vacuoles'] > 0.01
           else 0.0)
  vesicles = (params['vesicles'] * _spots(_in_cells(rng, rng.poisson(8, n), centre,
                                                    (a_cell, b_cell), cos, sin, 0.3, 0.95),
                                          size, 0.18 * r_nucleus)
              if params['vesicles'] > 0.01 else 0.0)
  poles = (u_own / (a_cell[own] * d1 + 1e-6)) ** 4
  protrusions = params['protrusions'] * poles * np.exp(-((d1 - 1.25) / 0.2) ** 2) * (0.3 + fibres)

  s = stain[own]
  dna = 0.6 * params['dna'] * s[..., 0] * nucleus * np.maximum(1 + 0.25 * chromatin, 0)
  er = (0.4 * params['er'] * s[..., 1]
        * (cytoplasm * perinuclear * np.maximum(1 + 0.4 * reticulum, 0) + 0.15 * nucleus)
        * (1 - 0.9 * holes) + 0.6 * vesicles * cell)
  rna = 0.35 * params['rna'] * s[..., 2] * (nucleus * (0.3 + 1.5 * nucleoli)
                                            + 0.35 * cytoplasm * perinuclear) * (1 - 0.9 * holes)
  agp = (0.45 * s[..., 3] * (params['agp_ring'] * boundary
                             + 0.35 * params['agp_fibres'] * cytoplasm * fibres
                             + 0.6 * golgi * cell)
         + 0.6 * vesicles * cell + 0.45 * protrusions)
  mito = (0.6 * params['mito'] * s[..., 4] * cytoplasm * perinuclear
          * (0.25 + np.maximum(mito_net + 0.3, 0)))
  return np.stack([dna, er, rna, agp, mito], axis=-1).astype(np.float32)
