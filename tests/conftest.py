"""Test setup: 4 fake CPU devices (so sharding is exercised), before JAX starts its backend."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 4)
# Tests run tiny models once: compile time dominates, so skip most XLA optimisation passes.
jax.config.update('jax_disable_most_optimizations', True)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()   # library code reading absl flags outside app.run (grain workers)

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def store_path(tmp_path_factory):
  """A small three-lab image store (see run_fixture.write_run_store)."""
  from run_fixture import write_run_store
  return write_run_store(tmp_path_factory.mktemp('store'))
