r"""Benchmarks that print JSON with the backend, devices and shapes (never run as tests).

  # the compiled, sharded meta-training step on device-resident contexts + adapt/predict latency
  python experiments/benchmark.py --bench=step
  # the input pipeline alone (540x540x5 uint8 store)
  python experiments/benchmark.py --bench=loader
  python experiments/benchmark.py --bench=train    # the full step with data from a store
  python experiments/benchmark.py --bench=memory   # compile (never run) the step: XLA's memory
                                                   # and cost analysis, any shape, any backend

  # the paper's setting on an accelerator:
  python experiments/benchmark.py --bench=step --model=resnet50 --image_size=256 --perturbed=64 \
      --controls=128 --contexts=8 --dtype=bfloat16

Images/s counts every image forwarded, controls included.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from absl import app, flags

from bench_common import host_info
from csarm_jax.data.store_writer import DEFAULT_COMPRESSION

_BENCH = flags.DEFINE_enum('bench', 'step', ['step', 'loader', 'train', 'memory'],
                           'What to measure.')
_MODEL = flags.DEFINE_string('model', 'resnet18', 'Model name (csarm_jax.models.names()).')
_WIDTH = flags.DEFINE_integer('width', 64, 'ResNet/CNN base width.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 128, 'Crop size fed to the model (square).')
_CHANNELS = flags.DEFINE_integer('channels', 5, 'Image channels.')
_PERTURBED = flags.DEFINE_integer('perturbed', 16, 'Perturbed (labelled) images per context.')
_CONTROLS = flags.DEFINE_integer('controls', 32, 'DMSO control images per context.')
_CONTEXTS = flags.DEFINE_integer('contexts', 4, 'Contexts per step (a multiple of the devices).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_MICRO = flags.DEFINE_integer('contexts_per_microbatch', 0,
                               'Contexts per micro-batch inside the step (0: all at once).')
_REMAT = flags.DEFINE_bool('remat', False, 'Rematerialise each residual block (model.remat).')
_METHOD = flags.DEFINE_string('method', 'cs_arm_bn', 'Method whose training step is timed.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (after one compile step).')
_STORE_SIZES = flags.DEFINE_list('store_sizes', ['512', '2048'],
                                 'loader/train: images per benchmark store (540x540x5 uint8).')
_COMPRESSIONS = flags.DEFINE_list('compressions', [DEFAULT_COMPRESSION],
                                  'loader: store compressions.')
_TILES = flags.DEFINE_list('tiles', ['0'],
                           'loader: store tile sides (0: default; 540: whole images).')
_THREADS = flags.DEFINE_integer('num_threads', 2, 'loader/train: grain reader threads.')
_FLIP_W = flags.DEFINE_list('flip_w', ['device'],
                            'loader: where horizontal flips go, in turn (device, host).')
_ROUNDS = flags.DEFINE_integer('rounds', 1, 'loader: serving runs per --flip_w, alternating.')


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


def _time_steps(step, state, batch) -> tuple[float, list[float], Any]:
  """(compile + first step seconds, per-step seconds, final state) of `step` on one resident
  batch."""
  holder = {'state': state}

  def one_step():
    holder['state'], metrics = step(holder['state'], batch)
    return metrics['loss']
  compile_s, times = _timed(one_step, _STEPS.value)
  return compile_s, times, holder['state']


def _model_method_step(mesh):
  """Model, method, optimizer and compiled (not yet traced) step from the flags."""
  import jax.numpy as jnp
  import optax
  from csarm_jax import methods, models, parallel, training

  options = dict(in_channels=_CHANNELS.value, dtype=_DTYPE.value)
  if _MODEL.value != 'mlp':
    options['width'] = _WIDTH.value
  if _REMAT.value:
    options['remat'] = True
  model = models.create(_MODEL.value, 8, **options)
  method = methods.get(_METHOD.value)
  tx = optax.adam(1e-3)
  parallel.check_contexts_divide(_CONTEXTS.value, mesh, '--contexts')
  training.check_microbatch(_CONTEXTS.value, _MICRO.value, mesh.size)
  preprocess = lambda x: x.astype(jnp.float32) / 255.0
  step = training.make_train_step(model, method, tx, preprocess, _MICRO.value)
  return model, method, tx, training.compile_train_step(step, mesh)


def _setup():
  """Model, method, mesh, replicated state and compiled step from the flags."""
  import jax
  import jax.numpy as jnp
  from csarm_jax import parallel, training

  mesh = parallel.make_mesh()
  model, method, tx, step = _model_method_step(mesh)
  size, ch = _IMAGE_SIZE.value, _CHANNELS.value
  state = parallel.replicate(
      training.create_state(model, tx, jax.random.key(0), jnp.zeros((2, size, size, ch))), mesh)
  return model, method, mesh, state, step


def _controls(method) -> int:
  """Controls per training context: --controls for methods that train with them, else 0."""
  return _CONTROLS.value if method.train_controls else 0


def _shapes(method) -> dict[str, Any]:
  return {'contexts_per_step': _CONTEXTS.value, 'perturbed': _PERTURBED.value,
          'controls': _controls(method),
          'crop': [_IMAGE_SIZE.value, _IMAGE_SIZE.value, _CHANNELS.value]}


def _batch_arrays(method, make):
  """The step's batch from the flags, each array made by ``make(shape, dtype)``."""
  import numpy as np
  c, m, size, ch = _CONTEXTS.value, _PERTURBED.value + _controls(method), _IMAGE_SIZE.value, \
      _CHANNELS.value
  return {
      'images': make((c, m, size, size, ch), np.uint8), 'labels': make((c, m), np.int32),
      'mask': make((c, m), np.float32), 'is_control': make((c, m), np.bool_),
      'flip_w': make((c, m), np.bool_)}


