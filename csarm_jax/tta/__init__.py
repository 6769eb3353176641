"""Test-time adaptation (TENT, DeYO, ROID): settings values and pure, jit-able plate adaptation."""
from csarm_jax.tta.adapt import (adapt_batch, adapt_plate, adapt_plates, bn_params,
                                 compile_adapt_plates, init_state, plate_sharding,
                                 with_bn)
from csarm_jax.tta.algorithms import ALGORITHMS, DeYO, ROID, Tent, settings, with_overrides
