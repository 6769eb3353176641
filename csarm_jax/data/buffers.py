"""Recycled host memory for batches.

    pool = BufferPool(max_buffers=6)
    images = pool.empty((1536, 256, 256, 5), np.uint8)   # a free pooled buffer, or a new one

Reading every batch into fresh memory costs a page fault per 4 KiB page on first touch: on 540-px
crops about a sixth of the loader's CPU (BENCHMARKS.md). A pool hands a buffer out again only once
nothing else references it -- no batch, no view of it, no JAX array aliasing it (JAX keeps the
NumPy array it aliases alive) -- so a consumer that keeps batches never sees them overwritten.
"""
from __future__ import annotations

import sys
import threading
from typing import Sequence

import numpy as np


def _references(buffers: list[np.ndarray], i: int) -> int:
  return sys.getrefcount(buffers[i])


# What ``_references`` counts for a buffer only the pool's list holds (the count includes the
# interpreter's own temporaries, so measure it the same way rather than assume it).
_UNREFERENCED = _references([np.empty(0)], 0)


class BufferPool:
  """Thread-safe: grain's reader threads take buffers concurrently. At most ``max_buffers`` are
  kept; past that, ``empty`` replaces a free buffer of another shape or returns unpooled memory."""

  def __init__(self, max_buffers: int):
    if max_buffers < 1:
      raise ValueError(f'max_buffers must be >= 1, got {max_buffers}')
    self.max_buffers = max_buffers
    self._buffers: list[np.ndarray] = []
    self._lock = threading.Lock()

  def empty(self, shape: Sequence[int], dtype) -> np.ndarray:
    """An uninitialised array of ``shape`` and ``dtype`` that nothing else references."""
    shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
    with self._lock:   # the caller's reference exists before another thread looks
      free = [i for i in range(len(self._buffers))
              if _references(self._buffers, i) == _UNREFERENCED]
      for i in free:
        if self._buffers[i].shape == shape and self._buffers[i].dtype == dtype:
          return self._buffers[i]
      buffer = np.empty(shape, dtype)
      if len(self._buffers) < self.max_buffers:
        self._buffers.append(buffer)
      elif free:
        self._buffers[free[0]] = buffer
      return buffer

  def __len__(self) -> int:
    return len(self._buffers)
