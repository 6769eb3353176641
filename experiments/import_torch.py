r"""Convert a checkpoint of the reference (ml-jku/cs-arm-bn, PyTorch) into a csarm-jax export.

  pip install -e '.[torch]'
  python experiments/import_torch.py --state_dict=CSARMBN_split0.pt --out=exports/reference0
  python experiments/predict.py --export=exports/reference0 --store=jump/images --out=predictions

The state_dict is the reference's ResNet-50 ``Featurizer`` (5 channels in the order RNA, ER, AGP,
Mito, DNA); the export takes the store's channel order (``--channels``, default csarm-jax's JUMP
order), the reference's normalisation statistics (``--mean``/``--std`` in the reference's order,
default the ones its PreTrainedCSARMBN hard-codes) and its test protocol (contexts of 64 perturbed
+ 128 same-plate controls, 256-px centre crops). The model reproduces the reference's head pooling,
so its logits are the reference's at 256 px too.
"""
from absl import app, flags

from csarm_jax import torch_import
from csarm_jax.data import constants

_STATE_DICT = flags.DEFINE_string('state_dict', None, 'The reference\'s .pt state_dict file.')
_OUT = flags.DEFINE_string('out', None, 'Directory to write the export to.')
_CHANNELS = flags.DEFINE_list('channels', list(constants.CHANNELS),
                              'Channel order of the stores the export will predict.')
_REF_CHANNELS = flags.DEFINE_list('reference_channels', list(torch_import.REFERENCE_CHANNELS),
                                  'Channel order of the checkpoint\'s input.')
_MEAN = flags.DEFINE_list('mean', [str(v) for v in torch_import.REFERENCE_MEAN],
                          'Per-channel mean of x / 255, in --reference_channels order.')
_STD = flags.DEFINE_list('std', [str(v) for v in torch_import.REFERENCE_STD],
                         'Per-channel std of x / 255, in --reference_channels order.')
_METHOD = flags.DEFINE_string('method', 'cs_arm_bn', 'The method the checkpoint was trained with '
                              '(its test-time rule): cs_arm_bn, arm_bn, ben, adabn, erm, ...')
_CROP = flags.DEFINE_integer('crop_size', 256, 'Centre crop at prediction (the reference: 256).')
_NUM_PERTURBED = flags.DEFINE_integer('num_perturbed', 64, 'Perturbed images per test context.')
_NUM_CONTROLS = flags.DEFINE_integer('num_controls', 128, 'Same-plate controls per test context.')
flags.mark_flags_as_required(['state_dict', 'out'])


def main(argv):
  del argv
  try:
    arrays = torch_import.read_state_dict(_STATE_DICT.value)
    path = torch_import.import_reference(
        arrays, _OUT.value, channels=_CHANNELS.value, reference_channels=_REF_CHANNELS.value,
        mean=[float(v) for v in _MEAN.value], std=[float(v) for v in _STD.value],
        method=_METHOD.value, crop_size=_CROP.value,
        eval_protocol={'num_perturbed': _NUM_PERTURBED.value, 'num_controls': _NUM_CONTROLS.value},
        provenance={'state_dict': _STATE_DICT.value})
  except ValueError as e:
    raise SystemExit(f'error: {_STATE_DICT.value}: {e}')
  print(f'imported {_STATE_DICT.value} ({len(arrays)} tensors) -> {path}')


if __name__ == '__main__':
  app.run(main)
