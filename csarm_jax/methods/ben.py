"""BEN (batch effects normalisation): every image normalised with its plate's controls' statistics.

Computed correctly: the statistics are exactly those of the controls (the reference's momentum-0.1
running buffers give 0.1*mean and 0.9 + 0.1*var instead). By default gradients flow through them;
``statistics_gradient=False`` (``config.method_options``; the paper's JUMP configs) treats them as
constants, as the reference does (it computes them under ``no_grad``).
"""
from csarm_jax.methods.base import Method

BEN = Method('ben', train_sampling='plate', train_controls=True, eval_controls=True,
             statistics_from='controls')
