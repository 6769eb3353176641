"""The interface every method implements: which images form a context and which statistics are used.

Most baselines differ only along a few axes (see docs/ARCHITECTURE.md), so a method is a small
frozen value that the one shared training step and evaluation read; no method copies the loop.
"""
from __future__ import annotations

import dataclasses

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from csarm_jax import adaptation
from csarm_jax.nn import CONTEXT, CONTEXT_CONSTANT, RUNNING, RUNNING_STATS

STATISTICS_FROM = ('context', 'controls')


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  train_sampling: str             # 'plate': contexts of one plate | 'mixed': images of any plates
                                  # | 'domains': several domains, a share each (DANN, CORAL)
  train_controls: bool            # training contexts carry the plate's DMSO controls
  eval_controls: bool             # test contexts carry the plate's DMSO controls
  running_stats: bool = False     # train running averages (ERM-style) ...
  eval_norm: str = CONTEXT        # ... and normalise test images with them ('running') or not
  statistics_from: str = 'context'  # 'context': every real row | 'controls': the controls alone
  statistics_gradient: bool = True  # training gradients flow through the context statistics
                                    # (False: they are constants, as the reference's BEN)
  context_net: bool = False       # the model gains ARM-CML's context network (models.arm_cml)
  test_time: Any = None           # test-time adaptation settings (csarm_jax.tta); None: no updates
  objective: Any = None           # an extra training loss on the features and domain ids
                                  # (methods/domain.py: DANN, CORAL); None: cross-entropy alone

  def __post_init__(self):
    if self.train_sampling not in ('plate', 'mixed', 'domains'):
      raise ValueError(f'{self.name}: train_sampling must be plate, mixed or domains')
    if (self.objective is not None) != (self.train_sampling == 'domains'):
      raise ValueError(f'{self.name}: a domain objective and domain contexts go together')
    if self.train_controls and self.train_sampling != 'plate':
      raise ValueError(f'{self.name}: controls belong to one plate, so need plate contexts')
    if self.eval_norm not in (CONTEXT, RUNNING) or (self.eval_norm == RUNNING
                                                    and not self.running_stats):
      raise ValueError(f'{self.name}: eval_norm {self.eval_norm!r} needs running statistics')
    if self.statistics_from not in STATISTICS_FROM or (
        self.statistics_from == 'controls' and not (self.train_controls and self.eval_controls)):
      raise ValueError(f'{self.name}: statistics_from must be one of {STATISTICS_FROM}; '
                       "'controls' needs controls in every context")
    if not self.statistics_gradient and self.running_stats:
      raise ValueError(f'{self.name}: statistics_gradient=False is for context-statistics methods; '
                       'ERM-style training keeps the gradient through its batch statistics')
    if self.test_time is not None and self.eval_norm != CONTEXT:
      raise ValueError(f'{self.name}: test-time adaptation normalises with the batch statistics')

  @property
  def trains(self) -> bool:
    """Whether the method trains a model; test-time adaptation starts from a trained one."""
    return self.test_time is None

  @property
  def whole_plate(self) -> bool:
    """Whether whole-plate evaluation applies: it streams BatchNorm statistics over a plate, while
    test-time adaptation learns from contexts and ARM-CML's context embedding is not streamed."""
    return self.trains and not self.context_net

  def model_choice(self, name: str, options: dict[str, Any],
                   num_domains: int | None = None) -> tuple[str, dict[str, Any]]:
    """The (registry name, options) of the model this method trains around ``name``
    (``num_domains``: the classes of DANN's domain classifier, counted from the data)."""
    if self.context_net:
      return 'arm_cml', {'backbone': name, **options}
    if self.objective is not None and self.objective.head:
      o = self.objective
      return 'domain_head', {'backbone': name, 'num_domains': num_domains,
                             'domain_hidden': o.head_hidden, 'domain_layers': o.head_layers,
                             **options}
    return name, options

  def weights(self, mask: jax.Array, is_control: jax.Array) -> jax.Array:
    """Per-row weights of a context's BatchNorm statistics: 0 for padding (and, for BEN, for
    perturbed rows), so equal weights pool perturbed images with their plate's controls."""
    mask = mask.astype(jnp.float32)
    return mask * is_control.astype(jnp.float32) if self.statistics_from == 'controls' else mask

  def forward(self, model: nn.Module, variables: dict[str, Any], x: jax.Array, mask: jax.Array,
              is_control: jax.Array, train: bool, **kwargs) -> tuple[Any, Any]:
    """(logits, running averages) of one context under this method's rule; when training an
    ERM-style method the running averages are the updated ones. ``kwargs`` go to the model (e.g.
    ``return_features=True`` makes the logits a (logits, features) pair)."""
    weights = self.weights(mask, is_control)
    if train and self.running_stats:
      out, updates = model.apply(variables, x, norm=CONTEXT, weights=weights,
                                 mutable=[RUNNING_STATS], **kwargs)
      return out, updates[RUNNING_STATS]
    if not train:
      norm = RUNNING if self.eval_norm == RUNNING else CONTEXT
    else:
      norm = CONTEXT if self.statistics_gradient else CONTEXT_CONSTANT
    return model.apply(variables, x, norm=norm, weights=weights, **kwargs), variables[RUNNING_STATS]

  def test_statistics(self, model: nn.Module, variables: dict[str, Any],
                      chunks: Callable[[], Iterable[tuple[jax.Array, np.ndarray, np.ndarray]]]
                      ) -> Any:
    """The statistics that normalise a whole test set under this rule, streamed exactly from
    ``chunks()`` (fresh chunks of the set and its controls: device images, host mask and
    is_control) with ``adaptation.plate_statistics``; controls count only for methods that use
    them at test. None for methods that normalise test images with running averages."""
    if self.eval_norm == RUNNING:
      return None

    def weighted():
      for x, mask, is_control in chunks():
        use = mask * (~is_control | self.eval_controls)     # drop controls if unused
        yield x, self.weights(*jax.device_put((use, is_control)))
    return adaptation.plate_statistics(model, variables, chunks=weighted)

  def test_logits(self, model: nn.Module, variables: dict[str, Any], stats: Any,
                  x: jax.Array, **kwargs) -> Any:
    """Logits of test images ``x`` normalised with ``test_statistics``' value (``kwargs`` go to
    the model, e.g. ``return_features=True``)."""
    if self.eval_norm == RUNNING:
      return model.apply(variables, x, norm=RUNNING, **kwargs)
    return adaptation.predict(model, variables, stats, x, **kwargs)


def labelled_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, ...]:
  """(sum of cross-entropy, number of labelled rows, number correct) over rows with label >= 0."""
  labelled = labels >= 0
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
  correct = (jnp.argmax(logits, -1) == labels) & labelled
  return jnp.sum(nll * labelled), jnp.sum(labelled), jnp.sum(correct)
