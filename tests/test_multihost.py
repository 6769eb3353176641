"""Two processes on one machine, each feeding its share of the contexts, equal one 4-device process.
"""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from csarm_jax import parallel
from step_fixture import make_batch, run_steps


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  port, out = _free_port(), tmp_path / 'params.npz'
  worker = os.path.join(os.path.dirname(__file__), 'multihost_worker.py')
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(sys.path)}
  procs = [subprocess.Popen([sys.executable, worker, str(i), '2', str(port), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  logs = [p.communicate(timeout=300)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), '\n'.join(logs)

  batches = [make_batch(num_contexts=8, seed=s) for s in range(2)]
  state, metrics = run_steps('cs_arm_bn', parallel.make_mesh(), batches)
  result = np.load(out)
  leaves = jax.tree.leaves(state.params)
  assert len(result.files) == len(leaves) + 1
  for i, leaf in enumerate(leaves):
    np.testing.assert_allclose(result[f'arr_{i}'], leaf, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result['loss'], metrics['loss'], rtol=1e-6)
