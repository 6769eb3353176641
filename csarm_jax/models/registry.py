"""Models by name: ``create(name, num_classes, **options)``."""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import flax.linen as nn

from csarm_jax.models.arm_cml import ARMCML
from csarm_jax.models.domain_head import WithDomainHead
from csarm_jax.models.resnet import ResNet18, ResNet34, ResNet50
from csarm_jax.models.small import CNN, MLP


def _arm_cml(num_classes: int, backbone: str = 'resnet50', in_channels: int = 5,
             context_channels: int = 12, context_hidden: int = 64, context_kernel: int = 5,
             dtype: Any = jnp.float32, **backbone_options: Any) -> ARMCML:
  """ARM-CML around an image backbone (``backbone_options`` go to it)."""
  if backbone not in _IMAGE_MODELS:
    raise ValueError(f'arm_cml needs an image backbone, one of {sorted(_IMAGE_MODELS)}; '
                     f'got {backbone!r}')
  net = _IMAGE_MODELS[backbone](num_classes=num_classes, in_channels=in_channels + context_channels,
                                dtype=dtype, **backbone_options)
  return ARMCML(net, num_classes, in_channels, context_channels, context_hidden, context_kernel,
                dtype)


def _linear(num_classes: int, **options: Any) -> MLP:
  """A linear classifier on feature vectors: the MLP without hidden layers."""
  return MLP(num_classes=num_classes, num_layers=0, **options)


def _domain_head(num_classes: int, num_domains: int, backbone: str = 'resnet50',
                 domain_hidden: int = 64, domain_layers: int = 2,
                 **backbone_options: Any) -> WithDomainHead:
  """Any model (``backbone``, with ``backbone_options``) plus DANN's domain classifier."""
  if backbone not in _IMAGE_MODELS and backbone != 'mlp':
    raise ValueError(f'domain_head wraps one of {sorted(_IMAGE_MODELS) + ["mlp"]}, '
                     f'got {backbone!r}')
  if not num_domains or num_domains < 2:
    raise ValueError(f'a domain classifier needs >= 2 domains, got {num_domains}')
  net = _MODELS[backbone](num_classes=num_classes, **backbone_options)
  return WithDomainHead(net, num_domains, domain_hidden, domain_layers)


_IMAGE_MODELS: dict[str, Callable[..., nn.Module]] = {
    'resnet18': ResNet18, 'resnet34': ResNet34, 'resnet50': ResNet50, 'cnn': CNN,
}
_MODELS: dict[str, Callable[..., nn.Module]] = {**_IMAGE_MODELS, 'mlp': MLP, 'linear': _linear,
                                                'arm_cml': _arm_cml, 'domain_head': _domain_head}
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def names() -> tuple[str, ...]:
  return tuple(_MODELS)


def create(name: str, num_classes: int, **options: Any) -> nn.Module:
  """Builds a model. ``dtype`` may be given as a string ('float32', 'bfloat16').

  Image models take ``in_channels`` (default 5), ResNets also ``width``, ``downsample``
  ('avgpool' | 'strided'), ``zero_init_last_bn`` and ``head_pool`` ('global' | 'reference');
  the MLP needs ``in_features`` (``linear``: the MLP without hidden layers); ``arm_cml`` takes
  ``backbone`` (an image model's name), ``context_channels``, ``context_hidden``,
  ``context_kernel`` and the backbone's options; ``domain_head`` (DANN) takes ``backbone``,
  ``num_domains``, ``domain_hidden``, ``domain_layers`` and the backbone's options.
  """
  if name not in _MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {sorted(_MODELS)}')
  if isinstance(options.get('dtype'), str):
    if options['dtype'] not in _DTYPES:
      raise ValueError(f"unknown dtype {options['dtype']!r}; choose one of {sorted(_DTYPES)}")
    options['dtype'] = _DTYPES[options['dtype']]
  try:
    return _MODELS[name](num_classes=num_classes, **options)
  except TypeError as e:
    raise ValueError(f'bad options for model {name!r}: {e}') from None


def from_spec(spec: dict[str, Any]) -> nn.Module:
  """The model a run's ``model.json`` records: ``{'name', 'num_classes', 'dtype', 'options'}``."""
  return create(spec['name'], spec['num_classes'], dtype=spec['dtype'], **spec['options'])


def example_input(model: nn.Module, crop_size: int | None) -> jnp.ndarray:
  """Two items of the model's input (zeros; ``crop_size`` for image models): what initialises it
  and shapes its state, in training and in an export."""
  if model.input_rank == 2:
    return jnp.zeros((2, model.in_channels), jnp.float32)
  return jnp.zeros((2, crop_size, crop_size, model.in_channels), jnp.float32)


def init_variables(model: nn.Module, rng, example) -> dict[str, Any]:
  """``{'params', 'batch_stats'}`` for ``model`` from an example input (its batch size is free)."""
  import jax
  return dict(jax.jit(lambda r, x: model.init(r, x, norm='context'))(rng, example))
