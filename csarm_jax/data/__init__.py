"""Data: the image store, splits, contexts and the input pipeline.

Names load lazily (``from csarm_jax.data import open_store`` imports only the store module), so
data-only processes such as image converters do not pay for grain or JAX imports.
"""
import importlib

_NAMES = {
    'csarm_jax.data.augment': ('Windows', 'apply_windows', 'center_crop', 'crop_windows',
                               'random_crop_flip'),
    'csarm_jax.data.constants': ('CHANNELS', 'CONTROL_ID', 'POSITIVE_CONTROLS'),
    'csarm_jax.data.contexts': ('Context', 'ContextError', 'Plan', 'PlateIndex', 'chunk_context',
                                'evaluation_contexts', 'evaluation_plan', 'index_plates',
                                'index_report', 'label_shift_contexts', 'mixed_context',
                                'too_few_report', 'training_context', 'whole_plate_contexts',
                                'whole_plate_plan'),
    'csarm_jax.data.normalization': ('NormStats', 'compute_normalization', 'normalize'),
    'csarm_jax.data.pipeline': ('Batches', 'evaluation_batches', 'read_chunks', 'read_contexts',
                                'read_plan', 'training_batches', 'whole_plates'),
    'csarm_jax.data.splits': ('Fold', 'SplitError', 'make_folds'),
    'csarm_jax.data.store': ('ImageStore', 'StoreError', 'open_array', 'open_store'),
    'csarm_jax.data.store_writer': ('COMPRESSIONS', 'DEFAULT_COMPRESSION', 'create_array',
                                    'make_manifest', 'write_metadata'),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}


def __getattr__(name):
  if name in _MODULE_OF:
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
  raise AttributeError(f'module csarm_jax.data has no attribute {name!r}')


def __dir__():
  return sorted(_MODULE_OF)
