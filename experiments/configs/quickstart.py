"""Quick start: the synthetic 'quickstart' benchmark (built on first use), a small CNN, CS-ARM-BN.

Trains on two synthetic labs and tests on the third (leave-one-source-out, fold 0), also scoring
held-out plates of the training labs (in-domain). Trains and evaluates in minutes on a laptop CPU.

  python experiments/train.py --config=experiments/configs/quickstart.py --workdir=runs/quickstart
  python experiments/train.py --config=experiments/configs/quickstart.py:erm --workdir=runs/qs_erm

The optional variant after ':' names the method (erm, adabn, adabn_controls, arm_bn,
arm_bn_controls, cs_arm_bn, ben, arm_cml, cs_arm_cml, dann, coral -- see config.domain; tent,
deyo, roid adapt a finished run: add --config.tta.source=runs/qs_erm).
"""
from configs.default import get_config as _default


def get_config(variant=None):
  c = _default()
  c.method = variant or 'cs_arm_bn'
  c.store = 'data/quickstart'
  c.synthetic.preset = 'quickstart'
  c.model.name = 'cnn'
  c.model.options = {'width': 16}
  # Twice as many controls as perturbed images per context, as the paper's 64 + 128.
  c.data.update(crop_size=48, num_perturbed=32, num_controls=64, contexts_per_step=2,
                num_threads=2)
  c.split.update(kind='source', fold=0, validation_by='batch', validation_fraction=0.15,
                 in_domain_fraction=0.1)
  c.optimizer.learning_rate = 1e-3
  c.train.update(max_epochs=20, patience=5, log_every_steps=20, checkpoint_every_steps=100)
  c.eval.update(num_perturbed=32, num_controls=64, contexts_per_step=8)
  return c
