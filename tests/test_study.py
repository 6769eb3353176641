"""Cross-validation and the reproduction study on a small store: files, columns, resumability, and
a report computed from results.csv."""
import dataclasses
import glob
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

from csarm_jax import methods
from csarm_jax.data import store as store_lib, synthetic
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
  for variant in ('quick', 'calibrated', 'full'):
    config = reproduce.get_config(variant)
    experiment.check_config(config.experiment)
    assert study.sweep_setting(config) == 'unseen_source'
    specs = study.eval_specs(config, methods.CS_ARM_BN)
    assert {s.setting for s in specs} == {'in_domain', 'unseen_batches', 'unseen_source'}
    benches = study.benchmarks(config, 'w')
    for b in benches:
      experiment.check_config(study._run_config(b.experiment, b.methods[0], 0, 0))
      study.training_groups(list(b.methods), config.tta_source)
    stores = {(b.variant, b.seed): b.experiment.store for b in benches if b.section == 'images'}
    assert len(set(stores.values())) == len(stores)            # one store per benchmark
  quick = reproduce.get_config('quick')
  assert {s.sweep for s in study.eval_specs(quick, methods.TENT)} == {'none', 'label_shift'}
  alphas = lambda config, method: [s.alpha for s in study.eval_specs(config, method) if s.alpha]
  assert alphas(quick, methods.TENT) == [0.01]               # quick: TTA at alpha = 0.01 only
  assert alphas(quick, methods.CS_ARM_BN) == list(quick.sweeps.label_shift_alphas)
  assert alphas(reproduce.get_config('full'), methods.TENT) == [1.0, 0.1, 0.01]
  assert {s.sweep for s in study.eval_specs(reproduce.get_config('full'), methods.TENT)} == {
      'none', 'label_shift', 'perturbed'}                      # no controls in TENT's contexts
  assert len(quick.benchmark_seeds) >= 3 and set(reproduce.METHODS) <= set(quick.methods)
  main = {b.seed: set(b.methods) for b in study.benchmarks(quick, 'w') if b.section == 'images'
          and b.variant == 'base'}
  assert main[0] == set(quick.methods)                       # method_benchmark_seeds: these
  assert main[1] == main[2] == set(quick.methods) - {'arm_cml', 'cs_arm_cml', 'tent', 'deyo',
                                                     'roid', 'tent@cs_arm_bn'}   # on 0 only
  variant = study.benchmarks(quick, 'w')[1]
  assert variant.variant == 'strength_1_3' and variant.label_shift_alphas == (0.01,)
  # the within-source section: one lab of 9 batches, its own settings, no sweeps
  within = next(b for b in study.benchmarks(quick, 'w') if b.section == study.WITHIN_SOURCE)
  assert within.experiment.store == quick.experiment.store + '-seed0-within'
  assert within.experiment.synthetic.overrides.layout.num_sources == 1
  assert within.experiment.split.kind == 'batch' and within.sweeps == ()
  assert {(s.setting, s.part, s.sweep) for s in study.eval_specs(
      quick, methods.CS_ARM_BN, settings=within.settings, sweeps=within.sweeps)} == {
          ('new_plates', 'in_domain', 'none'), ('new_batches', 'test', 'none')}
  quick.sections.within_source.sweeps = ('label_shift', 'labelshift')
  with pytest.raises(ValueError, match=r"within_source.sweeps: \['labelshift'\] name no sweep"):
    study.benchmarks(quick, 'w')
  assert variant.experiment.synthetic.overrides.effects.strength == 1.3
  calibrated = reproduce.get_config('calibrated')       # quick's study on the calibrated preset
  assert calibrated.experiment.synthetic.preset == 'calibrated'
  assert {b.section for b in study.benchmarks(calibrated, 'w')} == {'images', 'within_source'}
  assert {s.sweep for s in study.eval_specs(calibrated, methods.CS_ARM_BN)} == {'none',
                                                                                'label_shift'}
  assert study.benchmarks(calibrated, 'w')[1].experiment.synthetic.preset == 'calibrated'
  with pytest.raises(ValueError, match="variant must be 'quick', 'calibrated' or 'full'"):
    reproduce.get_config('medium')


