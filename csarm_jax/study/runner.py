"""The reproduction study: methods x settings x test-time sweeps x benchmarks x folds x seeds.

A *benchmark* is one store the study trains on (``Benchmark``): the main section's synthetic
preset built with each of ``c.benchmark_seeds``, each variant of it (``c.benchmark_variants``, e.g.
stronger technical effects, scored in the label-shift sweep only) and each extra section
(``c.sections``: the same runner on an overridden experiment config, e.g. another model or a
feature store). Methods that train identically (ERM, AdaBN and AdaBN with controls differ only at
test time) share one trained model per (benchmark, fold, seed); test-time adaptation methods (TENT,
DeYO, ROID) adapt the study's own model of their source method (``name@source``, default
``c.tta_source``). Every test-time rule and sweep is an evaluation of a trained model, never a
retraining. Each model trains in ``runs/<section>/<benchmark>/seed<b>/<trainer>/fold<f>_seed<s>``
(resuming if interrupted) and each evaluation is cached as a JSON file beside it, so a killed study
continues where it stopped. ``results.csv`` has one row per section x benchmark x benchmark seed x
method x setting x sweep value x fold x seed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import pandas as pd
from absl import logging

from csarm_jax import methods, nested
from csarm_jax.evaluation import metrics as metrics_lib
from csarm_jax.evaluation import protocol
from csarm_jax.training import cross_validation, experiment, loop
from csarm_jax.evaluation.step import compiled_eval_step

MAIN_SECTION, BASE = 'images', 'base'   # the main section; the benchmark without a variant
WITHIN_SOURCE = 'within_source'   # the section the paper's within-source figures compare with
# Placeholders a section's overrides may hold that only a run knows: filled per (fold, seed).
RUN_FIELDS = ('fold', 'seed')
SWEEPS = ('label_shift', 'perturbed', 'controls')
RESULT_COLUMNS = ('section', 'benchmark', 'benchmark_seed', 'method', 'setting', 'sweep',
                  'sweep_value', 'fold', 'seed', 'num_perturbed', 'num_controls', 'alpha',
                  'num_images', 'accuracy', 'balanced_accuracy', 'macro_f1', 'well_accuracy')


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """One evaluation of a trained model: a fold part under a (possibly swept) test protocol."""
  setting: str                       # display name, e.g. 'unseen_source'
  part: str                          # fold part: test | in_domain | unseen_batches | validation
  sweep: str = 'none'                # none | label_shift | perturbed | controls
  sweep_value: str = ''
  num_perturbed: int | None = None   # None: the config's eval default
  num_controls: int | None = None
  alpha: float | None = None
  max_images_per_plate: int | None = None

  @property
  def name(self) -> str:
    return f'{self.setting}.{self.sweep}' + (f'={self.sweep_value}' if self.sweep_value else '')


# Method fields that only decide how a trained model is used at test; every other field (and the
# Method's type) may change what training produces, so a new field never shares a model by accident.
TEST_ONLY_FIELDS = frozenset({'name', 'eval_controls', 'eval_norm', 'test_time'})


def training_key(method: methods.Method) -> tuple:
  """Methods with equal keys train the same model."""
  return (type(method).__qualname__,) + tuple(
      (f.name, repr(getattr(method, f.name))) for f in dataclasses.fields(method)
      if f.name not in TEST_ONLY_FIELDS)


def study_method(name: str, tta_source: str = 'erm') -> tuple[methods.Method, str | None]:
  """(method, the training method whose model it adapts) of a study method name: a training
  method ('cs_arm_bn': source None) or a test-time method, optionally naming its source
  ('tent', 'tent@cs_arm_bn'; default ``tta_source``)."""
  base, _, source = name.partition('@')
  method = methods.get(base)
  if method.trains:
    if source:
      raise ValueError(f'study method {name!r}: only a test-time method adapts a source (@...)')
    return method, None
  source = source or tta_source
  if not methods.get(source).trains:
    raise ValueError(f'study method {name!r}: its source {source!r} must be a training method')
  return method, source


def training_groups(names: list[str], tta_source: str = 'erm') -> dict[str, list[str]]:
  """{method that trains: [study methods evaluated on its model]}, in the given order. A
  test-time method's source trains its group, so the model adapted is the source's own."""
  trainers: dict[tuple, str] = {}
  members: dict[tuple, list[str]] = {}
  adapted: dict[tuple, str] = {}
  for name in names:
    method, source = study_method(name, tta_source)
    key = training_key(methods.get(source) if source else method)
    if source and adapted.setdefault(key, source) != source:
      raise ValueError(f'study methods adapt both {adapted[key]!r} and {source!r}, which train '
                       f'the same model: adapt one of them')
    trainers.setdefault(key, source or name)
    members.setdefault(key, []).append(name)
  return {adapted.get(k, trainers[k]): m for k, m in members.items()}


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One store the study trains and scores on, and what it runs there."""
  section: str                          # MAIN_SECTION or a c.sections name
  variant: str                          # BASE or a c.benchmark_variants name
  seed: int                             # benchmark seed (the synthetic store's seed)
  experiment: ml_collections.ConfigDict   # the experiment config before method, fold and seed
  methods: tuple[str, ...]
  label_shift_alphas: tuple[float, ...] | None = None   # a variant: only these label-shift specs
  # A section's own settings (display name -> fold part; None: config.settings) and the sweeps it
  # is scored in (None: every sweep), e.g. the within-source setting on its own split.
  settings: dict[str, str] | None = None
  sweeps: tuple[str, ...] | None = None

  def dir(self, workdir: str) -> str:
    return os.path.join(workdir, 'runs', self.section, self.variant, f'seed{self.seed}')


