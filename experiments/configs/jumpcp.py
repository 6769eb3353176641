"""JUMP-CP as in the paper, with any method: ResNet-50, 5 channels, 256 crops, contexts of 64
perturbed + 128 same-plate DMSO controls, 8 contexts per update, Adam 1e-3 without schedule, early
stopping (patience 20) on validation loss, at most 200 epochs, trained as the reference trains each
method (default.jump_reference: BN scales start at 1, ERM/AdaBN take one update per batch of 64,
BEN's control statistics carry no gradient).

Settings: cross_source (default) -- leave-one-source-out over a store holding source_3 and
source_8 (fold 0 tests source_3, fold 1 source_8) with 15 % of the training source's batches for
validation, as the reference's released script; new_batches / new_plates -- within source_3, 5 folds
of whole batches / plates (folds 0-4) with 15 % of the training plates for validation, as the
reference's default data config.

  python experiments/train.py --config=experiments/configs/jumpcp.py \
      --config.store=PATH_OR_URL --config.split.fold=0 --workdir=runs/jumpcp_fold0
  python experiments/train.py --config=experiments/configs/jumpcp.py:erm \
      --config.store=PATH_OR_URL --config.split.fold=0 --workdir=runs/jumpcp_erm_fold0
  python experiments/train.py --config=experiments/configs/jumpcp.py:cs_arm_bn,new_plates \
      --config.store=PATH_OR_URL --config.split.fold=3 --workdir=runs/jumpcp_plates3

The optional variant after ':' names the method (erm, adabn, adabn_controls, arm_bn,
arm_bn_controls (ARM-BN tested with controls), cs_arm_bn, ben, arm_cml, cs_arm_cml, dann, coral;
default cs_arm_bn), optionally followed by ',' and the setting. DANN and Deep CORAL take their
domains and transductive mode from config.domain. tent, deyo and roid adapt the model of a
finished run at test time, episodic per plate with the reference's settings (csarm_jax.tta):

  python experiments/train.py --config=experiments/configs/jumpcp.py:roid \
      --config.store=PATH_OR_URL --config.split.fold=0 --config.tta.source=runs/jumpcp_erm_fold0 \
      --workdir=runs/jumpcp_roid_fold0
"""
from configs.default import get_config as _default, jump_reference


def get_config(variant=None):
  method, _, setting = (variant or '').partition(',')
  c = _default()                    # the defaults are the paper's setting
  c.method = method or 'cs_arm_bn'
  return jump_reference(c, setting or None)
