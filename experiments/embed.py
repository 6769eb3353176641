r"""Embed every image of a store with a trained model: a feature store of penultimate features.

  python experiments/embed.py --workdir=runs/qs_erm --store=data/quickstart --out=data/qs_embed
  python experiments/train.py --config=experiments/configs/embeddings.py --workdir=runs/emb_tvn

(the config's ``features.from_run`` also embeds on first use, without the first command).

``--workdir`` is a training run's workdir (its selected checkpoint) or an export. Each image,
controls included, is embedded under the model's own test-time rule applied to its whole plate:
ERM's running averages, or the plate's statistics (with its controls for the methods that use
them). The output is the store format's features kind (docs/ARCHITECTURE.md, data/store.py): the
image store's table rows (``image_row``: the row in the image store), their features, manifest
last -- the format to write embeddings computed elsewhere in, too.
"""
from absl import flags

import os

from csarm_jax import cli
from csarm_jax import inference
from csarm_jax.data import open_store
from csarm_jax.training import embeddings

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run\'s workdir or an export.')
_STORE = flags.DEFINE_string('store', None, 'Image store path or URL to embed.')
_OUT = flags.DEFINE_string('out', None, 'Where the feature store is written.')
_PLATES = flags.DEFINE_list('plates', None, 'Only these plates (default: every plate).')
_SKIP_BAD = flags.DEFINE_bool('skip_bad', True, 'Skip (and count) plates that cannot form a '
                              'context under the model\'s rule; --noskip_bad refuses them.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a store already at --out.')
flags.mark_flags_as_required(['workdir', 'store', 'out'])


def main(argv):
  del argv
  path, args = _WORKDIR.value, (_PLATES.value, _SKIP_BAD.value, _OVERWRITE.value)
  if os.path.exists(os.path.join(path, inference.INFERENCE)):          # an export
    report = inference.write_embeddings(inference.load(path), open_store(_STORE.value),
                                        _OUT.value, *args)
  else:
    report = embeddings.embed_run(path, _STORE.value, _OUT.value, *args)
  store = open_store(_OUT.value)
  print(f'{len(store.table)} images x {store.item_shape[0]} features of '
        f'{store.table["Metadata_Plate"].nunique()} plates -> {_OUT.value}; skipped '
        f'{report["num_skipped_plates"]} plates and {report["num_skipped_rows"]} images')


if __name__ == '__main__':
  cli.run(main)
