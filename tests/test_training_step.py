"""The shared training step: oracle loss/gradients, per-context statistics, sharding invariance;
the training state and its checkpoints."""
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import csarm_jax as cj
from csarm_jax import methods, models, parallel, training
from csarm_jax.evaluation.step import make_eval_step
from csarm_jax.nn import RUNNING_STATS
from csarm_jax.training import checkpoint
from csarm_jax.training.state import TrainState, abstract_state
from step_fixture import make, make_batch, preprocess, run_steps


def _oracle_loss(model, method, params, batch_stats, batch):
  """Python loop over contexts: mean over contexts of the mean CE of labelled rows."""
  losses = []
  for c in range(batch['images'].shape[0]):
    weights = method.weights(jnp.asarray(batch['mask'][c]), jnp.asarray(batch['is_control'][c]))
    logits = cj.context_forward(model, {'params': params, RUNNING_STATS: batch_stats},
                                preprocess(jnp.asarray(batch['images'][c])), weights)
    labels = batch['labels'][c]
    rows = labels >= 0
    logp = jax.nn.log_softmax(logits)[rows]
    losses.append(-jnp.mean(logp[jnp.arange(rows.sum()), labels[rows]]))
  return jnp.mean(jnp.stack(losses))


@pytest.mark.parametrize('method_name', ['cs_arm_bn', 'ben', 'arm_bn'])
def test_step_equals_python_loop_oracle(method_name):
  method = methods.get(method_name)
  model, tx, state, step = make(method_name, tx=optax.sgd(0.1))
  batch = make_batch()
  new_state, metrics = jax.jit(step)(state, jax.tree.map(jnp.asarray, batch))
  loss, grads = jax.value_and_grad(
      lambda p: _oracle_loss(model, method, p, state.batch_stats, batch))(state.params)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
  chex.assert_trees_all_close(new_state.params, expected, rtol=1e-4, atol=1e-6)
  assert int(new_state.step) == 1 and int(metrics['labelled']) == 16


def test_padding_rows_do_not_change_the_update():
  _, _, state, step = make()
  batch = make_batch(pad=1)
  trimmed = {k: (v[:, :-1] if np.ndim(v) == 2 or k == 'images' else v) for k, v in batch.items()}
  a, _ = jax.jit(step)(state, jax.tree.map(jnp.asarray, batch))
  b, _ = jax.jit(step)(state, jax.tree.map(jnp.asarray, trimmed))
  chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-6)


def test_ben_normalises_with_the_controls_statistics_only():
  model, _, state, _ = make('ben')
  batch = make_batch(num_contexts=1)
  x = preprocess(jnp.asarray(batch['images'][0]))
  evaluate = make_eval_step(model, methods.BEN, preprocess)
  logits = evaluate(state.variables, jax.tree.map(jnp.asarray, batch))['logits'][0]
  controls = x[4:6]
  expected = cj.adapt_and_predict(model, state.variables, controls, x[:4])
  np.testing.assert_allclose(logits[:4], expected, rtol=1e-5, atol=1e-5)


def test_erm_trains_running_averages_as_the_mean_over_contexts():
  model, _, state, step = make('erm')
  batch = make_batch(controls=0)
  new_state, _ = jax.jit(step)(state, jax.tree.map(jnp.asarray, batch))
  per_context = []
  for c in range(4):
    _, upd = model.apply(state.variables, preprocess(jnp.asarray(batch['images'][c])),
                         norm='context', weights=jnp.asarray(batch['mask'][c]),
                         mutable=[RUNNING_STATS])
    per_context.append(upd[RUNNING_STATS])
  expected = jax.tree.map(lambda *r: jnp.mean(jnp.stack(r), 0), *per_context)
  chex.assert_trees_all_close(new_state.batch_stats, expected, rtol=1e-5, atol=1e-6)
  # ERM evaluates with those running averages, CS-ARM-BN never touches them.
  _, _, cs_state, cs_step = make('cs_arm_bn')
  cs_new, _ = jax.jit(cs_step)(cs_state, jax.tree.map(jnp.asarray, batch))
  chex.assert_trees_all_equal(cs_new.batch_stats, cs_state.batch_stats)


