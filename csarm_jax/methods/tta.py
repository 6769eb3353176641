"""TENT, DeYO and ROID: no training; a trained model (of any method) adapted on each test plate.

The values here carry the reference's default settings; ``from_source`` fixes the rest from the
method that trained the model: test contexts are formed as that method forms them (e.g. with the
plate's controls for a CS-ARM-BN model, whose statistics then pool them), always normalised with
the batch statistics, and ``csarm_jax.tta`` adapts the BatchNorm affines on them plate by plate.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from csarm_jax import tta
from csarm_jax.methods.base import Method

TENT, DEYO, ROID = (Method(name, train_sampling='mixed', train_controls=False, eval_controls=False,
                           test_time=tta.settings(name)) for name in ('tent', 'deyo', 'roid'))


def from_source(method: Method, source: Method, **settings: Any) -> Method:
  """``method`` adapting a model trained by ``source``, its settings overridden by ``settings``."""
  if source.test_time is not None:
    raise ValueError(f'{method.name}: the source model must come from a training method, '
                     f'not {source.name!r}')
  return dataclasses.replace(
      method, train_sampling=source.train_sampling, train_controls=source.train_controls,
      eval_controls=source.eval_controls, statistics_from=source.statistics_from,
      context_net=source.context_net, objective=source.objective,
      test_time=tta.with_overrides(method.test_time, **settings))
