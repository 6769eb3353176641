"""ContextBatchNorm against a numpy oracle: statistics, weights/masks, modes, dtypes."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csarm_jax.nn import (CONTEXT, GIVEN, RUNNING, RUNNING_STATS, STATS, ContextBatchNorm,
                          moments)


def oracle_moments(x, w=None):
  """float64 weighted mean and biased variance over all axes but the last."""
  x = np.asarray(x, np.float64)
  w = np.ones(x.shape[0]) if w is None else np.asarray(w, np.float64)
  wb = np.broadcast_to(w.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
  axes = tuple(range(x.ndim - 1))
  mean = (wb * x).sum(axes) / wb.sum(axes)
  var = (wb * (x - mean) ** 2).sum(axes) / wb.sum(axes)
  return mean, var


@pytest.mark.parametrize('shape', [(6, 4, 5, 3), (9, 7)])
@pytest.mark.parametrize('weighted', [False, True])
def test_moments_match_numpy(shape, weighted):
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, shape).astype(np.float32)
  w = rng.uniform(0, 2, shape[0]).astype(np.float32) if weighted else None
  if weighted:
    w[1] = 0.0
  _, mean, var = moments(jnp.asarray(x), None if w is None else jnp.asarray(w))
  m, v = oracle_moments(x, w)
  np.testing.assert_allclose(mean, m, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(var, v, rtol=1e-5, atol=1e-5)


def test_two_pass_variance_on_large_values():
  x = np.random.default_rng(1).normal(30000.0, 10.0, (64, 8, 8, 2)).astype(np.float32)
  _, _, var = moments(jnp.asarray(x))
  np.testing.assert_allclose(var, oracle_moments(x)[1], rtol=2e-3)   # E[x^2]-E[x]^2 is off by ~30 %


def test_zero_total_weight_is_defined_not_nan():
  x = jnp.ones((3, 4, 4, 2))
  count, mean, var = moments(x, jnp.zeros(3))
  assert float(count) == 0.0
  np.testing.assert_array_equal(mean, 0.0)
  np.testing.assert_array_equal(var, 1.0)


def _layer_and_vars(features=3, seed=0):
  bn = ContextBatchNorm()
  x = jnp.zeros((2, 4, 4, features))
  variables = bn.init(jax.random.key(seed), x, CONTEXT)
  rng = np.random.default_rng(seed)
  variables = {'params': {'scale': jnp.asarray(rng.uniform(0.5, 2, features), jnp.float32),
                          'bias': jnp.asarray(rng.normal(size=features), jnp.float32)},
               RUNNING_STATS: variables[RUNNING_STATS]}
  return bn, variables


def test_context_mode_output_matches_oracle_with_mask():
  bn, variables = _layer_and_vars()
  rng = np.random.default_rng(2)
  x = rng.normal(1.0, 2.0, (5, 4, 4, 3)).astype(np.float32)
  w = np.array([1, 1, 0, 1, 0], np.float32)
  y, upd = bn.apply(variables, jnp.asarray(x), CONTEXT, jnp.asarray(w), mutable=[STATS])
  m, v = oracle_moments(x, w)
  p = variables['params']
  expected = (x - m) / np.sqrt(v + 1e-5) * np.asarray(p['scale']) + np.asarray(p['bias'])
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(upd[STATS]['mean'], m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd[STATS]['var'], v, rtol=1e-5, atol=1e-6)
  # Masked rows equal dropping them from the statistics.
  _, dropped = bn.apply(variables, jnp.asarray(x[w > 0]), CONTEXT, mutable=[STATS])
  chex.assert_trees_all_close(upd[STATS], dropped[STATS], rtol=1e-5, atol=1e-6)


def test_given_mode_uses_the_given_statistics():
  bn, variables = _layer_and_vars()
  x = np.random.default_rng(3).normal(size=(4, 2, 2, 3)).astype(np.float32)
  stats = {'mean': jnp.array([1.0, -1.0, 0.5]), 'var': jnp.array([4.0, 0.25, 1.0])}
  y = bn.apply({**variables, STATS: stats}, jnp.asarray(x), GIVEN)
  p = variables['params']
  expected = ((x - np.asarray(stats['mean'])) / np.sqrt(np.asarray(stats['var']) + 1e-5)
              * np.asarray(p['scale']) + np.asarray(p['bias']))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='no statistics given'):
    bn.apply(variables, jnp.asarray(x), GIVEN)


def test_running_averages_update_and_use():
  bn, variables = _layer_and_vars()
  x = np.random.default_rng(4).normal(3.0, 2.0, (8, 3, 3, 3)).astype(np.float32)
  _, upd = bn.apply(variables, jnp.asarray(x), CONTEXT, mutable=[RUNNING_STATS])
  m, v = oracle_moments(x)
  np.testing.assert_allclose(upd[RUNNING_STATS]['mean'], 0.1 * m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd[RUNNING_STATS]['var'], 0.9 + 0.1 * v, rtol=1e-5, atol=1e-6)
  y = bn.apply({**variables, RUNNING_STATS: upd[RUNNING_STATS]}, jnp.asarray(x), RUNNING)
  p = variables['params']
  ra = upd[RUNNING_STATS]
  expected = ((x - np.asarray(ra['mean'])) / np.sqrt(np.asarray(ra['var']) + 1e-5)
              * np.asarray(p['scale']) + np.asarray(p['bias']))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_activations_keep_float32_statistics():
  bn = ContextBatchNorm(dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3, 3, 2)), jnp.bfloat16)
  variables = bn.init(jax.random.key(0), x, CONTEXT)
  y, upd = bn.apply(variables, x, CONTEXT, mutable=[STATS])
  chex.assert_type(y, jnp.bfloat16)
  chex.assert_type([upd[STATS]['mean'], upd[STATS]['var']], jnp.float32)
  chex.assert_type(jax.tree.leaves(variables), jnp.float32)
  chex.assert_tree_all_finite(y)


def test_unknown_mode_is_rejected():
  bn, variables = _layer_and_vars()
  with pytest.raises(ValueError, match='unknown BatchNorm mode'):
    bn.apply(variables, jnp.zeros((2, 2, 2, 3)), 'train')
