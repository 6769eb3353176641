"""Neural-network building blocks."""
from csarm_jax.nn.context_norm import (CONTEXT, CONTEXT_CONSTANT, GIVEN, MODES, RUNNING,
                                       RUNNING_STATS, STATS, STREAM, STREAM_FLAGS, STREAM_SUMS,
                                       ContextBatchNorm, moments)
from csarm_jax.nn.pool import max_pool