def _seed_store(experiment_config: ml_collections.ConfigDict, seed: int, variant: str):
  """A copy of the experiment config on the synthetic store of benchmark seed ``seed``."""
  cfg = ml_collections.ConfigDict(experiment_config.to_dict())
  if cfg.synthetic.preset:
    suffix = '' if variant == BASE else f'-{variant}'
    cfg.store, cfg.synthetic.seed = f'{cfg.store}{suffix}-seed{seed}', int(seed)
  return cfg


# Free-form experiment config fields: overrides may add keys under them.
FREE_FORM = ('model.options', 'tta.settings', 'synthetic.overrides')


def _format(value: Any, fields: dict[str, Any], strict: bool = True) -> Any:
  """'{name}' in the strings of ``value`` (nested dicts, lists, tuples) filled from ``fields``;
  ``strict``: str.format (an unknown name raises KeyError), else only these names replaced."""
  if isinstance(value, dict):
    return {k: _format(v, fields, strict) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_format(v, fields, strict) for v in value)
  if isinstance(value, str):
    if strict:
      return value.format(**fields)
    for name, v in fields.items():
      value = value.replace('{' + name + '}', str(v))
  return value


def with_overrides(cfg: ml_collections.ConfigDict, overrides: Any,
                   fields: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``cfg`` with ``overrides`` (nested, e.g. {'model': {'options': {'width': 8}}})
  applied; '{name}' in string values is filled from ``fields`` (workdir, benchmark_seed, store;
  a section's '{fold}' and '{seed}' (training seed) stay for ``_run_config`` to fill per run).
  An unknown field raises KeyError (new keys only under FREE_FORM fields). A FREE_FORM field in
  ``overrides`` replaces the config's as a whole: one model's options do not carry over to
  another model."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  if isinstance(overrides, ml_collections.ConfigDict):
    overrides = overrides.to_dict()
  for field in FREE_FORM:
    *parents, leaf = field.split('.')
    given, target = overrides, cfg
    for parent in parents:
      given, target = (given or {}).get(parent), target[parent]
    if isinstance(given, dict) and leaf in given:
      target[leaf] = ml_collections.ConfigDict()
  for key, value in nested.flatten(overrides).items():
    *parents, leaf = key.split('.')
    target = cfg
    for i, parent in enumerate(parents):
      free = '.'.join(parents[:i]).startswith(FREE_FORM)
      if parent not in target and free:
        target[parent] = ml_collections.ConfigDict()
      if not isinstance(target.get(parent), ml_collections.ConfigDict):
        raise KeyError(f'override {key!r}: no such experiment config field')
      target = target[parent]
    if leaf not in target and not '.'.join(parents).startswith(FREE_FORM):
      raise KeyError(f'override {key!r}: no such experiment config field')
    target[leaf] = _format(value, {**{name: '{' + name + '}' for name in RUN_FIELDS}, **fields})
  return cfg


def _applies(entry: ml_collections.ConfigDict, seed: int) -> bool:
  """Whether a variant or section runs on benchmark seed ``seed`` (its benchmark_seeds; all)."""
  seeds = entry.get('benchmark_seeds')
  return seeds is None or seed in seeds


def benchmarks(config: ml_collections.ConfigDict, workdir: str) -> list[Benchmark]:
  """Every benchmark of the study, in the order it runs: per benchmark seed the main section,
  its variants, then the extra sections (each variant or section on its ``benchmark_seeds``,
  default all)."""
  seeds = tuple(int(b) for b in config.get('benchmark_seeds', (0,)))
  if not config.experiment.synthetic.preset and len(seeds) > 1:
    raise ValueError('config.benchmark_seeds: a store that is not synthetic has one realisation')
  out = []
  for seed in seeds:
    main = _seed_store(config.experiment, seed, BASE)
    # method -> its benchmark seeds; 'tent' also holds for 'tent@cs_arm_bn' (a config key can't
    # hold '@' and stay settable from the command line)
    only = config.get('method_benchmark_seeds') or {}
    unknown = sorted(set(only) - set(methods.METHODS))
    if unknown:
      raise ValueError(f'config.method_benchmark_seeds: {unknown} name no method (choose from '
                       f'{sorted(methods.METHODS)})')
    out.append(Benchmark(MAIN_SECTION, BASE, seed, main, tuple(
        m for m in config.methods if seed in only.get(m.partition('@')[0], (seed,)))))
    variants = config.get('benchmark_variants') if config.experiment.synthetic.preset else None
    for name, v in (variants or {}).items():       # a store that is not synthetic has none
      if _applies(v, seed):
        cfg = with_overrides(_seed_store(config.experiment, seed, name),
                             {'synthetic': {'overrides': v.synthetic.to_dict()}}, {})
        out.append(Benchmark(MAIN_SECTION, name, seed, cfg, tuple(v.methods),
                             tuple(float(a) for a in v.label_shift_alphas)))
    fields = {'workdir': workdir, 'benchmark_seed': seed, 'store': main.store}
    for name, section in (config.get('sections') or {}).items():
      if name == MAIN_SECTION:
        raise ValueError(f'config.sections: {MAIN_SECTION!r} is the main section')
      if _applies(section, seed):
        settings, sweeps = section.get('settings'), section.get('sweeps')
        out.append(Benchmark(
            name, BASE, seed, with_overrides(main, section.overrides, fields),
            tuple(section.methods), settings=None if settings is None else settings.to_dict(),
            sweeps=None if sweeps is None else _known_sweeps(f'config.sections.{name}', sweeps)))
  return out


def _known_sweeps(where: str, sweeps) -> tuple[str, ...]:
  unknown = sorted(set(sweeps) - set(SWEEPS))
  if unknown:
    raise ValueError(f'{where}.sweeps: {unknown} name no sweep (choose from {list(SWEEPS)})')
  return tuple(sweeps)


def sweep_setting(config: ml_collections.ConfigDict, settings: dict[str, str] | None = None) -> str:
  """The setting whose fold part the test-time sweeps evaluate (of ``settings``, default
  ``config.settings``)."""
  for setting, part in (settings or config.settings).items():
    if part == config.sweeps.part:
      return setting
  raise ValueError(f'config.sweeps.part: {config.sweeps.part!r} is not a part of the settings '
                   f'{dict(settings or config.settings)}')


def eval_specs(config: ml_collections.ConfigDict, method: methods.Method,
               label_shift_alphas: tuple[float, ...] | None = None,
               settings: dict[str, str] | None = None,
               sweeps: tuple[str, ...] | None = None) -> list[EvalSpec]:
  """Every evaluation the study asks of one method (sweeps only where they apply; a test-time
  adaptation method only in ``config.sweeps.test_time``, default all, and at
  ``config.sweeps.test_time_alphas``, default every label-shift alpha); with
  ``label_shift_alphas`` (a benchmark variant) only the sweep setting and those alphas. A section
  passes its own ``settings`` (default ``config.settings``) and ``sweeps`` (default all)."""
  s = config.sweeps
  settings = settings or config.settings
  if label_shift_alphas is not None:
    setting = sweep_setting(config, settings)
    return [EvalSpec(setting, s.part)] + [
        EvalSpec(sweep='label_shift', sweep_value=f'{a:g}', alpha=float(a), setting=setting,
                 part=s.part) for a in label_shift_alphas]
  specs = [EvalSpec(setting, part) for setting, part in settings.items()]
  sweeps = SWEEPS if sweeps is None else sweeps
  if not method.trains:
    sweeps = tuple(w for w in sweeps if w in s.get('test_time', SWEEPS))
  if not sweeps:
    return specs
  setting = sweep_setting(config, settings)
  common = dict(setting=setting, part=s.part, max_images_per_plate=s.max_images_per_plate)
  alphas = s.label_shift_alphas
  if not method.trains and s.get('test_time_alphas') is not None:
    alphas = s.test_time_alphas
  for alpha in alphas if 'label_shift' in sweeps else ():
    specs.append(EvalSpec(sweep='label_shift', sweep_value=f'{alpha:g}', alpha=float(alpha),
                          setting=setting, part=s.part))
  for n in s.perturbed if 'perturbed' in sweeps else ():
    specs.append(EvalSpec(sweep='perturbed', sweep_value=str(n), num_perturbed=int(n), **common))
  if method.eval_controls and 'controls' in sweeps:
    for k in s.controls:
      if k == 0 and method.statistics_from == 'controls':
        continue                      # BEN's statistics come from the controls: K = 0 is undefined
      specs.append(EvalSpec(sweep='controls', sweep_value=str(k), num_controls=int(k), **common))
  return specs


def trainer_dir(workdir: str, bench: Benchmark, trainer: str, fold: int, seed: int) -> str:
  """Where the model that ``trainer`` trains for (fold, seed) on ``bench`` lives."""
  return cross_validation.run_dir(os.path.join(bench.dir(workdir), trainer), fold, seed)


def _run_config(experiment_config: ml_collections.ConfigDict, method: str, fold: int, seed: int,
                source_dir: str | None = None):
  cfg = ml_collections.ConfigDict(_format(experiment_config.to_dict(),
                                          {'fold': int(fold), 'seed': int(seed)}, strict=False))
  cfg.method, cfg.split.fold, cfg.seed = method, int(fold), int(seed)
  cfg.eval.final_evaluation = False
  if source_dir is not None:
    cfg.tta.source = source_dir
  return cfg


def spec_protocol(base: protocol.Protocol, spec: EvalSpec) -> protocol.Protocol:
  """The test protocol of one evaluation: the run's, with the spec's swept values."""
  swept = {k: v for k, v in (('num_perturbed', spec.num_perturbed),
                             ('num_controls', spec.num_controls)) if v is not None}
  return dataclasses.replace(base, max_images_per_plate=spec.max_images_per_plate, **swept)


def _evaluate(exp, eval_step, variables, spec: EvalSpec) -> dict[str, Any]:
  rule = spec_protocol(exp.protocol, spec)
  plates = getattr(exp.fold, spec.part)
  mode = 'label_shift' if spec.alpha is not None else 'chunks'
  with jax.transfer_guard(exp.config.train.transfer_guard):
    frame, _ = protocol.evaluate(exp, eval_step, variables, plates, rule, mode, spec.alpha)
  summary = metrics_lib.summarize(frame, exp.store.class_names)
  return {'num_perturbed': rule.num_perturbed,
          'num_controls': rule.num_controls if exp.method.eval_controls else 0,
          'alpha': spec.alpha, **{k: summary[k] for k in ('num_images', 'accuracy',
                                                           'balanced_accuracy', 'macro_f1',
                                                           'well_accuracy')}}


def trainer_experiment(config, bench: Benchmark, trainer: str) -> ml_collections.ConfigDict:
  """The experiment config of the model ``trainer`` trains on ``bench`` (and of every method
  evaluated on it): the benchmark's, with ``config.method_overrides[trainer]`` (e.g. a smaller
  ARM-CML context net for a quick study)."""
  overrides = (config.get('method_overrides') or {}).get(trainer)
  return with_overrides(bench.experiment, overrides, {}) if overrides else bench.experiment


def _build(config, bench: Benchmark, trainer: str, name: str, run_dir: str, fold: int,
           seed: int):
  """The experiment of study method ``name`` on the model ``trainer`` trained in ``run_dir``."""
  _, source = study_method(name, config.get('tta_source', 'erm'))
  cfg = _run_config(trainer_experiment(config, bench, trainer), name.partition('@')[0], fold,
                    seed, run_dir if source else None)
  return experiment.build(cfg, run_dir)


@dataclasses.dataclass(frozen=True)
class Model:
  """One model the study trains (on a benchmark, for a fold and training seed) and the study
  methods scored on it."""
  bench: Benchmark
  fold: int
  seed: int
  trainer: str
  members: tuple[str, ...]

  def dir(self, workdir: str) -> str:
    return trainer_dir(workdir, self.bench, self.trainer, self.fold, self.seed)

  @property
  def store_from_run(self) -> bool:
    """Whether its store is made from another model of the study (e.g. embeddings)."""
    return bool((self.bench.experiment.get('features') or {}).get('from_run'))


def plan(config: ml_collections.ConfigDict, workdir: str) -> list[Model]:
  """Every model of the study, in the order the study trains and scores them."""
  out = []
  for bench in benchmarks(config, workdir):
    folds = config.folds if config.folds is not None else range(
        cross_validation.num_folds(bench.experiment))
    groups = training_groups(list(bench.methods), config.get('tta_source', 'erm'))
    out.extend(Model(bench, int(fold), int(seed), trainer, tuple(members))
               for fold in folds for seed in config.seeds for trainer, members in groups.items())
  return out


def run_config(config: ml_collections.ConfigDict, model: Model) -> ml_collections.ConfigDict:
  """The experiment config ``model`` trains with."""
  return _run_config(trainer_experiment(config, model.bench, model.trainer), model.trainer,
                     model.fold, model.seed)


def train(config: ml_collections.ConfigDict, workdir: str, model: Model) -> None:
  """Trains ``model`` unless a finished run is there (resuming an interrupted one)."""
  run_dir = model.dir(workdir)
  if not os.path.exists(os.path.join(run_dir, 'results.json')):
    logging.info('training %s fold %d seed %d in %s', model.trainer, model.fold, model.seed,
                 run_dir)
    loop.train_and_evaluate(run_config(config, model), run_dir)


def evaluations(config: ml_collections.ConfigDict, workdir: str, model: Model,
                method_name: str) -> Iterator[dict]:
  """The rows of study method ``method_name`` on ``model``; each evaluation computed unless
  cached in the model's run_dir/study/."""
  bench, fold, seed, run_dir = model.bench, model.fold, model.seed, model.dir(workdir)
  exp = _build(config, bench, model.trainer, method_name, run_dir, fold, seed)
  cache_dir = os.path.join(run_dir, 'study', method_name)
  os.makedirs(cache_dir, exist_ok=True)
  variables = eval_step = None
  for spec in eval_specs(config, exp.method, bench.label_shift_alphas, bench.settings,
                         bench.sweeps):
    path = os.path.join(cache_dir, f'{spec.name}.json')
    if os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
    else:
      if variables is None:
        variables = loop.restore_variables(exp, run_dir)
        eval_step = compiled_eval_step(exp.model, exp.method, exp.preprocess, exp.mesh)
      result = _evaluate(exp, eval_step, variables, spec)
      if jax.process_index() == 0:
        with open(path, 'w') as f:
          json.dump(result, f)
    yield {'section': bench.section, 'benchmark': bench.variant, 'benchmark_seed': bench.seed,
           'method': method_name, 'setting': spec.setting, 'sweep': spec.sweep,
           'sweep_value': spec.sweep_value, 'fold': fold, 'seed': seed, **result}


def run(config: ml_collections.ConfigDict, workdir: str, jobs: int = 1,
        compilation_cache: str = '') -> pd.DataFrame:
  """Trains what is missing, evaluates what is not cached, writes and returns results.csv.
  ``jobs`` > 1: worker processes fill the caches first (``study.workers``; the rows are the same);
  ``compilation_cache``: a directory where XLA keeps compiled programs across runs and workers."""
  os.makedirs(workdir, exist_ok=True)
  if compilation_cache:
    enable_compilation_cache(compilation_cache)
  models = plan(config, workdir)
  if jobs > 1:
    from csarm_jax.study import workers
    workers.fill_caches(config, workdir, models, jobs, compilation_cache)
  rows, results = [], pd.DataFrame(columns=list(RESULT_COLUMNS))
  for model in models:
    train(config, workdir, model)
    for method_name in model.members:
      rows.extend(evaluations(config, workdir, model, method_name))
    results = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    results.to_csv(os.path.join(workdir, 'results.csv'), index=False)   # progress so far
  return results


def enable_compilation_cache(path: str) -> None:
  """XLA's persistent compilation cache in ``path``: the study compiles the same programs for
  every benchmark seed and method, and this process or a worker reuses them."""
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def main_benchmark(config: ml_collections.ConfigDict, workdir: str, seed: int) -> Benchmark:
  """The main section's benchmark of benchmark seed ``seed``."""
  return next(b for b in benchmarks(config, workdir)
              if (b.section, b.variant, b.seed) == (MAIN_SECTION, BASE, seed))


def embedding_frame(config: ml_collections.ConfigDict, workdir: str, method_name: str,
                    fold: int, seed: int, benchmark_seed: int) -> pd.DataFrame:
  """Penultimate features of held-out images of every source, under a method's test-time rule."""
  bench = main_benchmark(config, workdir, benchmark_seed)
  trainer = next(t for t, members in training_groups(
      list(config.methods), config.get('tta_source', 'erm')).items() if method_name in members)
  run_dir = trainer_dir(workdir, bench, trainer, fold, seed)
  exp = _build(config, bench, trainer, method_name, run_dir, fold, seed)
  variables = loop.restore_variables(exp, run_dir)
  eval_step = compiled_eval_step(exp.model, exp.method, exp.preprocess, exp.mesh,
                                 with_features=True)
  plates = tuple(p for part in config.embedding.parts for p in getattr(exp.fold, part))
  rule = dataclasses.replace(exp.protocol,
                             max_images_per_plate=config.embedding.max_images_per_plate)
  with jax.transfer_guard(exp.config.train.transfer_guard):
    frame, _ = protocol.evaluate(exp, eval_step, variables, plates, rule)
  frame['method'] = method_name
  return frame


def paper_numbers() -> pd.DataFrame:
  """The paper's figures (notes/paper.md §8) and the rows of our study each one compares with:
  the within-source section's (trained on one lab, as the paper's figures) and the main
  section's (new plates and batches of labs trained on beside others)."""
  within = f' [{WITHIN_SOURCE}]'
  return pd.DataFrame([
      ('erm' + within, 'new_plates', 'none', '', 0.939, 0.005, 'ResNet, training domain'),
      ('erm' + within, 'new_batches', 'none', '', 0.862, 0.060, 'ResNet, new experimental batches'),
      ('arm_bn' + within, 'new_batches', 'none', '', 0.935, 0.018,
       'meta-learning, new batches (ARM-BN?)'),
      ('cs_arm_bn' + within, 'new_batches', 'none', '', 0.935, 0.018,
       'meta-learning, new batches (CS-ARM-BN?)'),
      ('erm', 'in_domain', 'none', '', 0.939, 0.005, 'ResNet, training domain'),
      ('erm', 'unseen_batches', 'none', '', 0.862, 0.060, 'ResNet, new experimental batches'),
      ('cs_arm_bn', 'unseen_batches', 'none', '', 0.935, 0.018, 'meta-learning, new batches'),
      ('cs_arm_bn', 'unseen_source', 'label_shift', '0.01', 0.894, np.nan,
       'CS-ARM-BN, label shift alpha=0.01'),
      ('arm_bn', 'unseen_source', 'label_shift', '0.01', 0.228, np.nan,
       'ARM-BN, label shift alpha=0.01'),
  ], columns=['method', 'setting', 'sweep', 'sweep_value', 'paper_mean', 'paper_std',
              'paper_claim'])
