"""``train_and_evaluate(config, workdir)``: the one loop every method trains with.

Per step: the next batch of contexts (grain), assembled into global arrays sharded over contexts,
one compiled update. Metrics stay on the device until a logging step. Every epoch (or
``eval_every_epochs``) the validation plates are evaluated under the method's test-time rule;
early stopping watches that loss. ``latest`` checkpoints (state + data iterator + loop bookkeeping)
are written every ``checkpoint_every_steps`` and at evaluations; a run killed and restarted with
the same workdir continues exactly. SIGTERM (e.g. TPU preemption) saves before exiting. At the end
the best state is evaluated on every held-out part and metrics are written to the workdir.
"""
from __future__ import annotations

import json
import logging as std_logging
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from absl import logging
from tqdm import tqdm

from csarm_jax.data import pipeline
from csarm_jax.evaluation import protocol, suite
from csarm_jax import nested, parallel
from csarm_jax.training import checkpoint, experiment, fit
from csarm_jax.training import workdir as workdir_lib
from csarm_jax.training.metrics_log import MetricsLog
from csarm_jax.training.state import TrainState, abstract_state, create_state
from csarm_jax.evaluation.step import compiled_eval_step
from csarm_jax.training.step import compile_train_step, make_train_step


def quiet_library_logs() -> None:
  """Drops orbax's per-save INFO lines (dozens per checkpoint) so progress stays readable."""
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  if not any(getattr(f, 'csarm_quiet', False) for f in handler.filters):
    drop = lambda record: record.levelno > std_logging.INFO or '/orbax/' not in record.pathname
    drop.csarm_quiet = True
    handler.addFilter(drop)


class Preempted(Exception):
  """SIGTERM arrived; the latest checkpoint was saved. Re-run the same command to resume."""


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop polls between steps (restores the old handler on exit)."""

  def __enter__(self):
    self.raised = False
    self._old = signal.signal(signal.SIGTERM, self._handle) if _main_thread() else None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _train_batches(exp: experiment.Experiment):
  c, m = exp.config, exp.method
  return pipeline.training_batches(
      exp.store, exp.fold.train, num_perturbed=c.data.num_perturbed,
      num_controls=c.data.num_controls if m.train_controls else 0,
      contexts_per_batch=c.data.contexts_per_step,
      crop_size=c.data.crop_size if exp.store.kind == 'images' else None, flips=c.data.flips,
      sampling=m.train_sampling, too_few=c.data.too_few, seed=c.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=c.data.num_threads, prefetch_buffer_size=c.data.prefetch,
      **experiment.domain_sampling(exp))


def _fresh_meta() -> dict[str, Any]:
  return {'epoch': 0, 'best_val_loss': math.inf, 'best_step': -1, 'evals_without_improvement': 0,
          'history': [], 'stopped_early': False}


def _warn_changed_config(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
  """Logs (and returns) the config keys whose value differs from the checkpoint's config."""
  changed = nested.differences(saved, current) if saved is not None else []
  if changed:
    logging.warning('resuming with a config that differs from the checkpoint\'s in %s: %s',
                    len(changed), ', '.join(f'{k}: {a!r} -> {b!r}' for k, a, b in changed))
  return [k for k, _, _ in changed]