def test_training_groups_share_a_model_where_only_the_test_rule_differs():
  groups = study.training_groups(reproduce.METHODS)
  assert groups == {'erm': ['erm', 'adabn', 'adabn_controls', 'tent', 'deyo', 'roid'],
                    'ben': ['ben'], 'arm_bn': ['arm_bn', 'arm_bn_controls'],
                    'cs_arm_bn': ['cs_arm_bn'], 'arm_cml': ['arm_cml'],
                    'cs_arm_cml': ['cs_arm_cml'], 'dann': ['dann'], 'coral': ['coral']}
  # a test-time method's source trains its group, whatever is listed first
  assert study.training_groups(['adabn', 'tent@cs_arm_bn', 'deyo', 'cs_arm_bn']) == {
      'erm': ['adabn', 'deyo'], 'cs_arm_bn': ['tent@cs_arm_bn', 'cs_arm_bn']}
  with pytest.raises(ValueError, match='adapt both'):
    study.training_groups(['tent@erm', 'deyo@adabn'])
  with pytest.raises(ValueError, match='only a test-time method'):
    study.training_groups(['erm@cs_arm_bn'])


def test_training_key_separates_every_training_field():
  """Only test-time fields may be shared: a new field or a new Method type trains its own model."""
  @dataclasses.dataclass(frozen=True)
  class WithObjective(methods.Method):
    objective: str = 'dann'

  @dataclasses.dataclass(frozen=True)
  class Subclass(methods.Method):
    pass

  erm = methods.ERM
  fields = {f.name: getattr(erm, f.name) for f in dataclasses.fields(erm)}
  key = study.training_key
  assert key(dataclasses.replace(erm, name='other', eval_norm='context', eval_controls=True)) \
      == key(erm)
  assert key(WithObjective(**fields)) != key(erm)
  assert key(Subclass(**fields)) != key(erm)
  assert key(dataclasses.replace(erm, statistics_gradient=True)) == key(erm)
  for name in ('arm_cml', 'cs_arm_cml', 'arm_bn', 'ben'):
    assert key(methods.get(name)) != key(erm)
  assert key(methods.ARM_CML) != key(dataclasses.replace(methods.ARM_CML, context_net=False))


def test_section_overrides_fill_placeholders_and_refuse_unknown_fields(store_path):
  base = tiny_config(store_path)
  fields = {'workdir': '/w', 'benchmark_seed': 3, 'store': '/s-seed3'}
  cfg = study.with_overrides(base, {'store': '{store}/features', 'model': {'options': {
      'width': 8, 'hidden': 5}}, 'tta': {'source': '{workdir}/runs/b{benchmark_seed}'}}, fields)
  assert cfg.store == '/s-seed3/features' and cfg.tta.source == '/w/runs/b3'
  assert cfg.model.options.width == 8 and cfg.model.options.hidden == 5    # free-form options
  assert base.model.options.width == 4                                      # a copy
  alone = study.with_overrides(base, {'model': {'options': {'hidden': 5}}}, fields)
  assert alone.model.options.to_dict() == {'hidden': 5}     # replaced whole: no width carried over
  per_run = study.with_overrides(base, {'tta': {'source': '{workdir}/f{fold}_s{seed}'}}, fields)
  assert per_run.tta.source == '/w/f{fold}_s{seed}'          # filled per run, by _run_config:
  assert study._run_config(per_run, 'erm', fold=2, seed=1).tta.source == '/w/f2_s1'
  with pytest.raises(KeyError, match="'model.widht'"):
    study.with_overrides(base, {'model': {'widht': 8}}, fields)


def test_method_benchmark_seeds_refuse_a_name_that_is_no_method(tmp_path):
  config = reproduce.get_config('quick')
  config.methods = ['erm', 'tent']                 # quick's entries for unselected methods are fine
  names = lambda seed: next(b.methods for b in study.benchmarks(config, str(tmp_path))
                            if b.seed == seed)
  assert names(0) == ('erm', 'tent') and names(1) == ('erm',)
  config.method_benchmark_seeds = {'tnet': (0,)}
  with pytest.raises(ValueError, match=r"method_benchmark_seeds: \['tnet'\] name no method"):
    study.benchmarks(config, str(tmp_path))


