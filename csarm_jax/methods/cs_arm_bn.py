"""CS-ARM-BN: contexts of one plate pooled with that plate's DMSO controls, at train and test."""
from csarm_jax.methods.base import Method

CS_ARM_BN = Method('cs_arm_bn', train_sampling='plate', train_controls=True, eval_controls=True)
