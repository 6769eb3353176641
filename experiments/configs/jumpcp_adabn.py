"""The paper's JUMP-CP setting (see jumpcp_csarmbn.py) trained and evaluated with method 'adabn'."""
from configs.default import get_config as _default


def get_config(variant=None):
  config = _default(variant)
  config.method = 'adabn'
  return config
