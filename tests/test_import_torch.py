"""The reference's PyTorch checkpoints in JAX: a PyTorch model of the reference's architecture
(written here from its description) and its converted export give the same logits."""
import collections
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
from torch import nn  # noqa: E402

from csarm_jax import data, inference, torch_import  # noqa: E402
from csarm_jax.evaluation import metrics as metrics_lib  # noqa: E402
from store_fixture import write_store  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 8                     # the reference's is 64; the converter reads the width off the weights


class Bottleneck(nn.Module):
  """1x1 -> BN -> ReLU -> 3x3 -> BN -> ReLU -> AvgPool(stride) -> 1x1 -> BN, + shortcut, ReLU; the
  shortcut (stride > 1 or a channel change) is AvgPool(stride) -> 1x1 conv -> BN."""

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
    self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
    self.downsample = None
    if stride > 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(collections.OrderedDict([
          ('-1', nn.AvgPool2d(stride)), ('0', nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
          ('1', nn.BatchNorm2d(planes * 4))]))

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.avgpool(torch.relu(self.bn2(self.conv2(out))))
    out = self.bn3(self.conv3(out))
    return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
  def __init__(self, width, in_channels=5):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    inplanes = width
    for k, blocks in enumerate((3, 4, 6, 3)):
      planes = width * 2 ** k
      layer = [Bottleneck(inplanes if i == 0 else planes * 4, planes, 2 if k and not i else 1)
               for i in range(blocks)]
      setattr(self, f'layer{k + 1}', nn.Sequential(*layer))
      inplanes = planes * 4
    self.avgpool = nn.AvgPool2d(7, stride=1)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    x = self.avgpool(x)
    if x.shape[-2:] != (1, 1):
      x = nn.AvgPool2d(x.shape[2:])(x)
    return x.flatten(1)


class Featurizer(nn.Module):
  def __init__(self, width=WIDTH, num_classes=8):
    super().__init__()
    self.featurizer = ResNet50(width)
    self.classifier = nn.Linear(width * 32, num_classes)

  def forward(self, x):
    return self.classifier(self.featurizer(x))


def _random_reference(width=WIDTH, seed=0):
  """Random weights, and BN affine parameters and running statistics far from 1/0."""
  torch.manual_seed(seed)
  model = Featurizer(width)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.3)
        m.running_var.uniform_(0.5, 2.0)
        m.num_batches_tracked.fill_(17)
  return model


