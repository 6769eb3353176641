"""Defaults for every experiment: CS-ARM-BN in the paper's setting (jump_reference adds the
reference's remaining training choices and the within-source variants). Other configs import and
override.

Usage: python experiments/train.py --config=experiments/configs/NAME.py[:variant] --workdir=DIR \
           [--config.a.b=value ...]
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = 'cs_arm_bn'            # erm | adabn | adabn_controls | arm_bn | arm_bn_controls |
                                    # cs_arm_bn | ben |
                                    # arm_cml | cs_arm_cml | tent | deyo | roid (see c.tta) |
                                    # dann | coral (see c.domain)
  # Method fields a run may change. statistics_gradient: whether training gradients flow through
  # the context's BatchNorm statistics (False: constants, the reference's BEN; see jump_reference).
  c.method_options = ml_collections.ConfigDict({'statistics_gradient': True})
  c.seed = 0                        # parameters and training contexts
  c.store = config_dict.placeholder(str)   # image store path or URL (file://, gs://, s3://)

  # Build the synthetic benchmark into `store` on first use when set (tiny | quickstart | large).
  # features: 'image' | 'well' -- `store` receives hand-crafted profiles of the benchmark's images
  # (csarm_jax.data.synthetic.profiles), whose images go to `images` (None: `store` + '_images').
  # overrides: preset fields (nested), e.g. {'effects': {'strength': 1.3}} (make_synthetic.py's
  # --effects.strength); a store built otherwise is refused, not reused. All apply only with a
  # preset.
  c.synthetic = ml_collections.ConfigDict({
      'preset': config_dict.placeholder(str), 'seed': 0, 'overrides': {},
      'features': config_dict.placeholder(str), 'images': config_dict.placeholder(str)})

  c.model = ml_collections.ConfigDict({
      'name': 'resnet50',
      # conv1x1: 'conv' | 'dot' (1x1 convolutions as matrix products: ResNet-50's CPU step 1.4x
      # faster, BENCHMARKS.md section 8; same parameters, equal up to float rounding -- not
      # bit-identical, hence off by default)
      'options': {'width': 64, 'downsample': 'avgpool', 'zero_init_last_bn': True,
                  'conv1x1': 'conv'},
      'dtype': 'float32',           # compute dtype; 'bfloat16' keeps float32 parameters/statistics
      'remat': False,               # ResNets: recompute the stem and each block in the backward
                                    # pass (paper step, micro-batch 1: 31.6 -> 6.6 GiB planned)
  })

  c.data = ml_collections.ConfigDict({
      'crop_size': 256,             # random crop (training) / centre crop (evaluation)
      'flips': True,
      'num_perturbed': 64,          # labelled images per training context
      'num_controls': 128,          # same-plate DMSO controls per context (methods that use them)
      'contexts_per_step': 8,       # contexts per optimizer update (a multiple of the devices)
      # Contexts forwarded at once inside the step (divides contexts_per_step, a multiple of the
      # devices): gradients accumulate over micro-batches, memory follows it. None: the largest
      # that fits the device's memory (GPU/TPU; training/fit.py), all at once on CPU.
      'contexts_per_microbatch': config_dict.placeholder(int),
      'too_few': 'replace',         # plates with too few images: sample with replacement (reported)
      'skip_bad_plates': True,      # skip (and report) plates that cannot form a context and
                                    # images holding NaN/inf; False: refuse them at start
      'norm_max_images': config_dict.placeholder(int),   # cap the normalisation pass (None: all)
      'num_threads': 4,             # grain threads, each reading one batch (itself concurrent)
      'prefetch': 4,                # batches read ahead (>= num_threads: grain runs at most this
                                    # many threads; 0: read in the training thread)
      # Feature stores of embeddings: TVN over the fold's plates before training and evaluation
      # (csarm_jax.features.store_tvn); domain: plate | batch, each whitened with its own
      # controls; fit_on: all (every plate's controls, as the reference's TVN_all) | train.
      'tvn': ml_collections.ConfigDict({'enabled': False, 'domain': 'plate', 'fit_on': 'all'}),
  })

  # Embeddings built on first use: if config.store is missing, the model of the finished run
  # from_run embeds `images` (default: that run's store) into it (csarm_jax.training.embeddings).
  c.features = ml_collections.ConfigDict({'from_run': config_dict.placeholder(str),
                                          'images': config_dict.placeholder(str)})
  c.split = ml_collections.ConfigDict({
      'kind': 'source',             # source (leave-one-source-out) | batch | plate (k-fold)
      'num_folds': config_dict.placeholder(int),
      'sources': config_dict.placeholder(tuple),  # only these sources' plates (None: all)
      'fold': 0,                    # which fold this run trains
      'validation_by': 'batch',
      'validation_fraction': 0.15,
      # Extra held-out parts of the training sources, scored by the same trained model:
      'unseen_batches_fraction': 0.0,   # this fraction of the training batches
      'in_domain_fraction': 0.0,        # then this fraction of the remaining training plates
      'seed': 0,
  })

  c.optimizer = ml_collections.ConfigDict({
      'name': 'adam', 'learning_rate': 1e-3, 'weight_decay': 0.0,
      'schedule': 'constant',       # constant | cosine
      'warmup_steps': 0,
  })

  c.train = ml_collections.ConfigDict({
      'max_epochs': 200,
      'steps_per_epoch': config_dict.placeholder(int),   # None: training perturbed images / (N * C)
      'max_steps': config_dict.placeholder(int),         # hard cap on optimizer updates
      'patience': 20,               # early stopping on validation loss, in evaluations
      'eval_every_epochs': 1,
      'log_every_steps': 50,
      'checkpoint_every_steps': 500,
      'profile_steps': 0,           # trace this many steps (after the first) with jax.profiler
      'profile_dir': config_dict.placeholder(str),   # None: workdir/profile (TensorBoard)
      'transfer_guard': 'allow',    # 'disallow': implicit host<->device transfers in the step
                                    # and evaluation loops raise (the tests' setting)
  })

  c.eval = ml_collections.ConfigDict({
      'num_perturbed': 64,          # perturbed images per test context (chunks of a plate)
      'num_controls': 128,          # fresh same-plate controls per test context
      'contexts_per_step': 8,
      'seed': 1234,                 # the fixed permutation of each plate's images
      'max_images_per_plate': config_dict.placeholder(int),   # None: every image of a plate
      'whole_plate': False,         # also evaluate with whole-plate statistics (streamed)
      'label_shift_alphas': (),     # also evaluate under Dirichlet(alpha) label shift
      'label_shift_seed': 5678,
      'chunk_size': 256,            # rows per pass when streaming whole plates
      'final_evaluation': True,     # evaluate every held-out part when training ends
  })

  # Test-time adaptation (methods tent | deyo | roid): no training; the model of a finished run
  # (any training method, same store and fold) is adapted on each test plate's contexts.
  c.tta = ml_collections.ConfigDict({
      'source': config_dict.placeholder(str),   # workdir of the trained run to adapt
      'settings': {},               # overrides of csarm_jax.tta's defaults, e.g. {'steps': 2}
  })

  # Domain adaptation (methods dann | coral): what a domain is, how training contexts cover the
  # domains, and whether the held-out plates' images join training unlabelled (label -1, domain
  # loss and statistics only: transductive, as the reference) or not (training domains only).
  c.domain = ml_collections.ConfigDict({
      'by': 'plate',                # plate | batch | source; counted from the run's plates
      'transductive': True,
      'domains_per_context': 4,     # domains per training context, an equal share of N each
      'num_unlabelled': config_dict.placeholder(int),   # held-out images per context
                                                        # (None: data.num_perturbed)
      'settings': {},               # overrides of methods/domain.py's defaults, e.g.
                                    # {'schedule': 'ganin'} or {'weight': 1.0}
  })

  c.distributed = ml_collections.ConfigDict({
      'enabled': False,             # or CSARM_DISTRIBUTED=1; arguments None = auto-detect
      'coordinator_address': config_dict.placeholder(str),
      'num_processes': config_dict.placeholder(int),
      'process_id': config_dict.placeholder(int),
  })
  return c


# The paper's within-source settings on JUMP (the reference's default data config, source_3 only):
# 5 folds of whole batches or plates, validation on 15 % of the training plates.
WITHIN_SOURCE = {'new_batches': 'batch', 'new_plates': 'plate'}
ERM_STYLE = ('erm', 'adabn', 'adabn_controls', 'dann', 'coral')


def reference_method_choices(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """How the reference trains each method, whatever the model: ERM-style methods take one update
  per batch (contexts_per_step=1), BEN's control statistics carry no gradient."""
  if c.method in ERM_STYLE:
    c.data.contexts_per_step = 1
  if c.method == 'ben':
    c.method_options.statistics_gradient = False
  return c