def train(exp: experiment.Experiment, workdir: str,
          on_step: Callable[[int], None] | None = None) -> tuple[TrainState, dict[str, Any]]:
  """Trains to the end of the schedule or early stopping; returns (best state, loop bookkeeping)."""
  c = exp.config
  repl = parallel.replicated(exp.mesh)
  config_record = json.loads(c.to_json_best_effort())     # saved with every checkpoint
  abstract = abstract_state(exp.model, exp.tx, exp.example_input, repl)
  ckpt = checkpoint.Checkpoints(workdir)
  batches = _train_batches(exp)
  meta = _fresh_meta()
  restored = ckpt.restore(checkpoint.LATEST, abstract, move_damaged=True)
  if restored is not None:
    state, data_state, meta = restored
    batches.set_state(data_state)
    logging.info('resumed from step %d (epoch %d)', int(state.step), meta['epoch'])
    _warn_changed_config(ckpt.saved_config(), config_record)
  else:
    state = parallel.replicate(create_state(exp.model, exp.tx, jax.random.key(c.seed),
                                            exp.example_input), exp.mesh)

  step_fn = fit.fitted_train_step(
      lambda micro: compile_train_step(make_train_step(exp.model, exp.method, exp.tx,
                                                       exp.preprocess, micro, seed=c.seed,
                                                       total_steps=exp.total_steps), exp.mesh),
      exp.mesh, c.data.get('contexts_per_microbatch'), fit.device_memory_budget(exp.mesh))
  eval_step = compiled_eval_step(exp.model, exp.method, exp.preprocess, exp.mesh)
  log = MetricsLog(workdir, enabled=jax.process_index() == 0,
                  resumed_at=int(state.step) if restored is not None else None)
  lead = jax.process_index() == 0
  step = int(state.step)
  eval_every = c.train.eval_every_epochs * exp.steps_per_epoch
  pending: list[dict[str, jax.Array]] = []
  window_start = time.perf_counter()
  profiler = _Profiler(c.train.profile_steps, c.train.profile_dir or
                       os.path.join(workdir, 'profile'), first_step=step)

  def save(which: str) -> None:
    ckpt.save(which, step, state, batches.get_state(), meta, config_record)

  def diverged(why: str) -> FloatingPointError:
    """Saves the state as DIVERGED (never resumed from); the error to raise."""
    save(checkpoint.DIVERGED)
    ckpt.wait()
    return _diverged(step, why, workdir, ckpt.latest_step(checkpoint.LATEST))

  bar = tqdm(total=exp.total_steps, initial=step, disable=not lead, unit='step', dynamic_ncols=True)
  try:
    with _SigtermFlag() as sigterm:
      while step < exp.total_steps and not meta['stopped_early']:
        profiler.before(step)
        with jax.profiler.StepTraceAnnotation('train', step_num=step + 1), \
             jax.transfer_guard(c.train.transfer_guard):
          state, metrics = step_fn(state, parallel.global_batch(next(batches), exp.mesh))
        step += 1
        profiler.after(step, state)
        pending.append(metrics)
        bar.update(1)
        if on_step is not None:
          on_step(step)
        evaluate_now = step % eval_every == 0
        checkpoint_now = bool(c.train.checkpoint_every_steps) and \
            step % c.train.checkpoint_every_steps == 0
        saving = evaluate_now or checkpoint_now or sigterm.raised
        # Metrics come to the host at logging steps -- and before anything is saved, so a state
        # whose loss went NaN is never written as 'latest' or 'best' nor validated.
        if step % c.train.log_every_steps == 0 or step == exp.total_steps or saving:
          summary = _log_metrics(pending, window_start, step, log, bar)
          pending, window_start = [], time.perf_counter()
          if not np.isfinite(summary['loss']):
            raise diverged(f"loss {summary['loss']}")
          if saving and not _all_finite(state.params):
            raise diverged('parameters not finite')
        if evaluate_now:
          meta['epoch'] = step // exp.steps_per_epoch
          try:
            _validate(exp, eval_step, state, step, meta, log)
          except FloatingPointError as e:     # finite parameters so large that predictions are not
            raise diverged(f'validation: {e}') from e
          if meta['best_step'] == step:
            save(checkpoint.BEST)
          save(checkpoint.LATEST)
        elif checkpoint_now:
          save(checkpoint.LATEST)
        if sigterm.raised:
          save(checkpoint.LATEST)
          ckpt.wait()
          raise Preempted(f'SIGTERM at step {step}: saved {workdir}/checkpoints/latest; '
                          f'run the same command again to resume')
    save(checkpoint.LATEST)
    ckpt.wait()
    if exp.fold.validation and ckpt.latest_step(checkpoint.BEST) is not None:
      state = ckpt.restore(checkpoint.BEST, abstract)[0]
    return state, meta
  finally:
    profiler.close()
    bar.close()
    log.close()
    ckpt.close()


class _Profiler:
  """Captures a profile (``jax.profiler`` trace) of ``steps`` training steps into ``directory``:
  those after the first step this process runs, which compiles. ``steps`` 0: off."""

  def __init__(self, steps: int, directory: str, first_step: int):
    self.start, self.stop, self.directory = first_step + 1, first_step + 1 + steps, directory
    self.active = False

  def before(self, step: int) -> None:
    """Called before running step ``step + 1``."""
    if step == self.start and self.stop > self.start:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state: Any) -> None:
    """Called after step ``step``; ``state`` is awaited so the trace holds the device work."""
    if self.active and step >= self.stop:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info('profile written to %s', self.directory)


def _log_metrics(pending: list[dict[str, jax.Array]], since: float, step: int, log: MetricsLog,
                 bar: tqdm) -> dict[str, float]:
  """Brings the steps' metrics to the host, logs their summary and images/s since ``since``."""
  summary = _reduce(jax.device_get(pending))
  images = summary.pop('images')
  summary['images_per_s'] = images / max(time.perf_counter() - since, 1e-9)
  log.write(step, summary, 'train')
  bar.set_postfix(loss=f"{summary['loss']:.3f}", acc=f"{summary['accuracy']:.3f}",
                  img_s=f"{summary['images_per_s']:.0f}")
  return summary


def _diverged(step: int, why: str, workdir: str, good: int | None) -> FloatingPointError:
  """``why``: the loss (checked at logging steps), the parameters (before every save) or the
  validation predictions that were not finite."""
  return FloatingPointError(
      f'training diverged by step {step}: {why}. The diverged state is in '
      f'{workdir}/checkpoints/{checkpoint.DIVERGED}; '
      + (f'the checkpoint before it (step {good}) is in checkpoints/{checkpoint.LATEST}, which '
         f'a re-run resumes from. ' if good is not None else 'no earlier state was saved. ')
      + 'Lower config.optimizer.learning_rate or check the inputs.')


