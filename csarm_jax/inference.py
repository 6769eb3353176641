"""Self-contained inference checkpoints and prediction of new plates.

    export(workdir, out)          # best checkpoint of a run -> out/{variables, inference.json}
    members = [load(path) for path in exports]    # one per fold: an ensemble
    images, wells = predict_store(members, open_store(path))
    write_embeddings(load(path), open_store(images), out)   # a feature store of its features

An export holds everything prediction needs and nothing of training: parameters and running BN
averages, the normalisation statistics, class ids/names, channel names, the model's spec, the method
and its evaluation protocol (context size, controls per context, seed). Prediction applies exactly
the training-time preprocessing (centre crop, the fold's normalisation) and test-time rule: each
plate is adapted with its own controls, in contexts of the same shape as evaluation. Embedding
writes every image's penultimate features (controls too) under the whole-plate form of that rule.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
import flax.linen as nn

from csarm_jax import methods, models
from csarm_jax.data import normalization, plate_check
from csarm_jax.data.store import ImageStore
from csarm_jax.evaluation import metrics as metrics_lib
from csarm_jax.evaluation import embed as embed_lib
from csarm_jax.evaluation import protocol
from csarm_jax import parallel
from csarm_jax.training import workdir as workdir_lib
from csarm_jax.evaluation.step import compiled_eval_step

FORMAT_VERSION = 1
SPEC, CONFIG, NORMALIZATION = workdir_lib.SPEC, workdir_lib.CONFIG, workdir_lib.NORMALIZATION
INFERENCE, VARIABLES = 'inference.json', 'variables'


@dataclasses.dataclass
class Predictor:
  """One exported model, ready to predict."""
  path: str
  model: nn.Module
  variables: dict[str, Any]
  method: methods.Method
  norm: normalization.NormStats
  spec: dict[str, Any]
  protocol: protocol.Protocol           # the test-time protocol it was evaluated with

  def preprocess(self, images):
    return normalization.normalize(images, self.norm)


_read_json, SELECTED = workdir_lib.read_json, workdir_lib.SELECTED


def export(workdir: str, out: str, which: str = SELECTED) -> str:
  """Writes ``out/variables`` (orbax) and ``out/inference.json`` from a run's checkpoint.

  ``which``: 'selected' (default) -- the state the run itself evaluated: the best by validation loss
  if the run had validation plates, else the latest -- or 'best' / 'latest' explicitly.
  """
  return write_export(out, *workdir_lib.restore_run(workdir, which))


def write_export(out: str, variables: dict[str, Any], spec: dict[str, Any],
                 norm: normalization.NormStats, provenance: dict[str, Any]) -> str:
  """Writes ``out/variables`` ({'params', 'batch_stats'}, orbax) and ``out/inference.json`` (the
  model spec as ``model_spec`` writes it, the normalisation and where the weights came from)."""
  os.makedirs(out, exist_ok=True)
  variables_dir = os.path.join(os.path.abspath(out), VARIABLES)
  with ocp.StandardCheckpointer() as saver:
    saver.save(variables_dir, {'params': variables['params'],
                               'batch_stats': variables['batch_stats']}, force=True)
  info = {'format_version': FORMAT_VERSION, **spec, 'normalization': json.loads(norm.to_json()),
          'provenance': provenance}
  with open(os.path.join(out, INFERENCE), 'w') as f:
    json.dump(info, f, indent=1)
  return out


def load(path: str) -> Predictor:
  info = _read_json(os.path.join(path, INFERENCE))
  if info.get('format_version') != FORMAT_VERSION:
    raise ValueError(f'{path}/{INFERENCE}: format_version {info.get("format_version")} is not '
                     f'{FORMAT_VERSION}')
  model = models.from_spec(info['model'])
  with ocp.StandardCheckpointer() as loader:
    variables = loader.restore(os.path.join(os.path.abspath(path), VARIABLES))
  norm = normalization.NormStats.from_json(json.dumps(info['normalization']))
  return Predictor(path, model, variables, methods.get(info['method']), norm, info,
                   protocol.Protocol.from_spec(info))


def _check_compatible(members: Sequence[Predictor], store: ImageStore) -> dict[str, Any]:
  """The members' shared spec; raises naming the export and the store if anything differs."""
  first = members[0].spec
  for m in members:
    where = f'{m.path} vs store {store.path}'
    if m.spec['store_kind'] != store.kind:
      raise ValueError(f'{where}: trained on {m.spec["store_kind"]}, the store holds {store.kind}')
    if m.spec['channels'] != store.channels:
      raise ValueError(f'{where}: trained on channels {m.spec["channels"]}, but the store has '
                       f'{store.channels}')
    if store.kind == 'images':
      max_value = float(np.iinfo(store.manifest['dtype']).max)
      if max_value != m.norm.max_value:
        raise ValueError(f'{where}: trained on images scaled by {m.norm.max_value:g}, the store '
                         f'holds {store.manifest["dtype"]} (max {max_value:g}); convert it alike')
      if m.spec['crop_size'] > min(store.item_shape[:2]):
        raise ValueError(f'{where}: the model takes {m.spec["crop_size"]}-pixel crops, the '
                         f'store\'s images are {store.item_shape[0]}x{store.item_shape[1]}')
    if [c['id'] for c in m.spec['classes']] != [c['id'] for c in first['classes']]:
      raise ValueError(f'{m.path}: its classes differ from {members[0].path}\'s')
    if (m.protocol != members[0].protocol or
        m.method.eval_controls != members[0].method.eval_controls):
      raise ValueError(f'{m.path}: its test-time protocol (crop, context sizes, controls) differs '
                       f'from {members[0].path}\'s; ensemble members must share it')
  return first


