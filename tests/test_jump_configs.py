"""The paper's JUMP configs: the reference's training choices per method, and the within-source
variants' folds on a store shaped like JUMP sources 3 and 8."""
import math
import os
import sys

import pytest

from csarm_jax import models
from csarm_jax.data import open_store
from csarm_jax.training import experiment
from store_fixture import write_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {'csarmbn': 'cs_arm_bn', 'arm_bn': 'arm_bn', 'ben': 'ben', 'erm': 'erm',
           'adabn': 'adabn', 'adabn_controls': 'adabn_controls'}


def _config(name, setting=None):
  sys.path.insert(0, os.path.join(REPO, 'experiments'))
  try:
    from configs import jumpcp
    return jumpcp.get_config(f'{METHODS[name]},{setting or ""}')
  finally:
    sys.path.pop(0)


@pytest.fixture(scope='module')
def jump_store(tmp_path_factory):
  path = tmp_path_factory.mktemp('jump') / 'store'
  write_store(path, sources=('source_3', 'source_8'), batches_per_source=5, plates_per_batch=2,
              perturbed_per_plate=2, controls_per_plate=1, item_shape=(8, 8, 5))
  return open_store(str(path))


@pytest.mark.parametrize('name', sorted(METHODS))
def test_reference_training_choices_per_method(name, jump_store):
  c = _config(name)
  c.store = jump_store.path
  method = experiment.check_config(c)
  assert method.name == METHODS[name] and c.model.options.zero_init_last_bn is False
  assert c.data.contexts_per_step == (1 if method.train_sampling == 'mixed' else 8)
  assert method.statistics_gradient is (name != 'ben')
  assert (c.data.num_perturbed, c.optimizer.learning_rate, c.optimizer.schedule,
          c.train.patience, c.train.max_epochs) == (64, 1e-3, 'constant', 20, 200)
  model = models.create(c.model.name, 8, in_channels=5, **c.model.options)
  assert model.head_pool == 'reference' and model.zero_init_last_bn is False


@pytest.mark.parametrize('variant, kind', [('new_batches', 'Metadata_Batch'),
                                           ('new_plates', 'Metadata_Plate')])
def test_within_source_folds(variant, kind, jump_store):
  c = _config('csarmbn', variant)
  c.store = jump_store.path
  experiment.check_config(c)
  folds = experiment.make_run_folds(c, jump_store)
  t = jump_store.table
  source_3 = set(t.loc[t['Metadata_Source'] == 'source_3', 'Metadata_Plate'])
  assert len(folds) == 5
  assert sorted(p for f in folds for p in f.test) == sorted(source_3)   # each plate tested once
  for f in folds:
    assert set(f.train) | set(f.validation) | set(f.test) == source_3
    test_groups = set(t.loc[t['Metadata_Plate'].isin(f.test), kind])
    assert set(t.loc[t[kind].isin(test_groups), 'Metadata_Plate']) == set(f.test)  # whole groups
    assert len(f.validation) == math.ceil(0.15 * (len(source_3) - len(f.test)))     # by plate
    if variant == 'new_batches':      # 5 batches, 5 folds: each tests one whole batch
      assert len(set(t.loc[t['Metadata_Plate'].isin(f.test), 'Metadata_Batch'])) == 1
    else:                             # 10 plates, 5 folds: each tests two plates
      assert len(f.test) == 2


def test_cross_source_is_the_released_script(jump_store):
  c = _config('erm', 'cross_source')
  folds = experiment.make_run_folds(c, jump_store)
  assert [f.name for f in folds] == ['source=source_3', 'source=source_8']
  with pytest.raises(ValueError, match='setting must be cross_source'):
    _config('ben', 'new_wells')


def test_erm_takes_one_update_per_batch_of_64(jump_store):
  """The reference's ERM epoch: training perturbed images / N updates (CS-ARM-BN: / (N * 8));
  N = 2 here instead of 64, for the fixture's few images."""
  for name, per_update in (('erm', 2), ('csarmbn', 2 * 8)):
    c = _config(name)
    c.data.num_perturbed = 2
    fold = experiment.make_run_folds(c, jump_store)[0]
    t = jump_store.table
    n = int((t['Metadata_Plate'].isin(fold.train) & (t['label'] >= 0)).sum())
    steps, _ = experiment.schedule_length(c, jump_store, fold)
    assert steps == math.ceil(n / per_update) and n >= 2 * 8
