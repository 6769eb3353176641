r"""Benchmarks that print JSON with the backend, devices and shapes (never run as tests).

  python experiments/benchmark.py --bench=step   # compiled, sharded meta-training step + adapt/predict
  python experiments/benchmark.py --bench=step --model=resnet50 --image_size=256 --perturbed=64 \
      --controls=128 --contexts=8 --dtype=bfloat16          # the paper's setting (GPU/TPU)

Images/s counts every image forwarded (controls included). The step benchmark feeds device-resident
random uint8 contexts, so it measures the model step alone; ``--bench=loader`` measures the input
pipeline alone and ``--bench=train`` the full step with data.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Any

from absl import app, flags

_BENCH = flags.DEFINE_enum('bench', 'step', ['step', 'loader', 'train'], 'What to measure.')
_MODEL = flags.DEFINE_string('model', 'resnet18', 'Model name (csarm_jax.models.names()).')
_WIDTH = flags.DEFINE_integer('width', 64, 'ResNet/CNN base width.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 128, 'Crop size fed to the model (square).')
_CHANNELS = flags.DEFINE_integer('channels', 5, 'Image channels.')
_PERTURBED = flags.DEFINE_integer('perturbed', 16, 'Perturbed (labelled) images per context.')
_CONTROLS = flags.DEFINE_integer('controls', 32, 'DMSO control images per context.')
_CONTEXTS = flags.DEFINE_integer('contexts', 4, 'Contexts per step (a multiple of the devices).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_METHOD = flags.DEFINE_string('method', 'cs_arm_bn', 'Method whose training step is timed.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (after one compile step).')


def environment() -> dict[str, Any]:
  import jax
  return {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
          'devices': jax.device_count(), 'processes': jax.process_count(),
          'jax': jax.__version__, 'python': platform.python_version(), 'host': platform.node(),
          'cpu_count': __import__('os').cpu_count()}


def _timed(fn, steps: int) -> tuple[float, list[float]]:
  """(first-call seconds incl. compile, per-call seconds of the next `steps` calls)."""
  import jax
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, times


def step_benchmark() -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import csarm_jax as cj
  from csarm_jax import methods, models, training

  size, ch, n, k, c = (_IMAGE_SIZE.value, _CHANNELS.value, _PERTURBED.value, _CONTROLS.value,
                       _CONTEXTS.value)
  options = dict(in_channels=ch, dtype=_DTYPE.value)
  if _MODEL.value != 'mlp':
    options['width'] = _WIDTH.value
  model = models.create(_MODEL.value, 8, **options)
  method = methods.get(_METHOD.value)
  tx = optax.adam(1e-3)
  preprocess = lambda x: x.astype(jnp.float32) / 255.0
  mesh = training.make_mesh()
  training.sharding.check_contexts_divide(c, mesh, '--contexts')

  state = training.replicate(
      training.create_state(model, tx, jax.random.key(0), jnp.zeros((2, size, size, ch))), mesh)
  rng = np.random.default_rng(0)
  m = n + k
  labels = np.full((c, m), -1, np.int32)
  labels[:, :n] = rng.integers(0, 8, (c, n))
  batch = training.global_batch({
      'images': rng.integers(0, 256, (c, m, size, size, ch), dtype=np.uint8), 'labels': labels,
      'mask': np.ones((c, m), np.float32), 'is_control': np.arange(m)[None].repeat(c, 0) >= n}, mesh)
  step = training.compile_train_step(training.make_train_step(model, method, tx, preprocess), mesh)

  holder = {'state': state}
  def one_step():
    holder['state'], metrics = step(holder['state'], batch)
    return metrics['loss']
  compile_s, times = _timed(one_step, _STEPS.value)
  step_s = statistics.median(times)

  variables = jax.device_get(holder['state']).variables
  context = jnp.asarray(np.asarray(batch['images'][0]), jnp.float32) / 255.0
  adapt = jax.jit(cj.adapt, static_argnums=0)
  predict = jax.jit(cj.predict, static_argnums=0)
  adapt_first, adapt_times = _timed(lambda: adapt(model, variables, context), _STEPS.value)
  stats = adapt(model, variables, context)
  predict_first, predict_times = _timed(lambda: predict(model, variables, stats, context[:n]),
                                        _STEPS.value)
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables['params']))
  return {
      'bench': 'step', **environment(), 'model': _MODEL.value, 'width': options.get('width'),
      'params': params, 'dtype': _DTYPE.value, 'method': method.name,
      'shapes': {'contexts_per_step': c, 'perturbed': n, 'controls': k,
                 'image': [size, size, ch], 'batch_images': list(batch['images'].shape)},
      'compile_plus_first_step_s': round(compile_s, 3), 'step_s_median': round(step_s, 4),
      'step_s_all': [round(t, 4) for t in times],
      'images_per_s': round(c * m / step_s, 1), 'labelled_images_per_s': round(c * n / step_s, 1),
      'adapt_one_context_s': round(statistics.median(adapt_times), 4),
      'adapt_compile_s': round(adapt_first, 3),
      'predict_perturbed_s': round(statistics.median(predict_times), 4),
      'predict_compile_s': round(predict_first, 3),
  }


def main(argv):
  del argv
  if _BENCH.value == 'step':
    result = step_benchmark()
  else:
    raise app.UsageError(f'--bench={_BENCH.value} is not available yet')
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  app.run(main)
