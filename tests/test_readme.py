"""The README's API example runs as written."""
import os
import re


def test_readme_api_example_runs():
  text = open(os.path.join(os.path.dirname(__file__), '..', 'README.md')).read()
  blocks = re.findall(r'```python\n(.*?)```', text, flags=re.S)
  assert blocks, 'the README has no python example'
  namespace = {}
  exec(compile(blocks[0], 'README.md', 'exec'), namespace)
  assert namespace['batched'].shape == (2, 16, 8)
  assert namespace['logits'].shape == (16, 8)