def _results(accuracy: dict) -> pd.DataFrame:
  """results.csv rows of one method/setting: {(benchmark_seed, seed): accuracy}."""
  return pd.DataFrame([{'section': 'images', 'benchmark': 'base', 'benchmark_seed': b,
                        'method': 'cs_arm_bn', 'setting': 'unseen_source', 'sweep': 'none',
                        'sweep_value': '', 'fold': 0, 'seed': s, 'accuracy': a}
                       for (b, s), a in accuracy.items()])


def test_spread_splits_benchmark_and_training_seed_variation():
  # benchmark 0: runs 0.5, 0.7 (mean 0.6, std 0.1414); benchmark 1: 0.8, 0.9 (mean 0.85, std
  # 0.0707): between = std(0.6, 0.85) = 0.1768, within = (0.1414 + 0.0707) / 2 = 0.1061
  two = report.spread(_results({(0, 0): 0.5, (0, 1): 0.7, (1, 0): 0.8, (1, 1): 0.9})).iloc[0]
  assert two['between'] == pytest.approx(0.1767767) and two['within'] == pytest.approx(0.1060660)
  assert two['benchmarks'] == 2
  one_seed = report.spread(_results({(0, 0): 0.6, (1, 0): 0.85, (2, 0): 0.7})).iloc[0]
  assert one_seed['between'] == pytest.approx(np.std([0.6, 0.85, 0.7], ddof=1))
  assert np.isnan(one_seed['within'])                           # one run per benchmark
  one_bench = report.spread(_results({(0, 0): 0.5, (0, 1): 0.7})).iloc[0]
  assert np.isnan(one_bench['between']) and one_bench['within'] == pytest.approx(0.1414214)
  text = '\n'.join(report.spread_markdown(
      _results({(0, 0): 0.5, (0, 1): 0.7, (1, 0): 0.8, (1, 1): 0.9}), 'unseen_source',
      ['cs_arm_bn']))
  assert '| CS-ARM-BN | 0.177 / 0.106 |' in text
  agg = report.aggregate(_results({(0, 0): 0.5, (0, 1): 0.7, (1, 0): 0.8, (1, 1): 0.9}))
  assert agg['n'].tolist() == [4] and agg['std'].iloc[0] == pytest.approx(
      np.std([0.5, 0.7, 0.8, 0.9], ddof=1))


