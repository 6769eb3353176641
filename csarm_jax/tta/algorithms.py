"""TENT, DeYO and ROID as frozen settings values with the reference's defaults.

Each value knows its own objective; ``csarm_jax.tta.adapt`` runs any of them with the same step
(Adam on the BatchNorm scales and biases only, statistics of the adaptation batch), so no algorithm
owns a loop. The interface:

* ``init_extra(num_classes)`` -- the algorithm's own state (ROID's class-prior EMA), reset with
  the parameters;
* ``objective(forward, bn, x, weights, rows, extra, key)`` -> ``(loss, (logits, count, extra))``:
  ``forward(bn, x, weights)`` is the model under batch statistics weighted by ``weights``;
  ``rows`` are the batch's rows the loss may use; ``logits`` are the predictions of this step (of
  the forward the step is computed on, as TENT); ``count`` rows contributed -- with none the update
  is skipped, as the reference skips ``optimizer.step()``;
* ``after_update(bn, source_bn)`` and ``output(logits, rows)``: ROID's weight ensembling and
  prior correction (identity for the others).

Reference defaults (ml-jku/cs-arm-bn ``config/trainer/{tent,deyo,roid}.yaml``): Adam lr 1e-3, one
step per batch, batches of 64. Deviations, all deliberate: filtered rows stay in the batch with
weight 0 (fixed shapes), so an augmented view's statistics are those of the kept rows (plus the
context's controls when its statistics use them); ROID's min-max normalisation of a constant
batch gives 0 instead of NaN; ROID's class prior resets with the parameters (the reference never
resets it) -- continual mode carries both.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

from csarm_jax.tta import losses, views

Forward = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Tent:
  """TENT (Wang et al. 2021): minimise the mean prediction entropy of the batch."""
  name: ClassVar[str] = 'tent'
  learning_rate: float = 1e-3
  steps: int = 1                  # gradient steps per adaptation batch (0: AdaBN)
  continual: bool = False         # False: reset for every plate | True: carried through plates
  seed: int = 0                   # evaluation's key: the augmented views (DeYO, ROID)

  def __post_init__(self):
    if self.steps < 0 or self.learning_rate < 0:
      raise ValueError(f'{self.name}: steps and learning_rate must be >= 0')

  def init_extra(self, num_classes: int) -> Any:
    return ()

  def objective(self, forward: Forward, bn, x, weights, rows, extra, key):
    logits = forward(bn, x, weights)
    return losses.tent_loss(logits, rows), (logits, jnp.sum(rows > 0), extra)

  def after_update(self, bn, source_bn):
    return bn

  def output(self, logits: jax.Array, rows: jax.Array) -> jax.Array:
    return logits


def _view_weights(weights: jax.Array, rows: jax.Array, kept: jax.Array) -> jax.Array:
  """Statistics weights of an augmented view of the kept rows: the batch's rows not kept drop out,
  rows outside the batch (a context's controls) keep their weight."""
  return weights * jnp.where(rows > 0, kept, True).astype(weights.dtype)


@dataclasses.dataclass(frozen=True)
class DeYO(Tent):
  """DeYO (Lee et al. 2024): entropy of rows that pass the entropy and PLPD filters, reweighted."""
  name: ClassVar[str] = 'deyo'
  entropy_margin: float = 0.5     # filter: entropy < entropy_margin * ln K
  reweight_margin: float = 0.4    # weight exp(-(H - reweight_margin * ln K)) ...
  plpd_threshold: float = 0.2     # filter: PLPD > plpd_threshold
  reweight_entropy: bool = True
  reweight_plpd: bool = True      # ... + exp(PLPD)
  patch_grid: int = 4             # patch shuffle of a patch_grid x patch_grid grid

  def objective(self, forward: Forward, bn, x, weights, rows, extra, key):
    logits = forward(bn, x, weights)
    kept = losses.deyo_entropy_filter(logits, rows, self.entropy_margin)
    x_view = views.patch_shuffle(key, x, self.patch_grid)
    logits_view = jax.lax.stop_gradient(forward(bn, x_view, _view_weights(weights, rows, kept)))
    w = losses.deyo_weights(logits, losses.plpd(logits, logits_view), kept,
                            threshold=self.plpd_threshold, reweight_margin=self.reweight_margin,
                            reweight_entropy=self.reweight_entropy,
                            reweight_plpd=self.reweight_plpd)
    return losses.deyo_loss(logits, w), (logits, jnp.sum(w > 0), extra)


@dataclasses.dataclass(frozen=True)
class ROID(Tent):
  """ROID (Marsden et al. 2024): weighted soft-likelihood ratio + consistency, weight ensembling
  towards the source parameters, prior-corrected outputs."""
  name: ClassVar[str] = 'roid'
  temperature: float = 1 / 3
  momentum_source: float = 0.99   # after each update: bn = m * bn + (1 - m) * source
  momentum_prior: float = 0.9     # class-prior EMA
  clip: float = 0.99              # soft-likelihood-ratio probability clip
  eps: float = 1e-5
  consistency: bool = True
  consistency_alpha: float = 0.5  # symmetric cross-entropy mix
  prior_correction: bool = True
  loss_denominator: int = 64      # losses are summed and divided by this fixed batch size

  def init_extra(self, num_classes: int) -> Any:
    return jnp.full((num_classes,), 1.0 / num_classes, jnp.float32)

  def objective(self, forward: Forward, bn, x, weights, rows, extra, key):
    logits = forward(bn, x, weights)
    w = losses.roid_weights(logits, rows, extra, self.temperature)
    prior = losses.class_prior_update(extra, logits, rows, self.momentum_prior)
    loss = losses.roid_loss(logits, w, self.loss_denominator, self.clip, self.eps)
    if self.consistency:
      logits_view = forward(bn, views.affine_view(key, x), _view_weights(weights, rows, w > 0))
      loss = loss + losses.roid_consistency(logits_view, logits, w, self.loss_denominator,
                                            self.consistency_alpha)
    return loss, (logits, jnp.sum(rows > 0), prior)

  def after_update(self, bn, source_bn):
    m = self.momentum_source
    return jax.tree.map(lambda p, s: m * p + (1 - m) * s, bn, source_bn)

  def output(self, logits: jax.Array, rows: jax.Array) -> jax.Array:
    return losses.prior_correction(logits, rows) if self.prior_correction else logits


ALGORITHMS = {a.name: a for a in (Tent, DeYO, ROID)}


def settings(name: str, **overrides: Any) -> Tent:
  """The named algorithm's settings, defaults overridden by ``overrides`` (e.g. from a config)."""
  if name not in ALGORITHMS:
    raise ValueError(f'unknown test-time adaptation {name!r}; choose one of {sorted(ALGORITHMS)}')
  return with_overrides(ALGORITHMS[name](), **overrides)


def with_overrides(algo: Tent, **overrides: Any) -> Tent:
  fields = {f.name for f in dataclasses.fields(algo)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'{algo.name}: unknown settings {unknown}; known: {sorted(fields)}')
  return dataclasses.replace(algo, **overrides)
