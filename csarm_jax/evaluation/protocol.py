"""Evaluation protocols: per-image predictions of a set of plates under a method's test-time rule.

* ``chunks`` (the reference protocol): per plate, a fixed permutation of its perturbed images cut
  into contexts of at most N, each with K fresh same-plate controls (methods that use them), one
  forward pass each; every perturbed image is predicted exactly once.
* ``label_shift``: contexts whose class mix is drawn from Dirichlet(alpha) (see data.contexts).
* ``whole_plate``: statistics of the whole plate (its perturbed images, plus its controls for
  methods that use them), streamed exactly with ``plate_statistics``, then every image predicted.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from csarm_jax import adaptation
from csarm_jax.data import pipeline
from csarm_jax.evaluation.metrics import prob_columns
from csarm_jax.nn import RUNNING
from csarm_jax import parallel


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def predictions_frame(store, rows: np.ndarray, logits: np.ndarray, context: np.ndarray,
                      features: np.ndarray | None = None) -> pd.DataFrame:
  """One row per predicted image: store metadata, label, pred, class probabilities, context id
  (and ``feature_<i>`` columns when features are given)."""
  probs = _softmax(logits)
  frame = pd.DataFrame(probs, columns=prob_columns(probs.shape[1]))
  if features is not None:
    frame = pd.concat([frame, pd.DataFrame(features, columns=[f'feature_{i}' for i in
                                                              range(features.shape[1])])], axis=1)
  frame.insert(0, 'row', rows.astype(np.int64))
  frame.insert(1, 'context', context.astype(np.int64))
  frame.insert(2, 'pred', probs.argmax(axis=1))
  meta = store.table.set_index('row')
  joined = meta.loc[frame['row']].reset_index()
  return pd.concat([joined, frame.drop(columns='row')], axis=1)


def context_batches(store, plates, method, *, num_perturbed: int, num_controls: int,
                    contexts_per_step: int, crop_size: int | None, seed: int, too_few: str,
                    num_threads: int = 2, alpha: float | None = None, require_labels: bool = True,
                    max_images_per_plate: int | None = None):
  """The evaluation batches of ``plates`` under ``method``'s test-time rule -- the one builder of
  evaluation and prediction (controls only for methods that use them; this process's share)."""
  return pipeline.evaluation_batches(
      store, plates, num_perturbed=num_perturbed,
      num_controls=num_controls if method.eval_controls else 0,
      contexts_per_batch=contexts_per_step, crop_size=crop_size if store.kind == 'images' else None,
      seed=seed, label_shift_alpha=alpha, too_few=too_few, require_labels=require_labels,
      max_images_per_plate=max_images_per_plate, process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=num_threads)


def _eval_batches(exp, plates, alpha: float | None = None):
  c = exp.config
  return context_batches(
      exp.store, plates, exp.method, num_perturbed=c.eval.num_perturbed,
      num_controls=c.eval.num_controls, contexts_per_step=c.eval.contexts_per_step,
      crop_size=c.data.crop_size, seed=c.eval.label_shift_seed if alpha is not None else c.eval.seed,
      too_few=c.data.too_few, num_threads=c.data.num_threads, alpha=alpha,
      max_images_per_plate=c.eval.max_images_per_plate)


def run_contexts(store, mesh, eval_step, variables, batches: Iterable[dict[str, np.ndarray]]
                 ) -> tuple[pd.DataFrame, float, int]:
  """(predictions of the perturbed rows, summed loss, labelled rows) over evaluation batches."""
  rows, logits, contexts, features = [], [], [], []
  loss_sum, labelled, offset = 0.0, 0, 0
  for local in batches:
    local = {**local, 'rows': np.asarray(local['rows'], np.int32)}
    out = eval_step(variables, parallel.global_batch(local, mesh))
    gathered = multihost_utils.process_allgather(
        {**out,
         'rows': parallel.global_batch({'r': local['rows']}, mesh)['r'],
         'keep': parallel.global_batch({'k': (local['mask'] > 0) & ~local['is_control']}, mesh)['k']},
        tiled=True)
    keep = np.asarray(gathered['keep']) & (np.asarray(gathered['rows']) >= 0)
    num_contexts = keep.shape[0]
    rows.append(np.asarray(gathered['rows'])[keep])
    logits.append(np.asarray(gathered['logits'])[keep])
    if 'features' in gathered:
      features.append(np.asarray(gathered['features'])[keep])
    contexts.append(np.broadcast_to((offset + np.arange(num_contexts))[:, None], keep.shape)[keep])
    loss_sum += float(np.sum(gathered['loss_sum']))
    labelled += int(np.sum(gathered['labelled']))
    offset += num_contexts
  if not rows:
    raise ValueError('evaluation produced no contexts')
  frame = predictions_frame(store, np.concatenate(rows), np.concatenate(logits),
                            np.concatenate(contexts),
                            np.concatenate(features) if features else None)
  return frame, loss_sum, labelled


def whole_plate_predictions(exp, variables, plates) -> pd.DataFrame:
  """Each plate adapted with the statistics of all its images (streamed, exact), then predicted."""
  c, method, model = exp.config, exp.method, exp.model
  crop = c.data.crop_size if exp.store.kind == 'images' else None
  plates, contexts = pipeline.whole_plates(exp.store, plates, require_controls=method.eval_controls)
  predict = jax.jit(adaptation.predict, static_argnums=0)
  running = jax.jit(lambda v, x: model.apply(v, x, norm=RUNNING))
  rows, logits, ids = [], [], []
  for i, context in enumerate(contexts):
    def chunks():
      for b in pipeline.context_chunks(exp.store, context, c.eval.chunk_size, crop):
        use = b['mask'] * (~b['is_control'] | method.eval_controls)   # drop controls if unused
        yield exp.preprocess(b['images']), method.weights(jnp.asarray(use), jnp.asarray(b['is_control']))
    if method.eval_norm != RUNNING:
      stats = adaptation.plate_statistics(model, variables, chunks=chunks)
    for b in pipeline.context_chunks(exp.store, context, c.eval.chunk_size, crop):
      keep = (b['mask'] > 0) & ~b['is_control']
      x = exp.preprocess(b['images'])
      out = running(variables, x) if method.eval_norm == RUNNING else predict(model, variables, stats, x)
      rows.append(b['rows'][keep])
      logits.append(np.asarray(out)[keep])
      ids.append(np.full(int(keep.sum()), i))
  return predictions_frame(exp.store, np.concatenate(rows), np.concatenate(logits), np.concatenate(ids))


def evaluate(exp, eval_step, variables, plates, mode: str = 'chunks', alpha: float | None = None
             ) -> tuple[pd.DataFrame, dict[str, Any]]:
  """Predictions and loss of ``plates`` under ``mode`` ('chunks' | 'label_shift' | 'whole_plate')."""
  if mode == 'whole_plate':
    return whole_plate_predictions(exp, variables, plates), {}
  batches = _eval_batches(exp, plates, alpha=alpha if mode == 'label_shift' else None)
  frame, loss_sum, labelled = run_contexts(exp.store, exp.mesh, eval_step, variables, batches)
  return frame, {'loss': loss_sum / max(labelled, 1), 'labelled': labelled}
