"""Nested dicts by dotted key: known answers."""
from csarm_jax import nested


def test_flatten_and_differences():
  a = {'seed': 0, 'config': {'tile': 0, 'layout': {'num_sources': 3}}}
  b = {'seed': 1, 'config': {'layout': {'num_sources': 3, 'new': True}}}
  assert nested.flatten(a) == {'seed': 0, 'config.tile': 0, 'config.layout.num_sources': 3}
  assert nested.differences(a, b) == [('config.layout.new', None, True), ('config.tile', 0, None),
                                      ('seed', 0, 1)]
  assert nested.differences(a, a) == []


def test_with_defaults_fills_only_what_is_missing():
  saved = {'preset': 'tiny', 'layout': {'num_sources': 4}, 'extra': 1, 'cells': None}
  defaults = {'preset': 'quickstart', 'tile': 0, 'layout': {'num_sources': 3, 'sites': 2},
              'cells': {'per_site': 5.0}}
  assert nested.with_defaults(saved, defaults) == {
      'preset': 'tiny', 'tile': 0, 'layout': {'num_sources': 4, 'sites': 2}, 'extra': 1,
      'cells': None}                                 # a value of its own is kept, even None
