"""Data: the image store, splits, contexts and the input pipeline."""
from csarm_jax.data.constants import CHANNELS, CONTROL_ID, POSITIVE_CONTROLS
from csarm_jax.data.store import (ImageStore, StoreError, create_array, make_manifest, open_array,
                                  open_store, write_metadata)
