"""The adaptation API: invariances, vmap, jit, the meta-gradient, streamed statistics, bad input."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import csarm_jax as cj
from csarm_jax import models

H = 12


@functools.lru_cache(maxsize=None)
def _setup(name='cnn', **options):
  options = dict(options) or dict(width=4, num_stages=2)
  model = models.create(name, 3, **options)
  shape = (2, 6) if name == 'mlp' else (2, 32, 32, 5) if name.startswith('resnet') else (2, H, H, 5)
  variables = models.init_variables(model, jax.random.key(0), jnp.zeros(shape))
  # Non-trivial BN affine parameters, so tests do not pass by accident of ones/zeros.
  leaves, tree = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
  return model, {**variables, 'params': jax.tree.unflatten(tree, leaves)}


def _images(n, seed=0, shape=(H, H, 5)):
  return jnp.asarray(np.random.default_rng(seed).normal(0.5, 1.0, (n, *shape)), jnp.float32)


@pytest.fixture(scope='module')
def cnn():
  return _setup()


adapt = jax.jit(cj.adapt, static_argnums=0)
predict = jax.jit(cj.predict, static_argnums=0)
forward = jax.jit(cj.context_forward, static_argnums=0)
adapt_and_predict = jax.jit(cj.adapt_and_predict, static_argnums=0)


def test_adapt_and_predict_equals_train_mode_forward(cnn):
  model, variables = cnn
  context = _images(10)
  mask = jnp.array([1, 1, 1, 1, 1, 1, 1, 0, 1, 1], jnp.float32)
  full = forward(model, variables, context, mask)
  queries = context[:4]                       # the queries are part of the context
  chex.assert_trees_all_close(adapt_and_predict(model, variables, context, queries, mask), full[:4],
                              rtol=1e-5, atol=1e-5)
  stats = adapt(model, variables, context, mask)
  chex.assert_trees_all_close(predict(model, variables, stats, context), full, rtol=1e-5, atol=1e-5)
  chex.assert_type(jax.tree.leaves(stats), jnp.float32)


def test_vmap_over_contexts_equals_python_loop(cnn):
  model, variables = cnn
  contexts = jnp.stack([_images(6, seed=s) for s in range(3)])
  masks = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 0, 1, 0, 1, 1]], jnp.float32)
  batched = jax.jit(jax.vmap(cj.adapt_and_predict, in_axes=(None, None, 0, 0, 0)),
                    static_argnums=0)(model, variables, contexts, contexts, masks)
  stats = jax.vmap(cj.adapt, in_axes=(None, None, 0, 0))(model, variables, contexts, masks)
  chex.assert_shape(batched, (3, 6, 3))
  for c in range(3):
    one = adapt_and_predict(model, variables, contexts[c], contexts[c], masks[c])
    np.testing.assert_allclose(batched[c], one, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda s: s[c], stats),
                                adapt(model, variables, contexts[c], masks[c]),
                                rtol=1e-5, atol=1e-6)


def test_padding_rows_with_mask_zero_change_nothing(cnn):
  model, variables = cnn
  context = _images(5)
  padded = jnp.concatenate([context, 100.0 * _images(3, seed=9)])     # garbage padding rows
  mask = jnp.array([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32)
  chex.assert_trees_all_close(adapt(model, variables, padded, mask),
                              adapt(model, variables, context), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(forward(model, variables, padded, mask)[:5],
                             forward(model, variables, context), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name, options', [('cnn', None), ('resnet18', (('width', 4),)),
                                           ('mlp', (('in_features', 6), ('hidden', 8)))])
def test_scaling_inputs_leaves_logits_unchanged(name, options):
  model, variables = _setup(name, **dict(options or ()))
  x = {'mlp': _images(6, shape=(6,)), 'cnn': _images(6)}.get(name, _images(6, shape=(32, 32, 5)))
  base = forward(model, variables, x)
  for c in (0.1, 7.0):
    np.testing.assert_allclose(forward(model, variables, c * x), base, rtol=2e-3, atol=2e-3)


def test_permuting_a_context_permutes_outputs_only(cnn):
  model, variables = cnn
  x = _images(7)
  perm = np.random.default_rng(0).permutation(7)
  np.testing.assert_allclose(forward(model, variables, x[perm]), forward(model, variables, x)[perm],
                             rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(adapt(model, variables, x[perm]), adapt(model, variables, x),
                              rtol=1e-5, atol=1e-6)


def test_weights_give_pooled_and_controls_only_statistics(cnn):
  model, variables = cnn
  perturbed, controls = _images(4, seed=1), _images(6, seed=2)
  both = jnp.concatenate([perturbed, controls])
  pooled = adapt(model, variables, jnp.concatenate([perturbed, controls]), jnp.ones(10))
  chex.assert_trees_all_close(pooled, adapt(model, variables, both), rtol=1e-6, atol=1e-6)
  controls_only = adapt(model, variables, both, jnp.array([0.0] * 4 + [1.0] * 6))
  chex.assert_trees_all_close(controls_only, adapt(model, variables, controls),
                              rtol=1e-5, atol=1e-5)


def test_meta_gradient_flows_through_statistics(cnn):
  model, variables = cnn
  x = _images(8)
  labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])

  def loss(params, stop):
    v = {**variables, 'params': params}
    stats = cj.adapt(model, v, x)
    if stop:
      stats = jax.lax.stop_gradient(stats)
    logits = cj.predict(model, v, stats, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  g_live = jax.jit(jax.grad(loss), static_argnums=1)(variables['params'], False)
  g_stop = jax.jit(jax.grad(loss), static_argnums=1)(variables['params'], True)
  conv = g_live['conv0']['kernel']
  assert float(jnp.abs(conv).max()) > 0
  assert float(jnp.abs(conv - g_stop['conv0']['kernel']).max()) > 1e-4 * float(jnp.abs(conv).max())
  # adapt+predict on the same context is the train-mode forward, gradients included.
  def loss_forward(params):
    logits = cj.context_forward(model, {**variables, 'params': params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
  chex.assert_trees_all_close(jax.jit(jax.grad(loss_forward))(variables['params']), g_live,
                              rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name, options, chunk', [
    ('cnn', None, 3),
    ('resnet50', (('width', 4),), 6),
    ('mlp', (('in_features', 6), ('hidden', 8)), 4)])
def test_streamed_plate_statistics_equal_one_pass(name, options, chunk):
  model, variables = _setup(name, **dict(options or ()))
  x = np.asarray(_images(11, shape=(6,)) if name == 'mlp' else _images(11, shape=(32, 32, 5)))
  mask = np.ones(11, np.float32)
  mask[[2, 7]] = 0
  streamed = cj.plate_statistics(model, variables, x, mask=mask, chunk_size=chunk)
  one_pass = adapt(model, variables, jnp.asarray(x), jnp.asarray(mask))
  chex.assert_trees_all_equal_structs(streamed, one_pass)
  chex.assert_trees_all_close(streamed, one_pass, rtol=1e-4, atol=1e-5)


def test_bfloat16_model_keeps_float32_statistics_and_finite_outputs():
  model, variables = _setup('cnn', width=4, num_stages=2, dtype=jnp.bfloat16)
  chex.assert_type(jax.tree.leaves(variables), jnp.float32)
  x = _images(6)
  stats = adapt(model, variables, x)
  chex.assert_type(jax.tree.leaves(stats), jnp.float32)
  logits = predict(model, variables, stats, x)
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  ref_model, _ = _setup('cnn', width=4, num_stages=2)
  np.testing.assert_allclose(logits, forward(ref_model, variables, x), atol=0.1)


def test_one_image_context_is_defined(cnn):
  model, variables = cnn
  logits = forward(model, variables, _images(1))
  chex.assert_shape(logits, (1, 3))
  chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize('make, error, message', [
    (lambda: _images(4)[0], ValueError, 'must be NHWC images'),
    (lambda: _images(4, shape=(H, H, 3)), ValueError,
     'has 3 channels/features but the model was built for 5'),
    (lambda: jnp.zeros((4, H, H, 5), jnp.uint8), TypeError, 'float array'),
])
def test_bad_inputs_raise_clear_errors(cnn, make, error, message):
  model, variables = cnn
  with pytest.raises(error, match=message):
    cj.adapt(model, variables, make())


def test_images_too_small_for_the_network_are_rejected():
  model, variables = _setup('resnet18', width=4)
  with pytest.raises(ValueError, match='at least 32x32'):
    cj.adapt(model, variables, _images(2, shape=(16, 16, 5)))


def test_bad_masks_raise_clear_errors(cnn):
  model, variables = cnn
  x = _images(4)
  with pytest.raises(ValueError, match='mask selects no context row'):
    cj.adapt(model, variables, x, jnp.zeros(4))
  with pytest.raises(ValueError, match='mask must have shape'):
    cj.adapt(model, variables, x, jnp.ones(3))
  with pytest.raises(ValueError, match='mask selects no'):
    cj.plate_statistics(model, variables, np.asarray(x), mask=np.zeros(4), chunk_size=2)


def test_all_zero_mask_inside_jit_is_finite(cnn):
  model, variables = cnn
  logits = forward(model, variables, _images(4), jnp.zeros(4))
  chex.assert_tree_all_finite(logits)


def test_mlp_rejects_a_single_row_context():
  model, variables = _setup('mlp', in_features=6, hidden=8)
  with pytest.raises(ValueError, match='one feature vector'):
    cj.adapt(model, variables, _images(1, shape=(6,)))
  with pytest.raises(ValueError, match='must be feature vectors'):
    cj.adapt(model, variables, _images(2))


def test_streamed_statistics_accept_chunks_without_weight(cnn):
  # BEN's whole plate: perturbed rows first (weight 0), controls last -- whole chunks of zeros.
  model, variables = cnn
  x = np.asarray(_images(10))
  weights = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1], np.float32)
  streamed = cj.plate_statistics(model, variables, x, mask=weights, chunk_size=3)
  chex.assert_trees_all_close(streamed, adapt(model, variables, jnp.asarray(x[6:])),
                              rtol=1e-4, atol=1e-5)


def test_statistics_of_another_model_are_refused_naming_the_layer():
  def build(width, stages=2):
    model = models.create('cnn', num_classes=3, in_channels=2, width=width, num_stages=stages)
    return model, models.init_variables(model, jax.random.key(0), jnp.zeros((2, 8, 8, 2)))
  model, variables = build(4)
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 2))
  wide_stats = cj.adapt(*build(8), images)
  with pytest.raises(ValueError, match=r'statistics of layer bn0 \(mean\) have shape \(8,\), the '
                                       r"model's layer \(4,\)"):
    cj.predict(model, variables, wide_stats, images)
  with pytest.raises(ValueError, match='hold layer bn2, which the model does not have'):
    cj.predict(model, variables, cj.adapt(*build(4, 3), images), images)
  own = cj.adapt(model, variables, images)
  assert jax.jit(cj.predict, static_argnums=0)(model, variables, own, images).shape == (4, 3)
