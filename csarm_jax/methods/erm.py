"""ERM: mini-batches of images from any plates, running-average BatchNorm at test (no adaptation).
"""
from csarm_jax.methods.base import Method
from csarm_jax.nn import RUNNING

ERM = Method('erm', train_sampling='mixed', train_controls=False, eval_controls=False,
             running_stats=True, eval_norm=RUNNING)
