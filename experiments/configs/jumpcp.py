"""JUMP-CP as in the paper, with any method: ResNet-50, 5 channels, 256 crops, contexts of 64
perturbed + 128 same-plate DMSO controls, 8 contexts per update, Adam 1e-3 without schedule, early
stopping (patience 20) on validation loss, at most 200 epochs, leave-one-source-out over a store
holding source_3 and source_8 (fold 0 tests source_3, fold 1 source_8) with 15 % of the training
source's batches for validation.

  python experiments/train.py --config=experiments/configs/jumpcp.py \
      --config.store=PATH_OR_URL --config.split.fold=0 --workdir=runs/jumpcp_fold0
  python experiments/train.py --config=experiments/configs/jumpcp.py:erm \
      --config.store=PATH_OR_URL --config.split.fold=0 --workdir=runs/jumpcp_erm_fold0

The optional variant after ':' names the method (erm, adabn, adabn_controls, arm_bn, cs_arm_bn, ben;
default cs_arm_bn).
"""
from configs.default import get_config as _default


def get_config(variant=None):
  c = _default()                    # the defaults are the paper's setting
  c.method = variant or 'cs_arm_bn'
  return c
