"""Model zoo: ResNet-18/34/50, a small CNN, an MLP and ARM-CML, all with context BatchNorm."""
from csarm_jax.models.arm_cml import ARMCML
from csarm_jax.models.registry import (create, example_input, from_spec, init_variables,
                                      names)
from csarm_jax.models.resnet import ResNet
from csarm_jax.models.small import CNN, DROPOUT, MLP
