"""A tiny training config over a small three-lab store, shared by the loop and study tests."""
import os
import sys

import jax

from csarm_jax.training import checkpoint, experiment
from csarm_jax.training.state import abstract_state
from store_fixture import write_store

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'experiments'))
from configs import default as default_config  # noqa: E402


def write_run_store(path) -> str:
  write_store(path, sources=('source_1', 'source_2', 'source_3'), batches_per_source=2,
              plates_per_batch=2, perturbed_per_plate=8, controls_per_plate=6,
              item_shape=(12, 12, 5))
  return str(path)


def tiny_config(store_path, method='cs_arm_bn'):
  c = default_config.get_config()
  c.method = method
  c.store = store_path
  c.model.name, c.model.options = 'cnn', {'width': 4, 'num_stages': 2}
  c.data.update(crop_size=8, num_perturbed=4, num_controls=4, contexts_per_step=4, num_threads=1)
  c.split.update(kind='source', fold=0, validation_fraction=0.25, in_domain_fraction=0.34)
  c.optimizer.learning_rate = 1e-2
  c.train.update(max_epochs=3, steps_per_epoch=2, log_every_steps=1, checkpoint_every_steps=1,
                 patience=5, transfer_guard='disallow')
  c.eval.update(num_perturbed=4, num_controls=4, contexts_per_step=4)
  return c


def latest_state(workdir, config):
  """The state of the newest ``latest`` checkpoint of a run."""
  exp = experiment.build(config, workdir)
  target = abstract_state(exp.model, exp.tx, exp.example_input,
                          jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  ckpt = checkpoint.Checkpoints(workdir)
  try:
    return ckpt.restore_selected(target, prefer_best=False)[0]
  finally:
    ckpt.close()
