"""The three JUMP CLIs end to end, as a user runs them (subprocesses), on a generated mirror."""
import os
import subprocess
import sys

from csarm_jax.data import jump, open_store
from jump_fixture import build_mirror

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *flags):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, os.path.join(REPO, 'data_prep', script), *flags],
                          capture_output=True, text=True, env=env, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout + result.stderr


def test_mirror_to_stores(tmp_path):
  mirror = build_mirror(tmp_path)
  index = str(tmp_path / 'index.parquet')
  out = _run('jump_index.py', f'--root={mirror.root}', f'--metadata={mirror.metadata}',
             f'--out={index}', '--sources=source_3,source_8,source_10',
             '--max_rare_position_images=1')
  assert '24 sites on 4 plates' in out
  keys = (tmp_path / 'index.keys.txt').read_text().splitlines()
  assert keys == jump.object_keys(jump.read_index(index)[0]) and len(keys) == 125
  assert (tmp_path / 'index.report.json').exists()

  out = _run('jump_convert.py', f'--index={index}', f'--out={tmp_path / "images"}', '--crop=8',
             '--dtype=uint16', '--shard_items=5')
  assert 'QC: 19/24 sites written, 5 skipped' in out
  images = open_store(str(tmp_path / 'images'))
  assert images.item_shape == (8, 8, 5) and images.manifest['dtype'] == 'uint16'
  assert '--crop=8' in images.manifest['created_by']['command']

  out = _run('jump_profiles.py', f'--index={index}', f'--root={mirror.root}',
             f'--out={tmp_path / "profiles"}')
  assert 'profiles: 9 wells x 2 features' in out
  assert open_store(str(tmp_path / 'profiles')).kind == 'features'
