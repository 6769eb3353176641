"""max_pool against nn.max_pool (the oracle): values, gradients, ties, odd sides, bfloat16."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from csarm_jax.nn import max_pool


def _reference(x, window):
  p = (window - 1) // 2
  return nn.max_pool(x, (window, window), strides=(2, 2), padding=((p, p), (p, p)))


def _value_and_grad(pool, x, cotangent):
  """pool(x) and the gradient of <pool(x), cotangent>."""
  out, vjp = jax.vjp(pool, x)
  return out, vjp(cotangent)[0]


@pytest.mark.parametrize('window', [2, 3])
@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 7, 9, 3), (1, 5, 4, 2), (1, 2, 3, 1)])
@pytest.mark.parametrize('ties', [False, True])
def test_max_pool_equals_nn_max_pool_forward_and_gradient(window, shape, ties):
  """Even and odd sides; ``ties``: values in {0, 1, 2}, so most windows hold several maxima and
  the gradient must go where nn.max_pool's goes (the first maximum in row-major order)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 3, shape) if ties else rng.standard_normal(shape), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal(_reference(x, window).shape), jnp.float32)
  out, grad = jax.jit(_value_and_grad, static_argnums=0)(lambda x: max_pool(x, window), x,
                                                         cotangent)
  expected, expected_grad = _value_and_grad(lambda x: _reference(x, window), x, cotangent)
  np.testing.assert_array_equal(out, expected)
  if window == 2:           # disjoint windows: each element receives at most one cotangent
    np.testing.assert_array_equal(grad, expected_grad)
  else:                     # up to 4 cotangents summed into one element, in another order
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-6)
  assert float(jnp.sum(grad)) == pytest.approx(float(jnp.sum(cotangent)), rel=1e-5)


def test_max_pool_bfloat16_matches_nn_max_pool():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 10, 10, 4)), jnp.bfloat16)
  cotangent = jnp.ones((2, 5, 5, 4), jnp.bfloat16)
  out, grad = _value_and_grad(lambda x: max_pool(x, 3), x, cotangent)
  expected, expected_grad = _value_and_grad(lambda x: _reference(x, 3), x, cotangent)
  assert out.dtype == grad.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(grad, expected_grad)   # sums of ones: exact in bfloat16


def test_max_pool_rejects_what_it_does_not_implement():
  with pytest.raises(ValueError, match='windows'):
    max_pool(jnp.zeros((1, 8, 8, 1)), 4)
  with pytest.raises(ValueError, match='floats'):
    max_pool(jnp.zeros((1, 8, 8, 1), jnp.int32), 3)
