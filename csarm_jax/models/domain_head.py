"""A model with DANN's domain classifier beside its class head.

``__call__`` is the backbone's (the domain classifier plays no part in predictions, exports run
as ERM models); ``domain_logits(features)`` classifies penultimate features into the run's domains
(Dense(hidden) -> ReLU, ``layers`` times, then Dense(domains)). Its parameters live in the
model's variables under ``domain_head``, so checkpoints and the optimizer carry them.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import flax.linen as nn


class DomainClassifier(nn.Module):
  num_domains: int
  hidden: int = 64
  layers: int = 2

  @nn.compact
  def __call__(self, features):
    x = features.astype(jnp.float32)
    for i in range(self.layers):
      x = nn.relu(nn.Dense(self.hidden, name=f'dense{i}')(x))
    return nn.Dense(self.num_domains, name='out')(x)


class WithDomainHead(nn.Module):
  backbone: nn.Module
  num_domains: int
  hidden: int = 64
  layers: int = 2

  def setup(self):
    self.domain_head = DomainClassifier(self.num_domains, self.hidden, self.layers)

  @property
  def input_rank(self) -> int:
    return self.backbone.input_rank

  @property
  def in_channels(self) -> int:
    return self.backbone.in_channels

  def __call__(self, x, *, norm: str, weights=None, return_features: bool = False):
    out = self.backbone(x, norm=norm, weights=weights,
                        return_features=return_features or self.is_initializing())
    if self.is_initializing():          # create the domain classifier's parameters too
      self.domain_head(out[1])
      return out if return_features else out[0]
    return out

  def domain_logits(self, features: Any) -> Any:
    return self.domain_head(features)
