"""ARM-BN: meta-trained on contexts of one plate's perturbed images; the same at test."""
from csarm_jax.methods.base import Method

ARM_BN = Method('arm_bn', train_sampling='plate', train_controls=False, eval_controls=False)
