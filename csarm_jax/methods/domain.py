"""DANN and Deep CORAL: ERM plus a domain loss on the penultimate features.

Both train like ERM (BatchNorm over the training context, running averages kept) and test like it
(running averages, no adaptation), as in the reference. Training contexts hold several domains
(``data/domains.py``: plates, batches or sources, counted from the data) and, transductively, the
held-out domains' images with label -1: those join the domain loss and the statistics, never the
cross-entropy. The shared step calls ``Method.objective.loss`` on each context's features.

- DANN (Ganin et al. 2016): a gradient-reversal layer, then a small domain classifier (the model
  gains a ``domain_head``: ``models/domain_head.py``) trained to tell the domains apart, while the
  reversed gradient pushes the features to hide them. Reference defaults: loss weight 0.5, a fixed
  reversal coefficient 1 (``schedule='ganin'``: lambda = 2 / (1 + exp(-10 p)) - 1 over training
  progress p), the domain classifier's learning rate 1e-4.
- Deep CORAL (Sun & Saenko 2016, DomainBed's form): for every pair of domains in the context with
  at least ``min_group`` rows, the mean squared difference of their feature means plus that of
  their unbiased covariances, averaged over pairs; weight 0.1. Smaller groups are left out, so a
  singleton never divides by zero (the reference's NaN).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from csarm_jax import tta
from csarm_jax.methods.base import Method
from csarm_jax.nn import RUNNING

SCHEDULES = ('constant', 'ganin')


@jax.custom_vjp
def reverse_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
  """The identity whose gradient is multiplied by -``scale`` (no gradient to ``scale``)."""
  return x


def _reverse_fwd(x, scale):
  return x, scale


def _reverse_bwd(scale, g):
  return -scale * g, jnp.zeros_like(scale)


reverse_gradient.defvjp(_reverse_fwd, _reverse_bwd)


def ganin_lambda(progress: jax.Array) -> jax.Array:
  """The DANN paper's reversal coefficient at training progress p in [0, 1]."""
  return 2.0 / (1.0 + jnp.exp(-10.0 * progress)) - 1.0


def domain_cross_entropy(logits: jax.Array, domain: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean cross-entropy of the domain logits over real rows with a domain id (0 if none)."""
  use = (mask > 0) & (domain >= 0)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(log_probs, jnp.maximum(domain, 0)[:, None], axis=1)[:, 0]
  return jnp.sum(nll * use) / jnp.maximum(jnp.sum(use), 1)


def coral_penalty(features: jax.Array, domain: jax.Array, mask: jax.Array,
                  min_group: int = 2) -> jax.Array:
  """Mean over pairs of domain groups of mean((mu_i - mu_j)^2) + mean((C_i - C_j)^2).

  Groups: the distinct domain ids of real rows (at most one per row); a group with fewer than
  ``min_group`` rows is left out; 0 when fewer than two groups remain. Covariances are unbiased;
  <C_i, C_j> = sum over rows r of i, s of j of ((x_r - mu_i) . (x_s - mu_j))^2 /
  ((n_i - 1)(n_j - 1)), so no F x F covariance is formed (F = 2048 for ResNet-50).
  """
  x = features.astype(jnp.float32)
  ids = jnp.where(mask > 0, domain, -1)
  present = jnp.unique(ids, size=ids.shape[0], fill_value=-1)             # (G = M,)
  member = ((ids[None, :] == present[:, None]) & (present[:, None] >= 0)).astype(jnp.float32)
  count = member.sum(1)                                                    # (G,)
  valid = count >= max(min_group, 2)
  mean = member @ x / jnp.maximum(count, 1)[:, None]                       # (G, F)
  centred = (x - member.T @ mean) * member.sum(0)[:, None]     # each row minus its group's mean
  products = (centred @ centred.T) ** 2                                    # (M, M)
  scale = jnp.maximum(count - 1, 1)
  gram = member @ products @ member.T / jnp.outer(scale, scale)            # <C_i, C_j>
  sq = jnp.diag(gram)
  cov_dist = jnp.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
  mean_sq = jnp.sum(mean ** 2, axis=1)
  mean_dist = jnp.maximum(mean_sq[:, None] + mean_sq[None, :] - 2 * mean @ mean.T, 0.0)
  f = x.shape[-1]
  pair = jnp.triu(jnp.outer(valid, valid), k=1).astype(jnp.float32)
  penalty = mean_dist / f + cov_dist / f ** 2
  return jnp.sum(penalty * pair) / jnp.maximum(jnp.sum(pair), 1)


@dataclasses.dataclass(frozen=True)
class DANN:
  weight: float = 0.5                # the domain loss's weight (the reference's penalty)
  schedule: str = 'constant'         # reversal coefficient: 1 | 'ganin' (rises from 0 to 1)
  head_hidden: int = 64              # the domain classifier: Dense(hidden) -> ReLU, head_layers
  head_layers: int = 2               # times, then Dense(domains), as the reference's MLP
  head_learning_rate: float = 1e-4   # its learning rate (the featurizer's: config.optimizer)
  name = 'dann'
  head = True                        # the model gains a domain classifier

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f'schedule must be one of {SCHEDULES}, got {self.schedule!r}')

  def loss(self, model: nn.Module, variables: dict[str, Any], features: jax.Array,
           domain: jax.Array, mask: jax.Array, progress: jax.Array) -> jax.Array:
    scale = ganin_lambda(progress) if self.schedule == 'ganin' else jnp.float32(1.0)
    logits = model.apply(variables, reverse_gradient(features, scale), method='domain_logits')
    return self.weight * domain_cross_entropy(logits, domain, mask)


@dataclasses.dataclass(frozen=True)
class CORAL:
  weight: float = 0.1                # the penalty's weight (the reference's)
  min_group: int = 2                 # rows a domain needs in a context to enter the penalty
  name = 'coral'
  head = False

  def __post_init__(self):
    if self.min_group < 2:
      raise ValueError(f'min_group must be >= 2 (a covariance needs two rows), got '
                       f'{self.min_group}')

  def loss(self, model: nn.Module, variables: dict[str, Any], features: jax.Array,
           domain: jax.Array, mask: jax.Array, progress: jax.Array) -> jax.Array:
    del model, variables, progress
    return self.weight * coral_penalty(features, domain, mask, self.min_group)


# config.domain.settings replace fields as config.tta.settings do (unknown names raise)
with_overrides = tta.with_overrides


DANN_METHOD, CORAL_METHOD = (
    Method(name, train_sampling='domains', train_controls=False, eval_controls=False,
           running_stats=True, eval_norm=RUNNING, objective=objective)
    for name, objective in (('dann', DANN()), ('coral', CORAL())))
