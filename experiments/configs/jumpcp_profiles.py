"""CellProfiler profiles + MLP on JUMP, the reference's CellProfiler setting: the features store
that data_prep/jump_profiles.py writes (one row per well, float32 throughout).

- domains = batches: leave-batches-out, 5 folds of whole batches, validation on 15 % of each fold's
  training batches (the reference's GroupKFold / GroupShuffleSplit over Metadata_Batch);
  'cross_source' instead: leave-one-source-out with validation by batch, as the image configs;
- standardisation: each feature's mean and std over the fold's training wells (perturbed), a
  feature constant there centred only (std 1, as the reference's StandardScaler);
- MLP: BatchNorm on the standardised inputs, 2 hidden layers of 512 (Dense -> BatchNorm -> ReLU ->
  dropout 0.2), a linear head; every BatchNorm a ContextBatchNorm, so context methods apply;
- batch 128: ERM-style methods one update per batch of 128 wells of any plates; context methods
  4 contexts of one plate's 32 perturbed wells (+ 32 of its DMSO wells where the method uses
  controls) per update, 4 x 32 = 128 labelled wells; a plate with fewer wells is padded (masked),
  never sampled twice;
- Adam 1e-3, no schedule, early stopping (patience 20) on validation loss, at most 200 epochs.

  python experiments/train.py --config=experiments/configs/jumpcp_profiles.py:erm \
      --config.store=PROFILES_STORE --config.split.fold=0 --workdir=runs/profiles_erm_fold0
  python experiments/train.py --config=experiments/configs/jumpcp_profiles.py:cs_arm_bn \
      --config.store=PROFILES_STORE --config.split.fold=0 --workdir=runs/profiles_csarm_fold0

The optional variant after ':' names the method (erm, adabn, adabn_controls, arm_bn, cs_arm_bn,
ben; default erm, the reference's), optionally followed by ',' and the setting (new_batches, the
default, or cross_source).
"""
import ml_collections

from configs.default import get_config as _default, reference_method_choices

SETTINGS = ('new_batches', 'cross_source')


def profiles_recipe(c: ml_collections.ConfigDict, method: str,
                    setting: str) -> ml_collections.ConfigDict:
  """The profiles + MLP recipe (model, contexts, optimizer, split) on ``c``."""
  if setting not in SETTINGS:
    raise ValueError(f'setting must be one of {SETTINGS}, got {setting!r}')
  c.method = method
  c.model.name = 'mlp'
  c.model.options = {'hidden': 512, 'num_layers': 2, 'dropout': 0.2, 'input_norm': True}
  c.model.dtype = 'float32'
  c.data.update(num_perturbed=32, num_controls=32, contexts_per_step=4, too_few='pad')
  c.eval.update(num_perturbed=32, num_controls=32, contexts_per_step=8)
  reference_method_choices(c)
  if c.data.contexts_per_step == 1:         # ERM-style: one batch of 128 wells per update
    c.data.num_perturbed = 128
  if setting == 'new_batches':
    c.split.update(kind='batch', num_folds=5, validation_by='batch', validation_fraction=0.15)
  else:
    c.split.update(kind='source', validation_by='batch', validation_fraction=0.15)
  return c


def get_config(variant=None):
  method, _, setting = (variant or '').partition(',')
  return profiles_recipe(_default(), method or 'erm', setting or 'new_batches')
