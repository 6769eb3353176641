"""Technical effects: how a plate was imaged, a function of (source, batch, plate, site) only.

Controls and treated wells of a plate share one ``Acquisition`` per site position, so everything
here is what CS-ARM-BN's plate context can see and remove. Parameters are drawn hierarchically --
the source's value, the batch's deviation, the plate's deviation -- and all scale with
``effects.strength``. ``apply`` images a clean float image:

  bleed-through (5x5 channel mixing) -> illumination (vignetting x plate tilt)
  -> blur (Gaussian PSF) -> per-channel gain and offset -> per-channel gamma
  -> shot + read noise -> clip to [0, 1].
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
from scipy import ndimage

from csarm_jax.data.synthetic import keys

NUM_CHANNELS = 5
ER, RNA = 1, 2


@dataclasses.dataclass(frozen=True)
class Acquisition:
  gain: np.ndarray          # (5,) per-channel multiplier
  offset: np.ndarray        # (5,) per-channel background, full scale 1
  gamma: np.ndarray         # (5,) per-channel exponent
  bleed: np.ndarray         # (5, 5) channel mixing: observed = bleed @ true
  blur: float               # PSF sigma, pixels
  illumination: np.ndarray  # (H, W, 5) multiplicative field
  photons: float            # photons at full scale (shot noise), inf: none
  read_noise: float         # Gaussian sd, full scale 1
  density: float            # cell-count multiplier (batch seeding)


def plate_acquisition(config: ml_collections.ConfigDict, seed: int, s: int, b: int,
                      p: int) -> Acquisition:
  """The acquisition shared by all sites of plate (s, b, p), before per-site exposure jitter."""
  e, k, size = config.effects, config.effects.strength, config.image_size
  src, bat, pla = (keys.rng(seed, keys.SOURCE, s), keys.rng(seed, keys.BATCH, s, b),
                   keys.rng(seed, keys.PLATE, s, b, p))
  # Draws are made in a fixed order per stream; a zero sd still consumes its draws.
  log_gain = (src.normal(0, k * e.gain_source_sd, NUM_CHANNELS)
              + bat.normal(0, k * e.gain_batch_sd, NUM_CHANNELS)
              + pla.normal(0, k * e.gain_plate_sd, NUM_CHANNELS))
  stained = bat.integers(NUM_CHANNELS)
  log_gain[stained] += bat.uniform(-1, 1) * k * e.stain_shift_batch
  offset = np.maximum(src.uniform(0, k * e.offset_source, NUM_CHANNELS)
                      + bat.normal(0, k * e.offset_batch_sd, NUM_CHANNELS), 0)
  gamma = np.exp(src.normal(0, k * e.gamma_source_sd, NUM_CHANNELS)
                 + bat.normal(0, k * e.gamma_batch_sd, NUM_CHANNELS))
  bleed = np.eye(NUM_CHANNELS) + src.uniform(0, k * e.bleed_source / 4, (NUM_CHANNELS,) * 2) * (
      1 - np.eye(NUM_CHANNELS))
  bleed[ER, RNA], bleed[RNA, ER] = src.uniform(0, k * e.bleed_source, 2)
  blur = src.uniform(0, k * e.blur_source) + abs(bat.normal(0, k * e.blur_batch_sd))
  # Illumination: the source's vignetting (per-channel depth, off-centre) times a plate tilt.
  depth = src.uniform(0, k * e.vignetting) * src.uniform(0.7, 1.3, NUM_CHANNELS)
  centre = size * (0.5 + src.uniform(-0.15, 0.15, 2))
  tilt = pla.normal(0, k * e.illumination_plate_sd, 2)
  grid = np.arange(size) + 0.5
  y, x = (grid[:, None] - centre[0]) / size, (grid[None, :] - centre[1]) / size
  radial = (y ** 2 + x ** 2) / 0.5                          # ~1 at the corners
  field = (1 - depth * radial[..., None]) * (1 + tilt[0] * 2 * y + tilt[1] * 2 * x)[..., None]
  photon_jitter = np.exp(src.normal(0, 0.3))
  photons = e.photons * photon_jitter / k ** 2 if k > 0 else np.inf
  density = np.exp(bat.normal(0, k * e.density_batch_sd))
  return Acquisition(gain=np.exp(log_gain), offset=offset, gamma=gamma, bleed=bleed,
                     blur=float(blur), illumination=np.clip(field, 0.05, None).astype(np.float32),
                     photons=float(photons), read_noise=k * e.read_noise, density=float(density))


def site_acquisition(config: ml_collections.ConfigDict, seed: int, s: int, b: int, p: int,
                     site: int, plate: Acquisition | None = None) -> Acquisition:
  """The plate's acquisition (given, or drawn) with the exposure jitter of site position ``site``.
  """
  if plate is None:
    plate = plate_acquisition(config, seed, s, b, p)
  e = config.effects
  jitter = keys.rng(seed, keys.SITE, s, b, p, site).normal(0, e.strength * e.gain_site_sd,
                                                           NUM_CHANNELS)
  return dataclasses.replace(plate, gain=plate.gain * np.exp(jitter))


def apply(clean: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
  """Images a clean (H, W, 5) float image: returns float32 values in [0, 1]."""
  x = clean @ acq.bleed.T.astype(np.float32)
  x *= acq.illumination
  if acq.blur > 0.05:
    x = ndimage.gaussian_filter(x, (acq.blur, acq.blur, 0), mode='reflect')
  f32 = lambda a: np.asarray(a, np.float32)
  x = np.maximum(x * f32(acq.gain) + f32(acq.offset), 0) ** f32(acq.gamma)
  if np.isfinite(acq.photons):    # shot noise (Gaussian approximation of Poisson) + read noise
    x += np.sqrt(x / acq.photons + acq.read_noise ** 2) * rng.standard_normal(x.shape, np.float32)
  return np.clip(x, 0, 1)
