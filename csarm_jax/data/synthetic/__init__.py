"""A synthetic Cell Painting benchmark with JUMP's hierarchy, controls and batch effects.

    config = synthetic.preset('quickstart')          # an ml_collections.ConfigDict
    synthetic.generate(config, '/data/quickstart')   # writes a store (csarm_jax.data.open_store)
    synthetic.ensure('/data/quickstart', 'quickstart')   # reuse if complete, else generate
"""
from csarm_jax.data.synthetic.config import PRESETS, fields, preset, validate, with_overrides
from csarm_jax.data.synthetic.images import render_image
from csarm_jax.data.synthetic.writer import ensure, generate
