"""The functional adaptation API: BatchNorm statistics as a value.

    stats  = adapt(model, variables, context, mask=None)     # per-layer {'mean', 'var'} pytree
    logits = predict(model, variables, stats, images)
    logits = adapt_and_predict(model, variables, context, queries, mask=None)
    logits = context_forward(model, variables, context, mask=None)   # the train-mode forward
    stats  = plate_statistics(model, variables, images, mask=None, chunk_size=256)  # streamed

All but ``plate_statistics`` are pure and traceable: use them inside ``jax.jit`` (``model`` is a
hashable flax module, pass it as a static argument or close over it), ``jax.vmap`` over a leading
context axis, and ``jax.grad`` (gradients flow through the statistics).

Inputs are float arrays: NHWC images for image models, (N, D) vectors for the MLP; integer images
are rejected (scale them first). ``mask`` holds one weight per sample: 0 drops a padded row from the
statistics, equal weights give the pooled statistics. Defined edge cases:

* a context of one image is valid (statistics over its pixels); a context of one feature vector is
  rejected, as its variance is zero;
* an all-zero mask raises ``ValueError`` when the mask is concrete; inside a trace, where it cannot
  be checked, every layer falls back to mean 0 / variance 1 -- finite, never NaN.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import chex
import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util

from csarm_jax.nn import (CONTEXT, GIVEN, RUNNING_STATS, STATS, STREAM, STREAM_FLAGS,
                          STREAM_SUMS, ContextBatchNorm)

Variables = dict[str, Any]
Stats = dict[str, Any]


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def validate_inputs(model: nn.Module, x: jax.Array, mask: jax.Array | None = None,
                    what: str = 'context') -> None:
  """Raises a clear error for inputs the model cannot take. Cheap; shape checks only when traced."""
  rank = getattr(model, 'input_rank', None)
  if rank is not None and x.ndim != rank:
    kind = 'NHWC images (N, H, W, C)' if rank == 4 else 'feature vectors (N, D)'
    raise ValueError(f'{what} must be {kind} for {type(model).__name__}, got shape {x.shape}')
  channels = getattr(model, 'in_channels', None)
  if channels is not None and x.shape[-1] != channels:
    raise ValueError(f'{what} has {x.shape[-1]} channels/features but the model was built for '
                     f'{channels} (last axis of shape {x.shape})')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'{what} must be a float array (scale images to ~unit range first), '
                    f'got dtype {x.dtype}')
  if x.shape[0] < 1:
    raise ValueError(f'{what} is empty')
  if mask is None:
    valid = x.shape[0]
  else:
    if mask.shape != x.shape[:1]:
      raise ValueError(f'mask must have shape {x.shape[:1]} (one weight per {what} row), '
                       f'got {mask.shape}')
    if not _is_concrete(mask):
      return
    m = np.asarray(mask, np.float64)
    if (m < 0).any() or not np.isfinite(m).all():
      raise ValueError('mask weights must be finite and >= 0')
    if m.sum() <= 0:
      raise ValueError(f'mask selects no {what} row: statistics of an empty set are undefined')
    valid = int((m > 0).sum())
  if rank == 2 and valid < 2:
    raise ValueError(f'a {what} of one feature vector has zero variance; give at least 2 rows')


def context_forward(model: nn.Module, variables: Variables, context: jax.Array,
                    mask: jax.Array | None = None, **kwargs) -> Any:
  """The train-mode forward: every row normalised with the statistics of the (masked) context."""
  validate_inputs(model, context, mask)
  return model.apply(variables, context, norm=CONTEXT, weights=mask, **kwargs)


def adapt(model: nn.Module, variables: Variables, context: jax.Array,
          mask: jax.Array | None = None) -> Stats:
  """Per-layer BatchNorm statistics ({'mean', 'var'}, float32) of the (masked) context."""
  validate_inputs(model, context, mask)
  _, updates = model.apply(variables, context, norm=CONTEXT, weights=mask, mutable=[STATS])
  stats = updates[STATS]
  chex.assert_type(jax.tree.leaves(stats), jnp.float32)     # statistics stay float32 under bf16
  return stats


def check_stats(variables: Variables, stats: Stats) -> None:
  """Raises ValueError naming the first BatchNorm layer whose statistics do not fit the model (a
  layer missing or extra, or another shape): statistics adapted with another model. Shapes only,
  so it also checks traced statistics."""
  expected = variables.get(RUNNING_STATS)        # one {'mean', 'var'} per layer, as the statistics
  if expected is None:
    return
  want = traverse_util.flatten_dict(dict(expected))
  have = traverse_util.flatten_dict(dict(stats)) if isinstance(stats, Mapping) else {}
  for path in sorted(want.keys() | have.keys()):
    layer = '/'.join(path[:-1])
    if path not in have:
      raise ValueError(f'the statistics lack layer {layer} ({path[-1]}): they were adapted with '
                       f'another model')
    if path not in want:
      raise ValueError(f'the statistics hold layer {layer}, which the model does not have: they '
                       f'were adapted with another model')
    if jnp.shape(have[path]) != jnp.shape(want[path]):
      raise ValueError(f'the statistics of layer {layer} ({path[-1]}) have shape '
                       f'{jnp.shape(have[path])}, the model\'s layer {jnp.shape(want[path])}: they '
                       f'were adapted with another model')


def predict(model: nn.Module, variables: Variables, stats: Stats, images: jax.Array,
            **kwargs) -> Any:
  """Logits of ``images`` normalised with the given statistics (no statistics of their own)."""
  validate_inputs(model, images, None, what='images')
  check_stats(variables, stats)
  out = model.apply({**_without(variables, STATS), STATS: stats}, images, norm=GIVEN, **kwargs)
  chex.assert_shape(jax.tree.leaves(out)[0], (images.shape[0], None))   # one row per image
  return out


def adapt_and_predict(model: nn.Module, variables: Variables, context: jax.Array,
                      queries: jax.Array, mask: jax.Array | None = None, **kwargs) -> Any:
  """``predict(adapt(context), queries)``: adapt to a context, classify the queries."""
  return predict(model, variables, adapt(model, variables, context, mask), queries, **kwargs)


def _without(variables: Variables, *collections: str) -> Variables:
  return {k: v for k, v in variables.items() if k not in collections}


# ------------------------------------------------------------------------------------------------
# Whole-plate statistics, streamed layer by layer.

def bn_layer_order(model: nn.Module, variables: Variables,
                   example: jax.Array) -> list[tuple[str, ...]]:
  """Paths of the model's ContextBatchNorm layers in execution order (traced, nothing computed)."""
  order: list[tuple[str, ...]] = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, ContextBatchNorm) and context.method_name == '__call__':
      path = tuple(context.module.path)
      if path not in order:
        order.append(path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, norm=CONTEXT), variables, example)
  return order


