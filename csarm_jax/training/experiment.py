"""Everything a run derives from its config, built and checked once at start.

Bad configs fail here, before any compilation, with a message naming the config field: an unknown
method or model, a store path that does not exist, a fold with no test plates, contexts that do not
divide over the devices, a crop larger than the images.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import optax
import flax.linen as nn
import ml_collections
from absl import logging
from jax.sharding import Mesh

from csarm_jax import methods, models, tta
from csarm_jax.data import domains as domain_lib, normalization, plate_check, splits
from csarm_jax.data.contexts import TOO_FEW
from csarm_jax.data.store import ImageStore, StoreError, open_store
from csarm_jax.evaluation.protocol import Protocol
from csarm_jax.features import store_tvn
from csarm_jax.methods import Method, domain as domain_methods
from csarm_jax import parallel
from csarm_jax.training.step import check_microbatch


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
  protocol: Protocol               # how held-out plates are evaluated
  skipped: dict[str, Any] = dataclasses.field(default_factory=dict)   # plate_check's report
  source: dict[str, Any] | None = None   # test-time adaptation: the adapted run's model.json
  domains: tuple[str, ...] | None = None  # DANN / CORAL: the run's domains (ids: positions)
  unlabelled: tuple[str, ...] = ()        # ... and the held-out plates that train unlabelled

  def preprocess(self, images: jax.Array) -> jax.Array:
    """The one input transform of training, evaluation and prediction."""
    return normalization.normalize(images, self.norm)

  @property
  def example_input(self) -> jax.Array:
    return models.example_input(self.model, self.config.data.crop_size)


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
  guards = ('allow', 'log', 'disallow')
  _require(config.train.transfer_guard in guards, 'train.transfer_guard',
           f'must be one of {guards}, got {config.train.transfer_guard!r}')
  _require(config.train.profile_steps >= 0, 'train.profile_steps',
           f'must be >= 0, got {config.train.profile_steps}')
  _require(config.data.too_few in TOO_FEW, 'data.too_few',
           f'must be one of {TOO_FEW}, got {config.data.too_few!r}')
  try:
    method = methods.get(config.method, **dict(config.get('method_options') or {}))
  except ValueError as e:
    raise ConfigError(f'config.method_options: {e}') from None
  if not method.trains:
    _require(bool(config.tta.source), 'tta.source',
             f'{method.name} adapts a trained model: give the workdir of a finished training run')
    _tta_settings(method, config)
  _check_controls(method, config)
  _check_optimizer(config.optimizer)
  if method.objective is not None:
    method = _domain_method(method, config)
  _check_synthetic(config)
  return method


def _domain_method(method: Method, config: ml_collections.ConfigDict) -> Method:
  """DANN / CORAL with ``config.domain.settings`` applied, its sampling fields checked."""
  d = config.domain
  _require(d.by in domain_lib.COLUMNS, 'domain.by',
           f'must be one of {sorted(domain_lib.COLUMNS)}, got {d.by!r}')
  _require(d.domains_per_context >= 1, 'domain.domains_per_context',
           f'must be >= 1, got {d.domains_per_context}')
  _require(d.num_unlabelled is None or d.num_unlabelled >= 0, 'domain.num_unlabelled',
           f'must be >= 0, got {d.num_unlabelled}')
  try:
    objective = domain_methods.with_overrides(method.objective, **dict(d.settings))
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.domain.settings: {e}') from None
  share = config.data.num_perturbed // d.domains_per_context
  min_group = getattr(objective, 'min_group', 1)
  _require(share >= min_group, 'domain.domains_per_context',
           f'{config.data.num_perturbed} images per context (data.num_perturbed) over '
           f'{d.domains_per_context} domains give {share} per domain; {method.name} needs '
           f'>= {min_group} (min_group)')
  return dataclasses.replace(method, objective=objective)


def held_out_plates(fold: splits.Fold) -> tuple[str, ...]:
  """Every plate a run evaluates: validation, test and the training sources' held-out parts."""
  return fold.validation + fold.test + fold.in_domain + fold.unseen_batches


