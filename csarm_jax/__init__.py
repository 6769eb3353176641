"""csarm-jax: CS-ARM-BN in JAX -- models whose BatchNorm statistics come from a plate's context.

    stats  = csarm_jax.adapt(model, variables, context, mask=None)
    logits = csarm_jax.predict(model, variables, stats, images)
    logits = csarm_jax.adapt_and_predict(model, variables, context, queries, mask=None)

Attributes load lazily, so data-only work (e.g. worker processes converting images) does not
import JAX.
"""
import importlib

__version__ = '0.1.0'

_API = {name: 'csarm_jax.adaptation' for name in (
    'adapt', 'adapt_and_predict', 'bn_layer_order', 'context_forward', 'plate_statistics',
    'predict', 'validate_inputs')}
_SUBPACKAGES = ('data', 'evaluation', 'inference', 'methods', 'models', 'nn', 'torch_import',
                'training')


def __getattr__(name):
  if name in _API:
    return getattr(importlib.import_module(_API[name]), name)
  if name in _SUBPACKAGES:
    return importlib.import_module(f'csarm_jax.{name}')
  raise AttributeError(f'module csarm_jax has no attribute {name!r}')


def __dir__():
  return sorted(list(_API) + list(_SUBPACKAGES) + ['__version__'])
