"""All folds x seeds of one config, each run in its own workdir, reported as mean +- std.

Resumable: a run whose ``results.json`` exists is read, not retrained; an unfinished run resumes
from its checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import ml_collections
import pandas as pd

from csarm_jax.training import experiment, loop

METRICS = ('accuracy', 'balanced_accuracy', 'macro_f1', 'well_accuracy')


def num_folds(config: ml_collections.ConfigDict) -> int:
  return len(experiment.make_run_folds(config, experiment.open_run_store(config)))


def run_dir(workdir: str, fold: int, seed: int) -> str:
  return os.path.join(workdir, f'fold{fold}_seed{seed}')


def run(config: ml_collections.ConfigDict, workdir: str, folds: Sequence[int] | None = None,
        seeds: Sequence[int] = (0,)) -> pd.DataFrame:
  """One row per (fold, seed, evaluation) with the metrics in METRICS."""
  folds = range(num_folds(config)) if folds is None else folds
  rows = []
  for fold in folds:
    for seed in seeds:
      path = run_dir(workdir, fold, seed)
      results_file = os.path.join(path, 'results.json')
      if os.path.exists(results_file):
        with open(results_file) as f:
          results = json.load(f)
      else:
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.split.fold, cfg.seed = int(fold), int(seed)
        results = loop.train_and_evaluate(cfg, path)
      for name, r in results['evaluations'].items():
        rows.append({'fold': fold, 'fold_name': results['fold'], 'seed': seed, 'evaluation': name,
                     **{m: r[m] for m in METRICS}})
  return pd.DataFrame(rows)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
  """mean, sample std (ddof=1; 0 for a single run) and n per evaluation and metric."""
  grouped = runs.groupby('evaluation')[list(METRICS)]
  mean, std = grouped.mean(), grouped.std(ddof=1).fillna(0.0)
  out = pd.concat({'mean': mean, 'std': std}, axis=1).swaplevel(axis=1).sort_index(axis=1)
  out[('n', '')] = grouped.size()
  return out
