"""train_and_evaluate end to end on a small store: outputs, exact resume, SIGTERM, NaN, bad configs,
export and ensemble prediction."""
import json
import os
import signal

import chex
import jax
import ml_collections
import numpy as np
import optax
import pandas as pd
import pytest

import csarm_jax
from csarm_jax import inference, parallel
from csarm_jax.data.augment import center_crop
from csarm_jax.data import open_store
from csarm_jax.training import checkpoint, experiment, loop
from run_fixture import latest_state as _params, tiny_config



@pytest.fixture(scope='module')
def finished(store_path, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config(store_path)
  config.eval.update(whole_plate=True, label_shift_alphas=[0.1])
  return workdir, config, loop.train_and_evaluate(config, workdir)


def test_run_writes_metrics_predictions_and_a_consistent_summary(finished):
  workdir, config, results = finished
  for name in ('results.json', 'metrics.jsonl', 'fold.json', 'normalization.json', 'model.json',
               'config.json'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert set(results['evaluations']) == {
      f'{part}.{mode}' for part in ('test', 'in_domain', 'validation')
      for mode in ('chunks', 'whole_plate', 'label_shift_alpha0.1')}
  store = open_store(config.store)
  fold = json.load(open(os.path.join(workdir, 'fold.json')))
  for name, summary in results['evaluations'].items():
    frame = pd.read_parquet(os.path.join(workdir, 'eval', f'{name}.predictions.parquet'))
    part = name.split('.')[0]
    if 'label_shift' in name:          # images drawn per context by class: a plate's subset
      assert set(frame['row']) <= set(store.table['row']) and len(frame) > 0
      continue
    expected_rows = store.table.loc[store.table['Metadata_Plate'].isin(fold[part]) &
                                    ~store.table['is_control'], 'row']
    assert sorted(frame['row']) == sorted(expected_rows)          # every image exactly once
    assert summary['accuracy'] == pytest.approx((frame['pred'] == frame['label']).mean())
    assert summary['num_images'] == len(frame)
    np.testing.assert_allclose(frame.filter(like='prob_').sum(axis=1), 1.0, rtol=1e-6)
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [l['step'] for l in lines if 'train/loss' in l] == list(range(1, 7))
  assert sum('validation/loss' in l for l in lines) == 3


def test_whole_plate_evaluation_equals_adapting_on_the_whole_plate(finished):
  workdir, config, _ = finished
  exp = experiment.build(config, workdir)
  variables = loop.restore_variables(exp, workdir)
  frame = pd.read_parquet(os.path.join(workdir, 'eval', 'test.whole_plate.predictions.parquet'))
  store = open_store(config.store)
  plate = exp.fold.test[0]
  rows = store.table.loc[store.table['Metadata_Plate'] == plate]
  images = exp.preprocess(center_crop(store.read(rows['row']), config.data.crop_size))
  stats = csarm_jax.adapt(exp.model, variables, images)          # perturbed + controls, one pass
  perturbed = ~rows['is_control'].to_numpy()
  logits = csarm_jax.predict(exp.model, variables, stats, images[perturbed])
  expected = np.asarray(jax.nn.softmax(logits))
  got = (frame.set_index('row').loc[rows['row'].to_numpy()[perturbed]]
         .filter(like='prob_').to_numpy())
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_killed_run_resumes_to_the_same_parameters(finished, store_path, tmp_path):
  workdir_a, config, _ = finished
  workdir_b = str(tmp_path)

  def crash(step):
    if step == 4:
      raise KeyboardInterrupt   # like a kill: work after the step-3 checkpoint is lost
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config, workdir_b, on_step=crash)
  loop.train_and_evaluate(config, workdir_b)
  chex.assert_trees_all_equal(_params(workdir_b, config).params, _params(workdir_a, config).params)


def test_resume_on_another_device_count(finished, store_path, tmp_path, monkeypatch):
  # Checkpointed on the 4 test devices, resumed on 2 (a smaller slice): restores go through an
  # abstract target with the current shardings; only the order of float sums may differ.
  workdir_a, config, _ = finished
  workdir_b = str(tmp_path)

  def crash(step):
    if step == 4:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config, workdir_b, on_step=crash)
  two, made = parallel.make_mesh(jax.devices()[:2]), []
  monkeypatch.setattr(parallel, 'make_mesh', lambda devices=None: made.append(two) or two)
  loop.train_and_evaluate(config, workdir_b)
  assert made                                          # the resumed run ran on the 2-device mesh
  chex.assert_trees_all_close(_params(workdir_b, config).params, _params(workdir_a, config).params,
                              rtol=1e-5, atol=1e-6)


