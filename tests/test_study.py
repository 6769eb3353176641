"""Cross-validation and the reproduction study on a small store: files, columns, resumability, and
a report computed from results.csv."""
import glob
import os
import sys

import numpy as np
import pandas as pd
import pytest

from csarm_jax import methods
from csarm_jax.data import synthetic
from csarm_jax.study import report, runner as study
from csarm_jax.training import cross_validation, experiment, loop
from run_fixture import tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'experiments'))
from configs import reproduce  # noqa: E402


def test_cross_validation_runs_every_fold_and_reuses_finished_runs(store_path, tmp_path):
  config = tiny_config(store_path, 'arm_bn')
  config.train.update(max_epochs=1, steps_per_epoch=1)
  runs = cross_validation.run(config, str(tmp_path), folds=[0, 2], seeds=[0])
  assert set(runs['fold']) == {0, 2} and set(runs['seed']) == {0}
  assert set(runs['evaluation']) == {'test.chunks', 'in_domain.chunks', 'validation.chunks'}
  summary = cross_validation.summarize(runs)
  test = runs[runs['evaluation'] == 'test.chunks']['accuracy']
  assert summary.loc['test.chunks', ('accuracy', 'mean')] == pytest.approx(test.mean())
  assert summary.loc['test.chunks', ('accuracy', 'std')] == pytest.approx(test.std(ddof=1))
  mtime = os.path.getmtime(tmp_path / 'fold0_seed0' / 'results.json')
  again = cross_validation.run(config, str(tmp_path), folds=[0, 2], seeds=[0])
  assert os.path.getmtime(tmp_path / 'fold0_seed0' / 'results.json') == mtime
  pd.testing.assert_frame_equal(again, runs)


def test_both_study_variants_are_valid_configs():
  for variant in ('quick', 'full'):
    config = reproduce.get_config(variant)
    experiment.check_config(config.experiment)
    assert study.sweep_setting(config) == 'unseen_source'
    specs = study.eval_specs(config, methods.CS_ARM_BN)
    assert {s.setting for s in specs} == {'in_domain', 'unseen_batches', 'unseen_source'}
  with pytest.raises(ValueError, match="variant must be 'quick' or 'full'"):
    reproduce.get_config('medium')


def test_training_groups_share_a_model_where_only_the_test_rule_differs():
  groups = study.training_groups(reproduce.METHODS)
  assert groups == {'erm': ['erm', 'adabn', 'adabn_controls'], 'ben': ['ben'],
                    'arm_bn': ['arm_bn'], 'cs_arm_bn': ['cs_arm_bn']}


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  """The study on the synthetic `tiny` store: one seed, two methods, a few sweep values."""
  store = str(tmp_path_factory.mktemp('tiny'))
  synthetic.generate(synthetic.preset('tiny'), store, seed=0, workers=1, progress=False)
  config = reproduce.get_config('quick')
  config.experiment = tiny_config(store)
  config.experiment.data.crop_size = 24
  config.experiment.train.update(max_epochs=1, steps_per_epoch=2)
  config.experiment.split.update(validation_fraction=0.25, unseen_batches_fraction=0.3,
                                 in_domain_fraction=0.25)
  config.methods = ['erm', 'cs_arm_bn']
  config.seeds = [0]
  config.sweeps.update(label_shift_alphas=[0.01], perturbed=[1, 4], controls=[0, 4],
                       max_images_per_plate=4)
  config.embedding.max_images_per_plate = 4
  workdir = str(tmp_path_factory.mktemp('study'))
  return config, workdir, study.run(config, workdir)


def test_study_writes_one_row_per_evaluation(smoke):
  config, workdir, results = smoke
  saved = pd.read_csv(os.path.join(workdir, 'results.csv'), dtype={'sweep_value': str})
  assert list(saved.columns) == list(study.RESULT_COLUMNS)
  assert len(saved) == len(results)
  per_method = saved.groupby('method').size()
  # erm: 3 settings + 1 alpha + 2 context sizes; cs_arm_bn also sweeps 2 control counts
  assert per_method.to_dict() == {'erm': 6, 'cs_arm_bn': 8}
  assert set(saved['setting']) == {'in_domain', 'unseen_batches', 'unseen_source'}
  assert saved['accuracy'].between(0, 1).all()
  k = saved[(saved['method'] == 'cs_arm_bn') & (saved['sweep'] == 'controls')]
  assert sorted(k['num_controls']) == [0, 4]
  assert (saved[saved['method'] == 'erm']['num_controls'] == 0).all()


def _cache_files(workdir):
  """Every trained run's results.json and every cached evaluation: path -> (inode, mtime, bytes)."""
  paths = (glob.glob(os.path.join(workdir, 'runs', '*', '*', 'results.json')) +
           glob.glob(os.path.join(workdir, 'runs', '*', '*', 'study', '*', '*.json')))
  return {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns, open(p, 'rb').read()) for p in paths}


def test_study_resumes_from_its_caches(smoke, monkeypatch):
  config, workdir, results = smoke
  cached = _cache_files(workdir)
  # 2 trained models; erm's 6 evaluations, cs_arm_bn's 8 (as results.csv counts them)
  assert len(cached) == 2 + len(results)

  def recompute(*args, **kwargs):
    raise AssertionError('the study recomputed a cached result')
  monkeypatch.setattr(loop, 'train_and_evaluate', recompute)    # training a model again
  monkeypatch.setattr(loop, 'restore_variables', recompute)     # evaluating a model again
  again = study.run(config, workdir)
  assert _cache_files(workdir) == cached                        # nothing rewritten
  pd.testing.assert_frame_equal(again.reset_index(drop=True), results.reset_index(drop=True))


def test_report_is_computed_from_results_csv(smoke):
  config, workdir, _ = smoke
  path = os.path.join(workdir, 'results.csv')
  results = pd.read_csv(path, dtype={'sweep_value': str})
  # Perturb the CSV: the report must follow the file, not any state of the study.
  results.loc[(results['method'] == 'cs_arm_bn') & (results['setting'] == 'in_domain') &
              (results['sweep'] == 'none'), 'accuracy'] = 0.4321
  results.to_csv(path, index=False)
  text = report.write(workdir, study.paper_numbers(), 'unseen_source',
                      'python experiments/reproduce.py')
  assert '0.432 ± 0.000 (n=1)' in text
  assert os.path.exists(os.path.join(workdir, 'summary.md'))
  for name in ('accuracy_by_setting', 'accuracy_vs_label_shift', 'accuracy_vs_context_size',
               'accuracy_vs_controls'):
    assert os.path.getsize(os.path.join(workdir, f'{name}.png')) > 1000
  erm_unseen = results[(results['method'] == 'erm') & (results['setting'] == 'unseen_source') &
                       (results['sweep'] == 'none')]['accuracy'].mean()
  assert f'{erm_unseen:.3f} ± 0.000 (n=1)' in text


def test_embedding_features_cover_the_held_out_parts(smoke):
  config, workdir, _ = smoke
  frame = study.embedding_frame(config, workdir, 'cs_arm_bn', 0, 0)
  features = frame.filter(regex=r'^feature_')
  assert features.shape[1] == 8 and np.isfinite(features.to_numpy()).all()   # cnn: 4 * 2 channels
  assert frame['Metadata_Source'].nunique() == 3