def _domains(config: ml_collections.ConfigDict, store: ImageStore, fold: splits.Fold,
             method: Method) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(the run's domains, the plates whose images join training unlabelled)."""
  d = config.domain
  unlabelled = held_out_plates(fold) if d.transductive else ()
  names = domain_lib.domain_names(store.table, fold.train + unlabelled, d.by)
  _require(len(names) >= 2, 'domain.by', f'{method.name} needs >= 2 domains; the run\'s plates '
           f'({"training and held-out" if d.transductive else "training"}) have {len(names)} '
           f'{d.by} value(s): {list(names)}')
  return names, unlabelled


def domain_sampling(exp: Experiment) -> dict[str, Any]:
  """``pipeline.training_batches``' domain arguments for a DANN / CORAL run, else none."""
  if exp.domains is None:
    return {}
  d = exp.config.domain
  ids = {name: i for i, name in enumerate(exp.domains)}
  plates = exp.fold.train + exp.unlabelled
  domain_of = {p: ids[n] for p, n in
               domain_lib.plate_domains(exp.store.table, plates, d.by).items()}
  num_unlabelled = 0
  if exp.unlabelled:
    num_unlabelled = exp.config.data.num_perturbed if d.num_unlabelled is None else d.num_unlabelled
  return {'domain_of': domain_of, 'unlabelled_plates': exp.unlabelled,
          'num_unlabelled': num_unlabelled, 'domains_per_context': d.domains_per_context}


def _check_synthetic(config: ml_collections.ConfigDict) -> None:
  features = config.synthetic.get('features')
  if not features or not config.synthetic.preset:      # no benchmark to build: a given store
    return
  from csarm_jax.data.synthetic.profiles import LEVELS
  _require(features in LEVELS, 'synthetic.features',
           f'must be one of {LEVELS} (or None: an image store), got {features!r}')
  _require(synthetic_images_path(config).rstrip('/') != config.store.rstrip('/'),
           'synthetic.images', 'must differ from config.store, which receives the profiles')


def _check_controls(method: Method, config: ml_collections.ConfigDict) -> None:
  if method.train_controls:
    _require(config.data.num_controls >= 1, 'data.num_controls',
             f'{method.name} trains on contexts with the plate\'s controls: K must be >= 1 '
             f'(K = 0 without controls is arm_bn)')
  if method.eval_controls:
    _require(config.eval.num_controls >= 1, 'eval.num_controls',
             f'{method.name} normalises test contexts with the plate\'s controls: K must be >= 1')


def _adam(lr: Any, o: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam; a weight decay is added to the gradient (L2), unlike AdamW's decoupled decay."""
  if not o.weight_decay:
    return optax.adam(lr)
  return optax.chain(optax.add_decayed_weights(o.weight_decay), optax.adam(lr))


# config.optimizer.name -> its optax transformation of (learning rate or schedule, config.optimizer)
OPTIMIZERS: dict[str, Callable[[Any, ml_collections.ConfigDict], optax.GradientTransformation]] = {
    'adam': _adam,
    'adamw': lambda lr, o: optax.adamw(lr, weight_decay=o.weight_decay),
    'sgd': lambda lr, o: optax.sgd(lr, momentum=0.9),
}
SCHEDULES = ('constant', 'cosine')


def _check_optimizer(o: ml_collections.ConfigDict) -> None:
  _require(o.name in OPTIMIZERS, 'optimizer.name',
           f'unknown optimizer {o.name!r}; choose one of {sorted(OPTIMIZERS)}')
  _require(o.schedule in SCHEDULES, 'optimizer.schedule',
           f'unknown schedule {o.schedule!r}; choose one of {list(SCHEDULES)}')


def _read_source(config: ml_collections.ConfigDict, name: str) -> Any:
  """A JSON file of the run that test-time adaptation starts from."""
  path = os.path.join(config.tta.source, name)
  _require(os.path.exists(path), 'tta.source', f'{path} is missing: give the workdir of a finished '
           f'training run')
  with open(path) as f:
    return json.load(f)


def _tta_settings(method: Method, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config.tta.settings``, checked against the method's settings value."""
  settings = dict(config.tta.settings)
  try:
    tta.with_overrides(method.test_time, **settings)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.tta.settings: {e}') from None
  return settings


def _adapting(method: Method, config: ml_collections.ConfigDict) -> Method:
  """A test-time adaptation method completed by the run it adapts (``config.tta.source``)."""
  source = _read_source(config, 'model.json')['method']
  _require(source in methods.METHODS and methods.get(source).trains, 'tta.source',
           f'its model.json names {source!r}, not a training method')
  method = methods.from_source(method, methods.get(source), **_tta_settings(method, config))
  _check_controls(method, config)
  return method


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   head_learning_rate: float | None = None) -> optax.GradientTransformation:
  """``config.optimizer``'s transformation; raises ConfigError on an unknown name or schedule.
  ``head_learning_rate``: the parameters under ``domain_head`` (DANN) get this learning rate
  (same optimizer and schedule shape)."""
  o = config.optimizer
  _check_optimizer(o)

  def schedule(peak: float) -> Any:
    if o.schedule == 'cosine':
      return optax.warmup_cosine_decay_schedule(0.0, peak, o.warmup_steps, max(total_steps, 1),
                                                end_value=peak * 1e-3)
    return optax.linear_schedule(0.0, peak, o.warmup_steps) if o.warmup_steps else peak
  tx = OPTIMIZERS[o.name](schedule(o.learning_rate), o)
  if head_learning_rate is None:
    return tx
  head = OPTIMIZERS[o.name](schedule(head_learning_rate), o)
  labels = lambda params: {k: 'head' if k == 'domain_head' else 'model' for k in params}
  return optax.multi_transform({'model': tx, 'head': head}, labels)


def saved_optimizer(config: ml_collections.ConfigDict,
                    model_spec: dict[str, Any]) -> optax.GradientTransformation:
  """An optimizer with the structure of a finished run's (``model_spec``: its ``model.json``
  entry), to restore its checkpoint: a DANN model's domain head has its own transformation."""
  head = 1.0 if model_spec['name'] == 'domain_head' else None   # structure only, not the value
  return make_optimizer(config, total_steps=1, head_learning_rate=head)


def make_run_folds(config: ml_collections.ConfigDict, store: ImageStore) -> list[splits.Fold]:
  s = config.split
  try:
    return splits.make_folds(store.table, kind=s.kind, num_folds=s.num_folds,
                             validation_by=s.validation_by,
                             validation_fraction=s.validation_fraction,
                             in_domain_fraction=s.in_domain_fraction,
                             unseen_batches_fraction=s.unseen_batches_fraction, seed=s.seed,
                             sources=s.get('sources'))
  except splits.SplitError as e:
    raise ConfigError(f'config.split: {e}') from None


def synthetic_images_path(config: ml_collections.ConfigDict) -> str:
  """Where a run's synthetic image store is: ``config.store``, or with ``synthetic.features`` set
  ``synthetic.images`` (default: ``config.store`` + '_images')."""
  s = config.synthetic
  if not s.get('features'):
    return config.store
  return s.get('images') or config.store.rstrip('/') + '_images'


def build_synthetic(config: ml_collections.ConfigDict) -> None:
  """Builds (or reuses) the synthetic benchmark of ``config.synthetic``: the image store, and with
  ``synthetic.features`` ('image' | 'well') its hand-crafted profiles as ``config.store``."""
  from csarm_jax.data import synthetic      # imported only when a benchmark is built
  from csarm_jax.data.synthetic import profiles
  s = config.synthetic
  images = synthetic_images_path(config)
  overrides = s.get('overrides') or ml_collections.ConfigDict()
  synthetic.ensure(images, s.preset, seed=s.seed, **overrides.to_dict())
  if s.get('features'):
    try:
      profiles.ensure(config.store, images, level=s.features)
    except FileExistsError as e:
      raise ConfigError(f'config.store: {e}') from None


def open_run_store(config: ml_collections.ConfigDict) -> ImageStore:
  if (config.get('features') or {}).get('from_run'):
    from csarm_jax.training import embeddings     # embeds the run's images on first use
    embeddings.ensure(config)
  if config.synthetic.preset:
    def build() -> str:   # multi-host: on process 0, so config.store must be a path all can read
      build_synthetic(config)
      return ''
    parallel.from_lead_process('synthetic store', build)
  elif '://' not in config.store and not os.path.exists(config.store):
    raise ConfigError(f'config.store: {config.store!r} does not exist (give a store built by '
                      f'data_prep/make_synthetic.py or data_prep/jump_convert.py)')
  try:
    return open_store(config.store)
  except StoreError as e:
    raise ConfigError(f'config.store: {e}') from None


def select_fold(config: ml_collections.ConfigDict, store: ImageStore, workdir: str) -> splits.Fold:
  """The run's fold; saved in the workdir and, on resume, reloaded and checked against the
  config."""
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
  parallel.from_lead_process('fold', save_or_check)
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
  return normalization.NormStats.from_json(
      parallel.from_lead_process('normalization', load_or_compute))


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
  if not method.trains:         # completed by its source run first: plates are checked for it
    method = _adapting(method, config)
  store = open_run_store(config)
  if store.kind == 'images':
    h, w = store.item_shape[:2]
    _require(config.data.crop_size <= min(h, w), 'data.crop_size',
             f'{config.data.crop_size} exceeds the stored images ({h}x{w})')
  fold = select_fold(config, store, workdir)
  store, fold, skipped = plate_check.check_fold(
      store, fold, method, skip_bad=config.data.skip_bad_plates,
      hint='set config.data.skip_bad_plates=true to skip them')
  _require(len(fold.test) > 0, 'split', f'fold {fold.name} has no test plates')
  store = feature_tvn(config, store, fold)
  mesh = parallel.make_mesh()
  for field in ('data.contexts_per_step', 'eval.contexts_per_step'):
    section, key = field.split('.')
    try:
      parallel.check_contexts_divide(config[section][key], mesh, field)
    except ValueError as e:
      raise ConfigError(f'config.{e}') from None
  if not method.trains:
    return _adaptation_run(config, store, fold, method, mesh, skipped)
  try:
    check_microbatch(config.data.contexts_per_step, config.data.get('contexts_per_microbatch'),
                     mesh.size)
  except ValueError as e:
    raise ConfigError(f'config.data.{e}') from None
  norm = fold_normalization(config, store, fold, workdir)
  _require(not method.context_net or store.kind == 'images', 'method',
           f'{method.name} needs an image store (its context net is a CNN)')
  domains, unlabelled = (None, ()) if method.objective is None else _domains(config, store, fold,
                                                                              method)
  name, options = method.model_choice(config.model.name, model_options(config, store),
                                      None if domains is None else len(domains))
  try:
    remat = {'remat': True} if config.model.get('remat') else {}   # memory only: not in model.json
    model = models.create(name, len(store.class_ids), dtype=config.model.dtype, **options,
                          **remat)
  except ValueError as e:
    raise ConfigError(f'config.model: {e}') from None
  steps_per_epoch, total_steps = schedule_length(config, store, fold)
  head_lr = method.objective.head_learning_rate if name == 'domain_head' else None
  return Experiment(config, store, fold, norm, model, method,
                    make_optimizer(config, total_steps, head_lr), mesh, steps_per_epoch,
                    total_steps, Protocol.from_config(config, store.kind), skipped,
                    domains=domains, unlabelled=unlabelled)


TVN_FIT_ON = ('all', 'train')


def feature_tvn(config: ml_collections.ConfigDict, store: ImageStore,
                fold: splits.Fold) -> ImageStore:
  """The store as the run sees it: with ``config.data.tvn.enabled``, the TVN of its feature
  vectors over the fold's plates (``features.store_tvn``), fitted on all their controls or the
  training plates' (``fit_on``), each plate or batch whitened with its own (``domain``)."""
  t = config.data.get('tvn')
  if not t or not t.enabled:
    return store
  _require(store.kind == 'features', 'data.tvn.enabled',
           f'TVN normalises embeddings, {config.store} holds {store.kind} (embed it first: '
           f'experiments/embed.py)')
  _require(t.domain in store_tvn.DOMAINS, 'data.tvn.domain',
           f'must be one of {sorted(store_tvn.DOMAINS)}, got {t.domain!r}')
  _require(t.fit_on in TVN_FIT_ON, 'data.tvn.fit_on',
           f'must be one of {TVN_FIT_ON}, got {t.fit_on!r}')
  plates = [p for part in ('train', 'validation', 'test', 'in_domain', 'unseen_batches')
            for p in getattr(fold, part)]
  try:
    return store_tvn.tvn_store(store, plates, plates if t.fit_on == 'all' else fold.train,
                               fold.train, domain=t.domain)
  except ValueError as e:
    raise ConfigError(f'config.data.tvn: {e}') from None


def _adaptation_run(config, store, fold, method, mesh, skipped) -> Experiment:
  """The run of a test-time adaptation: the source run's model, optimizer structure (to restore
  its checkpoint) and normalisation, on the same fold; nothing to train."""
  spec = _read_source(config, 'model.json')
  _require(splits.Fold.load(os.path.join(config.tta.source, 'fold.json')) == fold, 'split',
           f'the fold differs from that of tta.source {config.tta.source}: adapt on its test '
           f'plates')
  _require(len(spec['classes']) == len(store.class_ids), 'tta.source',
           f'its model has {len(spec["classes"])} classes, the store {len(store.class_ids)}')
  norm = normalization.NormStats.load(os.path.join(config.tta.source, 'normalization.json'))
  model = models.from_spec(spec['model'])
  source_config = ml_collections.ConfigDict(_read_source(config, 'config.json'))
  return Experiment(config, store, fold, norm, model, method,
                    saved_optimizer(source_config, spec['model']), mesh, 1, 0,
                    Protocol.from_config(config, store.kind), skipped, source=spec)


def model_spec(exp) -> dict[str, Any]:
  """What a run writes to ``workdir/model.json``: enough to rebuild its model and protocol."""
  c = exp.config
  name, options = exp.method.model_choice(c.model.name, model_options(c, exp.store),
                                          None if exp.domains is None else len(exp.domains))
  model = exp.source['model'] if exp.source else {
      'name': name, 'num_classes': len(exp.store.class_ids), 'options': options,
      'dtype': c.model.dtype}
  domain = {}
  if exp.domains is not None:     # DANN / CORAL: the mode that ran, for the study to report
    domain = {'domain': {'by': c.domain.by, 'transductive': bool(exp.unlabelled),
                         'num_domains': len(exp.domains), 'unlabelled_plates': len(exp.unlabelled),
                         'settings': dataclasses.asdict(exp.method.objective)}}
  return {'model': model, **domain,
          'method': exp.method.name, 'store_kind': exp.store.kind,
          'channels': exp.store.channels,
          'classes': [{'id': i, 'name': n}
                      for i, n in zip(exp.store.class_ids, exp.store.class_names)],
          'crop_size': exp.protocol.crop_size, 'eval': exp.protocol.spec()}


def model_options(config: ml_collections.ConfigDict, store: ImageStore) -> dict[str, Any]:
  """The model's options: the config's, with its input size taken from the store (features per
  item, or channels per image)."""
  key = 'in_features' if store.kind == 'features' else 'in_channels'
  return {**config.model.options, key: store.item_shape[-1]}
