"""A finished run as a featurizer: its embeddings of an image store, built on first use.

    embed_run('runs/erm', 'data/images', 'data/erm_embeddings')
    ensure(config)     # config.features.from_run set and config.store missing: embed it there

``config.features.from_run`` names a finished run; if ``config.store`` does not exist yet, the
run's model embeds ``config.features.images`` (default: the run's own store) into it
(``evaluation.embed``) before the experiment opens it, so a config alone describes an
"embeddings + TVN" run. An existing store is used as it is.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from absl import logging

from csarm_jax import methods, models, parallel
from csarm_jax.data.store import StoreError, open_store, read_manifest
from csarm_jax.evaluation import embed as embed_lib
from csarm_jax.evaluation.protocol import Protocol
from csarm_jax.training import workdir as workdir_lib


def embed_run(workdir: str, images: str, out: str, plates=None, skip_bad: bool = True,
              overwrite: bool = False) -> dict[str, Any]:
  """Writes the feature store of the selected checkpoint of the run in ``workdir`` over the image
  store ``images`` at ``out``; returns the skip report."""
  variables, spec, norm, _ = workdir_lib.restore_run(workdir)
  variables = jax.device_put(variables, parallel.replicated(parallel.make_mesh()))
  return embed_lib.write_embeddings(out, models.from_spec(spec['model']), variables,
                                    methods.get(spec['method']), norm, Protocol.from_spec(spec),
                                    open_store(images), workdir, plates, skip_bad, overwrite)


def ensure(config: ml_collections.ConfigDict) -> None:
  """Embeds ``config.features.images`` into ``config.store`` with ``config.features.from_run``'s
  model unless the store is complete (its manifest, written last, exists); on the lead process
  (see the module doc)."""
  f = config.get('features')
  if not f or not f.get('from_run'):
    return
  run = f.from_run

  def build() -> str:
    try:
      read_manifest(config.store)
      return ''
    except StoreError:          # missing, or an interrupted write: (re)build it
      pass
    if not os.path.exists(os.path.join(run, workdir_lib.SPEC)):
      raise ValueError(f'config.features.from_run: {run} holds no finished run '
                       f'({workdir_lib.SPEC} is missing)')
    images = f.get('images') or workdir_lib.read_json(
        os.path.join(run, workdir_lib.CONFIG))['store']
    logging.info('embedding %s with the model of %s into %s', images, run, config.store)
    embed_run(run, images, config.store, overwrite=True)
    return ''
  parallel.from_lead_process('embeddings', build)
