"""Whole-plate evaluation under every method's test-time rule, against adapting on the whole plate
in one pass (an independent oracle: which rows form the statistics is spelled out per method
here, not read from the Method), under a transfer guard that forbids implicit transfers."""
import dataclasses

import jax
import numpy as np
import pytest

import csarm_jax
from csarm_jax import models, parallel
from csarm_jax.data import open_store
from csarm_jax.data.augment import center_crop
from csarm_jax.evaluation import protocol
from csarm_jax.nn import RUNNING, RUNNING_STATS
from csarm_jax.training import experiment
from run_fixture import tiny_config

# The rows whose statistics normalise a plate's images at test; None: ERM's running averages.
RULES = {'erm': None, 'adabn': 'perturbed', 'arm_bn': 'perturbed', 'adabn_controls': 'all',
         'arm_bn_controls': 'all',
         'cs_arm_bn': 'all', 'ben': 'controls'}


def _variables(exp):
  """Random-initialised variables with running averages far from the plate's statistics (so
  using the wrong statistics changes the predictions), replicated as a restored run's are."""
  variables = models.init_variables(exp.model, jax.random.key(0), exp.example_input)
  leaves, tree = jax.tree.flatten(variables[RUNNING_STATS])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [l + 0.5 * jax.random.uniform(k, l.shape) for l, k in zip(leaves, keys)]
  variables = {**variables, RUNNING_STATS: jax.tree.unflatten(tree, leaves)}
  return jax.device_put(variables, parallel.replicated(exp.mesh))


def _probabilities(exp, variables, images, rows):
  """Softmax of the plate's images normalised with the statistics of ``rows`` (a boolean mask;
  None: the running averages), in one pass."""
  if rows is None:
    logits = exp.model.apply(variables, images, norm=RUNNING)
  else:
    stats = csarm_jax.adapt(exp.model, variables, images[rows])
    logits = csarm_jax.predict(exp.model, variables, stats, images)
  return np.asarray(jax.nn.softmax(logits))


@pytest.mark.parametrize('method', sorted(RULES))
def test_whole_plate_evaluation_matches_adapting_on_the_plate(method, store_path, tmp_path):
  config = tiny_config(store_path, method)
  exp = experiment.build(config, str(tmp_path))
  variables = _variables(exp)
  rule = dataclasses.replace(exp.protocol, chunk_size=8)     # 14 rows a plate: streamed in 2
  plates = exp.fold.test[:2]
  with jax.transfer_guard('disallow'):
    frame, _ = protocol.evaluate(exp, None, variables, plates, rule, 'whole_plate')
  store = open_store(config.store)
  assert sorted(frame['row']) == sorted(store.table.loc[
      store.table['Metadata_Plate'].isin(plates) & ~store.table['is_control'], 'row'])
  for plate in plates:
    table = store.table.loc[store.table['Metadata_Plate'] == plate]
    images = exp.preprocess(center_crop(store.read(table['row']), config.data.crop_size))
    control = table['is_control'].to_numpy()
    choices = {None: None, 'perturbed': ~control, 'all': np.ones_like(control),
               'controls': control}
    got = frame.set_index('row').loc[table['row'].to_numpy()[~control]].filter(like='prob_')
    expected = _probabilities(exp, variables, images, choices[RULES[method]])[~control]
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-4, atol=1e-5)
    for other, rows in choices.items():     # every other rule gives other predictions
      if other != RULES[method]:
        wrong = _probabilities(exp, variables, images, rows)[~control]
        assert np.abs(wrong - expected).max() > 1e-3, other
