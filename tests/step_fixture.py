"""A tiny model, a random context batch and a compiled step, shared by the training tests."""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import optax

from csarm_jax import methods, models, parallel, training

H, CLASSES = 8, 3


def preprocess(images):
  return images.astype(jnp.float32) / 255.0 - 0.5


def make_batch(num_contexts=4, perturbed=4, controls=2, seed=0, pad=1):
  """Contexts of `perturbed` labelled rows, `controls` control rows and `pad` padding rows."""
  rng = np.random.default_rng(seed)
  m = perturbed + controls + pad
  labels = np.full((num_contexts, m), -1, np.int32)
  labels[:, :perturbed] = rng.integers(0, CLASSES, (num_contexts, perturbed))
  is_control = np.zeros((num_contexts, m), bool)
  is_control[:, perturbed:perturbed + controls] = True
  mask = np.ones((num_contexts, m), np.float32)
  mask[:, perturbed + controls:] = 0
  images = rng.integers(0, 256, (num_contexts, m, H, H, 5), dtype=np.uint8)
  images[:, perturbed + controls:] = 255          # padding content must not matter
  domain = np.broadcast_to((np.arange(m) // 2) % 2, (num_contexts, m)).astype(np.int32)
  domain = np.where(mask > 0, domain, -1)         # pairs of rows per domain (DANN, CORAL)
  return {'images': images, 'labels': labels, 'mask': mask, 'is_control': is_control,
          'plate': np.arange(num_contexts, dtype=np.int32),
          'rows': np.arange(num_contexts * m).reshape(num_contexts, m), 'domain': domain}


def make(method='cs_arm_bn', tx=None, seed=0, dtype='float32', contexts_per_microbatch=None):
  name, options = methods.get(method).model_choice(
      'cnn', {'width': 4, 'num_stages': 2, 'dtype': dtype}, num_domains=2)
  model = models.create(name, CLASSES, **options)
  tx = tx or optax.adam(1e-2)
  state = training.create_state(model, tx, jax.random.key(seed), jnp.zeros((2, H, H, 5)))
  step = training.make_train_step(model, methods.get(method), tx, preprocess,
                                  contexts_per_microbatch, total_steps=10)
  return model, tx, state, step


def run_steps(method, mesh, batches, tx=None, contexts_per_microbatch=None):
  """Runs the compiled, sharded step over `batches` (numpy, global) on `mesh`; returns the state."""
  model, tx, state, step = make(method, tx, contexts_per_microbatch=contexts_per_microbatch)
  compiled = training.compile_train_step(step, mesh)
  state = parallel.replicate(state, mesh)
  for batch in batches:
    state, metrics = compiled(state, parallel.global_batch(batch, mesh))
  return jax.device_get(state), jax.device_get(metrics)