STRONG = {'effects': {'strength': 1.3}}


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  """The study on synthetic `tiny` stores of two benchmark seeds: ERM, CS-ARM-BN and TENT (from
  the ERM model, on benchmark 0 only); ARM-CML on a stronger-effects variant of benchmark 0
  (label shift only); a 'wide' section (the same store, a wider model) on benchmark 1."""
  root = tmp_path_factory.mktemp('tiny')
  for path, seed, overrides in ((root / 'b-seed0', 0, {}), (root / 'b-seed1', 1, {}),
                                (root / 'b-strong-seed0', 0, STRONG)):
    synthetic.ensure(str(path), 'tiny', seed=seed, workers=1, progress=False, **overrides)
  config = reproduce.get_config('quick')
  config.experiment = tiny_config(str(root / 'b'))
  config.experiment.synthetic.preset = 'tiny'
  config.experiment.data.crop_size = 24
  config.experiment.train.update(max_epochs=1, steps_per_epoch=2)
  config.experiment.split.update(validation_fraction=0.25, unseen_batches_fraction=0.3,
                                 in_domain_fraction=0.25)
  config.methods = ['erm', 'cs_arm_bn', 'tent']
  config.seeds = [0]
  config.benchmark_seeds = [0, 1]
  config.benchmark_variants = {'strong': {'synthetic': STRONG, 'methods': ['arm_cml'],
                                          'label_shift_alphas': [0.01], 'benchmark_seeds': [0]}}
  config.sections = {'wide': {'overrides': {'model': {'options': {'width': 8}},
                                            'store': '{store}'},
                              'methods': ['erm'], 'benchmark_seeds': [1]},
                     # its own split and settings, no sweeps (the shape of quick's section)
                     'within_source': {'overrides': {'store': '{store}', 'split': {
                         'kind': 'batch', 'num_folds': 2, 'validation_by': 'plate',
                         'unseen_batches_fraction': 0.0, 'in_domain_fraction': 0.3}},
                         'methods': ['erm'], 'benchmark_seeds': [0], 'sweeps': [],
                         'settings': {'new_plates': 'in_domain', 'new_batches': 'test'}}}
  config.method_overrides = {'arm_cml': {'model': {'options': {'width': 4, 'context_hidden': 6}}}}
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
  per = saved.groupby(['section', 'benchmark', 'benchmark_seed', 'method']).size().to_dict()
  # erm: 3 settings + 1 alpha + 2 context sizes; cs_arm_bn also sweeps 2 control counts; tent
  # (quick: sweeps.test_time = label shift) 3 settings + 1 alpha; the variant: balanced + 1 alpha
  main = {('images', 'base', b, m): n for b in (0, 1)
          for m, n in (('erm', 6), ('cs_arm_bn', 8), ('tent', 4))
          if (m, b) != ('tent', 1)}         # quick's method_benchmark_seeds: TENT on 0 only
  assert per == {**main, ('images', 'strong', 0, 'arm_cml'): 2, ('wide', 'base', 1, 'erm'): 6,
                 ('within_source', 'base', 0, 'erm'): 2}
  within = saved[saved['section'] == 'within_source']
  assert sorted(within['setting']) == ['new_batches', 'new_plates']
  assert set(saved[saved['section'] != 'within_source']['setting']) == {
      'in_domain', 'unseen_batches', 'unseen_source'}
  assert saved['accuracy'].between(0, 1).all()
  k = saved[(saved['method'] == 'cs_arm_bn') & (saved['sweep'] == 'controls')]
  assert sorted(k['num_controls']) == [0, 0, 4, 4]
  assert (saved[saved['method'] == 'erm']['num_controls'] == 0).all()
  strong = saved[saved['benchmark'] == 'strong']
  assert set(strong['sweep_value'].fillna('')) == {'', '0.01'}
  assert set(strong['setting']) == {'unseen_source'}


def _run_dir(workdir, section, variant, bseed, trainer):
  return os.path.join(workdir, 'runs', section, variant, f'seed{bseed}', trainer, 'fold0_seed0')


def test_each_benchmark_trains_on_its_own_store(smoke):
  config, workdir, _ = smoke
  def run_config(*where):
    with open(os.path.join(_run_dir(workdir, *where), 'config.json')) as f:
      return json.load(f)
  stores = {b: run_config('images', 'base', b, 'erm')['store'] for b in (0, 1)}
  assert stores[0].endswith('b-seed0') and stores[1].endswith('b-seed1')
  strong = run_config('images', 'strong', 0, 'arm_cml')
  assert strong['store'].endswith('b-strong-seed0')
  assert strong['model']['options']['context_hidden'] == 6        # config.method_overrides
  with open(os.path.join(_run_dir(workdir, 'images', 'strong', 0, 'arm_cml'), 'model.json')) as f:
    assert json.load(f)['model']['options']['context_hidden'] == 6
  made_by = store_lib.read_manifest(strong['store'])['created_by']
  assert made_by['config']['effects']['strength'] == 1.3 and made_by['seed'] == 0
  wide = run_config('wide', 'base', 1, 'erm')
  assert wide['store'] == stores[1] and wide['model']['options']['width'] == 8
  assert run_config('images', 'base', 1, 'erm')['model']['options']['width'] == 4
  # TENT trains nothing: it adapts the ERM model of its benchmark
  assert not os.path.exists(_run_dir(workdir, 'images', 'base', 0, 'tent'))
  tent = os.path.join(_run_dir(workdir, 'images', 'base', 0, 'erm'), 'study', 'tent')
  assert len(os.listdir(tent)) == 4


