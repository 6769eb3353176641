r"""The reproduction study: every method, setting and test-time sweep on every benchmark seed
(and benchmark variant and section of the config), then the report.

  python experiments/reproduce.py --config=experiments/configs/reproduce.py:quick \
      --workdir=runs/study --jobs=2

--jobs=N trains and evaluates in N worker processes (on a CPU host; the results are the same).
Writes WORKDIR/results.csv, summary.md and PNG figures. Trained models are reused across the
test-time sweeps; a study killed midway continues where it stopped when re-run.
"""
import os
import sys

import pandas as pd
from absl import flags
from ml_collections import config_flags
from sklearn.decomposition import PCA

from csarm_jax import cli
from csarm_jax.study import report, runner as study

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Study config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where runs, results and the report go.')
_JOBS = flags.DEFINE_integer(
    'jobs', 1, 'Worker processes that train and evaluate side by side (CPU hosts; results are '
    'the same as with 1).', lower_bound=1)
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', 'xla_cache', 'Where XLA keeps compiled programs for reuse across '
    'benchmarks, methods and workers (relative: under --workdir; empty: no cache).')
flags.mark_flags_as_required(['config', 'workdir'])


def write_embedding(config, workdir: str) -> list[str]:
  """PCA (2-D) of penultimate features per method, to embedding.csv; returns the class names."""
  e = config.embedding
  frames = []
  for method in e.methods:
    frame = study.embedding_frame(config, workdir, method, e.fold, e.seed, e.benchmark_seed)
    features = frame.filter(regex=r'^feature_').to_numpy()
    pca = PCA(2, random_state=0).fit(features)
    xy = pca.transform(features)
    frames.append(frame[['method', 'Metadata_Source', 'Metadata_Plate', 'label']].assign(
        pc1=xy[:, 0], pc2=xy[:, 1], pc1_var=pca.explained_variance_ratio_[0],
        pc2_var=pca.explained_variance_ratio_[1]))
  pd.concat(frames).to_csv(os.path.join(workdir, 'embedding.csv'), index=False)
  from csarm_jax.data import open_store
  return open_store(study.main_benchmark(config, workdir, e.benchmark_seed).experiment.store
                    ).class_names


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  cache = os.path.join(workdir, _COMPILATION_CACHE.value) if _COMPILATION_CACHE.value else ''
  study.run(config, workdir, jobs=_JOBS.value, compilation_cache=cache)
  class_names = write_embedding(config, workdir) if config.embedding.methods else None
  command = 'python experiments/reproduce.py ' + ' '.join(sys.argv[1:])
  text = report.write(workdir, study.paper_numbers(), study.sweep_setting(config), command,
                      class_names)
  print(text)


if __name__ == '__main__':
  cli.run(main)
