"""One process of a 2-process CPU run of the sharded step (launched by test_multihost.py).

usage: multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
"""
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['CSARM_DISTRIBUTED'] = '1'
sys.path.insert(0, os.path.dirname(__file__))

from csarm_jax import parallel  # noqa: E402


def _check_lead_process_values():
  """Run setup made on process 0 reaches every process, and so does its failure (no hang)."""
  import jax
  me = jax.process_index()
  assert parallel.from_lead_process('text', lambda: f'made by process {me} é') == \
      'made by process 0 é'
  assert parallel.from_lead_process('empty', lambda: '') == ''

  def fail():
    raise ValueError('boom')
  try:
    parallel.from_lead_process('failing', fail)
  except (ValueError, RuntimeError) as e:
    expected = 'boom' if me == 0 else 'failing failed on process 0'
    assert expected in str(e), e
  else:
    raise AssertionError('a failure on process 0 must reach every process')


def main(process_id, num_processes, port, out):
  parallel.maybe_initialize_distributed(f'localhost:{port}', num_processes, process_id)
  import jax
  import numpy as np
  from step_fixture import make_batch, run_steps

  mesh = parallel.make_mesh()
  assert jax.process_count() == num_processes and mesh.size == 2 * num_processes
  # Each process feeds only its own share of every global batch: a consecutive block, as the
  # pipeline builds it.
  local = 8 // num_processes
  share = lambda b: {k: v[process_id * local:(process_id + 1) * local] for k, v in b.items()}
  batches = [share(make_batch(num_contexts=8, seed=s)) for s in range(2)]
  state, metrics = run_steps('cs_arm_bn', mesh, batches)
  _check_lead_process_values()
  if jax.process_index() == 0:
    leaves = jax.tree.leaves(state.params)
    np.savez(out, loss=metrics['loss'], *leaves)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
