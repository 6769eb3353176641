"""Everything a run derives from its config, built and checked once at start.

Bad configs fail here, before any compilation, with a message naming the config field: an unknown
method or model, a store path that does not exist, a fold with no test plates, contexts that do not
divide over the devices, a crop larger than the images.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
import ml_collections
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from csarm_jax import methods, models
from csarm_jax.data import normalization, splits
from csarm_jax.data.contexts import TOO_FEW
from csarm_jax.data.store import ImageStore, StoreError, open_store
from csarm_jax.methods import Method
from csarm_jax import parallel


class ConfigError(ValueError):
  """A config field with a value the run cannot use; the message names the field."""


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  store: ImageStore
  fold: splits.Fold
  norm: normalization.NormStats
  model: nn.Module
  method: Method
  tx: optax.GradientTransformation
  mesh: Mesh
  steps_per_epoch: int
  total_steps: int                 # upper bound: early stopping may end sooner

  def preprocess(self, images: jax.Array) -> jax.Array:
    """The one input transform of training, evaluation and prediction."""
    return normalization.normalize(images, self.norm)

  @property
  def example_input(self) -> jax.Array:
    crop = self.config.data.crop_size
    if self.store.kind == 'features':
      return jnp.zeros((2, self.store.item_shape[0]), jnp.float32)
    return jnp.zeros((2, crop, crop, self.store.item_shape[-1]), jnp.float32)


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f'config.{field}: {message}')


def check_config(config: ml_collections.ConfigDict) -> Method:
  """Checks the fields that need no data; returns the method."""
  _require(config.method in methods.METHODS, 'method',
           f'unknown method {config.method!r}; choose one of {sorted(methods.METHODS)}')
  _require(config.model.name in models.names(), 'model.name',
           f'unknown model {config.model.name!r}; choose one of {list(models.names())}')
  _require(bool(config.store), 'store', 'no image store given (set --config.store=PATH or URL)')
  for field in ('data.num_perturbed', 'data.contexts_per_step', 'eval.num_perturbed',
                'eval.contexts_per_step', 'train.max_epochs', 'train.log_every_steps',
                'train.eval_every_epochs', 'train.patience'):
    section, key = field.split('.')
    _require(config[section][key] >= 1, field, f'must be >= 1, got {config[section][key]}')
  _require(config.data.num_threads >= 1 and config.data.prefetch >= 0, 'data.num_threads',
           f'num_threads must be >= 1 and prefetch >= 0, got {config.data.num_threads} and '
           f'{config.data.prefetch}')
  _require(config.data.prefetch == 0 or config.data.prefetch >= config.data.num_threads,
           'data.prefetch', f'{config.data.prefetch} batches read ahead would let grain run only '
           f'{config.data.prefetch} of data.num_threads={config.data.num_threads} threads; set '
           f'prefetch >= num_threads (or 0 to read in the training thread)')
  _require(config.data.too_few in TOO_FEW, 'data.too_few',
           f'must be one of {TOO_FEW}, got {config.data.too_few!r}')
  method = methods.get(config.method)
  if method.train_controls:
    _require(config.data.num_controls >= 1, 'data.num_controls',
             f'{method.name} trains on contexts with the plate\'s controls: K must be >= 1 '
             f'(K = 0 without controls is arm_bn)')
  if method.eval_controls:
    _require(config.eval.num_controls >= 1, 'eval.num_controls',
             f'{method.name} normalises test contexts with the plate\'s controls: K must be >= 1')
  _require(config.optimizer.name in ('adam', 'adamw', 'sgd'), 'optimizer.name',
           f'unknown optimizer {config.optimizer.name!r}; choose adam, adamw or sgd')
  _require(config.optimizer.schedule in ('constant', 'cosine'), 'optimizer.schedule',
           f'unknown schedule {config.optimizer.schedule!r}; choose constant or cosine')
  return method


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  o = config.optimizer
  lr: Any = o.learning_rate
  if o.schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, o.warmup_steps, max(total_steps, 1),
                                            end_value=o.learning_rate * 1e-3)
  elif o.warmup_steps:
    lr = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
  if o.name == 'adam':
    return optax.adam(lr) if not o.weight_decay else optax.chain(
        optax.add_decayed_weights(o.weight_decay), optax.adam(lr))
  if o.name == 'adamw':
    return optax.adamw(lr, weight_decay=o.weight_decay)
  return optax.sgd(lr, momentum=0.9)


def _from_lead_process(name: str, produce: Callable[[], str]) -> str:
  """``produce()`` run on process 0 only; its text (or its failure) reaches every process.

  A collective: every process calls it at the same point, whatever it sees on its own disk, so
  none waits for a peer that skipped it; workdirs need not be shared between hosts.
  """
  if jax.process_count() == 1:
    return produce()
  text, error = '', None
  if jax.process_index() == 0:
    try:
      text = produce()
    except Exception as e:       # re-raised below, after telling the other processes
      error = e
  payload = np.frombuffer(text.encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(
      np.int64(-1 if error is not None else payload.size)))
  if error is not None:
    raise error
  if size < 0:
    raise RuntimeError(f'{name} failed on process 0 (see its log)')
  if size == 0:
    return ''
  mine = payload if jax.process_index() == 0 else np.zeros(size, np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(mine))).decode()


def make_run_folds(config: ml_collections.ConfigDict, store: ImageStore) -> list[splits.Fold]:
  s = config.split
  try:
    return splits.make_folds(store.table, kind=s.kind, num_folds=s.num_folds,
                             validation_by=s.validation_by,
                             validation_fraction=s.validation_fraction,
                             in_domain_fraction=s.in_domain_fraction,
                             unseen_batches_fraction=s.unseen_batches_fraction, seed=s.seed)
  except splits.SplitError as e:
    raise ConfigError(f'config.split: {e}') from None


def open_run_store(config: ml_collections.ConfigDict) -> ImageStore:
  if config.synthetic.preset:
    from csarm_jax.data import synthetic      # builds the benchmark on first use
    def build() -> str:   # multi-host: on process 0, so config.store must be a path all can read
      synthetic.ensure(config.store, config.synthetic.preset, seed=config.synthetic.seed)
      return ''
    _from_lead_process('synthetic store', build)
  elif '://' not in config.store and not os.path.exists(config.store):
    raise ConfigError(f'config.store: {config.store!r} does not exist (give a store built by '
                      f'data_prep/make_synthetic.py or data_prep/jump_convert.py)')
  try:
    return open_store(config.store)
  except StoreError as e:
    raise ConfigError(f'config.store: {e}') from None


def select_fold(config: ml_collections.ConfigDict, store: ImageStore, workdir: str) -> splits.Fold:
  """The run's fold; saved in the workdir and, on resume, reloaded and checked against the config."""
  s = config.split
  folds = make_run_folds(config, store)
  _require(0 <= s.fold < len(folds), 'split.fold', f'{s.fold} is out of range: the {s.kind} split '
           f'has {len(folds)} folds')
  fold = folds[s.fold]          # every process derives the same fold from the config
  path = os.path.join(workdir, 'fold.json')

  def save_or_check() -> str:
    if os.path.exists(path):
      _require(splits.Fold.load(path) == fold, 'split', f'the workdir holds a different fold '
               f'({path}); use a new workdir or the config that made it')
    else:
      fold.save(path)
    return ''
  _from_lead_process('fold', save_or_check)
  return fold