ChunkSource = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def _chunks_of(images, mask, chunk_size: int) -> ChunkSource:
  """A re-iterable source of fixed-size (chunk, weights) pairs; the last chunk is zero-padded."""
  n = len(images)
  weights = np.ones(n, np.float32) if mask is None else np.asarray(mask, np.float32)
  if weights.shape != (n,):
    raise ValueError(f'mask must have shape ({n},), got {weights.shape}')

  def source() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, n, chunk_size):
      chunk = np.asarray(images[start:start + chunk_size])
      w = weights[start:start + chunk_size]
      pad = chunk_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        w = np.concatenate([w, np.zeros(pad, np.float32)])
      yield chunk, w
  return source


def plate_statistics(model: nn.Module, variables: Variables, images: Any = None,
                     mask: np.ndarray | None = None, chunk_size: int = 256,
                     chunks: ChunkSource | None = None) -> Stats:
  """Statistics of a set too large for one pass, equal to ``adapt`` on the whole set.

  Layer l's statistics depend on the whole-set statistics of layers before it, so they are found
  layer by layer: pass k streams every chunk with layers < k normalised by their finished
  whole-set statistics and accumulates layer k's weighted count, mean and centred sum of squares
  (Chan et al.'s pairwise combination, exact up to float rounding). Memory is bounded by one chunk;
  compute is (number of BN layers) forward passes over the set, with one compiled chunk function.

  Give either ``images`` (any array-like supporting ``len`` and slicing, e.g. a lazily-read
  tensorstore view) with an optional per-image ``mask``, or ``chunks``: a function returning a fresh
  iterable of fixed-shape ``(images, weights)`` pairs on each call.
  """
  if chunks is None:
    if images is None:
      raise ValueError('give images or chunks')
    chunks = _chunks_of(images, mask, chunk_size)
  first = next(iter(chunks()), None)
  if first is None:
    raise ValueError('plate_statistics got no images')
  example, example_w = jnp.asarray(first[0]), jnp.asarray(first[1])
  # Weights: a first chunk may hold none (e.g. BEN's perturbed rows).
  validate_inputs(model, example)
  base = _without(variables, STATS, STREAM_FLAGS, STREAM_SUMS)

  order = bn_layer_order(model, base, example)
  shapes = jax.eval_shape(lambda v, x, w: adapt(model, v, x, w), base, example, example_w)
  flat = jax.device_put({path: (np.zeros if path[-1] == 'mean' else np.ones)(s.shape, s.dtype)
                         for path, s in traverse_util.flatten_dict(shapes).items()})  # replaced
  flags = jax.device_put({path: np.zeros((), bool) for path in order})          # layer by layer
  done = jax.device_put(np.ones((), bool))

  @jax.jit
  def chunk_sums(flat_stats, flat_flags, x, w):
    v = {**base, STATS: traverse_util.unflatten_dict(flat_stats),
         STREAM_FLAGS: traverse_util.unflatten_dict(
             {p + ('use_given',): f for p, f in flat_flags.items()})}
    _, out = model.apply(v, x, norm=STREAM, weights=w, mutable=[STREAM_SUMS])
    return traverse_util.flatten_dict(out[STREAM_SUMS])

  total_weight = 0.0
  for k, path in enumerate(order):
    count = mean = m2 = None
    for x, w in chunks():
      if k == 0:
        total_weight += float(np.sum(jax.device_get(w)))
      sums = chunk_sums(flat, flags, jnp.asarray(x), jnp.asarray(w))
      c, mu, s = sums[path + ('count',)], sums[path + ('mean',)], sums[path + ('m2',)]
      if count is None:
        count, mean, m2 = c, mu, s
      else:
        count, mean, m2 = _combine(count, mean, m2, c, mu, s)
    if k == 0 and total_weight <= 0:
      raise ValueError('mask selects no image: statistics of an empty set are undefined')
    flat[path + ('mean',)] = mean
    flat[path + ('var',)] = m2 / count
    flags[path] = done
  return traverse_util.unflatten_dict(flat)


@jax.jit
def _combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
  """Chan et al.: merge two (count, mean, M2) summaries; chunks of zero weight are a no-op."""
  n = n_a + n_b
  frac_b = jnp.where(n > 0, n_b / jnp.maximum(n, 1e-30), 0.0)
  delta = mean_b - mean_a
  mean = mean_a + delta * frac_b
  m2 = m2_a + m2_b + jnp.square(delta) * n_a * frac_b
  return n, mean, m2
