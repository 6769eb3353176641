"""Model zoo: ResNet-18/34/50, a small CNN and an MLP, all with context BatchNorm."""
from csarm_jax.models.registry import create, example_input, init_variables, names
from csarm_jax.models.resnet import ResNet
from csarm_jax.models.small import CNN, MLP
