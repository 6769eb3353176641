"""csarm-jax: CS-ARM-BN in JAX -- models whose BatchNorm statistics come from a plate's context."""
from csarm_jax import models, nn
from csarm_jax.adaptation import (adapt, adapt_and_predict, bn_layer_order, context_forward,
                                  plate_statistics, predict, validate_inputs)

__version__ = '0.1.0'
