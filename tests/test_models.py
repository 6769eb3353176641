"""The model zoo: every name builds and runs; parameter counts and initialisation are as
specified."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import csarm_jax as cj
from csarm_jax import models


def _num_params(model, shape):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), norm='context'))
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes['params']))


# torchvision's counts (ResNet-18 11,689,512; -34 21,797,672; -50 25,557,032 with a 1000-way head)
# minus that head, plus 2 more stem input channels (2 * 64 * 7 * 7) and an 8-way head.
@pytest.mark.parametrize('name, torchvision, features', [
    ('resnet18', 11_689_512, 512), ('resnet34', 21_797_672, 512), ('resnet50', 25_557_032, 2048)])
@pytest.mark.parametrize('downsample', ['avgpool', 'strided'])
def test_resnet_parameter_counts_match_torchvision(name, torchvision, features, downsample):
  model = models.create(name, 8, in_channels=5, downsample=downsample)
  expected = torchvision - (features * 1000 + 1000) + 2 * 64 * 49 + features * 8 + 8
  assert _num_params(model, (1, 224, 224, 5)) == expected


@pytest.mark.parametrize('name, options, shape', [
    ('resnet18', dict(width=4), (3, 32, 32, 5)),
    ('resnet34', dict(width=4, downsample='strided'), (3, 32, 32, 5)),
    ('resnet50', dict(width=4, in_channels=3), (3, 32, 32, 3)),   # bottleneck + zero-init bn3
    ('cnn', dict(width=4), (3, 16, 16, 5)),
    ('mlp', dict(in_features=10, hidden=8), (3, 10)),
])
def test_every_model_builds_and_runs(name, options, shape):
  model = models.create(name, 4, **options)
  x = jax.random.normal(jax.random.key(0), shape)
  variables = models.init_variables(model, jax.random.key(1), x)
  chex.assert_type(jax.tree.leaves(variables), jnp.float32)
  logits, features = jax.jit(lambda v, x: cj.context_forward(model, v, x, return_features=True))(
      variables, x)
  chex.assert_shape(logits, (shape[0], 4))
  chex.assert_rank(features, 2)
  chex.assert_tree_all_finite((logits, features))
  bottleneck_last = [block['bn3']['scale'] for block in variables['params'].values()
                     if isinstance(block, dict) and 'bn3' in block]
  assert len(bottleneck_last) == (16 if name == 'resnet50' else 0)
  assert all(float(jnp.abs(s).max()) == 0.0 for s in bottleneck_last)


def test_initialisation_zero_last_bn_and_kaiming_fan_out():
  model = models.create('resnet18', 8, width=16)
  variables = models.init_variables(model, jax.random.key(0), jnp.zeros((1, 32, 32, 5)))
  params = variables['params']
  assert float(jnp.abs(params['stage1_block0']['bn2']['scale']).max()) == 0.0
  assert float(jnp.min(params['stage1_block0']['bn1']['scale'])) == 1.0
  stem = np.asarray(params['stem_conv']['kernel'])               # (7, 7, 5, 16): fan_out = 7*7*16
  np.testing.assert_allclose(stem.std(), np.sqrt(2.0 / (7 * 7 * 16)), rtol=0.1)
  plain = models.create('resnet18', 8, width=16, zero_init_last_bn=False)
  p2 = models.init_variables(plain, jax.random.key(0), jnp.zeros((1, 32, 32, 5)))['params']
  assert float(jnp.min(p2['stage1_block0']['bn2']['scale'])) == 1.0


def test_downsampling_variants_differ_where_documented():
  pooled = models.create('resnet18', 2, width=4, downsample='avgpool')
  strided = models.create('resnet18', 2, width=4, downsample='strided')
  shape = (1, 32, 32, 5)
  def init(m):
    return jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros(shape), norm='context'))
  assert jax.tree.structure(init(pooled)) == jax.tree.structure(init(strided))
  jaxpr = lambda m: str(jax.make_jaxpr(lambda x: m.init(jax.random.key(0), x, norm='context'))(
      jnp.zeros(shape)))
  assert 'reduce_window_sum' in jaxpr(pooled)      # average pooling in blocks and shortcuts
  assert 'reduce_window_sum' not in jaxpr(strided)


def test_bad_model_names_and_options():
  with pytest.raises(ValueError, match='unknown model'):
    models.create('vit', 8)
  with pytest.raises(ValueError, match="bad options for model 'cnn'"):
    models.create('cnn', 8, depth=3)
  with pytest.raises(ValueError, match='unknown dtype'):
    models.create('cnn', 8, dtype='float8')
  with pytest.raises(ValueError, match="downsample must be"):
    models.init_variables(models.create('resnet18', 8, downsample='conv'), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 5)))


@pytest.mark.parametrize('size', [7, 8, 9])
def test_reference_head_pool_weighs_border_rows_as_the_reference(size):
  """AvgPool(7, stride 1) then a mean: a position counts once per 7-window covering it."""
  from csarm_jax.models.resnet import _head_pool
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  cover = np.array([sum(s <= i < s + 7 for s in range(size - 6)) for i in range(size)], float)
  w = np.outer(cover, cover) / np.outer(cover, cover).sum()
  expected = np.einsum('nhwc,hw->nc', x, w)
  np.testing.assert_allclose(_head_pool(jnp.asarray(x), 'reference'), expected, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(_head_pool(jnp.asarray(x), 'global'), x.mean((1, 2)), rtol=1e-5,
                             atol=1e-6)
  if size == 8:     # notes: border rows weigh 1/14, inner rows 2/14
    np.testing.assert_allclose(cover / cover.sum(), [1 / 14] + [2 / 14] * 6 + [1 / 14])


def test_reference_head_pool_needs_a_7x7_map():
  model = models.create('resnet18', 2, width=4, head_pool='reference')
  with pytest.raises(ValueError, match="head_pool='reference' pools 7x7"):
    models.init_variables(model, jax.random.key(0), jnp.zeros((1, 64, 64, 5)))
  with pytest.raises(ValueError, match='head_pool must be'):
    models.init_variables(models.create('resnet18', 2, width=4, head_pool='max'), jax.random.key(0),
                          jnp.zeros((1, 64, 64, 5)))


def _assert_close_to_scale(actual, expected, rel=1e-5):
  """Leaf by leaf, equal up to float32 rounding relative to the leaf's largest magnitude (deep
  ResNet gradients span orders of magnitude; summation order differs between the two forms)."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=rel * float(np.max(np.abs(e))) + 1e-7)


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_remat_gives_the_same_variables_outputs_gradients_and_running_averages(name):
  """Rematerialisation changes what is stored for the backward pass, nothing computed."""
  x = jax.random.normal(jax.random.key(0), (6, 32, 32, 5))
  weights = jnp.array([1., 1., 1., 1., 1., 0.])
  labels = jnp.array([0, 1, 2, 3, 0, 1])
  results = []
  for remat in (False, True):
    model = models.create(name, 4, width=4, zero_init_last_bn=False, remat=remat)
    variables = models.init_variables(model, jax.random.key(1), x)

    def loss(params):
      logits, updates = model.apply({**variables, 'params': params}, x, norm='context',
                                    weights=weights, mutable=['batch_stats'])
      ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)
      return jnp.sum(ce[:, 0] * weights), (logits, updates)
    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    results.append((variables, grad_fn(variables['params'])))
  (v0, out0), (v1, out1) = results
  chex.assert_trees_all_equal(v0, v1)                    # same names and shapes: checkpoints load
  _assert_close_to_scale(out1, out0)
  assert float(jnp.abs(out0[1]['stage1_block0']['conv1']['kernel']).sum()) > 0