def fold_normalization(config: ml_collections.ConfigDict, store: ImageStore, fold: splits.Fold,
                       workdir: str) -> normalization.NormStats:
  """Per-channel statistics of the fold's training perturbed images, computed once per workdir."""
  path = os.path.join(workdir, 'normalization.json')

  def load_or_compute() -> str:
    if os.path.exists(path):
      return normalization.NormStats.load(path).to_json()
    t = store.table
    rows = t.loc[t['Metadata_Plate'].isin(fold.train) & (t['label'] >= 0), 'row'].to_numpy()
    logging.info('normalisation statistics over %d training images', len(rows))
    norm = normalization.compute_normalization(store, rows, max_images=config.data.norm_max_images,
                                               seed=config.seed)
    norm.save(path)
    return norm.to_json()
  return normalization.NormStats.from_json(_from_lead_process('normalization', load_or_compute))


def schedule_length(config: ml_collections.ConfigDict, store: ImageStore,
                    fold: splits.Fold) -> tuple[int, int]:
  """(steps per epoch, total steps). An epoch sees about every training perturbed image once, as
  in the reference (its contexts per epoch = perturbed images // N, grouped C per update)."""
  t = config.train
  steps_per_epoch = t.steps_per_epoch
  if not steps_per_epoch:
    n = int((store.table['Metadata_Plate'].isin(fold.train) & (store.table['label'] >= 0)).sum())
    steps_per_epoch = max(1, -(-n // (config.data.num_perturbed * config.data.contexts_per_step)))
  total = t.max_epochs * steps_per_epoch
  return steps_per_epoch, min(total, t.max_steps) if t.max_steps else total


def build(config: ml_collections.ConfigDict, workdir: str) -> Experiment:
  method = check_config(config)
  store = open_run_store(config)
  if store.kind == 'images':
    h, w = store.item_shape[:2]
    _require(config.data.crop_size <= min(h, w), 'data.crop_size',
             f'{config.data.crop_size} exceeds the stored images ({h}x{w})')
  fold = select_fold(config, store, workdir)
  _require(len(fold.test) > 0, 'split', f'fold {fold.name} has no test plates')
  mesh = parallel.make_mesh()
  for field in ('data.contexts_per_step', 'eval.contexts_per_step'):
    section, key = field.split('.')
    try:
      parallel.check_contexts_divide(config[section][key], mesh, field)
    except ValueError as e:
      raise ConfigError(f'config.{e}') from None
  norm = fold_normalization(config, store, fold, workdir)
  options = dict(config.model.options)
  if store.kind == 'features':
    options['in_features'] = store.item_shape[0]
  else:
    options['in_channels'] = store.item_shape[-1]
  try:
    model = models.create(config.model.name, len(store.class_ids), dtype=config.model.dtype, **options)
  except ValueError as e:
    raise ConfigError(f'config.model: {e}') from None
  steps_per_epoch, total_steps = schedule_length(config, store, fold)
  return Experiment(config, store, fold, norm, model, method, make_optimizer(config, total_steps), mesh,
                    steps_per_epoch, total_steps)


def model_spec(exp) -> dict[str, Any]:
  """What a run writes to ``workdir/model.json``: enough to rebuild its model and protocol."""
  c = exp.config
  return {'model': {'name': c.model.name, 'num_classes': len(exp.store.class_ids),
                    'options': _model_options(exp.model, c), 'dtype': c.model.dtype},
          'method': exp.method.name, 'store_kind': exp.store.kind,
          'channels': exp.store.channels,
          'classes': [{'id': i, 'name': n} for i, n in zip(exp.store.class_ids, exp.store.class_names)],
          'crop_size': c.data.crop_size if exp.store.kind == 'images' else None,
          'eval': {'num_perturbed': c.eval.num_perturbed, 'num_controls': c.eval.num_controls,
                   'seed': c.eval.seed, 'too_few': c.data.too_few}}


def _model_options(model: nn.Module, config) -> dict[str, Any]:
  options = dict(config.model.options)
  key = 'in_features' if model.input_rank == 2 else 'in_channels'
  options[key] = int(model.in_channels)
  return options
