"""Embeddings + TVN on the quick-start benchmark: a trained model's penultimate features of every
image, TVN-normalised per plate with its controls, then a linear classifier (or an MLP), trained and
evaluated with the quick-start's splits, protocol and metrics.

  python experiments/train.py --config=experiments/configs/quickstart.py:erm --workdir=runs/qs_erm
  python experiments/embed.py --workdir=runs/qs_erm --store=data/quickstart \
      --out=data/quickstart_embeddings
  python experiments/train.py --config=experiments/configs/embeddings.py --workdir=runs/qs_tvn

The second command is optional: ``features.from_run`` embeds the run's store into ``store`` on
first use. The featurizer (an ERM model, the closest thing to a foundation model shipped here) was
trained on the same fold's training labs only. The optional variant after ':' names the classifier
(linear, mlp); --config.data.tvn.enabled=false trains on the raw embeddings.
"""
from configs.quickstart import get_config as _quickstart


def get_config(variant=None):
  c = _quickstart('erm')
  c.store = 'data/quickstart_embeddings'
  c.synthetic.preset = None
  c.features.from_run = 'runs/qs_erm'
  c.model.name = variant or 'linear'
  c.model.options = {'hidden': 64, 'num_layers': 1} if c.model.name == 'mlp' else {}
  c.data.tvn.update(enabled=True, domain='plate', fit_on='all')
  return c
