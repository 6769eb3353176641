"""Nested dicts (configs, recorded options) by dotted key: flatten, compare, fill in defaults.

Plain Python, no JAX: used by data writers (fingerprints of what made a store) and by the training
loop (a checkpoint's config against the current one).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a.b': leaf, ...} for every non-mapping leaf of ``tree``."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """(dotted key, value in a, value in b) for every leaf that differs, sorted by key; a leaf
  missing on one side reads as None there."""
  flat_a, flat_b = flatten(a), flatten(b)
  return [(k, flat_a.get(k), flat_b.get(k)) for k in sorted(flat_a.keys() | flat_b.keys())
          if flat_a.get(k) != flat_b.get(k)]


def with_defaults(tree: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
  """``tree`` with every key it lacks (at any depth) taken from ``defaults``; its own keys win."""
  merged = dict(tree)
  for key, default in defaults.items():
    if key not in tree:
      merged[key] = default
    elif isinstance(default, Mapping) and isinstance(tree[key], Mapping):
      merged[key] = with_defaults(tree[key], default)
  return merged