def _arrays(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _torch_logits(model, x, train):
  model.train(train)
  with torch.no_grad():
    return model(torch.from_numpy(x)).numpy()


def _to_store_order(x_nchw):
  """Reference-order NCHW -> the store's channel order, NHWC."""
  order = torch_import.channel_order(torch_import.REFERENCE_CHANNELS, data.CHANNELS)
  return x_nchw.transpose(0, 2, 3, 1)[..., order]


def test_reference_state_dict_keys_convert_at_full_width():
  """The real model: 320 tensors named as in the reference, all mapped, shapes checked."""
  arrays = _arrays(Featurizer(width=64))
  assert len(arrays) == 320
  assert {'featurizer.conv1.weight', 'featurizer.bn1.running_var', 'classifier.bias',
          'featurizer.layer1.0.downsample.0.weight', 'featurizer.layer4.0.downsample.1.weight',
          'featurizer.layer3.5.conv3.weight',
          'featurizer.layer4.2.bn3.num_batches_tracked'} <= set(arrays)
  variables, options, ignored = torch_import.convert_state_dict(arrays)
  assert ignored == 53 and options['width'] == 64 and options['head_pool'] == 'reference'
  assert variables['params']['stem_conv']['kernel'].shape == (7, 7, 5, 64)
  assert variables['params']['head']['kernel'].shape == (2048, 8)
  assert variables['params']['stage4_block0']['shortcut_conv']['kernel'].shape == (1, 1, 1024, 2048)
  np.testing.assert_array_equal(variables['params']['stage2_block1']['conv2']['kernel'],
                                arrays['featurizer.layer2.1.conv2.weight'].transpose(2, 3, 1, 0))


@pytest.mark.parametrize('size', [224, 256])
def test_converted_model_gives_the_reference_logits(tmp_path, size):
  model = _random_reference()
  out = torch_import.import_reference(_arrays(model), str(tmp_path / 'export'))
  member = inference.load(out)
  rng = np.random.default_rng(size)   # images with coarse structure, so their logits differ
  coarse = rng.normal(size=(6, 5, 8, 8)) * rng.uniform(0.5, 2.0, (6, 5, 1, 1))
  x = (np.repeat(np.repeat(coarse, size // 8, 2), size // 8, 3)
       + 0.3 * rng.normal(size=(6, 5, size, size))).astype(np.float32)
  x_jax = jnp.asarray(_to_store_order(x))
  apply = jax.jit(member.model.apply, static_argnames='norm')
  # running statistics first: a train-mode forward in PyTorch updates them
  for train, norm in ((False, 'running'), (True, 'context')):
    expected = _torch_logits(model, x, train)
    got = np.asarray(apply(member.variables, x_jax, norm=norm))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  assert np.std(expected, axis=0).min() > 0.02     # the context-mode logits differ across images


def test_import_then_predict_round_trip(tmp_path):
  """.pt file -> import_torch.py -> export -> prediction of a store: the reference model's
  probabilities on the context of every perturbed image with all of the plate's controls,
  through the store's channel order and the reference's normalisation."""
  model = _random_reference(seed=1)
  torch.save(model.state_dict(), tmp_path / 'ref.pt')
  _, images = write_store(tmp_path / 'store', sources=('source_3',), batches_per_source=1,
                          plates_per_batch=1, perturbed_per_plate=6, controls_per_plate=4,
                          item_shape=(224, 224, 5), shard_items=10)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'experiments', 'import_torch.py'),
       f'--state_dict={tmp_path / "ref.pt"}', f'--out={tmp_path / "export"}', '--crop_size=224',
       '--num_perturbed=8', '--num_controls=4'], capture_output=True, text=True, env=env)
  assert result.returncode == 0 and '(320 tensors)' in result.stdout, result.stderr[-3000:]
  member = inference.load(str(tmp_path / 'export'))
  assert member.spec['channels'] == list(data.CHANNELS)
  assert member.spec['provenance']['tensors_ignored'] == 53
  frame, wells = inference.predict_store([member], data.open_store(str(tmp_path / 'store')))
  frame = frame.sort_values('row')
  assert frame['row'].tolist() == list(range(6)) and len(wells) == 6

  ref_order = [data.CHANNELS.index(c) for c in torch_import.REFERENCE_CHANNELS]
  x = images[..., ref_order].astype(np.float32) / 255.0
  x = (x - np.float32(torch_import.REFERENCE_MEAN)) / np.float32(torch_import.REFERENCE_STD)
  logits = _torch_logits(model, x.transpose(0, 3, 1, 2).astype(np.float32), train=True)[:6]
  probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
  np.testing.assert_allclose(frame[metrics_lib.prob_columns(8)].to_numpy(), probs, atol=2e-4)


def test_bad_state_dicts_and_channels_are_named():
  arrays = _arrays(Featurizer())
  with pytest.raises(ValueError, match='featurizer.layer1.0.bn1.weight'):
    bad = dict(arrays)
    bad['featurizer.layer1.0.bn1.weights'] = bad.pop('featurizer.layer1.0.bn1.weight')
    torch_import.convert_state_dict(bad)
  with pytest.raises(ValueError, match='gives no value for params/stage2_block0/bn3/scale'):
    torch_import.convert_state_dict({k: v for k, v in arrays.items()
                                     if k != 'featurizer.layer2.0.bn3.weight'})
  with pytest.raises(ValueError, match=r'\(3, 4, 5, 3\) blocks per stage'):
    torch_import.convert_state_dict({k: v for k, v in arrays.items() if '.layer3.5.' not in k})
  with pytest.raises(ValueError, match='not a reordering'):
    torch_import.channel_order(torch_import.REFERENCE_CHANNELS, ('DNA', 'ER', 'RNA', 'AGP', 'BF'))


def test_bad_checkpoint_file_is_one_line(tmp_path):
  torch.save({'conv.weight': torch.zeros(2, 2)}, tmp_path / 'other.pt')
  result = subprocess.run([sys.executable, os.path.join(REPO, 'experiments', 'import_torch.py'),
                           f'--state_dict={tmp_path / "other.pt"}', f'--out={tmp_path / "x"}'],
                          capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'other.pt'}: featurizer.conv1.weight is missing: not a state_dict of "
      "the reference's Featurizer"]


def test_missing_torch_is_named(monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ValueError, match=r"^reading a PyTorch checkpoint needs torch: pip install"):
    torch_import.read_state_dict('x.pt')