def test_sharded_update_equals_single_device_update():
  assert jax.device_count() == 4
  batches = [make_batch(num_contexts=8, seed=s) for s in range(2)]
  one, m1 = run_steps('cs_arm_bn', parallel.make_mesh(jax.devices()[:1]), batches)
  four, m4 = run_steps('cs_arm_bn', parallel.make_mesh(), batches)
  chex.assert_trees_all_close(four.params, one.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(four.opt_state, one.opt_state, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m4['loss'], m1['loss'], rtol=1e-6)


def test_bfloat16_step_keeps_float32_parameters_and_tracks_the_float32_step():
  batch = jax.tree.map(jnp.asarray, make_batch())
  _, _, state16, step16 = make(dtype='bfloat16')
  _, _, state32, step32 = make()
  new16, m16 = jax.jit(step16)(state16, batch)
  new32, m32 = jax.jit(step32)(state32, batch)
  chex.assert_type(jax.tree.leaves(new16.params), jnp.float32)
  chex.assert_tree_all_finite(new16.params)
  np.testing.assert_allclose(m16['loss'], m32['loss'], rtol=0.05)


def test_contexts_must_divide_across_devices():
  with pytest.raises(ValueError, match='contexts_per_step=6 must be a multiple'):
    parallel.check_contexts_divide(6, parallel.make_mesh())


def test_fresh_state_initialises_from_the_first_half_of_the_split_key():
  # The draws a run starts from: the key's first half initialises the model (the second was once
  # stored as TrainState.rng and never read), so dropping that field changed no parameter.
  model, tx, state, _ = make(seed=3)
  expected = models.init_variables(model, jax.random.split(jax.random.key(3))[0],
                                      jnp.zeros((2, 8, 8, 5)))
  chex.assert_trees_all_equal(state.params, expected['params'])


@flax.struct.dataclass
class _StateWithRng:            # the TrainState of checkpoints written before rng was dropped
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def test_checkpoint_with_the_dropped_rng_field_restores(tmp_path):
  model, tx, state, _ = make()
  old = _StateWithRng(state.step + 5, state.params, state.batch_stats, state.opt_state,
                      jnp.arange(2, dtype=jnp.uint32))
  ckpt = checkpoint.Checkpoints(str(tmp_path))
  ckpt.save(checkpoint.LATEST, 5, old, {'next_batch': 5}, {'epoch': 1}, {})
  ckpt.wait()
  target = abstract_state(model, tx, jnp.zeros((2, 8, 8, 5)),
                          jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  restored, data, meta = ckpt.restore(checkpoint.LATEST, target)
  ckpt.close()
  assert isinstance(restored, TrainState) and (data, meta) == ({'next_batch': 5}, {'epoch': 1})
  chex.assert_trees_all_equal(restored, state.replace(step=state.step + 5))


def test_ben_without_statistics_gradient_holds_the_control_statistics_constant():
  """statistics_gradient=False (the reference's BEN): the update is that of the loss with each
  context's control statistics computed apart and passed in as constants; the loss is unchanged
  and the default (gradient through the statistics) gives a different update."""
  model, _, state, default_step = make('ben', tx=optax.sgd(0.1))
  method = methods.get('ben', statistics_gradient=False)
  step = training.make_train_step(model, method, optax.sgd(0.1), preprocess)
  batch = make_batch()
  new_state, metrics = jax.jit(step)(state, jax.tree.map(jnp.asarray, batch))

  def oracle(params):
    variables = {'params': params, RUNNING_STATS: state.batch_stats}
    losses = []
    for c in range(batch['images'].shape[0]):
      x = preprocess(jnp.asarray(batch['images'][c]))
      labels = batch['labels'][c]
      stats = jax.lax.stop_gradient(cj.adapt(model, variables, x[batch['is_control'][c]]))
      logits = cj.predict(model, variables, stats, x[labels >= 0])
      logp = jax.nn.log_softmax(logits)
      losses.append(-jnp.mean(logp[jnp.arange(len(logits)), labels[labels >= 0]]))
    return jnp.mean(jnp.stack(losses))

  loss, grads = jax.value_and_grad(oracle)(state.params)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  chex.assert_trees_all_close(new_state.params, jax.tree.map(lambda p, g: p - 0.1 * g, state.params,
                                                             grads), rtol=1e-4, atol=1e-6)
  default_state, default_metrics = jax.jit(default_step)(state, jax.tree.map(jnp.asarray, batch))
  np.testing.assert_allclose(default_metrics['loss'], loss, rtol=1e-5)
  differs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), default_state.params,
                         new_state.params)
  assert max(jax.tree.leaves(differs)) > 1e-4