@pytest.mark.parametrize('kernel_size,strides,size', [
    (1, 1, 6), (1, 2, 6), (3, 1, 6), (3, 2, 7), (3, 1, 2), (3, 2, 2), (3, 1, 1)])
def test_matmul_conv_equals_the_convolution_forward_and_gradients(kernel_size, strides, size):
  """Patches times kernel == nn.Conv with 'same' padding, on ordinary maps and on maps smaller
  than the kernel (where ResNet uses it); same parameter names and shapes."""
  from csarm_jax.models.resnet import MatmulConv
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(0), (3, size, size, 8))
  pad = kernel_size // 2
  dot = MatmulConv(5, kernel_size, strides, pad)
  conv = nn.Conv(5, (kernel_size, kernel_size), strides=strides, padding=pad, use_bias=False,
                 kernel_init=models.resnet.kaiming_fan_out)
  params = conv.init(jax.random.key(1), x)
  chex.assert_trees_all_equal_shapes(params, dot.init(jax.random.key(1), x))
  cotangent = jax.random.normal(jax.random.key(2), conv.apply(params, x).shape)
  grads = [jax.grad(lambda p, x: jnp.sum(m.apply(p, x) * cotangent), argnums=(0, 1))(params, x)
           for m in (conv, dot)]
  np.testing.assert_allclose(dot.apply(params, x), conv.apply(params, x), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('downsample', ['avgpool', 'strided'])
def test_1x1_convolutions_as_matrix_products_give_the_same_model(downsample):
  """Same ResNet-50 parameters (checkpoints interchangeable); a strided bottleneck (1x1 convs in
  the main path and the projection shortcut) gives the same outputs and gradients."""
  from csarm_jax.models.resnet import Bottleneck
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 8))
  inits = [models.init_variables(models.create('resnet50', 4, width=4, conv1x1=kind),
                                 jax.random.key(1), x[..., :5]) for kind in ('conv', 'dot')]
  chex.assert_trees_all_equal(inits[1], inits[0])
  blocks = [Bottleneck(4, 2, downsample, False, jnp.float32, kind) for kind in ('conv', 'dot')]
  variables = blocks[0].init(jax.random.key(2), x, 'context', None)
  cotangent = jax.random.normal(jax.random.key(3), (4, 16, 16, 16))
  out = [jax.value_and_grad(lambda p, x: jnp.sum(b.apply({**variables, 'params': p}, x, 'context',
                                                         None) * cotangent), argnums=(0, 1))(
                                                             variables['params'], x)
         for b in blocks]
  _assert_close_to_scale(out[1], out[0])


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)                    # ClosedJaxpr -> Jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          yield from _equations(sub)


