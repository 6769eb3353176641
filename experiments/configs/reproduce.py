"""The reproduction study (experiments/reproduce.py).

  quick: the synthetic quickstart benchmark, small CNN, 3 seeds of one leave-one-source-out fold;
         about 30 minutes on 2 CPU cores.
  full:  the 'large' synthetic benchmark, ResNet-18, every leave-one-source-out fold x 3 seeds;
         sized for one GPU/TPU host. On a real store (e.g. JUMP sources 3 and 8):
         --config.experiment.store=PATH --config.experiment.synthetic.preset=''
"""
import ml_collections
from ml_collections import config_dict

from configs import quickstart
from configs.default import get_config as _default

METHODS = ('erm', 'adabn', 'adabn_controls', 'ben', 'arm_bn', 'cs_arm_bn', 'arm_cml',
           'cs_arm_cml', 'tent', 'deyo', 'roid')


def get_config(variant='quick'):
  if variant not in ('quick', 'full'):
    raise ValueError(f"variant must be 'quick' or 'full', got {variant!r}")
  c = ml_collections.ConfigDict()
  c.methods = METHODS
  # Test-time methods (tent, deyo, roid) adapt the study's own model of this training method;
  # 'tent@cs_arm_bn' names another source for one entry.
  c.tta_source = 'erm'
  c.seeds = (0, 1, 2)                        # training seeds (parameters, training contexts)
  # Benchmark seeds: each builds its own synthetic store (same preset; the store path gains
  # '-seed<b>'), crossed with the training seeds. A non-synthetic store allows one.
  c.benchmark_seeds = (0,)
  # Variants of the benchmark (a store per benchmark seed, its own trained models), scored on the
  # sweep setting, balanced and under these label-shift alphas only:
  # name -> {synthetic: preset overrides, methods, label_shift_alphas}.
  c.benchmark_variants = {}
  # Extra sections: name -> {overrides: of c.experiment (nested; '{workdir}', '{benchmark_seed}',
  # '{store}' (the main section's store of that seed) filled in string values), methods}; each runs
  # the same study on its own experiment config, per benchmark seed.
  c.sections = {}
  c.folds = config_dict.placeholder(tuple)   # None: every fold of the split
  # display name of each setting -> the fold part scored for it (one trained model scores all)
  c.settings = {'in_domain': 'in_domain', 'unseen_batches': 'unseen_batches',
                'unseen_source': 'test'}
  c.sweeps = ml_collections.ConfigDict({
      'part': 'test',                           # sweeps score the unseen source
      'label_shift_alphas': (1.0, 0.1, 0.01),   # plus 'balanced' (the default protocol)
      'perturbed': (1, 4, 16, 64),              # perturbed images per test context
      'controls': (0, 8, 32, 128),              # DMSO controls per test context
      'max_images_per_plate': 32,               # sweeps score a fixed subset of each plate
  })
  c.embedding = ml_collections.ConfigDict({
      'methods': ('erm', 'cs_arm_bn'), 'fold': 0, 'seed': 0, 'benchmark_seed': 0,
      'parts': ('test', 'in_domain', 'unseen_batches'), 'max_images_per_plate': 24})
  # c.experiment: the experiment config (as train.py takes) of every run, before the study sets
  # its method, fold and seed.
  if variant == 'quick':
    c.folds = (0,)
    c.benchmark_seeds = (0, 1, 2)
    c.seeds = (0,)
    # How the alpha = 0.01 result depends on the shift's size (make_synthetic.py
    # --effects.strength=1.3): only the methods that result is about.
    c.benchmark_variants = {'strength_1_3': {
        'synthetic': {'effects': {'strength': 1.3}}, 'methods': ('arm_bn', 'cs_arm_bn'),
        'label_shift_alphas': (0.01,)}}
    c.experiment = quickstart.get_config()
    c.experiment.split.update(validation_fraction=0.15, unseen_batches_fraction=0.2,
                              in_domain_fraction=0.1)
    c.experiment.train.max_epochs = 10
  else:
    c.experiment = _default()
    c.experiment.store = 'data/large'
    c.experiment.synthetic.preset = 'large'
    c.experiment.model.name = 'resnet18'
    c.experiment.data.update(crop_size=160, num_perturbed=64, num_controls=128, contexts_per_step=8)
    c.experiment.split.update(validation_fraction=0.15, unseen_batches_fraction=0.25,
                              in_domain_fraction=0.15)
    c.experiment.train.update(max_epochs=60, patience=10)
    c.sweeps.max_images_per_plate = 128
  return c
