"""Data: the image store, splits, contexts and the input pipeline."""
from csarm_jax.data.augment import (Windows, apply_windows, center_crop, crop_windows,
                                    random_crop_flip)
from csarm_jax.data.constants import CHANNELS, CONTROL_ID, POSITIVE_CONTROLS
from csarm_jax.data.contexts import (Context, ContextError, PlateIndex, evaluation_contexts,
                                     index_plates, label_shift_contexts, mixed_context,
                                     too_few_report, training_context, whole_plate_contexts)
from csarm_jax.data.normalization import NormStats, compute_normalization, normalize
from csarm_jax.data.pipeline import (Batches, context_chunks, evaluation_batches, read_contexts,
                                     read_windows, training_batches, whole_plates)
from csarm_jax.data.splits import Fold, SplitError, make_folds
from csarm_jax.data.store import (ImageStore, StoreError, create_array, make_manifest, open_array,
                                  open_store, write_metadata)
