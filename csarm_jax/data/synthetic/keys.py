"""Random streams of the generator: every draw comes from ``rng(seed, STREAM, *key)``.

Each stream is keyed by what it describes (a source, a plate, an image row), never by the order in
which work is done, so the output is the same for any number of workers or shard size.
"""
from __future__ import annotations

import numpy as np

# What a stream draws (the first element of its spawn key).
LAYOUT, SOURCE, BATCH, PLATE, SITE, WELL, IMAGE, SOURCE_BIOLOGY = range(8)


def rng(seed: int, stream: int, *key: int) -> np.random.Generator:
  sequence = np.random.SeedSequence(int(seed), spawn_key=(stream, *map(int, key)))
  return np.random.default_rng(sequence)