def test_sigterm_saves_and_resumes_exactly(finished, store_path, tmp_path):
  workdir_a, config, _ = finished
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.checkpoint_every_steps = 100            # only SIGTERM and evaluations save
  workdir = str(tmp_path)

  def preempt(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(loop.Preempted, match='SIGTERM at step 3'):
    loop.train_and_evaluate(config, workdir, on_step=preempt)
  ckpt = checkpoint.Checkpoints(workdir)
  assert ckpt.latest_step() == 3
  saved = ckpt.saved_config()                          # the config travels with the checkpoint
  ckpt.close()
  assert saved == json.loads(config.to_json_best_effort())
  changed = ml_collections.ConfigDict(config.to_dict())
  changed.eval.seed += 1
  changed_keys = loop._warn_changed_config(saved, json.loads(changed.to_json_best_effort()))
  assert changed_keys == ['eval.seed']
  loop.train_and_evaluate(config, workdir)
  chex.assert_trees_all_equal(_params(workdir, config).params, _params(workdir_a, config).params)


def test_nan_loss_stops_with_a_saved_checkpoint(store_path, tmp_path):
  config = tiny_config(store_path)
  # The warmup's first update has learning rate 0, so step 1 is finite and saved; then it explodes.
  config.optimizer.update(learning_rate=1e30, warmup_steps=2)
  config.train.checkpoint_every_steps = 1
  with pytest.raises(FloatingPointError, match='training diverged by step') as raised:
    loop.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpoint.Checkpoints(str(tmp_path))
  diverged = ckpt.latest_step(checkpoint.DIVERGED)
  good = ckpt.latest_step(checkpoint.LATEST)
  ckpt.close()
  assert diverged is not None                          # kept for a post-mortem ...
  assert good is not None and good < diverged          # ... but never what a re-run resumes from
  assert f'the checkpoint before it (step {good})' in str(raised.value)


@pytest.mark.parametrize('field, value, message', [
    ('method', 'mmd', "config.method: unknown method 'mmd'"),
    ('model.name', 'vit', "config.model.name: unknown model 'vit'"),
    ('store', '/nonexistent/store', 'config.store:'),
    ('split.fold', 7, 'config.split.fold: 7 is out of range'),
    ('data.contexts_per_step', 6, 'config.data.contexts_per_step=6 must be a multiple'),
    ('data.crop_size', 64, 'config.data.crop_size: 64 exceeds'),
    ('data.num_controls', 0, 'config.data.num_controls: cs_arm_bn trains on contexts'),
    ('eval.num_controls', 0, 'config.eval.num_controls: cs_arm_bn normalises'),
    ('data.too_few', 'repeat', "config.data.too_few: must be one of"),
    ('data.num_threads', 0, 'config.data.num_threads: num_threads must be >= 1'),
    ('data.num_threads', 8, 'config.data.prefetch: 4 batches read ahead would let grain run only '
                            '4 of data.num_threads=8'),
    ('train.eval_every_epochs', 0, 'config.train.eval_every_epochs: must be >= 1'),
    ('optimizer.name', 'lamb', "config.optimizer.name: unknown optimizer 'lamb'"),
    ('optimizer.schedule', 'step', "config.optimizer.schedule: unknown schedule 'step'"),
    ('train.transfer_guard', 'never', "config.train.transfer_guard: must be one of"),
    ('train.profile_steps', -1, 'config.train.profile_steps: must be >= 0'),
])
def test_bad_configs_fail_at_start_naming_the_field(store_path, tmp_path, field, value, message):
  config = tiny_config(store_path)
  section, _, key = field.rpartition('.')
  (config[section] if section else config)[key] = value
  with pytest.raises(experiment.ConfigError, match=message):
    loop.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize('name, weight_decay, expected', [
    ('adam', 0.0, optax.adam(0.1)),
    ('adam', 0.5, optax.chain(optax.add_decayed_weights(0.5), optax.adam(0.1))),
    ('adamw', 0.5, optax.adamw(0.1, weight_decay=0.5)),
    ('sgd', 0.0, optax.sgd(0.1, momentum=0.9)),
])
def test_optimizer_names_build_their_optax_transformation(name, weight_decay, expected):
  config = tiny_config('unused')
  config.optimizer.update(name=name, weight_decay=weight_decay, learning_rate=0.1)
  tx = experiment.make_optimizer(config, total_steps=10)
  params, grads = {'w': np.array([1.0, -2.0], np.float32)}, {'w': np.array([0.5, 0.25], np.float32)}
  updates = []
  for t in (tx, expected):
    state, p = t.init(params), params
    for _ in range(2):
      u, state = t.update(grads, state, p)
      p = optax.apply_updates(p, u)
    updates.append(p)
  chex.assert_trees_all_equal(*updates)


def test_an_unknown_optimizer_is_rejected_not_replaced():
  # make_optimizer is also called without check_config (export rebuilds a run's optimizer)
  config = tiny_config('unused')
  config.optimizer.name = 'lamb'
  with pytest.raises(experiment.ConfigError,
                     match="config.optimizer.name: unknown optimizer "
                           r"'lamb'; choose one of \['adam', 'adamw', 'sgd'\]"):
    experiment.make_optimizer(config, total_steps=10)


def test_export_and_ensemble_prediction_match_evaluation(finished, tmp_path):
  workdir, config, results = finished
  out = inference.export(workdir, str(tmp_path / 'export'))
  member = inference.load(out)
  assert member.spec['method'] == 'cs_arm_bn' and member.norm.channels
  store = open_store(config.store)
  fold = json.load(open(os.path.join(workdir, 'fold.json')))
  images, wells = inference.predict_store([member, member], store, plates=fold['test'],
                                          contexts_per_step=4)
  evaluated = pd.read_parquet(os.path.join(workdir, 'eval', 'test.chunks.predictions.parquet'))
  merged = images.merge(evaluated, on='row', suffixes=('', '_eval'))
  assert len(merged) == len(evaluated) == len(images)
  np.testing.assert_allclose(merged['prob_0'], merged['prob_0_eval'], rtol=1e-5, atol=1e-6)
  assert {'entropy', 'pred_name'} <= set(images.columns)
  assert wells['num_images'].sum() == len(images)
