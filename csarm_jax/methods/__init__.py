"""Methods by name. Each is a small value (see base.Method) read by the one shared loop."""
import dataclasses

from csarm_jax.methods.adabn import ADABN, ADABN_CONTROLS
from csarm_jax.methods.arm_bn import ARM_BN, ARM_BN_CONTROLS
from csarm_jax.methods.arm_cml import ARM_CML, CS_ARM_CML
from csarm_jax.methods.base import Method, labelled_cross_entropy
from csarm_jax.methods.ben import BEN
from csarm_jax.methods.cs_arm_bn import CS_ARM_BN
from csarm_jax.methods.domain import CORAL_METHOD as CORAL, DANN_METHOD as DANN
from csarm_jax.methods.erm import ERM
from csarm_jax.methods.tta import DEYO, ROID, TENT, from_source

METHODS = {m.name: m for m in (ERM, ADABN, ADABN_CONTROLS, ARM_BN, ARM_BN_CONTROLS, CS_ARM_BN,
                               BEN, ARM_CML, CS_ARM_CML, TENT, DEYO, ROID, DANN, CORAL)}
OPTIONS = {'statistics_gradient'}   # fields a config may set (config.method_options)


def get(name: str, **options) -> Method:
  """The method ``name``, with ``options`` replacing fields (e.g. ``statistics_gradient=False``)."""
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}; choose one of {sorted(METHODS)}')
  if not options:
    return METHODS[name]
  unknown = sorted(set(options) - OPTIONS)
  if unknown:
    raise ValueError(f'unknown method option {unknown[0]!r}; choose from {sorted(OPTIONS)}')
  return dataclasses.replace(METHODS[name], **options)
