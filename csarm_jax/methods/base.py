"""The interface every method implements: which images form a context and which statistics are used.

Most baselines differ only along a few axes (see docs/ARCHITECTURE.md), so a method is a small frozen
value that the one shared training step and evaluation read; no method copies the loop.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from csarm_jax.nn import CONTEXT, RUNNING

STATISTICS_FROM = ('context', 'controls')


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  train_sampling: str             # 'plate': contexts of one plate | 'mixed': images of any plates
  train_controls: bool            # training contexts carry the plate's DMSO controls
  eval_controls: bool             # test contexts carry the plate's DMSO controls
  running_stats: bool = False     # train running averages (ERM-style) ...
  eval_norm: str = CONTEXT        # ... and normalise test images with them ('running') or not
  statistics_from: str = 'context'  # 'context': every real row | 'controls': the controls alone

  def __post_init__(self):
    if self.train_sampling not in ('plate', 'mixed'):
      raise ValueError(f'{self.name}: train_sampling must be plate or mixed')
    if self.train_controls and self.train_sampling != 'plate':
      raise ValueError(f'{self.name}: controls belong to one plate, so need plate contexts')
    if self.eval_norm not in (CONTEXT, RUNNING) or (self.eval_norm == RUNNING and not self.running_stats):
      raise ValueError(f'{self.name}: eval_norm {self.eval_norm!r} needs running statistics')
    if self.statistics_from not in STATISTICS_FROM or (
        self.statistics_from == 'controls' and not (self.train_controls and self.eval_controls)):
      raise ValueError(f'{self.name}: statistics_from must be one of {STATISTICS_FROM}; '
                       "'controls' needs controls in every context")

  def weights(self, mask: jax.Array, is_control: jax.Array) -> jax.Array:
    """Per-row weights of a context's BatchNorm statistics: 0 for padding (and, for BEN, for
    perturbed rows), so equal weights pool perturbed images with their plate's controls."""
    mask = mask.astype(jnp.float32)
    return mask * is_control.astype(jnp.float32) if self.statistics_from == 'controls' else mask