def test_method_options_are_checked():
  assert methods.get('ben', statistics_gradient=False).statistics_gradient is False
  assert methods.get('ben') is methods.BEN
  with pytest.raises(ValueError, match="unknown method option 'momentum'"):
    methods.get('ben', momentum=0.1)
  with pytest.raises(ValueError, match='statistics_gradient=False is for context-statistics'):
    methods.get('erm', statistics_gradient=False)


@pytest.mark.parametrize('method_name', sorted(methods.METHODS))
@pytest.mark.parametrize('micro', [1, 2])
def test_micro_batched_update_equals_all_at_once(method_name, micro):
  """Parameters, ERM's running averages and every metric, for each method; context 1 has no
  labelled rows (it must drop out of the mean, not count as a zero loss)."""
  batch = make_batch(controls=2 if methods.get(method_name).train_controls else 0)
  batch['labels'][1] = -1
  batch = jax.tree.map(jnp.asarray, batch)
  _, _, state, whole = make(method_name, tx=optax.sgd(0.1))
  _, _, _, parts = make(method_name, tx=optax.sgd(0.1), contexts_per_microbatch=micro)
  expected, m_expected = jax.jit(whole)(state, batch)
  got, m_got = jax.jit(parts)(state, batch)
  chex.assert_trees_all_close(got.params, expected.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got.batch_stats, expected.batch_stats, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(m_got, m_expected, rtol=1e-5, atol=1e-6)
  if not methods.get(method_name).running_stats:
    chex.assert_trees_all_equal(got.batch_stats, state.batch_stats)
  else:   # the running averages moved, so the comparison above is not vacuous
    moved = jax.tree.leaves(got.batch_stats)[0]
    assert not np.allclose(moved, jax.tree.leaves(state.batch_stats)[0])


def test_micro_batched_sharded_update_equals_single_device_all_at_once():
  batches = [make_batch(num_contexts=8, seed=s) for s in range(2)]
  one, m1 = run_steps('erm', parallel.make_mesh(jax.devices()[:1]), batches)
  four, m4 = run_steps('erm', parallel.make_mesh(), batches, contexts_per_microbatch=4)
  for tree in ('params', 'batch_stats', 'opt_state'):
    chex.assert_trees_all_close(getattr(four, tree), getattr(one, tree), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m4['loss'], m1['loss'], rtol=1e-6)


def _compiled_plan(remat: bool, size: int = 32, images: int = 16) -> tuple[int, int, int]:
  """(planned temporary bytes, barriers lowered, barriers compiled) of a ResNet-18 CS-ARM-BN step
  compiled, not run, as training compiles it, for one context of ``images`` images."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = models.create('resnet18', 3, width=8, remat=remat)
  tx = optax.sgd(0.1)
  step = training.compile_train_step(
      training.make_train_step(model, methods.CS_ARM_BN, tx, preprocess), mesh)
  state = abstract_state(model, tx, jax.ShapeDtypeStruct((2, size, size, 5), jnp.float32),
                         parallel.replicated(mesh))
  shapes = {'images': ((1, images, size, size, 5), jnp.uint8), 'labels': ((1, images), jnp.int32),
            'mask': ((1, images), jnp.float32), 'is_control': ((1, images), jnp.bool_)}
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.context_sharded(mesh))
           for k, (shape, dtype) in shapes.items()}
  lowered = step.lower(state, batch)
  compiled = lowered.compile()
  return (compiled.memory_analysis().temp_size_in_bytes,
          lowered.as_text().count('stablehlo.optimization_barrier'),
          compiled.as_text().count(' opt-barrier('))


def test_remat_keeps_its_barriers_and_shrinks_the_compiled_steps_memory_plan():
  """XLA:CPU expands jax.checkpoint's optimization barriers unless the step's compiler options
  keep them; then the recomputation merges back into the forward pass and remat plans as much
  memory as no remat (measured: 1.01x here). Kept, every barrier (the stem's and each block's)
  survives and the plan shrinks (0.51x)."""
  plain, plain_lowered, _ = _compiled_plan(remat=False)
  rematted, lowered, compiled = _compiled_plan(remat=True)
  assert plain_lowered == 0 and lowered == 1 + 8 and compiled == lowered
  assert rematted < 0.75 * plain


def test_rematted_step_as_training_compiles_it_equals_the_plain_step():
  """The CPU compiler options that keep remat's barriers change what is stored, nothing computed:
  one ResNet-18 update, remat vs none, both through compile_train_step."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  rng = np.random.default_rng(0)
  batch = {'images': rng.integers(0, 256, (1, 6, 32, 32, 5), dtype=np.uint8),
           'labels': np.array([[0, 1, 2, 0, -1, -1]], np.int32),
           'mask': np.ones((1, 6), np.float32),
           'is_control': np.array([[False] * 4 + [True] * 2])}
  states = []
  for remat in (False, True):
    model = models.create('resnet18', 3, width=4, zero_init_last_bn=False, remat=remat)
    tx = optax.sgd(0.1)
    step = training.compile_train_step(
        training.make_train_step(model, methods.CS_ARM_BN, tx, preprocess), mesh)
    state = training.create_state(model, tx, jax.random.key(0), jnp.zeros((2, 32, 32, 5)))
    start = jax.device_get(state)                            # the step donates its state
    new_state, _ = step(parallel.replicate(state, mesh), parallel.global_batch(batch, mesh))
    states.append((start, jax.device_get(new_state)))
  (start, plain), (_, rematted) = states
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), plain.params, start.params)
  assert max(jax.tree.leaves(moved)) > 1e-4                  # the update is not vacuous
  for a, e in zip(jax.tree.leaves(rematted.params), jax.tree.leaves(plain.params), strict=True):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(e))) + 1e-7)


