"""Profiles + MLP on the synthetic benchmark: hand-crafted well-level profiles of the quickstart
benchmark's images (both built on first use; csarm_jax/data/synthetic/profiles.py), trained with
jumpcp_profiles' recipe on quickstart's split (leave-one-source-out, fold 0, with in-domain
plates). Trains and evaluates in about a minute on a laptop CPU.

  python experiments/train.py --config=experiments/configs/profiles.py --workdir=runs/profiles
  python experiments/train.py --config=experiments/configs/profiles.py:cs_arm_bn \
      --workdir=runs/profiles_csarm

The optional variant after ':' names the method (erm, adabn, adabn_controls, arm_bn, cs_arm_bn,
ben; default erm), optionally followed by ',' and the setting (cross_source, the default, or
new_batches: the reference's leave-batches-out). --config.synthetic.features=image profiles each
image instead of each well (into another --config.store).
"""
from configs.default import get_config as _default
from configs.jumpcp_profiles import profiles_recipe


def get_config(variant=None):
  method, _, setting = (variant or '').partition(',')
  c = profiles_recipe(_default(), method or 'erm', setting or 'cross_source')
  c.store = 'data/quickstart_profiles'
  c.synthetic.update(preset='quickstart', features='well', images='data/quickstart')
  # quickstart's plates: 32 perturbed and 16 DMSO wells each
  c.data.update(num_controls=16, num_threads=2)
  c.eval.update(num_perturbed=32, num_controls=16)
  c.split.update(fold=0, in_domain_fraction=0.1)
  c.train.update(max_epochs=60, patience=10, log_every_steps=20, checkpoint_every_steps=100)
  return c
