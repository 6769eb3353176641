"""ResNet-18/34/50 for NHWC images with any number of channels, built on ContextBatchNorm.

Matches the reference backbone's choices (ml-jku/cs-arm-bn ``plt/model/resnet.py``): 7x7 stride-2
stem + 3x3 max-pool; in ``'avgpool'`` downsampling the main path downsamples with an average pool
after its 3x3 conv and the shortcut is AvgPool -> 1x1 conv -> BN (ResNet-D style); ``'strided'`` is
the standard torchvision form. Head: ``head_pool='global'``, true global average pooling, or
``'reference'``, the reference's AvgPool(7, stride 1) followed by a mean over what remains (at
256 px the last map is 8x8 and border rows weigh 1/14, inner rows 2/14; at 224 px both are
identical), then a float32 Dense.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from csarm_jax.nn import ContextBatchNorm, max_pool

# as torch's kaiming_normal_
kaiming_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


HEAD_POOLS = ('global', 'reference')


def _head_pool(x: jax.Array, kind: str) -> jax.Array:
  """(N, H, W, C) -> (N, C) in float32: a global mean, or the reference's AvgPool(7, stride 1)
  (its windows overlap, so rows near the border are counted less) then a mean."""
  x = x.astype(jnp.float32)
  if kind == 'reference':
    if min(x.shape[1:3]) < 7:
      raise ValueError(f"head_pool='reference' pools 7x7 windows: the last stage's map is "
                       f'{x.shape[1]}x{x.shape[2]} (use inputs of at least 224 px)')
    x = nn.avg_pool(x, (7, 7), strides=(1, 1))
  return jnp.mean(x, axis=(1, 2))


class MatmulConv(nn.Module):
  """A bias-free k x k convolution written as one matrix product of image patches.

  Same parameter ('kernel', shape (k, k, in, out)) and initialisation as ``nn.Conv(out, (k, k))``,
  so checkpoints are interchangeable; equal to it up to float rounding. Used where XLA:CPU's
  convolution is slow: 1x1 convolutions on CPU (``conv1x1``), and on every backend for maps
  smaller than the kernel (the 3x3 convolutions of ResNet's 2x2 last stage at 64 px, which XLA:CPU
  runs ~80x slower than this product; BENCHMARKS.md section 8).
  """
  features: int
  kernel_size: int = 1
  strides: int = 1
  padding: int = 0
  dtype: Any = None
  kernel_init: Any = kaiming_fan_out

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel_size, self.strides
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if self.padding:
      x = jnp.pad(x, ((0, 0), (self.padding,) * 2, (self.padding,) * 2, (0, 0)))
    height, width = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
    patches = jnp.concatenate(        # (N, H', W', k*k*in), tap-major like the kernel's layout
        [x[:, i:i + s * (height - 1) + 1:s, j:j + s * (width - 1) + 1:s]
         for i in range(k) for j in range(k)], axis=-1)
    return jnp.einsum('nhwc,co->nhwo', patches, kernel.reshape(-1, self.features))


def _conv(features: int, kernel_size: int, dtype, strides: int = 1, *, as_matmul: bool,
          name: str):
  """A bias-free 'same'-padded convolution module: nn.Conv, or MatmulConv when ``as_matmul``."""
  padding = kernel_size // 2
  if as_matmul:
    return MatmulConv(features, kernel_size, strides, padding, dtype=dtype, name=name)
  return nn.Conv(features, (kernel_size, kernel_size), strides=strides, padding=padding,
                 use_bias=False, dtype=dtype, kernel_init=kaiming_fan_out, name=name)


def _conv1x1(kind: str, features: int, dtype, strides: int = 1, name: str | None = None):
  """A 1x1 convolution module: ``'conv'`` (nn.Conv) or ``'dot'`` (MatmulConv)."""
  return _conv(features, 1, dtype, strides, as_matmul=kind == 'dot', name=name)


def _conv3x3(x: jax.Array, features: int, dtype, strides: int = 1, *, name: str):
  """A 3x3 convolution module for input ``x``: a matrix product on maps smaller than the kernel."""
  return _conv(features, 3, dtype, strides, as_matmul=min(x.shape[1:3]) < 3, name=name)


def _avg_pool(x: jax.Array, stride: int) -> jax.Array:
  return nn.avg_pool(x, (stride, stride), strides=(stride, stride)) if stride > 1 else x


class BasicBlock(nn.Module):
  planes: int
  stride: int
  downsample: str
  zero_init_last: bool
  dtype: Any
  conv1x1: str = 'conv'
  expansion = 1

  @nn.compact
  def __call__(self, x, mode, weights):
    norm = partial(ContextBatchNorm, dtype=self.dtype)
    last_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
    pool_main = self.downsample == 'avgpool'
    y = _conv3x3(x, self.planes, self.dtype, 1 if pool_main else self.stride, name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y, mode, weights))
    if pool_main:
      y = _avg_pool(y, self.stride)
    y = _conv3x3(y, self.planes, self.dtype, name='conv2')(y)
    y = norm(scale_init=last_init, name='bn2')(y, mode, weights)
    return nn.relu(y + _shortcut(self, x, self.planes, mode, weights))


class Bottleneck(nn.Module):
  planes: int
  stride: int
  downsample: str
  zero_init_last: bool
  dtype: Any
  conv1x1: str = 'conv'
  expansion = 4

  @nn.compact
  def __call__(self, x, mode, weights):
    norm = partial(ContextBatchNorm, dtype=self.dtype)
    last_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
    pool_main = self.downsample == 'avgpool'
    y = _conv1x1(self.conv1x1, self.planes, self.dtype, name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y, mode, weights))
    y = _conv3x3(y, self.planes, self.dtype, 1 if pool_main else self.stride, name='conv2')(y)
    y = nn.relu(norm(name='bn2')(y, mode, weights))
    if pool_main:
      y = _avg_pool(y, self.stride)
    y = _conv1x1(self.conv1x1, self.planes * 4, self.dtype, name='conv3')(y)
    y = norm(scale_init=last_init, name='bn3')(y, mode, weights)
    return nn.relu(y + _shortcut(self, x, self.planes * 4, mode, weights))


def _shortcut(block: nn.Module, x, out_features: int, mode, weights):
  """Identity, or a projection when the shape changes (called inside the block's compact scope)."""
  if block.stride == 1 and x.shape[-1] == out_features:
    return x
  if block.downsample == 'avgpool':
    x = _avg_pool(x, block.stride)
    stride = 1
  else:
    stride = block.stride
  x = _conv1x1(block.conv1x1, out_features, block.dtype, stride, name='shortcut_conv')(x)
  return ContextBatchNorm(dtype=block.dtype, name='shortcut_bn')(x, mode, weights)


def _stem(resnet: 'ResNet', x, norm, weights):
  """7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max-pool; its modules belong to ``resnet``, so
  wrapping it in ``nn.remat`` leaves the parameter names as they are."""
  x = nn.Conv(resnet.width, (7, 7), strides=2, padding=3, use_bias=False, dtype=resnet.dtype,
              kernel_init=kaiming_fan_out, name='stem_conv')(x)
  x = nn.relu(ContextBatchNorm(dtype=resnet.dtype, name='stem_bn')(x, norm, weights))
  return max_pool(x, 3)        # nn.max_pool's 3x3, stride 2, padding 1; scatter-free gradient


class ResNet(nn.Module):
  """ResNet classifier. ``__call__(x, norm=..., weights=None, return_features=False)``."""
  stage_sizes: Sequence[int]
  block: str                       # 'basic' | 'bottleneck'
  num_classes: int
  in_channels: int = 5
  width: int = 64
  downsample: str = 'avgpool'      # 'avgpool' (reference) | 'strided' (torchvision)
  zero_init_last_bn: bool = True
  head_pool: str = 'global'        # 'global' (mean) | 'reference' (AvgPool(7, stride 1), then mean)
  dtype: Any = jnp.float32         # compute dtype; parameters and BN statistics stay float32
  remat: bool = False              # recompute the stem's and each block's activations in the
                                   # backward pass (the forward keeps their inputs only)
  conv1x1: str = 'conv'            # 'conv' | 'dot': 1x1 convolutions as matrix products (faster
                                   # on CPU; same parameters, equal up to float rounding)
  input_rank = 4

  @nn.compact
  def __call__(self, x, *, norm: str, weights=None, return_features: bool = False):
    if self.downsample not in ('avgpool', 'strided'):
      raise ValueError(f"downsample must be 'avgpool' or 'strided', got {self.downsample!r}")
    if self.head_pool not in HEAD_POOLS:
      raise ValueError(f'head_pool must be one of {HEAD_POOLS}, got {self.head_pool!r}')
    if self.conv1x1 not in ('conv', 'dot'):
      raise ValueError(f"conv1x1 must be 'conv' or 'dot', got {self.conv1x1!r}")
    block_cls = {'basic': BasicBlock, 'bottleneck': Bottleneck}[self.block]
    if self.remat:      # `mode` (argument 2) is static
      block_cls = nn.remat(block_cls, static_argnums=(2,))
    min_size = 2 ** (len(self.stage_sizes) + 1)      # stem /2, max-pool /2, each later stage /2
    if min(x.shape[1:3]) < min_size:
      raise ValueError(f'{self.num_classes}-class ResNet needs images of at least '
                       f'{min_size}x{min_size} pixels, got {x.shape[1]}x{x.shape[2]}')
    stem = nn.remat(_stem, static_argnums=(2,)) if self.remat else _stem
    x = stem(self, x.astype(self.dtype), norm, weights)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = block_cls(self.width * 2 ** i, stride, self.downsample, self.zero_init_last_bn,
                      self.dtype, self.conv1x1, name=f'stage{i + 1}_block{j}')(x, norm, weights)
    features = _head_pool(x, self.head_pool)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name='head')(features)
    return (logits, features) if return_features else logits


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block='basic')
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block='basic')
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block='bottleneck')