def predict_store(members: Sequence[Predictor], store: ImageStore,
                  plates: Sequence[str] | None = None,
                  contexts_per_step: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
  """Per-image and per-well predictions (ensemble-mean class probabilities, predictive entropy) of
  every perturbed image of ``plates`` (default: all), each plate adapted with its own controls."""
  return predict_plates(members, store, plates, contexts_per_step)[:2]


def predict_plates(members: Sequence[Predictor], store: ImageStore,
                   plates: Sequence[str] | None = None, contexts_per_step: int = 8,
                   skip_bad: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
  """``predict_store`` and the report of what it skipped: plates that cannot form a context under
  the members' test-time rule and images holding NaN or inf (``skip_bad=False``: refuse them)."""
  if not members:
    raise ValueError('no exported model given')
  if contexts_per_step < 1:
    raise ValueError(f'contexts_per_step must be >= 1, got {contexts_per_step}')
  spec = _check_compatible(members, store)
  plates = sorted(store.table['Metadata_Plate'].unique()) if plates is None else list(plates)
  checked = plate_check.check_parts(store, {'predict': (plates, members[0].method.eval_controls)},
                                    require_labels=False, skip_bad=skip_bad,
                                    hint='skip_bad=True (predict.py: no --noskip_bad) skips them')
  store, plates = checked.store, checked.parts['predict']
  mesh = parallel.make_mesh()
  parallel.check_contexts_divide(contexts_per_step, mesh, 'contexts_per_step')
  rule = dataclasses.replace(members[0].protocol, contexts_per_step=contexts_per_step)
  num_classes = len(spec['classes'])
  probs, frame = None, None
  for m in members:
    batches = protocol.context_batches(store, plates, m.method, rule)
    eval_step = compiled_eval_step(m.model, m.method, m.preprocess, mesh)
    member_frame, _, _ = protocol.run_contexts(store, mesh, eval_step, m.variables, batches)
    p = member_frame[metrics_lib.prob_columns(num_classes)].to_numpy()
    if frame is None:
      frame, probs = member_frame, p
    else:
      if not np.array_equal(member_frame['row'].to_numpy(), frame['row'].to_numpy()):
        raise AssertionError('ensemble members saw different contexts')
      probs = probs + p
  probs = probs / len(members)
  broken = ~np.isfinite(probs).all(axis=1)
  if broken.any():               # finite inputs, so the model itself: never write such numbers
    raise FloatingPointError(f'{int(broken.sum())} predictions are NaN or inf (first: plate '
                             f'{frame["Metadata_Plate"].iloc[np.argmax(broken)]}); the exported '
                             f'parameters are not finite')
  frame[metrics_lib.prob_columns(num_classes)] = probs
  frame['pred'] = probs.argmax(axis=1)
  frame['pred_id'] = [spec['classes'][k]['id'] for k in frame['pred']]
  frame['pred_name'] = [spec['classes'][k]['name'] for k in frame['pred']]
  frame['entropy'] = metrics_lib.entropy(probs)
  wells = metrics_lib.well_predictions(frame, num_classes)
  wells['pred_name'] = [spec['classes'][k]['name'] for k in wells['pred']]
  return frame, wells, checked.report



def write_embeddings(member: Predictor, store: ImageStore, out: str,
                     plates: Sequence[str] | None = None, skip_bad: bool = True,
                     overwrite: bool = False) -> dict[str, Any]:
  """``evaluation.embed.write_embeddings`` of an export (``training.embeddings.embed_run``: of a
  run's workdir)."""
  _check_compatible([member], store)
  variables = jax.device_put(member.variables, parallel.replicated(parallel.make_mesh()))
  return embed_lib.write_embeddings(out, member.model, variables, member.method, member.norm,
                                    member.protocol, store, member.path, plates, skip_bad,
                                    overwrite)