def memory_benchmark() -> dict[str, Any]:
  """Compiles the step for the flags' shapes without running it (nothing the size of the batch or
  the activations is allocated) and reports XLA's buffer plan and cost estimate, and how many of
  remat's optimization barriers the compiled program kept. Set ``XLA_FLAGS=--xla_dump_to=DIR`` to
  see the buffer assignment that sets the peak."""
  import jax
  from csarm_jax import parallel, training

  mesh = parallel.make_mesh()
  model, method, tx, step = _model_method_step(mesh)
  size, ch = _IMAGE_SIZE.value, _CHANNELS.value
  example = jax.ShapeDtypeStruct((2, size, size, ch), 'float32')
  state = training.abstract_state(model, tx, example, parallel.replicated(mesh))
  batch = _batch_arrays(method, lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=parallel.context_sharded(mesh)))
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  # remat's recomputation stays in the backward pass only while its barriers survive compilation
  barriers = {'lowered': lowered.as_text().count('stablehlo.optimization_barrier'),
              'compiled': compiled.as_text().count(' opt-barrier(')}
  mem = compiled.memory_analysis()
  gib = lambda b: round(b / 2 ** 30, 3)
  memory = {k: gib(getattr(mem, f'{k}_size_in_bytes')) for k in
            ('argument', 'output', 'alias', 'temp', 'generated_code')} if mem is not None else None
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else None
  images = _CONTEXTS.value * (_PERTURBED.value + _controls(method))
  return {'bench': 'memory', 'host': host_info(), 'model': _MODEL.value, 'width': _WIDTH.value,
          'dtype': _DTYPE.value, 'method': method.name, 'shapes': _shapes(method),
          'contexts_per_microbatch': _MICRO.value or _CONTEXTS.value, 'remat': _REMAT.value,
          'compile_s': round(compile_s, 1), 'optimization_barriers': barriers,
          'memory_gib_per_device': memory,
          'peak_estimate_gib': (memory['argument'] + memory['output'] - memory['alias'] +
                                memory['temp']) if memory else None,
          'flops': flops, 'gflop_per_image': round(flops / images / 1e9, 2) if flops else None,
          'bytes_accessed': float(cost.get('bytes accessed', 0.0)) if cost else None}


def _random_batch(mesh, method):
  import numpy as np
  from csarm_jax import parallel
  c, n, k, size, ch = (_CONTEXTS.value, _PERTURBED.value, _controls(method), _IMAGE_SIZE.value,
                       _CHANNELS.value)
  rng = np.random.default_rng(0)
  labels = np.full((c, n + k), -1, np.int32)
  labels[:, :n] = rng.integers(0, 8, (c, n))
  return parallel.global_batch({
      'images': rng.integers(0, 256, (c, n + k, size, size, ch), dtype=np.uint8), 'labels': labels,
      'mask': np.ones((c, n + k), np.float32),
      'is_control': np.arange(n + k)[None].repeat(c, 0) >= n,
      'flip_w': rng.random((c, n + k)) < 0.5}, mesh)


