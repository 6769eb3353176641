"""Evaluation protocols: per-image predictions of a set of plates under a method's test-time rule.

* ``chunks`` (the reference protocol): per plate, a fixed permutation of its perturbed images cut
  into contexts of at most N, each with K fresh same-plate controls (methods that use them), one
  forward pass each; every perturbed image is predicted exactly once.
* ``label_shift``: contexts whose class mix is drawn from Dirichlet(alpha) (see data.contexts).
* ``whole_plate``: statistics of the whole plate (its perturbed images, plus its controls for
  methods that use them), streamed exactly with ``plate_statistics``, then every image predicted.

A ``Protocol`` holds every setting of these, built once from a config or an export's spec and
passed explicitly; a test-time sweep is a ``dataclasses.replace``d protocol.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import numpy as np
import pandas as pd
import jax
from jax.experimental import multihost_utils

from csarm_jax.data import normalization, pipeline
from csarm_jax.evaluation import plates as plate_eval
from csarm_jax.evaluation.metrics import prob_columns
from csarm_jax import parallel

MODES = ('chunks', 'label_shift', 'whole_plate')


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How held-out plates are evaluated (and new plates predicted)."""
  num_perturbed: int                      # perturbed images per test context (N)
  num_controls: int                       # same-plate controls per test context (K), if used
  seed: int                               # the fixed permutation of each plate's images
  too_few: str                            # plates short of controls: 'replace' | 'pad'
  crop_size: int | None                   # centre crop; None for feature stores
  contexts_per_step: int = 8              # contexts per compiled evaluation step
  max_images_per_plate: int | None = None   # a fixed seeded subset of each plate (None: all)
  label_shift_alphas: tuple[float, ...] = ()   # the suite's Dirichlet label-shift evaluations
  label_shift_seed: int = 5678
  whole_plate: bool = False               # the suite also evaluates whole-plate statistics
  chunk_size: int = 256                   # rows per pass when streaming whole plates
  require_labels: bool = True             # False: unlabelled perturbed images (prediction)
  num_threads: int = 2                    # reading threads

  @classmethod
  def from_config(cls, config, store_kind: str) -> Protocol:
    """A run's protocol: ``config.eval`` and the data fields it shares with training."""
    e = config.eval
    return cls(num_perturbed=e.num_perturbed, num_controls=e.num_controls, seed=e.seed,
               too_few=config.data.too_few,
               crop_size=config.data.crop_size if store_kind == 'images' else None,
               contexts_per_step=e.contexts_per_step,
               max_images_per_plate=e.max_images_per_plate,
               label_shift_alphas=tuple(float(a) for a in e.label_shift_alphas),
               label_shift_seed=e.label_shift_seed, whole_plate=bool(e.whole_plate),
               chunk_size=e.chunk_size, num_threads=config.data.num_threads)

  @classmethod
  def from_spec(cls, spec: dict[str, Any], contexts_per_step: int = 8) -> Protocol:
    """An export's protocol (its ``model.json``: ``spec['eval']``, ``spec['crop_size']``), for
    predicting unlabelled plates."""
    e = {'too_few': 'replace', **spec['eval']}   # exports made before it was recorded
    return cls(num_perturbed=e['num_perturbed'], num_controls=e['num_controls'], seed=e['seed'],
               too_few=e['too_few'], crop_size=spec['crop_size'],
               contexts_per_step=contexts_per_step, require_labels=False)

  def spec(self) -> dict[str, Any]:
    """What an export records to rebuild this protocol (``from_spec``)."""
    return {'num_perturbed': self.num_perturbed, 'num_controls': self.num_controls,
            'seed': self.seed, 'too_few': self.too_few}


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


def context_batches(store, plates, method, protocol: Protocol, alpha: float | None = None):
  """The evaluation batches of ``plates`` under ``method``'s test-time rule -- the one builder of
  evaluation and prediction (controls only for methods that use them; this process's share).
  ``alpha`` given: Dirichlet(alpha) label-shift contexts."""
  return pipeline.evaluation_batches(
      store, plates, num_perturbed=protocol.num_perturbed,
      num_controls=protocol.num_controls if method.eval_controls else 0,
      contexts_per_batch=protocol.contexts_per_step, crop_size=protocol.crop_size,
      seed=protocol.label_shift_seed if alpha is not None else protocol.seed,
      label_shift_alpha=alpha, too_few=protocol.too_few, require_labels=protocol.require_labels,
      max_images_per_plate=protocol.max_images_per_plate, process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=protocol.num_threads)