def jump_reference(c: ml_collections.ConfigDict, setting: str | None = None
                   ) -> ml_collections.ConfigDict:
  """The paper's JUMP configs: the reference's training choices (README, "Differences from the
  reference implementation") and its data setting.

  - every BatchNorm scale starts at 1 (the reference has no zero-init of the last BN), and the
    head pools as the reference's (border rows of the 8x8 map weigh less at 256 px);
  - ERM-style methods (and DANN / Deep CORAL, which the reference trains as ERM): one optimizer
    update per batch of N = 64 mixed images, BatchNorm over that batch (contexts_per_step=1; on
    D > 1 devices use D, i.e. D batches of 64 per update), with the released script's trainer
    settings, which are the defaults (Adam 1e-3, no schedule, early stopping with patience 20, at
    most 200 epochs);
  - BEN: the control statistics carry no gradient.

  setting: None or 'cross_source' -- leave-one-source-out S3 <-> S8 (the released script);
  'new_batches' / 'new_plates' -- within source_3, leave-batches-out / leave-plates-out (5 folds).
  """
  c.model.options.zero_init_last_bn = False
  c.model.options.head_pool = 'reference'    # AvgPool(7, stride 1), then a mean (equal at 224 px)
  reference_method_choices(c)
  if setting in (None, 'cross_source'):
    return c
  if setting not in WITHIN_SOURCE:
    raise ValueError(f"setting must be cross_source, {' or '.join(WITHIN_SOURCE)}, got {setting!r}")
  c.split.update(kind=WITHIN_SOURCE[setting], num_folds=5, sources=('source_3',),
                 validation_by='plate', validation_fraction=0.15)
  return c
