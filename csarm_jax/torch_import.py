"""The reference's PyTorch checkpoints (ml-jku/cs-arm-bn) as csarm-jax exports.

    variables, options, ignored = convert_state_dict(arrays)   # {key: numpy array} -> flax
    import_reference(arrays, out, channels=CHANNELS)           # -> an export predict.py loads

The reference's model (``Featurizer``: its ResNet-50 + ``Linear(2048, classes)``) is csarm-jax's
``resnet50`` with ``downsample='avgpool'`` and ``head_pool='reference'``; its ``state_dict`` keys
map one to one (``featurizer.conv1`` -> ``stem_conv``, ``featurizer.layer{k}.{i}.conv{j}`` ->
``stage{k}_block{i}/conv{j}``, ``downsample.0/.1`` -> ``shortcut_conv/_bn``, ``classifier`` ->
``head``), convolutions OIHW -> HWIO, BatchNorm weight/bias -> scale/bias and running mean/var ->
``batch_stats``. The first convolution's input channels and the normalisation statistics are
reordered from the reference's channel order (RNA, ER, AGP, Mito, DNA) to the target store's. This
module works on numpy arrays; only ``read_state_dict`` (a ``.pt`` file) imports torch, when called.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from csarm_jax import models
from csarm_jax.data import constants, normalization

REFERENCE_CHANNELS = ('RNA', 'ER', 'AGP', 'Mito', 'DNA')
# The statistics the reference's PreTrainedCSARMBN hard-codes (units of x / 255, reference order).
REFERENCE_MEAN = (0.0913, 0.0880, 0.1122, 0.0765, 0.0598)
REFERENCE_STD = (0.1152, 0.1075, 0.1067, 0.0796, 0.0944)
MODEL = 'resnet50'
STAGE_SIZES = (3, 4, 6, 3)
IGNORED_SUFFIX = '.num_batches_tracked'        # PyTorch's BN step counter: nothing to convert

_BN = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
       'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}
_BLOCK = re.compile(
    r'featurizer\.layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(\w+)$')
_RENAME = {'downsample.0': 'shortcut_conv', 'downsample.1': 'shortcut_bn'}
_TOP = re.compile(r'(featurizer\.conv1|featurizer\.bn1|classifier)\.(\w+)$')
_TOP_NAMES = {'featurizer.conv1': 'stem_conv', 'featurizer.bn1': 'stem_bn', 'classifier': 'head'}


class StateDictError(ValueError):
  """A state_dict that is not the reference's model (message names the key)."""


def _target(key: str) -> tuple[str, str, str] | None:
  """(collection, layer path, leaf) of a state_dict key; None if it is not the reference's."""
  m = _BLOCK.match(key)
  if m:
    stage, block, layer, leaf = m.groups()
    layer = f'stage{stage}_block{block}/{_RENAME.get(layer, layer)}'
  else:
    m = _TOP.match(key)
    if not m:
      return None
    layer, leaf = _TOP_NAMES[m.group(1)], m.group(2)
  kind = layer.rsplit('/', 1)[-1]
  if 'conv' in kind and leaf == 'weight':
    return 'params', layer, 'kernel'
  if kind == 'head' and leaf in ('weight', 'bias'):
    return 'params', layer, {'weight': 'kernel', 'bias': 'bias'}[leaf]
  if 'bn' in kind and leaf in _BN:
    return _BN[leaf][0], layer, _BN[leaf][1]
  return None


def _to_flax(key: str, value: np.ndarray) -> np.ndarray:
  value = np.asarray(value, np.float32)
  if value.ndim == 4:                        # conv OIHW -> HWIO
    return value.transpose(2, 3, 1, 0)
  if key == 'classifier.weight':             # Linear (out, in) -> Dense (in, out)
    return value.T
  return value


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: float32 numpy array} of a torch ``.pt`` state_dict (tensors only, no pickled code)."""
  try:
    import torch
  except ImportError:
    raise StateDictError("reading a PyTorch checkpoint needs torch: pip install -e '.[torch]'"
                         ) from None
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same one-line message
    raise StateDictError(f'not a readable PyTorch state_dict ({type(e).__name__}: {e})') from None
  if isinstance(state, dict) and 'state_dict' in state:
    state = state['state_dict']
  if not isinstance(state, dict):
    raise StateDictError(f'holds a {type(state).__name__}, not a state_dict')
  bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise StateDictError(f'entry {bad[0]!r} is not a tensor ({len(bad)} such entries)')
  return {k: v.detach().float().numpy() for k, v in state.items()}


def layout(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Model options read off the state_dict: width, input channels, classes; checks the depth."""
  for key in ('featurizer.conv1.weight', 'classifier.weight'):
    if key not in arrays:
      raise StateDictError(f'{key} is missing: not a state_dict of the reference\'s Featurizer')
  blocks = {}
  for key in arrays:
    m = _BLOCK.match(key)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  sizes = tuple(len(blocks.get(k, ())) for k in range(1, 5))
  if sizes != STAGE_SIZES or not any('.conv3.' in k for k in arrays):
    raise StateDictError(f'the state_dict has {sizes} blocks per stage; only the reference\'s '
                       f'ResNet-50 (bottleneck blocks {STAGE_SIZES}) is supported')
  conv1 = np.shape(arrays['featurizer.conv1.weight'])
  return {'width': int(conv1[0]), 'in_channels': int(conv1[1]),
          'num_classes': int(np.shape(arrays['classifier.weight'])[0])}


