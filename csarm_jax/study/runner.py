"""The reproduction study: methods x settings x test-time sweeps x folds x seeds.

Methods that train identically (ERM, AdaBN and AdaBN with controls differ only at test time) share
one trained model per (fold, seed); every test-time rule and sweep is an evaluation of a trained
model, never a retraining. Each run trains in ``runs/<trainer>/fold<f>_seed<s>`` (resuming if
interrupted) and each evaluation is cached as a JSON file beside it, so a killed study continues
where it stopped. ``results.csv`` has one row per method x setting x sweep value x fold x seed.
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

from csarm_jax import methods
from csarm_jax.evaluation import metrics as metrics_lib
from csarm_jax.evaluation import protocol
from csarm_jax.training import cross_validation, experiment, loop
from csarm_jax.evaluation.step import compiled_eval_step

RESULT_COLUMNS = ('method', 'setting', 'sweep', 'sweep_value', 'fold', 'seed', 'num_perturbed',
                  'num_controls', 'alpha', 'num_images', 'accuracy', 'balanced_accuracy',
                  'macro_f1', 'well_accuracy')


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


def training_key(method: methods.Method) -> tuple:
  """Methods with equal keys train the same model."""
  return (method.train_sampling, method.train_controls, method.running_stats,
          method.statistics_from, method.objective)


def training_groups(names: list[str]) -> dict[str, list[str]]:
  """{method that trains: [methods evaluated on its model]}, in the given order."""
  groups: dict[tuple, list[str]] = {}
  for name in names:
    groups.setdefault(training_key(methods.get(name)), []).append(name)
  return {members[0]: members for members in groups.values()}


def sweep_setting(config: ml_collections.ConfigDict) -> str:
  """The setting whose fold part the test-time sweeps evaluate."""
  for setting, part in config.settings.items():
    if part == config.sweeps.part:
      return setting
  raise ValueError(f'config.sweeps.part: {config.sweeps.part!r} is not a part of config.settings')


def eval_specs(config: ml_collections.ConfigDict, method: methods.Method) -> list[EvalSpec]:
  """Every evaluation the study asks of one method (sweeps only where they apply)."""
  specs = [EvalSpec(setting, part) for setting, part in config.settings.items()]
  s = config.sweeps
  setting = sweep_setting(config)
  common = dict(setting=setting, part=s.part, max_images_per_plate=s.max_images_per_plate)
  for alpha in s.label_shift_alphas:
    specs.append(EvalSpec(sweep='label_shift', sweep_value=f'{alpha:g}', alpha=float(alpha),
                          setting=setting, part=s.part))
  for n in s.perturbed:
    specs.append(EvalSpec(sweep='perturbed', sweep_value=str(n), num_perturbed=int(n), **common))
  if method.eval_controls:
    for k in s.controls:
      if k == 0 and method.statistics_from == 'controls':
        continue                      # BEN's statistics come from the controls: K = 0 is undefined
      specs.append(EvalSpec(sweep='controls', sweep_value=str(k), num_controls=int(k), **common))
  return specs


def trainer_dir(workdir: str, trainer: str, fold: int, seed: int) -> str:
  """Where the model that ``trainer`` trains for (fold, seed) lives."""
  return cross_validation.run_dir(os.path.join(workdir, 'runs', trainer), fold, seed)


def _run_config(config: ml_collections.ConfigDict, method: str, fold: int, seed: int):
  cfg = ml_collections.ConfigDict(config.experiment.to_dict())
  cfg.method, cfg.split.fold, cfg.seed = method, int(fold), int(seed)
  cfg.eval.final_evaluation = False
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


def run_evaluations(config, method_name: str, run_dir: str, fold: int, seed: int) -> Iterator[dict]:
  """Rows for one method on one trained run; each evaluation cached in run_dir/study/."""
  cfg = _run_config(config, method_name, fold, seed)
  exp = experiment.build(cfg, run_dir)
  cache_dir = os.path.join(run_dir, 'study', method_name)
  os.makedirs(cache_dir, exist_ok=True)
  variables = eval_step = None
  for spec in eval_specs(config, exp.method):
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
    yield {'method': method_name, 'setting': spec.setting, 'sweep': spec.sweep,
           'sweep_value': spec.sweep_value, 'fold': fold, 'seed': seed, **result}


def run(config: ml_collections.ConfigDict, workdir: str) -> pd.DataFrame:
  """Trains what is missing, evaluates what is not cached, writes and returns results.csv."""
  os.makedirs(workdir, exist_ok=True)
  folds = config.folds if config.folds is not None else range(
      cross_validation.num_folds(config.experiment))
  groups = training_groups(list(config.methods))
  rows = []
  for fold in folds:
    for seed in config.seeds:
      for trainer, members in groups.items():
        run_dir = trainer_dir(workdir, trainer, fold, seed)
        if not os.path.exists(os.path.join(run_dir, 'results.json')):
          logging.info('training %s fold %d seed %d in %s', trainer, fold, seed, run_dir)
          loop.train_and_evaluate(_run_config(config, trainer, fold, seed), run_dir)
        for method_name in members:
          rows.extend(run_evaluations(config, method_name, run_dir, fold, seed))
      results = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
      results.to_csv(os.path.join(workdir, 'results.csv'), index=False)   # progress so far
  return results


def embedding_frame(config: ml_collections.ConfigDict, workdir: str, method_name: str,
                    fold: int, seed: int) -> pd.DataFrame:
  """Penultimate features of held-out images of every source, under a method's test-time rule."""
  trainer = next(t for t, members in training_groups(list(config.methods)).items()
                 if method_name in members)
  run_dir = trainer_dir(workdir, trainer, fold, seed)
  exp = experiment.build(_run_config(config, method_name, fold, seed), run_dir)
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
  """The paper's figures (notes/paper.md §8) and the row of our study each one compares with."""
  return pd.DataFrame([
      ('erm', 'in_domain', 'none', '', 0.939, 0.005, 'ResNet, training domain'),
      ('erm', 'unseen_batches', 'none', '', 0.862, 0.060, 'ResNet, new experimental batches'),
      ('cs_arm_bn', 'unseen_batches', 'none', '', 0.935, 0.018, 'meta-learning, new batches'),
      ('cs_arm_bn', 'unseen_source', 'label_shift', '0.01', 0.894, np.nan,
       'CS-ARM-BN, label shift alpha=0.01'),
      ('arm_bn', 'unseen_source', 'label_shift', '0.01', 0.228, np.nan,
       'ARM-BN, label shift alpha=0.01'),
  ], columns=['method', 'setting', 'sweep', 'sweep_value', 'paper_mean', 'paper_std',
              'paper_claim'])
