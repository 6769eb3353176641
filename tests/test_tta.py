"""Test-time adaptation: TENT/DeYO/ROID steps, plates in parallel, episodic isolation, and the
losses against numpy transcriptions of the reference (subset indexing, as in PyTorch)."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csarm_jax import adaptation, methods, models, parallel, tta
from csarm_jax.evaluation import plates as plate_eval
from csarm_jax.tta import losses, views

P, T, M, K = 4, 2, 6, 3


@pytest.fixture(scope='module')
def setup():
  model = models.create('cnn', K, width=4, num_stages=2)
  images = jax.random.normal(jax.random.key(0), (P, T, M, 8, 8, 5))
  images = images + jnp.arange(P, dtype=jnp.float32)[:, None, None, None, None, None]  # plate shift
  variables = models.init_variables(model, jax.random.key(1), images[0, 0])
  mask = jnp.ones((P, T, M)).at[:, -1, -2:].set(0.0)            # a padded tail context
  rows = mask.at[:, :, 0].set(0.0)                                # row 0: a control, no loss
  return model, variables, images, mask, rows


def _run(model, variables, images, mask, rows, algo, key=jax.random.key(2)):
  return jax.jit(lambda v, x, w, r, k: tta.adapt_plates(model, v, x, w, r, algo, k))(
      variables, images, mask, rows, key)


def test_tent_with_zero_steps_is_adabn(setup):
  model, variables, images, mask, rows = setup
  adapted, logits = _run(model, variables, images, mask, rows, tta.Tent(steps=0))
  for p in range(P):
    for t in range(T):
      expected = adaptation.adapt_and_predict(model, variables, images[p, t], images[p, t],
                                              mask[p, t])
      np.testing.assert_allclose(logits[p, t], expected, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_equal(jax.tree.map(lambda a: a[1], adapted['params']), variables['params'])


def test_a_tent_step_lowers_the_entropy_of_its_batch(setup):
  model, variables, images, mask, rows = setup
  x, w, r = images[0, :1], mask[0, :1], rows[0, :1]
  adapted, _ = tta.adapt_plate(model, variables, x, w, r, tta.Tent(), jax.random.key(0))

  def entropy(v):
    return float(losses.tent_loss(adaptation.context_forward(model, v, x[0], w[0]), r[0]))
  assert entropy(adapted) < entropy(variables) - 1e-4
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), adapted['params'], variables['params'])
  assert changed['bn0'] == {'scale': True, 'bias': True}      # only BatchNorm affines move
  assert not any(jax.tree.leaves(changed['conv0'])) and not any(jax.tree.leaves(changed['head']))


@pytest.mark.parametrize('algo', [tta.Tent(), tta.DeYO(plpd_threshold=-1.0), tta.ROID()],
                         ids=lambda a: a.name)
def test_plates_in_parallel_equal_plates_one_by_one(setup, algo):
  model, variables, images, mask, rows = setup
  key = jax.random.key(3)
  adapted, logits = _run(model, variables, images, mask, rows, algo, key)
  keys = [jax.random.fold_in(key, p) for p in range(P)]
  one_plate = jax.jit(lambda v, x, w, r, k: tta.adapt_plate(model, v, x, w, r, algo, k))
  for p in range(P):
    one, one_logits = one_plate(variables, images[p], mask[p], rows[p], keys[p])
    np.testing.assert_allclose(logits[p], one_logits, rtol=2e-4, atol=2e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[p], adapted['params']), one['params'],
                                rtol=2e-4, atol=2e-5)
  assert not np.allclose(logits[0, 1], one_logits[1])          # the plates really differ
  mesh = parallel.make_mesh()
  sharded_logits = tta.compile_adapt_plates(model, algo, mesh, logits_only=True)(
      variables, images, mask, rows, key, jnp.arange(P))
  assert sharded_logits.sharding.spec[0] == parallel.AXIS
  np.testing.assert_allclose(sharded_logits, logits, rtol=2e-4, atol=2e-5)


def test_episodic_plates_are_independent_and_continual_ones_are_not(setup):
  model, variables, images, mask, rows = setup
  other = images.at[0].multiply(-3.0)                           # change plate A only
  for continual, same in ((False, True), (True, False)):
    algo = tta.Tent(continual=continual)
    _, before = _run(model, variables, images, mask, rows, algo)
    _, after = _run(model, variables, other, mask, rows, algo)
    assert np.allclose(before[1:], after[1:], rtol=1e-6, atol=1e-6) == same
    assert not np.allclose(before[0], after[0])


def test_continual_mode_is_one_plate_of_all_contexts(setup):
  model, variables, images, mask, rows = setup
  adapted, logits = _run(model, variables, images, mask, rows, tta.ROID(continual=True))
  flat = lambda a: a.reshape((P * T,) + a.shape[2:])
  one, one_logits = tta.adapt_plate(model, variables, flat(images), flat(mask), flat(rows),
                                    tta.ROID(), jax.random.key(2))
  np.testing.assert_allclose(flat(logits), one_logits, rtol=2e-4, atol=2e-5)
  chex.assert_trees_all_close(adapted['params'], one['params'], rtol=2e-4, atol=2e-5)


def test_a_padding_context_changes_nothing(setup):
  model, variables, images, mask, rows = setup
  x, w, r = images[0], mask[0], rows[0]
  pad = lambda a: jnp.concatenate([a[:1], jnp.zeros_like(a[:1]), a[1:]])   # padding in between
  algo = tta.ROID(consistency=False)               # no random view: the keys differ by position
  one_plate = jax.jit(lambda v, x, w, r: tta.adapt_plate(model, v, x, w, r, algo,
                                                         jax.random.key(0)))
  plain, plain_logits = one_plate(variables, x, w, r)
  padded, padded_logits = one_plate(variables, pad(x), pad(w), pad(r))
  np.testing.assert_allclose(padded_logits[2], plain_logits[1], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(padded['params'], plain['params'], rtol=1e-6)


def test_adaptation_methods_take_the_source_methods_test_contexts():
  tent_ben = methods.from_source(methods.TENT, methods.BEN, steps=3)
  assert (tent_ben.eval_controls, tent_ben.statistics_from) == (True, 'controls')
  assert tent_ben.test_time == tta.Tent(steps=3) and not tent_ben.trains
  assert not methods.from_source(methods.DEYO, methods.ERM).eval_controls
  with pytest.raises(ValueError, match='training method'):
    methods.from_source(methods.ROID, methods.TENT)
  assert methods.CS_ARM_CML.model_choice('cnn', {'width': 4}) == (
      'arm_cml', {'backbone': 'cnn', 'width': 4})
  assert methods.CS_ARM_BN.model_choice('cnn', {'width': 4}) == ('cnn', {'width': 4})
  assert methods.CS_ARM_BN.whole_plate and not tent_ben.whole_plate
  assert not methods.ARM_CML.whole_plate


def test_settings_from_a_config_reject_unknown_fields():
  assert tta.settings('deyo', plpd_threshold=0.3) == tta.DeYO(plpd_threshold=0.3)
  assert dataclasses.replace(tta.settings('roid'), steps=2).steps == 2
  with pytest.raises(ValueError, match='unknown settings'):
    tta.settings('tent', margin=1.0)
  with pytest.raises(ValueError, match='unknown test-time adaptation'):
    tta.settings('sar')


# ------------------------------------------------------------------------------------------------
# Losses against numpy transcriptions of the reference, on fixed logits.

def _np_softmax(z):
  e = np.exp(z - z.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def _np_entropy(z):
  p = _np_softmax(z)
  return -(p * np.log(p)).sum(1)


LOGITS = np.array([[4.0, 0.0, 0.0], [0.1, 0.0, -0.1], [0.0, 3.5, 0.2], [2.0, 1.9, -1.0],
                   [0.0, 0.0, 6.0], [-1.0, 3.0, 0.5], [0.3, 0.2, 0.1], [5.0, -2.0, 1.0]])
VIEW = np.array([[0.5, 0.0, 0.0], [0.1, 0.0, -0.1], [0.0, 3.4, 0.2], [0.0, 1.0, 0.0],
                 [0.0, 2.0, 2.0], [-1.0, 3.0, 0.5], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
ROWS = np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32)           # the last row is not in the batch


def test_deyo_filters_weights_and_loss_match_the_reference():
  z, zv = LOGITS[ROWS > 0], VIEW[ROWS > 0]
  ent = _np_entropy(z)
  ids1 = np.where(ent < 0.5 * np.log(K))[0]
  p, pv = _np_softmax(z[ids1]), _np_softmax(zv[ids1])
  cls = p.argmax(1)
  plpd = p[np.arange(len(ids1)), cls] - pv[np.arange(len(ids1)), cls]
  ids2 = np.where(plpd > 0.2)[0]
  ent2, plpd2 = ent[ids1][ids2], plpd[ids2]
  coeff = np.exp(-(ent2 - 0.4 * np.log(K))) + np.exp(plpd2)
  expected_loss = (ent2 * coeff).mean()
  assert 0 < len(ids2) < len(ids1) < len(z)                     # both filters drop something

  algo = tta.DeYO()
  kept = losses.deyo_entropy_filter(LOGITS, ROWS, algo.entropy_margin)
  w = losses.deyo_weights(LOGITS, losses.plpd(LOGITS, VIEW), kept, threshold=algo.plpd_threshold,
                          reweight_margin=algo.reweight_margin)
  expected_w = np.zeros(len(LOGITS))
  expected_w[np.where(ROWS > 0)[0][ids1[ids2]]] = coeff
  np.testing.assert_allclose(w, expected_w, rtol=1e-5)
  np.testing.assert_allclose(losses.deyo_loss(LOGITS, w), expected_loss, rtol=1e-5)


def test_roid_weights_losses_prior_and_correction_match_the_reference():
  z, zv = LOGITS[ROWS > 0], VIEW[ROWS > 0]
  ema = np.array([0.5, 0.3, 0.2])
  p = _np_softmax(z)
  div = 1 - (p @ ema) / (np.linalg.norm(p, axis=1) * np.linalg.norm(ema))
  div = (div - div.min()) / (div.max() - div.min())
  masked = div < div.mean()
  cert = -_np_entropy(z)
  cert = (cert - cert.min()) / (cert.max() - cert.min())
  weights = np.exp(div * cert * 3.0)
  weights[masked] = 0.0
  pc = np.clip(p, 0.0, 0.99)
  slr = -(pc * np.log(pc / (1 - pc) + 1e-5)).sum(1)
  expected_loss = (slr * weights)[~masked].sum() / 64
  log_v, log_z = np.log(_np_softmax(zv)), np.log(p)
  sce = -0.5 * (p * log_v).sum(1) - 0.5 * (_np_softmax(zv) * log_z).sum(1)
  expected_consistency = (sce[~masked] * weights[~masked]).sum() / 64
  expected_ema = 0.9 * ema + 0.1 * p.mean(0)
  prior = p.mean(0)
  smooth = max(1 / len(z), 1 / K) / prior.max()
  expected_out = z * (prior + smooth) / (1 + smooth * K)
  assert 0 < masked.sum() < len(z)

  w = np.asarray(losses.roid_weights(LOGITS, ROWS, jnp.asarray(ema), 1 / 3))
  np.testing.assert_allclose(w[ROWS > 0], weights, rtol=1e-5)
  assert w[ROWS == 0].item() == 0
  np.testing.assert_allclose(losses.roid_loss(LOGITS, w, 64), expected_loss, rtol=1e-5)
  np.testing.assert_allclose(losses.roid_consistency(VIEW, LOGITS, w, 64), expected_consistency,
                             rtol=1e-5)
  np.testing.assert_allclose(losses.class_prior_update(jnp.asarray(ema), LOGITS, ROWS, 0.9),
                             expected_ema, rtol=1e-5)
  np.testing.assert_allclose(losses.prior_correction(LOGITS, ROWS)[ROWS > 0], expected_out,
                             rtol=1e-5)


def test_patch_shuffle_permutes_whole_patches_per_image():
  x = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1)
  y = views.patch_shuffle(jax.random.key(0), x, grid=4)
  patches = lambda a: sorted(tuple(np.asarray(a[i:i + 2, j:j + 2]).ravel())
                             for i in range(0, 8, 2) for j in range(0, 8, 2))
  for n in range(2):
    assert patches(y[n]) == patches(x[n]) and not np.array_equal(y[n], x[n])
  assert views.affine_view(jax.random.key(1), x).shape == x.shape


def test_evaluation_regroups_contexts_by_plate_across_batches(setup):
  model, variables, _, _, _ = setup
  mesh = parallel.make_mesh()
  variables = parallel.replicate(variables, mesh)
  rng = np.random.default_rng(0)

  def batch(plate_ids):
    c = len(plate_ids)
    return {'images': rng.normal(size=(c, M, 8, 8, 5)).astype(np.float32),
            'labels': rng.integers(0, K, (c, M)).astype(np.int32),
            'mask': np.ones((c, M), np.float32), 'is_control': np.zeros((c, M), bool),
            'rows': np.arange(c * M).reshape(c, M) + 100 * np.array(plate_ids)[:, None],
            'plate': np.array(plate_ids, np.int32)}
  batches = [batch([0, 0, 1, 2]), batch([2, 3, 4, -1])]        # plate 2 spans both; -1: padding
  with jax.transfer_guard('disallow'):
    method = methods.from_source(methods.TENT, methods.ERM, seed=7)
    out = list(plate_eval.adapt_contexts(model, method, lambda x: x, mesh, variables, batches, 4))
  assert [len(o['rows']) for o in out] == [6 * M, M]             # plates 0-3, then plate 4
  assert list(np.concatenate([o['context'] for o in out])) == list(np.repeat(np.arange(7), M))
  plate2 = {k: np.stack([batches[0][k][3], batches[1][k][0]]) for k in ('images', 'mask')}
  _, expected = tta.adapt_plates(model, variables, plate2['images'][None], plate2['mask'][None],
                                 plate2['mask'][None], tta.Tent(), jax.random.key(7),
                                 jnp.array([2]))
  np.testing.assert_allclose(out[0]['logits'][3 * M:5 * M], expected[0].reshape(2 * M, K),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='not consecutive'):
    list(plate_eval.plate_groups([batch([0, 1, 0])], 4))
