"""The test-time objectives of TENT, DeYO and ROID as pure functions of logits.

Every function takes the logits (M, K) of one adaptation batch and ``rows`` (M,), 1 for the rows
that belong to the batch (padding and, by default, a context's controls are 0), so shapes stay fixed
under ``jit``; a filtered-out row is a row of weight 0, never a gather. Each returns plain values;
``csarm_jax.tta.algorithms`` wires them to forward passes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

TINY = 1e-12


def entropy(logits: jax.Array) -> jax.Array:
  """Softmax entropy per row (nats)."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def masked_mean(values: jax.Array, rows: jax.Array) -> jax.Array:
  rows = rows.astype(jnp.float32)
  return jnp.sum(values * rows) / jnp.maximum(jnp.sum(rows), 1.0)


def _min_max(values: jax.Array, rows: jax.Array) -> jax.Array:
  """(v - min) / (max - min) over ``rows``; a constant batch maps to 0 (the reference: 0/0)."""
  rows = rows > 0
  lo = jnp.min(jnp.where(rows, values, jnp.inf))
  hi = jnp.max(jnp.where(rows, values, -jnp.inf))
  return jnp.where(rows, (values - lo) / jnp.maximum(hi - lo, TINY), 0.0)


# ---------------------------------------------------------------------------------------------
# TENT: mean entropy of the batch.

def tent_loss(logits: jax.Array, rows: jax.Array) -> jax.Array:
  return masked_mean(entropy(logits), rows)


# ---------------------------------------------------------------------------------------------
# DeYO (Lee et al. 2024): entropy filter, PLPD filter, reweighting.

def deyo_entropy_filter(logits: jax.Array, rows: jax.Array, margin: float) -> jax.Array:
  """Rows kept by the first filter: entropy < margin * ln(K)."""
  bound = margin * jnp.log(logits.shape[-1])
  return (rows > 0) & (jax.lax.stop_gradient(entropy(logits)) < bound)


def plpd(logits: jax.Array, logits_view: jax.Array) -> jax.Array:
  """Pseudo-label probability difference: p(c|x) - p(c|x') for c = argmax p(.|x), no gradient."""
  p = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32))
  p_view = jax.nn.softmax(jax.lax.stop_gradient(logits_view).astype(jnp.float32))
  c = jnp.argmax(p, axis=-1)[:, None]
  return (jnp.take_along_axis(p, c, 1) - jnp.take_along_axis(p_view, c, 1))[:, 0]


def deyo_weights(logits: jax.Array, plpd_values: jax.Array, kept: jax.Array, *,
                 threshold: float, reweight_margin: float, reweight_entropy: bool = True,
                 reweight_plpd: bool = True) -> jax.Array:
  """Per-row loss weights: 0 outside ``kept`` or with PLPD <= threshold, else
  reweight_entropy * exp(-(H - reweight_margin * ln K)) + reweight_plpd * exp(PLPD) (no gradient).
  Without reweighting a surviving row weighs 1."""
  final = kept & (plpd_values > threshold)
  ent = jax.lax.stop_gradient(entropy(logits))
  coeff = (reweight_entropy * jnp.exp(-(ent - reweight_margin * jnp.log(logits.shape[-1])))
           + reweight_plpd * jnp.exp(plpd_values))
  coeff = coeff if (reweight_entropy or reweight_plpd) else jnp.ones_like(ent)
  return jnp.where(final, coeff, 0.0)


def deyo_loss(logits: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over surviving rows (weight > 0) of weight * entropy."""
  return masked_mean(weights * entropy(logits), weights > 0)


# ---------------------------------------------------------------------------------------------
# ROID (Marsden et al. 2024): diversity x certainty weights, soft likelihood ratio, consistency,
# prior correction.

def roid_weights(logits: jax.Array, rows: jax.Array, class_prior: jax.Array,
                 temperature: float) -> jax.Array:
  """exp(div * cert / T) on rows whose diversity weight is at least its batch mean, else 0.

  div = 1 - cos(class_prior, p), cert = -entropy, each min-max normalised over the batch. No
  gradient flows through the weights."""
  logits = jax.lax.stop_gradient(logits)
  p = jax.nn.softmax(logits.astype(jnp.float32))
  cos = (p @ class_prior) / jnp.maximum(
      jnp.linalg.norm(p, axis=-1) * jnp.linalg.norm(class_prior), 1e-8)
  div = _min_max(1.0 - cos, rows)
  cert = _min_max(-entropy(logits), rows)
  keep = (rows > 0) & ~(div < masked_mean(div, rows))
  return jnp.where(keep, jnp.exp(div * cert / temperature), 0.0)


def soft_likelihood_ratio(logits: jax.Array, clip: float = 0.99, eps: float = 1e-5) -> jax.Array:
  """-sum_k p_k log(p_k / (1 - p_k) + eps) with p clipped to [0, clip], per row."""
  p = jnp.clip(jax.nn.softmax(logits.astype(jnp.float32)), 0.0, clip)
  return -jnp.sum(p * jnp.log(p / (1.0 - p) + eps), axis=-1)


def symmetric_cross_entropy(logits: jax.Array, logits_ref: jax.Array, alpha: float = 0.5
                            ) -> jax.Array:
  """-(1 - alpha) sum p_ref log p - alpha sum p log p_ref per row (``logits``: augmented view)."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  log_q = jax.nn.log_softmax(logits_ref.astype(jnp.float32))
  return (-(1 - alpha) * jnp.sum(jnp.exp(log_q) * log_p, -1)
          - alpha * jnp.sum(jnp.exp(log_p) * log_q, -1))


def roid_loss(logits: jax.Array, weights: jax.Array, denominator: int, clip: float = 0.99,
              eps: float = 1e-5) -> jax.Array:
  """Sum of weighted soft-likelihood-ratio losses divided by a fixed batch size (as ROID)."""
  return jnp.sum(weights * soft_likelihood_ratio(logits, clip, eps)) / denominator


def roid_consistency(logits_view: jax.Array, logits: jax.Array, weights: jax.Array,
                     denominator: int, alpha: float = 0.5) -> jax.Array:
  return jnp.sum(weights * symmetric_cross_entropy(logits_view, logits, alpha)) / denominator


def class_prior_update(prior: jax.Array, logits: jax.Array, rows: jax.Array,
                       momentum: float) -> jax.Array:
  """EMA of the batch-mean softmax (ROID's class-prior estimate), no gradient."""
  p = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32))
  r = rows.astype(jnp.float32)[:, None]
  mean = jnp.sum(p * r, 0) / jnp.maximum(jnp.sum(r), 1.0)
  return momentum * prior + (1 - momentum) * mean


def prior_correction(logits: jax.Array, rows: jax.Array) -> jax.Array:
  """ROID's output correction: the logits multiplied by the smoothed batch prior.

  prior = mean softmax over the batch, s = max(1/N, 1/K) / max(prior), smoothed = (prior + s) /
  (1 + s K). As in ROID the *logits* (not the probabilities) are scaled."""
  p = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32))
  r = rows.astype(jnp.float32)
  n, k = jnp.maximum(jnp.sum(r), 1.0), logits.shape[-1]
  prior = jnp.sum(p * r[:, None], 0) / n
  smooth = jnp.maximum(1.0 / n, 1.0 / k) / jnp.max(prior)
  return logits * ((prior + smooth) / (1.0 + smooth * k))
