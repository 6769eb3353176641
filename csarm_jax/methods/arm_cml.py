"""ARM-CML: a context network summarises each context into channels appended to its images.

Trained end to end on contexts of one plate (``cs_arm_cml``: pooled with the plate's controls,
which the context net also sees); as in the reference the backbone trains running averages and
normalises test images with them, while the context net always uses the context's statistics.
"""
from csarm_jax.methods.base import Method
from csarm_jax.nn import RUNNING

ARM_CML = Method('arm_cml', train_sampling='plate', train_controls=False, eval_controls=False,
                 running_stats=True, eval_norm=RUNNING, context_net=True)
CS_ARM_CML = Method('cs_arm_cml', train_sampling='plate', train_controls=True, eval_controls=True,
                    running_stats=True, eval_norm=RUNNING, context_net=True)
