"""Choosing the context micro-batch from the compiled step's memory plan."""
import math

import chex
import jax
import numpy as np
import pytest

from csarm_jax import parallel, training
from csarm_jax.training import fit
from step_fixture import make, make_batch


def test_candidates_divide_the_contexts_and_split_evenly_over_devices():
  assert fit.candidates(8, 1) == [8, 4, 2, 1]
  assert fit.candidates(8, 2) == [8, 4, 2]
  assert fit.candidates(12, 4) == [12, 4]
  assert fit.candidates(6, 4) == []


def test_the_largest_micro_batch_within_the_budget_is_chosen():
  plan = lambda b: 10 * b
  assert fit.choose_microbatch(plan, 8, 1, budget=80) == 8
  assert fit.choose_microbatch(plan, 8, 1, budget=79) == 4
  assert fit.choose_microbatch(plan, 8, 1, budget=25) == 2
  assert fit.choose_microbatch(lambda b: math.inf if b > 1 else 3, 8, 1, budget=5) == 1
  with pytest.raises(ValueError, match=r'does not fit the device.*8: 0\.00.*1: 0\.00.*remat'):
    fit.choose_microbatch(plan, 8, 1, budget=5)


def test_planned_bytes_is_the_plans_arguments_outputs_and_temporaries_less_donations():
  def f(x):
    return x * 2.0
  x = jax.ShapeDtypeStruct((256, 256), np.float32)
  kept = fit.planned_bytes(jax.jit(f).lower(x).compile())
  donated = fit.planned_bytes(jax.jit(f, donate_argnums=0).lower(x).compile())
  assert kept == 2 * 256 * 256 * 4 and donated == 256 * 256 * 4


def test_the_fitted_step_picks_the_micro_batch_that_fits_and_makes_the_same_update():
  mesh = parallel.make_mesh(jax.devices()[:1])
  batch = make_batch(num_contexts=4, perturbed=16, controls=16)
  built = []

  def build(micro):
    built.append(micro)
    return training.compile_train_step(make(contexts_per_microbatch=micro)[3], mesh)

  def run(step):
    state = parallel.replicate(make()[2], mesh)
    return jax.device_get(step(state, parallel.global_batch(batch, mesh)))

  state = parallel.replicate(make()[2], mesh)
  global_batch = parallel.global_batch(batch, mesh)
  plans = {b: fit._plan(build(b), state, global_batch) for b in (None, 2, 1)}
  assert plans[None] > plans[2] > plans[1]
  built.clear()
  fitted = fit.fitted_train_step(build, mesh, None, budget=plans[2])
  assert built == []                       # nothing compiled before the first call
  got = run(fitted)
  assert built == [None, 2, 2]             # tried all 4, fit 2 (planned, then built to run)
  expected = run(build(None))
  chex.assert_trees_all_close(got[0].params, expected[0].params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_a_set_micro_batch_or_an_unknown_budget_builds_the_step_as_asked():
  built = []
  build = lambda micro: built.append(micro) or 'step'
  mesh = parallel.make_mesh(jax.devices()[:1])
  assert fit.fitted_train_step(build, mesh, 2, budget=1) == 'step'
  assert fit.fitted_train_step(build, mesh, None, budget=None) == 'step'
  assert built == [2, None]
  assert fit.device_memory_budget(mesh) is None     # the CPU backend reports no memory limit
