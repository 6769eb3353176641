"""Metrics from a table of per-image predictions (scikit-learn does the arithmetic).

The predictions table has one row per perturbed image: ``label`` (true class id), ``pred``,
``prob_<k>`` class probabilities and the store's ``Metadata_*`` columns. ``summarize`` gives image-
and well-level accuracy, balanced accuracy, macro-F1, per-class, per-plate and per-source figures
and the confusion matrix.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as skm


def prob_columns(num_classes: int) -> list[str]:
  return [f'prob_{k}' for k in range(num_classes)]


def entropy(probs: np.ndarray) -> np.ndarray:
  """Predictive entropy (nats) of each row of class probabilities."""
  p = np.clip(probs, 1e-12, 1.0)
  return -(p * np.log(p)).sum(axis=-1)


def well_predictions(predictions: pd.DataFrame, num_classes: int) -> pd.DataFrame:
  """One row per (plate, well): mean class probabilities of its images, argmax, entropy, label."""
  cols = prob_columns(num_classes)
  keys = ['Metadata_Source', 'Metadata_Batch', 'Metadata_Plate', 'Metadata_Well']
  keys = [k for k in keys if k in predictions.columns]
  agg = {c: 'mean' for c in cols}
  agg['pred'] = 'size'
  if 'label' in predictions.columns:
    agg['label'] = 'first'
  wells = predictions.groupby(keys, sort=True).agg(agg).rename(columns={'pred': 'num_images'})
  probs = wells[cols].to_numpy()
  wells['pred'] = probs.argmax(axis=1)
  wells['entropy'] = entropy(probs)
  return wells.reset_index()


def _group_accuracy(frame: pd.DataFrame, column: str) -> dict[str, dict[str, float]]:
  return {str(key): {'accuracy': float((g['pred'] == g['label']).mean()), 'n': int(len(g))}
          for key, g in frame.groupby(column, sort=True)}


def summarize(predictions: pd.DataFrame, class_names: Sequence[str]) -> dict[str, Any]:
  """Every metric of one evaluation, JSON-serialisable."""
  k = len(class_names)
  if len(predictions) == 0:
    raise ValueError('no predictions to score')
  probs = predictions[prob_columns(k)].to_numpy()
  if not np.isfinite(probs).all():     # never scored, never written: a NaN would read as class 0
    raise FloatingPointError(f'{int((~np.isfinite(probs).all(axis=1)).sum())} of {len(probs)} '
                             f'predictions are NaN or inf; the parameters or inputs are not finite')
  y, p = predictions['label'].to_numpy(), predictions['pred'].to_numpy()
  labels = list(range(k))
  precision, recall, f1, support = skm.precision_recall_fscore_support(
      y, p, labels=labels, zero_division=0)
  wells = well_predictions(predictions, k)
  present = sorted(set(y.tolist()))
  return {
      'num_images': int(len(y)),
      'accuracy': float(skm.accuracy_score(y, p)),
      'balanced_accuracy': float(np.mean(recall[present])),
      'macro_f1': float(np.mean(f1[present])),
      'well_accuracy': float((wells['pred'] == wells['label']).mean()),
      'num_wells': int(len(wells)),
      'mean_entropy': float(entropy(probs).mean()),
      'per_class': {name: {'precision': float(precision[i]), 'recall': float(recall[i]),
                           'f1': float(f1[i]), 'support': int(support[i])}
                    for i, name in enumerate(class_names)},
      'per_plate': _group_accuracy(predictions, 'Metadata_Plate'),
      'per_source': _group_accuracy(predictions, 'Metadata_Source'),
      'confusion_matrix': skm.confusion_matrix(y, p, labels=labels).tolist(),
  }


def write(summary: dict[str, Any], class_names: Sequence[str], prefix: str) -> None:
  """``prefix.metrics.json`` plus CSVs of the per-class, per-plate figures and confusion matrix."""
  with open(f'{prefix}.metrics.json', 'w') as f:
    json.dump(summary, f, indent=1)
  pd.DataFrame(summary['per_class']).T.rename_axis('class').to_csv(f'{prefix}.per_class.csv')
  pd.DataFrame(summary['per_plate']).T.rename_axis('plate').to_csv(f'{prefix}.per_plate.csv')
  pd.DataFrame(summary['confusion_matrix'], index=list(class_names),
               columns=list(class_names)).rename_axis('true \\ predicted').to_csv(
                   f'{prefix}.confusion.csv')
