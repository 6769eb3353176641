"""What every benchmark prints about the machine it ran on."""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any


def disk_bytes(path: str) -> int:
  """Bytes of every file under ``path`` (a store on local disk)."""
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), '')
  except OSError:
    return platform.processor()


def host_info(libraries: tuple[str, ...] = ('numpy', 'jax', 'flax', 'tensorstore', 'grain')
              ) -> dict[str, Any]:
  """Platform, CPU, load and library versions; the JAX backend and devices if JAX is loaded."""
  info = {'platform': platform.platform(), 'python': platform.python_version(),
          'cpu_model': cpu_model(), 'cpu_cores_available': len(os.sched_getaffinity(0)),
          'load_average_1min_at_start': round(os.getloadavg()[0], 2),
          **{lib: metadata.version(lib) for lib in libraries}}
  if 'jax' in sys.modules:
    import jax
    info.update(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
                devices=jax.device_count(), processes=jax.process_count())
  return info