def _cache_files(workdir):
  """Every trained run's results.json and every cached evaluation: path -> (inode, mtime, bytes)."""
  runs = os.path.join(workdir, 'runs', '*', '*', '*', '*', '*')
  paths = (glob.glob(os.path.join(runs, 'results.json')) +
           glob.glob(os.path.join(runs, 'study', '*', '*.json')))
  return {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns, open(p, 'rb').read()) for p in paths}


def test_study_resumes_from_its_caches(smoke, monkeypatch):
  config, workdir, results = smoke
  cached = _cache_files(workdir)
  # 7 trained models (erm, cs_arm_bn per benchmark seed; arm_cml; wide and within-source erm),
  # one file per row
  assert len(cached) == 7 + len(results)

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
  in_domain = ((results['method'] == 'cs_arm_bn') & (results['setting'] == 'in_domain') &
               (results['sweep'] == 'none'))
  results.loc[in_domain, 'accuracy'] = [0.4, 0.6]
  results.to_csv(path, index=False)
  text = report.write(workdir, study.paper_numbers(), 'unseen_source',
                      'python experiments/reproduce.py')
  assert f'0.500 ± {np.std([0.4, 0.6], ddof=1):.3f} (n=2)' in text
  assert '2 benchmark seeds × 1 folds × 1 training seeds' in text
  assert os.path.exists(os.path.join(workdir, 'summary.md'))
  for name in ('accuracy_by_setting', 'accuracy_vs_label_shift', 'accuracy_vs_context_size',
               'accuracy_vs_controls'):
    assert os.path.getsize(os.path.join(workdir, f'{name}.png')) > 1000
  main = results[(results['section'] == 'images') & (results['benchmark'] == 'base')]
  erm_unseen = main[(main['method'] == 'erm') & (main['setting'] == 'unseen_source') &
                    (main['sweep'] == 'none')]['accuracy']
  assert f'{erm_unseen.mean():.3f} ± {erm_unseen.std(ddof=1):.3f} (n=2)' in text
  for row in ('| ARM-CML [strong] |', '| ERM [wide] |', '| TENT |'):
    assert row in text
  within = results[(results['section'] == 'within_source') & (results['setting'] == 'new_batches')]
  assert ('## Within one lab' in text and '| method | new plates of its lab | new batches of its '
          "lab |\n|---|---|---|\n| ERM [within_source] | " in text)
  assert (f"| ResNet, new experimental batches | 0.862 ± 0.060 | {within['accuracy'].iloc[0]:.3f}"
          ' ± 0.000 (n=1) (ERM [within_source], new batches of its lab) |' in text)
  assert '## Where the spread comes from' in text


def test_embedding_features_cover_the_held_out_parts(smoke):
  config, workdir, _ = smoke
  frame = study.embedding_frame(config, workdir, 'cs_arm_bn', 0, 0, benchmark_seed=1)
  features = frame.filter(regex=r'^feature_')
  assert features.shape[1] == 8 and np.isfinite(features.to_numpy()).all()   # cnn: 4 * 2 channels
  assert frame['Metadata_Source'].nunique() == 3


def test_worker_processes_compute_what_the_sequential_study_does(smoke, tmp_path, monkeypatch):
  config, _, results = smoke
  config = config.copy_and_resolve_references()      # the ERM model and its TENT, on benchmark 0
  config.methods, config.benchmark_seeds = ['erm', 'tent'], [0]
  config.benchmark_variants, config.sections = {}, {}
  def in_parent(*args, **kwargs):
    raise AssertionError('the parent trained or evaluated: the workers should have')
  monkeypatch.setattr(loop, 'train_and_evaluate', in_parent)   # spawned workers import their own
  monkeypatch.setattr(loop, 'restore_variables', in_parent)
  parallel = study.run(config, str(tmp_path), jobs=2)
  expected = results[(results['benchmark_seed'] == 0) & (results['section'] == 'images') &
                     results['method'].isin(['erm', 'tent'])]
  assert len(parallel) == 10
  pd.testing.assert_frame_equal(parallel, expected.reset_index(drop=True))
