r"""Predict the plates of a store with one or several exported models (an ensemble over folds).

  python experiments/predict.py --export=exports/fold0,exports/fold1 --store=data/new_plates \
      --out=predictions/

Writes ``images.parquet`` (one row per perturbed image: metadata, mean class probabilities over the
ensemble, prediction, predictive entropy) and ``wells.csv`` (mean probabilities per well), each
plate adapted with its own DMSO controls exactly as in evaluation, and ``skipped.json`` (the plates
that cannot form a context and the images holding NaN or inf, left out and counted). If the store
carries labels, prints the accuracy too.
"""
import json
import os

from absl import flags

from csarm_jax import cli
from csarm_jax import inference
from csarm_jax.data import open_store
from csarm_jax.evaluation import metrics as metrics_lib
from csarm_jax.training.workdir import writable_dir

_EXPORT = flags.DEFINE_list('export', None, 'Export directories (comma-separated: an ensemble).')
_STORE = flags.DEFINE_string('store', None, 'Image store path or URL of the plates to predict.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_PLATES = flags.DEFINE_list('plates', None, 'Only these plates (default: every plate).')
_CONTEXTS = flags.DEFINE_integer('contexts_per_step', 8, 'Contexts per forward pass.',
                                 lower_bound=1)
_SKIP_BAD = flags.DEFINE_bool('skip_bad', True, 'Skip (and report in skipped.json) plates that '
                              'cannot form a context and images holding NaN or inf; '
                              '--noskip_bad refuses them.')
flags.mark_flags_as_required(['export', 'store', 'out'])


def main(argv):
  del argv
  out = writable_dir(_OUT.value, '--out')          # before any prediction is computed
  members = [inference.load(path) for path in _EXPORT.value]
  store = open_store(_STORE.value)
  images, wells, skipped = inference.predict_plates(members, store, _PLATES.value, _CONTEXTS.value,
                                                    skip_bad=_SKIP_BAD.value)
  images.to_parquet(os.path.join(out, 'images.parquet'), index=False)
  wells.to_csv(os.path.join(out, 'wells.csv'), index=False)
  with open(os.path.join(out, 'skipped.json'), 'w') as f:
    json.dump(skipped, f, indent=1)
  print(f'{len(images)} images in {len(wells)} wells of '
        f'{images["Metadata_Plate"].nunique()} plates -> {out}; '
        f'skipped {skipped["num_skipped_plates"]} plates and '
        f'{skipped["num_skipped_rows"]} images (see skipped.json)')
  labelled = images[images['label'] >= 0]
  if len(labelled):
    summary = metrics_lib.summarize(labelled, [c['name'] for c in members[0].spec['classes']])
    print(f'labelled images: accuracy {summary["accuracy"]:.3f}, well accuracy '
          f'{summary["well_accuracy"]:.3f} (n={summary["num_images"]})')


if __name__ == '__main__':
  cli.run(main)