def test_micro_batch_must_divide_the_contexts():
  _, _, state, step = make(contexts_per_microbatch=3)
  with pytest.raises(ValueError, match='contexts_per_microbatch=3 must divide contexts_per_step=4'):
    step(state, jax.tree.map(jnp.asarray, make_batch()))
  with pytest.raises(ValueError, match='multiple of the number of devices'):
    training.check_microbatch(8, 2, num_devices=4)


@pytest.mark.parametrize('micro', [None, 2])
def test_deferred_horizontal_flips_equal_flipping_on_the_host(micro):
  """The step applies the batch's ``flip_w`` before anything else: the update equals the one on
  images flipped beforehand (sharded over 4 devices, all at once and micro-batched)."""
  batch = make_batch(num_contexts=4)
  flip_w = np.random.default_rng(1).random(batch['labels'].shape) < 0.5
  host = {**batch, 'images': np.where(flip_w[..., None, None, None],
                                      batch['images'][..., ::-1, :], batch['images'])}
  mesh = parallel.make_mesh()
  expected, m_expected = run_steps('cs_arm_bn', mesh, [host], contexts_per_microbatch=micro)
  got, m_got = run_steps('cs_arm_bn', mesh, [{**batch, 'flip_w': flip_w}],
                         contexts_per_microbatch=micro)
  chex.assert_trees_all_close(got.params, expected.params, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(m_got['loss'], m_expected['loss'], rtol=1e-6)
  unflipped, _ = run_steps('cs_arm_bn', mesh, [batch], contexts_per_microbatch=micro)
  assert not np.allclose(jax.tree.leaves(unflipped.params)[0], jax.tree.leaves(got.params)[0])
