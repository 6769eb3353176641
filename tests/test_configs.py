"""The experiment configs hold the settings their docstrings and the README promise."""
import os
import sys

import pytest

from csarm_jax import methods

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'experiments'))
from configs import default, jumpcp  # noqa: E402


@pytest.mark.parametrize('variant', [None, *methods.METHODS])
def test_jumpcp_is_the_papers_setting_with_the_named_method(variant):
  c = jumpcp.get_config(variant)
  assert c.method == (variant or 'cs_arm_bn')
  # notes/paper.md: ResNet-50, 256 crops, 64 perturbed + 128 controls, 8 contexts per update, Adam
  # 1e-3 without schedule, patience 20, at most 200 epochs, leave-one-source-out, 15 % of the
  # training batches for validation.
  assert (c.model.name, c.model.dtype, c.data.crop_size) == ('resnet50', 'float32', 256)
  assert (c.data.num_perturbed, c.data.num_controls) == (64, 128)
  # the reference's ERM / AdaBN: one update per batch (tests/test_jump_configs.py)
  assert c.data.contexts_per_step == (1 if c.method in default.ERM_STYLE else 8)
  assert (c.eval.num_perturbed, c.eval.num_controls) == (64, 128)
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.schedule) == \
      ('adam', 1e-3, 'constant')
  assert (c.train.max_epochs, c.train.patience) == (200, 20)
  assert (c.split.kind, c.split.validation_by, c.split.validation_fraction) == \
      ('source', 'batch', 0.15)
  assert c.store is None and c.synthetic.preset is None


def test_jumpcp_differs_from_the_defaults_only_in_the_method_and_reference_choices():
  for name in methods.METHODS:
    expected = default.get_config()
    expected.method = name
    assert jumpcp.get_config(name).to_dict() == default.jump_reference(expected).to_dict()