def run_contexts(store, mesh, eval_step, variables, batches: Iterable[dict[str, np.ndarray]]
                 ) -> tuple[pd.DataFrame, float, int]:
  """(predictions of the perturbed rows, summed loss, labelled rows) over evaluation batches."""
  rows, logits, contexts, features = [], [], [], []
  loss_sum, labelled, offset = 0.0, 0, 0
  for local in batches:
    local = {**local, 'rows': np.asarray(local['rows'], np.int32)}
    out = eval_step(variables, parallel.global_batch(local, mesh))
    gathered = jax.device_get(multihost_utils.process_allgather(
        {**out,
         'rows': parallel.global_batch({'r': local['rows']}, mesh)['r'],
         'keep': parallel.global_batch({'k': (local['mask'] > 0) & ~local['is_control']},
                                       mesh)['k']},
        tiled=True))
    keep = gathered['keep'] & (gathered['rows'] >= 0)
    num_contexts = keep.shape[0]
    rows.append(gathered['rows'][keep])
    logits.append(gathered['logits'][keep])
    if 'features' in gathered:
      features.append(gathered['features'][keep])
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


def run_plates(run, variables, batches: Iterable[dict[str, np.ndarray]], plates_per_step: int
               ) -> tuple[pd.DataFrame, float, int]:
  """``run_contexts`` for a test-time adaptation method: each plate's contexts adapted in order
  (see ``evaluation.plates``)."""
  parts = list(plate_eval.adapt_contexts(run.model, run.method, run.preprocess, run.mesh, variables,
                                         batches, plates_per_step))
  if not parts:
    raise ValueError('evaluation produced no contexts')
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  loss_sum, labelled = plate_eval.labelled_loss(out['logits'], out['labels'])
  frame = predictions_frame(run.store, out['rows'], out['logits'], out['context'])
  return frame, loss_sum, labelled


def whole_plate_predictions(run, variables, plates, protocol: Protocol,
                            with_features: bool = False) -> pd.DataFrame:
  """Each plate normalised as ``run.method`` rules for a whole test set (its statistics streamed
  exactly, or running averages), then every perturbed image predicted; ``with_features``: every
  image, controls too, with its penultimate features (``feature_<i>`` columns)."""
  method, model, store = run.method, run.model, run.store
  plan = pipeline.whole_plates(store, plates, chunk_size=protocol.chunk_size,
                               require_controls=method.eval_controls,
                               require_labels=protocol.require_labels)
  logits_of = jax.jit(functools.partial(method.test_logits, return_features=with_features),
                      static_argnums=0)
  constants = normalization.device_constants(run.norm)   # unjitted, as ever: the same numbers
  rows, logits, ids, features = [], [], [], []
  for i in range(len(plan.plates)):
    chunks = [c for c in plan.contexts if c.plate == i]

    def read():
      for b in pipeline.read_chunks(store, chunks, protocol.crop_size):
        yield b, normalization.normalize(jax.device_put(b['images']), run.norm, constants)

    stats = method.test_statistics(model, variables, lambda: (
        (x, b['mask'], b['is_control']) for b, x in read()))
    for b, x in read():
      keep = (b['mask'] > 0) & (~b['is_control'] | with_features)
      rows.append(b['rows'][keep])
      on_mesh = jax.device_put((stats, x), parallel.replicated(run.mesh))   # where variables are
      out = jax.device_get(logits_of(model, variables, *on_mesh))
      logits.append((out[0] if with_features else out)[keep])
      features.append(out[1][keep] if with_features else None)
      ids.append(np.full(int(keep.sum()), i))
  return predictions_frame(store, np.concatenate(rows), np.concatenate(logits),
                           np.concatenate(ids),
                           np.concatenate(features) if with_features else None)


def evaluate(run, eval_step, variables, plates, protocol: Protocol, mode: str = 'chunks',
             alpha: float | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
  """Predictions and loss of ``plates`` under ``mode`` ('chunks' | 'label_shift' |
  'whole_plate') and ``protocol``. ``run``: the store, mesh, model, method, norm and preprocess
  (``normalize`` with that norm) of a trained run (e.g. a ``training.experiment.Experiment``)."""
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  if mode == 'whole_plate':
    if not run.method.whole_plate:
      raise ValueError(f'{run.method.name}: whole-plate evaluation does not apply')
    return whole_plate_predictions(run, variables, plates, protocol), {}
  batches = context_batches(run.store, plates, run.method, protocol,
                            alpha=alpha if mode == 'label_shift' else None)
  if run.method.test_time is not None:        # the method adapts: plates, each in order
    frame, loss_sum, labelled = run_plates(run, variables, batches, protocol.contexts_per_step)
  else:
    frame, loss_sum, labelled = run_contexts(run.store, run.mesh, eval_step, variables, batches)
  return frame, {'loss': loss_sum / max(labelled, 1), 'labelled': labelled}
