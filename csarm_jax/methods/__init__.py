"""Methods by name. Each is a small value (see base.Method) read by the one shared loop."""
from csarm_jax.methods.adabn import ADABN, ADABN_CONTROLS
from csarm_jax.methods.arm_bn import ARM_BN
from csarm_jax.methods.base import Method, labelled_cross_entropy
from csarm_jax.methods.ben import BEN
from csarm_jax.methods.cs_arm_bn import CS_ARM_BN
from csarm_jax.methods.erm import ERM

METHODS = {m.name: m for m in (ERM, ADABN, ADABN_CONTROLS, ARM_BN, CS_ARM_BN, BEN)}


def get(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}; choose one of {sorted(METHODS)}')
  return METHODS[name]