def step_benchmark() -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import csarm_jax as cj

  model, method, mesh, state, step = _setup()
  batch = _random_batch(mesh, method)
  compile_s, times, state = _time_steps(step, state, batch)
  step_s = statistics.median(times)
  m = _PERTURBED.value + _controls(method)

  variables = jax.device_get(state).variables
  context = jnp.asarray(np.asarray(batch['images'][0]), jnp.float32) / 255.0
  adapt = jax.jit(cj.adapt, static_argnums=0)
  predict = jax.jit(cj.predict, static_argnums=0)
  adapt_first, adapt_times = _timed(lambda: adapt(model, variables, context), _STEPS.value)
  stats = adapt(model, variables, context)
  predict_first, predict_times = _timed(
      lambda: predict(model, variables, stats, context[:_PERTURBED.value]), _STEPS.value)
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables['params']))
  return {
      'bench': 'step', 'host': host_info(), 'model': _MODEL.value, 'width': _WIDTH.value,
      'params': params, 'dtype': _DTYPE.value, 'method': method.name, 'shapes': _shapes(method),
      'compile_plus_first_step_s': round(compile_s, 3), 'step_s_median': round(step_s, 4),
      'step_s_all': [round(t, 4) for t in times],
      'images_per_s': round(_CONTEXTS.value * m / step_s, 1),
      'labelled_images_per_s': round(_CONTEXTS.value * _PERTURBED.value / step_s, 1),
      'adapt_one_context_s': round(statistics.median(adapt_times), 4),
      'adapt_compile_s': round(adapt_first, 3),
      'predict_perturbed_s': round(statistics.median(predict_times), 4),
      'predict_compile_s': round(predict_first, 3),
      'device_memory': _memory_stats(),
  }


def _memory_stats() -> dict[str, int] | None:
  import jax
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return {k: int(v) for k, v in stats.items() if k in ('peak_bytes_in_use', 'bytes_limit')}


def loader_benchmark() -> dict[str, Any]:
  import benchmark_loader
  return benchmark_loader.loader_benchmark(
      [int(s) for s in _STORE_SIZES.value], _COMPRESSIONS.value, [int(t) for t in _TILES.value],
      _PERTURBED.value, _CONTROLS.value,
      _CONTEXTS.value, _IMAGE_SIZE.value, num_batches=_STEPS.value, num_threads=_THREADS.value,
      flip_w=_FLIP_W.value, rounds=_ROUNDS.value)


def train_benchmark() -> dict[str, Any]:
  """The full step with data: grain batches from a store -> global arrays -> compiled step.

  Reports end-to-end images/s, the share of wall time the host waited for data, and (as the
  utilisation proxy every backend allows) the compute-only step time on a device-resident batch
  divided by the end-to-end step time.
  """
  import jax
  import benchmark_loader
  from csarm_jax import data, parallel

  model, method, mesh, state, step = _setup()
  root = tempfile.mkdtemp(prefix='csarm_train_bench_')
  try:
    path = os.path.join(root, 'store')
    built = benchmark_loader.make_benchmark_store(path, int(_STORE_SIZES.value[-1]),
                                                  compression=_COMPRESSIONS.value[0])
    store = data.open_store(path)
    batches = data.training_batches(
        store, sorted(store.table['Metadata_Plate'].unique()), num_perturbed=_PERTURBED.value,
        num_controls=_controls(method),
        contexts_per_batch=_CONTEXTS.value, crop_size=_IMAGE_SIZE.value,
        sampling=method.train_sampling, num_threads=_THREADS.value)
    wait, total = [], []
    for i in range(_STEPS.value + 1):
      start = time.perf_counter()
      batch = parallel.global_batch(next(batches), mesh)
      fetched = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics['loss'])
      if i:                                     # the first step compiles
        wait.append(fetched - start)
        total.append(time.perf_counter() - start)
    _, compute, _ = _time_steps(step, state, _random_batch(mesh, method))
    m = _PERTURBED.value + _controls(method)
    step_s, compute_s = statistics.median(total), statistics.median(compute)
    return {'bench': 'train', 'host': host_info(), 'model': _MODEL.value, 'width': _WIDTH.value,
            'dtype': _DTYPE.value, 'method': method.name, 'shapes': _shapes(method), 'store': built,
            'num_threads': _THREADS.value, 'end_to_end_step_s_median': round(step_s, 4),
            'images_per_s': round(_CONTEXTS.value * m / step_s, 1),
            'data_wait_fraction': round(sum(wait) / sum(total), 3),
            'compute_only_step_s_median': round(compute_s, 4),
            'device_busy_fraction': round(min(1.0, compute_s / step_s), 3),
            'device_memory': _memory_stats()}
  finally:
    shutil.rmtree(root, ignore_errors=True)


def main(argv):
  del argv
  bench = {'step': step_benchmark, 'loader': loader_benchmark, 'train': train_benchmark,
           'memory': memory_benchmark}
  print(json.dumps(bench[_BENCH.value](), indent=1))


if __name__ == '__main__':
  app.run(main)
