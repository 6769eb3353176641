"""BufferPool: a buffer comes back only when nothing references it, under threads too."""
import threading

import numpy as np
import pytest

from csarm_jax.data.buffers import BufferPool


def _same_memory(a, b):
  return a.__array_interface__['data'][0] == b.__array_interface__['data'][0]


def test_a_released_buffer_is_reused_a_referenced_one_is_not():
  pool = BufferPool(4)
  first = pool.empty((3, 5), np.uint8)
  address = first.__array_interface__['data'][0]
  del first
  again = pool.empty((3, 5), np.uint8)
  assert again.__array_interface__['data'][0] == address and len(pool) == 1
  view = again[1:]                         # a view keeps its base referenced
  del again
  other = pool.empty((3, 5), np.uint8)
  assert not np.shares_memory(other, view) and len(pool) == 2
  # Another shape or dtype never gets a free buffer of the wrong kind.
  assert pool.empty((5, 3), np.uint8).shape == (5, 3)
  assert pool.empty((3, 5), np.uint16).dtype == np.uint16


def test_past_the_cap_a_free_buffer_is_replaced_or_memory_is_unpooled():
  pool = BufferPool(2)
  held = [pool.empty((4,), np.float32), pool.empty((4,), np.float32)]
  extra = pool.empty((4,), np.float32)     # both pooled buffers are held: new, unpooled memory
  assert len(pool) == 2 and not any(np.shares_memory(extra, h) for h in held)
  del held[0], extra
  replaced = pool.empty((8,), np.float32)  # the free (4,) buffer makes room for an (8,) one
  assert len(pool) == 2 and replaced.shape == (8,) and not np.shares_memory(replaced, held[0])
  with pytest.raises(ValueError, match='max_buffers must be >= 1'):
    BufferPool(0)


def test_threads_never_share_a_buffer():
  pool, held, clobbered, lock = BufferPool(16), [], [], threading.Lock()

  def take(k):
    for _ in range(200):
      buf = pool.empty((4096,), np.int64)
      buf[:] = k                           # a thread given a held buffer would clobber it
      with lock:
        held.append((k, buf))
        if len(held) > 8:
          held.pop(0)
        clobbered.extend(j for j, b in held if not (b == j).all())

  threads = [threading.Thread(target=take, args=(k,)) for k in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not clobbered and len(pool) <= 16
  for i, (_, a) in enumerate(held):        # buffers held at the end are all distinct
    assert not any(_same_memory(a, b) for _, b in held[i + 1:])
