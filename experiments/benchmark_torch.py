r"""The CPU training step and forward pass of csarm-jax against an equivalent PyTorch model.

Both run in one process, alternated step by step (the machine may be shared, so only the ratio
means anything); the ratio is PyTorch's median time over JAX's (>= 1: JAX at least as fast), for
each JAX variant (``--conv1x1``: 1x1 convolutions as convolutions, the default, or matrix products).

  pip install -e '.[torch]'      # torch, for this script only
  python experiments/benchmark_torch.py --models=resnet50,resnet18 --sizes=64,128 --conv1x1=conv,dot

The step is one context of P perturbed + K control images: train-mode BatchNorm over the context,
mean cross-entropy over the perturbed rows, backward, one Adam update. The forward pass is the same
context in train-mode BatchNorm without gradients. The PyTorch models are the reference's
(ml-jku/cs-arm-bn ``plt/model/resnet.py``): AvgPool downsampling in the main path and shortcut,
7x7 stem + max-pool, global average pooling, Linear head; ResNet-18 is our basic-block variant.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

from absl import app, flags

from bench_common import host_info

_MODELS = flags.DEFINE_list('models', ['resnet50', 'resnet18'], 'resnet50 and/or resnet18.')
_SIZES = flags.DEFINE_list('sizes', ['64', '128'], 'Square image sizes.')
_PERTURBED = flags.DEFINE_integer('perturbed', 16, 'Perturbed (labelled) images per context.')
_CONTROLS = flags.DEFINE_integer('controls', 32, 'Control images per context.')
_CHANNELS = flags.DEFINE_integer('channels', 5, 'Image channels.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per framework (after one warm-up step).')
_PAUSE = flags.DEFINE_float('pause', 0.5, 'Seconds of idle between calls, so that neither '
                            "framework's still-spinning worker threads slow the other's call.")
_CONV1X1 = flags.DEFINE_list('conv1x1', ['conv', 'dot'],
                             "JAX variants timed: 1x1 convolutions as 'conv' and/or 'dot'.")


def torch_resnet(name: str, in_channels: int, num_classes: int):
  """The reference's ResNet-50 (avg-pool downsampling) or the ResNet-18 of the same family."""
  import torch
  from torch import nn

  class Block(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, bottleneck: bool):
      super().__init__()
      out = planes * (4 if bottleneck else 1)
      if bottleneck:
        self.main = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True), nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
            nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out))
      else:
        self.main = nn.Sequential(
            nn.Conv2d(inplanes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True), nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
            nn.Conv2d(planes, out, 3, padding=1, bias=False), nn.BatchNorm2d(out))
      self.shortcut = nn.Identity() if stride == 1 and inplanes == out else nn.Sequential(
          nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
          nn.Conv2d(inplanes, out, 1, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
      return torch.relu(self.main(x) + self.shortcut(x))

  bottleneck = name == 'resnet50'
  layers = {'resnet50': (3, 4, 6, 3), 'resnet18': (2, 2, 2, 2)}[name]
  modules = [nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
             nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
  inplanes = 64
  for i, blocks in enumerate(layers):
    for j in range(blocks):
      planes = 64 * 2 ** i
      modules.append(Block(inplanes, planes, 2 if i > 0 and j == 0 else 1, bottleneck))
      inplanes = planes * (4 if bottleneck else 1)
  modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes)]
  model = nn.Sequential(*modules)
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
  return model


def torch_fns(name: str, images, labels) -> tuple[Callable, Callable]:
  """(train step, forward) of the PyTorch model on one context (NCHW float32 from uint8)."""
  import torch
  model = torch_resnet(name, images.shape[-1], 8).train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  x_u8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(labels).long()
  labelled = y >= 0

  def step():
    logits = model(x_u8.float() / 255.0)
    loss = torch.nn.functional.cross_entropy(logits[labelled], y[labelled])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()

  def forward():
    with torch.no_grad():
      return model(x_u8.float() / 255.0).sum().item()
  return step, forward


def jax_fns(name: str, images, labels, conv1x1: str) -> tuple[Callable, Callable]:
  """(train step, forward) of csarm-jax's compiled CS-ARM-BN step on the same context."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import csarm_jax as cj
  from csarm_jax import methods, models, training

  model = models.create(name, 8, in_channels=images.shape[-1], conv1x1=conv1x1)
  tx = optax.adam(1e-3)
  preprocess = lambda x: x.astype(jnp.float32) / 255.0
  batch = {'images': images[None], 'labels': labels[None],
           'mask': np.ones(labels.shape, np.float32)[None], 'is_control': (labels < 0)[None]}
  batch = jax.tree.map(jnp.asarray, batch)
  holder = {'state': training.create_state(model, tx, jax.random.key(0),
                                           jnp.zeros((2,) + images.shape[1:]))}
  train_step = jax.jit(training.make_train_step(model, methods.CS_ARM_BN, tx, preprocess),
                       donate_argnums=0)
  forward_fn = jax.jit(lambda v, x: cj.context_forward(model, v, preprocess(x)).sum())

  def step():
    holder['state'], metrics = train_step(holder['state'], batch)
    return float(metrics['loss'])

  def forward():
    return float(forward_fn(holder['state'].variables, batch['images'][0]))
  return step, forward


def alternate(fns: dict[str, Callable], steps: int, pause: float) -> dict[str, Any]:
  """One warm-up call each (JAX compiles), then `steps` rounds calling every fn in turn, `pause`
  seconds apart; the median seconds of each and PyTorch's median over each JAX variant's."""
  for fn in fns.values():
    fn()
  times = {k: [] for k in fns}
  for _ in range(steps):
    for which, fn in fns.items():
      time.sleep(pause)
      start = time.perf_counter()
      fn()
      times[which].append(time.perf_counter() - start)
  medians = {k: statistics.median(v) for k, v in times.items()}
  out = {f'{k}_s_median': round(v, 4) for k, v in medians.items()}
  out.update({f'torch_over_{k}': round(medians['torch'] / v, 3) for k, v in medians.items()
              if k != 'torch'})
  return out


def main(argv):
  del argv
  import numpy as np
  import torch
  rows = []
  for name in _MODELS.value:
    for size in map(int, _SIZES.value):
      rng = np.random.default_rng(0)
      m = _PERTURBED.value + _CONTROLS.value
      images = rng.integers(0, 256, (m, size, size, _CHANNELS.value), dtype=np.uint8)
      labels = np.full(m, -1, np.int32)
      labels[:_PERTURBED.value] = rng.integers(0, 8, _PERTURBED.value)
      fns = {f'jax_{kind}': jax_fns(name, images, labels, kind) for kind in _CONV1X1.value}
      fns['torch'] = torch_fns(name, images, labels)
      rows.append({'model': name, 'image_size': size, 'images': m, **{
          what: alternate({k: v[i] for k, v in fns.items()}, _STEPS.value, _PAUSE.value)
          for i, what in enumerate(('step', 'forward'))}})
      print(json.dumps(rows[-1]), flush=True)
  print(json.dumps({'bench': 'torch_vs_jax', 'host': host_info(('numpy', 'jax', 'flax', 'torch')),
                    'torch_threads': torch.get_num_threads(), 'conv1x1': _CONV1X1.value,
                    'steps': _STEPS.value, 'pause_s': _PAUSE.value,
                    'dtype': 'float32', 'results': rows}, indent=1))


if __name__ == '__main__':
  app.run(main)