def restore_variables(exp: experiment.Experiment, workdir: str) -> dict[str, Any]:
  """The selected (best, else latest) variables of a trained run, replicated on ``exp.mesh``."""
  abstract = abstract_state(exp.model, exp.tx, exp.example_input, parallel.replicated(exp.mesh))
  ckpt = checkpoint.Checkpoints(workdir)
  try:
    restored = ckpt.restore_selected(abstract, prefer_best=bool(exp.fold.validation))
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'{workdir} holds no checkpoint')
  return restored[0].variables


def _all_finite(tree) -> bool:
  return bool(jax.device_get(_all_finite_on_device(tree)))


@jax.jit
def _all_finite_on_device(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _reduce(metrics: list[dict[str, np.ndarray]]) -> dict[str, float]:
  labelled = np.array([m['labelled'] for m in metrics], np.float64)
  out = {'loss': float(np.mean([m['loss'] for m in metrics])),
         'accuracy': float(np.sum([m['accuracy'] * n for m, n in zip(metrics, labelled)]) /
                           max(labelled.sum(), 1)),
         'grad_norm': float(np.mean([m['grad_norm'] for m in metrics])),
         'images': int(np.sum([m['images'] for m in metrics]))}
  if 'domain_loss' in metrics[0]:           # DANN / CORAL: the weighted domain loss within 'loss'
    out['domain_loss'] = float(np.mean([m['domain_loss'] for m in metrics]))
  return out


def _validate(exp, eval_step, state, step: int, meta: dict[str, Any], log: MetricsLog) -> None:
  """Validation loss and accuracy; updates the early-stopping bookkeeping in ``meta``."""
  if not exp.fold.validation:
    meta['best_step'] = step        # nothing to select on: the newest state is the best
    return
  with jax.transfer_guard(exp.config.train.transfer_guard):
    frame, result = protocol.evaluate(exp, eval_step, state.variables, exp.fold.validation,
                                      exp.protocol)
  if not math.isfinite(result['loss']):
    raise FloatingPointError(f"loss {result['loss']}")
  accuracy = float((frame['pred'] == frame['label']).mean())
  meta['history'].append({'step': step, 'epoch': meta['epoch'], 'val_loss': result['loss'],
                          'val_accuracy': accuracy})
  log.write(step, {'loss': result['loss'], 'accuracy': accuracy}, 'validation')
  if result['loss'] < meta['best_val_loss']:
    meta.update(best_val_loss=result['loss'], best_step=step, evals_without_improvement=0)
  else:
    meta['evals_without_improvement'] += 1
    if meta['evals_without_improvement'] >= exp.config.train.patience:
      meta['stopped_early'] = True
      logging.info('early stopping at step %d: no validation improvement in %d evaluations',
                   step, exp.config.train.patience)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint), then evaluates it.

  Returns (and writes to ``workdir/results.json``) the metrics of every evaluation.
  """
  d = config.distributed
  parallel.maybe_initialize_distributed(d.coordinator_address, d.num_processes, d.process_id,
                                        enabled=d.enabled)
  quiet_library_logs()
  with workdir_lib.removed_on_failure(workdir):     # a failed config check leaves no workdir
    exp = experiment.build(config, workdir)
    spec = experiment.model_spec(exp)
    workdir_lib.check_resume(workdir, json.loads(config.to_json_best_effort()), spec)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, workdir_lib.CONFIG), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
    with open(os.path.join(workdir, workdir_lib.SPEC), 'w') as f:
      json.dump(spec, f, indent=1)
  logging.info('%s | %s | %s on %d devices | %d steps/epoch, at most %d steps',
               exp.fold.description, exp.method.name, config.model.name, exp.mesh.size,
               exp.steps_per_epoch, exp.total_steps)
  if exp.method.trains:
    state, meta = train(exp, workdir, on_step)
    variables, step = state.variables, int(state.step)
  else:                     # test-time adaptation: the source run's model, adapted at evaluation
    variables, meta, step = restore_variables(exp, config.tta.source), _fresh_meta(), 0
  results = {}
  if config.eval.final_evaluation:
    with jax.transfer_guard(config.train.transfer_guard):
      results = suite.evaluate_all(exp, variables, exp.protocol, workdir)
  final = {'method': exp.method.name, 'fold': exp.fold.name, 'seed': config.seed,
           'best_step': meta['best_step'], 'stopped_early': meta['stopped_early'],
           'evaluated_step': step, 'skipped': exp.skipped, 'evaluations': results}
  if exp.domains is not None:       # which domain-adaptation mode ran (the study reports it)
    final['domain'] = spec['domain']
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(final, f, indent=1)
    if results:
      print(f'\n{exp.method.name} | {exp.fold.description}\n'
            f'{suite.summary_table(results)}', flush=True)
  return final
