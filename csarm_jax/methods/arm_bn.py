"""ARM-BN: meta-trained on contexts of one plate's perturbed images; the same at test (or with the
plate's controls pooled in at test only)."""
from csarm_jax.methods.base import Method

ARM_BN = Method('arm_bn', train_sampling='plate', train_controls=False, eval_controls=False)
# The ablation of the paper's question "are controls needed in training, or only at test?": the
# ARM-BN model (trained without controls), tested with its plate's controls pooled in.
ARM_BN_CONTROLS = Method('arm_bn_controls', train_sampling='plate', train_controls=False,
                         eval_controls=True)
