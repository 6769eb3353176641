"""The final evaluation suite of a trained run: every held-out part under every protocol mode
its ``Protocol`` asks for, written to ``workdir/eval``."""
from __future__ import annotations

import os
from typing import Any

import jax
import pandas as pd

from csarm_jax.evaluation import metrics as metrics_lib
from csarm_jax.evaluation.protocol import Protocol, evaluate
from csarm_jax.evaluation.step import compiled_eval_step

PARTS = ('test', 'unseen_batches', 'in_domain', 'validation')


def evaluation_settings(fold, protocol: Protocol, method
                        ) -> list[tuple[str, str, Any, tuple[str, ...]]]:
  """(part, mode, alpha, plates) for every evaluation ``protocol`` asks of ``fold``'s parts that
  applies to ``method`` (whole-plate statistics only where ``method.whole_plate``)."""
  settings = []
  for part in PARTS:
    plates = getattr(fold, part)
    if not plates:
      continue
    settings.append((part, 'chunks', None, plates))
    if protocol.whole_plate and method.whole_plate:
      settings.append((part, 'whole_plate', None, plates))
    for alpha in protocol.label_shift_alphas:
      settings.append((part, 'label_shift', alpha, plates))
  return settings


def evaluate_all(run, variables, protocol: Protocol, workdir: str) -> dict[str, Any]:
  """Evaluates every held-out part of ``run.fold`` and mode; writes predictions and metrics under
  workdir/eval. ``run``: a trained run's store, fold, mesh, model, method and preprocess."""
  eval_step = compiled_eval_step(run.model, run.method, run.preprocess, run.mesh)
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  results = {}
  for part, mode, alpha, plates in evaluation_settings(run.fold, protocol, run.method):
    name = f'{part}.{mode}' + (f'_alpha{alpha:g}' if alpha is not None else '')
    frame, extra = evaluate(run, eval_step, variables, plates, protocol, mode, alpha)
    summary = {**metrics_lib.summarize(frame, run.store.class_names), **extra,
               'part': part, 'mode': mode, 'alpha': alpha, 'num_plates': len(plates)}
    results[name] = summary
    if jax.process_index() == 0:
      frame.to_parquet(os.path.join(out_dir, f'{name}.predictions.parquet'), index=False)
      metrics_lib.well_predictions(frame, len(run.store.class_ids)).to_csv(
          os.path.join(out_dir, f'{name}.wells.csv'), index=False)
      metrics_lib.write(summary, run.store.class_names, os.path.join(out_dir, name))
  return results


def summary_table(results: dict[str, Any]) -> str:
  """One line per evaluation: images, accuracy, balanced accuracy, macro F1, well accuracy."""
  rows = [{'evaluation': name, 'images': r['num_images'], 'accuracy': r['accuracy'],
           'balanced_acc': r['balanced_accuracy'], 'macro_f1': r['macro_f1'],
           'well_acc': r['well_accuracy']} for name, r in results.items()]
  return pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f'{v:.3f}')
