"""The study's trainings and evaluations in worker processes (``reproduce.py --jobs=N``).

Every result of the study is cached on disk (``runner``), so workers only fill the caches; the
runner then reads them in its own order, and results.csv is the one a sequential study writes.
Stages keep the dependencies: every model trains before any is evaluated (test-time methods adapt
other models), and models whose store is made from another model (embeddings) train after the
rest. Stores are built here, in the parent, before the stage that reads them, so that no two
workers build one.
"""
from __future__ import annotations

import multiprocessing

import jax
import ml_collections

from csarm_jax.study import runner
from csarm_jax.training import experiment


def _start(compilation_cache: str) -> None:
  if compilation_cache:
    runner.enable_compilation_cache(compilation_cache)


def _train(task) -> None:
  runner.train(*task)


def _evaluate(task) -> None:
  for _ in runner.evaluations(*task):
    pass


def fill_caches(config: ml_collections.ConfigDict, workdir: str, models: list[runner.Model],
                jobs: int, compilation_cache: str = '') -> None:
  """Trains and evaluates ``models`` (``runner.plan(config, workdir)``; pickled to the workers
  with the config) in ``jobs`` processes."""
  if jax.default_backend() != 'cpu' or jax.process_count() > 1:
    raise ValueError(f'--jobs={jobs}: worker processes share one host\'s CPU cores; on '
                     f'{jax.default_backend()} with {jax.process_count()} process(es) use --jobs=1')
  first = [m for m in models if not m.store_from_run]
  then = [m for m in models if m.store_from_run]
  context = multiprocessing.get_context('spawn')    # a fresh JAX in each worker
  with context.Pool(jobs, initializer=_start, initargs=(compilation_cache,)) as pool:
    for stage in (first, then):
      stores = {}                     # store path -> a config that builds it
      for model in stage:
        cfg = runner.run_config(config, model)
        stores.setdefault(cfg.store, cfg)
      for cfg in stores.values():
        experiment.open_run_store(cfg)
      for _ in pool.imap_unordered(_train, [(config, workdir, m) for m in stage]):
        pass
    tasks = [(config, workdir, m, name) for m in models for name in m.members]
    for _ in pool.imap_unordered(_evaluate, tasks):
      pass
    pool.close()                     # workers exit on their own (leaving the with: terminated)
    pool.join()