@pytest.mark.parametrize('name', ['resnet18', 'cnn'])
def test_gradients_route_through_max_pool_without_a_scatter(name):
  """The models' max pools are nn.max_pool's values with csarm_jax.nn.max_pool's gradient:
  XLA:CPU runs select_and_scatter 4-5x slower (BENCHMARKS.md section 8)."""
  model = models.create(name, 4, width=4)
  x = jnp.zeros((2, 32, 32, 5))
  variables = models.init_variables(model, jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(jax.grad(lambda v: model.apply(v, x, norm='context').sum()))(variables)
  primitives = {e.primitive.name for e in _equations(jaxpr.jaxpr)}
  assert 'conv_general_dilated' in primitives and 'max' in primitives
  assert not {p for p in primitives if p.startswith('select_and') or p == 'reduce_window_max'}


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_no_convolution_runs_on_a_map_smaller_than_its_kernel(name):
  """At 64 px the last stage's maps are 2x2: its 3x3 layers must be matrix products, not
  convolutions (XLA:CPU runs those ~80x slower; BENCHMARKS.md section 8)."""
  model = models.create(name, 4, width=4)
  x = jnp.zeros((2, 64, 64, 5))
  variables = models.init_variables(model, jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(jax.grad(lambda v: model.apply(v, x, norm='context').sum()))(variables)
  convs = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == 'conv_general_dilated']
  assert len(convs) >= 20                                   # forward and backward convolutions
  for eqn in convs:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    spec = eqn.params['dimension_numbers']
    spatial = [lhs[d] for d in spec.lhs_spec[2:]]
    window = [rhs[d] for d in spec.rhs_spec[2:]]
    assert min(spatial) >= max(window), (lhs, rhs, spec)