def convert_state_dict(arrays: Mapping[str, np.ndarray], input_order: Sequence[int] | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any], int]:
  """(variables {'params', 'batch_stats'}, model options, tensors ignored) of a state_dict.

  ``input_order[c]`` is the reference channel that the model's input channel c takes (default: the
  same order). Every key must map to a variable and every variable be given, else StateDictError.
  """
  opts = layout(arrays)
  options = {'width': opts['width'], 'downsample': 'avgpool', 'zero_init_last_bn': False,
             'head_pool': 'reference', 'in_channels': opts['in_channels']}
  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  ignored = 0
  for key, value in arrays.items():
    if key.endswith(IGNORED_SUFFIX):
      ignored += 1
      continue
    target = _target(key)
    if target is None:
      raise StateDictError(f'{key}: not a parameter of the reference\'s ResNet-50 Featurizer')
    collection, layer, leaf = target
    value = _to_flax(key, value)
    if key == 'featurizer.conv1.weight' and input_order is not None:
      value = value[:, :, list(input_order), :]
    node = variables[collection]
    for part in layer.split('/'):
      node = node.setdefault(part, {})
    node[leaf] = value
  model = models.create(MODEL, opts['num_classes'], **options)
  expected = jax.eval_shape(lambda: models.init_variables(
      model, jax.random.key(0), jnp.zeros((1, 224, 224, opts['in_channels']))))
  _check_against(variables, expected)
  return variables, options, ignored


def _check_against(variables: dict[str, Any], expected: dict[str, Any]) -> None:
  got = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
  want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  name = lambda path: '/'.join(str(getattr(p, 'key', p)) for p in path)
  for path in want:
    if path not in got:
      raise StateDictError(f'the state_dict gives no value for {name(path)}')
    if tuple(got[path].shape) != tuple(want[path].shape):
      raise StateDictError(f'{name(path)}: shape {tuple(got[path].shape)} (after OIHW -> HWIO), '
                         f'the model needs {tuple(want[path].shape)}')


def channel_order(source: Sequence[str], target: Sequence[str]) -> list[int]:
  """Index into ``source`` of each ``target`` channel (the same channel names, any order)."""
  if sorted(source) != sorted(target) or len(set(target)) != len(target):
    raise StateDictError(f'channels {list(target)} are not a reordering of the checkpoint\'s '
                       f'{list(source)}')
  return [list(source).index(c) for c in target]


def import_reference(arrays: Mapping[str, np.ndarray], out: str, *,
                     channels: Sequence[str] = constants.CHANNELS,
                     reference_channels: Sequence[str] = REFERENCE_CHANNELS,
                     mean: Sequence[float] = REFERENCE_MEAN, std: Sequence[float] = REFERENCE_STD,
                     method: str = 'cs_arm_bn', crop_size: int = 256,
                     classes: Sequence[tuple[str, str]] = constants.POSITIVE_CONTROLS,
                     eval_protocol: Mapping[str, Any] | None = None,
                     provenance: Mapping[str, Any] | None = None) -> str:
  """Converts a reference state_dict into an export at ``out`` for uint8 stores with ``channels``.

  ``mean``/``std`` are the reference's normalisation statistics in its channel order and units of
  x / 255; ``eval_protocol`` (num_perturbed, num_controls, seed, too_few) defaults to the
  reference's test contexts: 64 perturbed + 128 controls, seed 1234.
  """
  from csarm_jax import inference, methods   # inference imports training: keep this module light
  methods.get(method)
  if len(mean) != len(reference_channels) or len(std) != len(reference_channels):
    raise StateDictError(f'mean and std need one value per channel {list(reference_channels)}')
  order = channel_order(reference_channels, channels)
  variables, options, ignored = convert_state_dict(arrays, order)
  num_classes = int(variables['params']['head']['bias'].shape[0])
  if num_classes != len(classes):
    raise StateDictError(f'classifier.weight has {num_classes} outputs for {len(classes)} classes')
  norm = normalization.NormStats(
      mean=np.asarray(mean, np.float32)[order], std=np.asarray(std, np.float32)[order],
      kind='images', max_value=255.0, channels=tuple(channels), num_images=0)
  spec = {'model': {'name': MODEL, 'num_classes': num_classes, 'options': options,
                    'dtype': 'float32'},
          'method': method, 'store_kind': 'images', 'channels': list(channels),
          'classes': [{'id': i, 'name': n} for i, n in classes], 'crop_size': crop_size,
          'eval': {'num_perturbed': 64, 'num_controls': 128, 'seed': 1234, 'too_few': 'replace',
                   **(eval_protocol or {})}}
  record = {'imported_from': 'pytorch state_dict (ml-jku/cs-arm-bn Featurizer)',
            'reference_channels': list(reference_channels), 'tensors_ignored': ignored,
            **(provenance or {})}
  variables = jax.tree.map(jnp.asarray, variables)
  return inference.write_export(os.fspath(out), variables, spec, norm, record)
