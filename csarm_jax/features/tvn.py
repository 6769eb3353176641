"""Typical Variation Normalization (TVN) of embeddings, fitted on negative controls.

As in EFAAR's ``tvn_on_controls`` with the reference's re-colouring (``plt/data/transforms.TVN``):

1. standardise every feature with the mean and std of the fit controls (all plates' controls, or
   the training plates'), then project on the principal components of those controls (PCA);
2. per domain (plate or batch), standardise each component with that domain's controls;
3. whiten each domain with its controls' covariance, ``C_g = cov(controls_g) + ridge*I``, and
   colour it to the pooled covariance of the fit controls, ``C_T = cov(fit controls) + ridge*I``:
   ``z -> z C_g^{-1/2} C_T^{1/2}`` (``ridge`` 0.5 as in both references);
4. a final standardisation (``standardize_on``: e.g. the training rows).

    groups = group_controls(x, domain, is_control, G, fit_rows)    # host: padded per domain
    params = fit(*groups, num_components=k)                        # jit-able
    params = standardize_on(params, x, domain, weights)            # jit-able
    y = apply(params, x, domain)                                   # jit-able, (N, k)

Means and variances are the population ones (``StandardScaler``), covariances use ddof 1
(``np.cov``); a constant feature or component gets scale 1, as ``StandardScaler`` does. The PCA
keeps ``num_components`` components, at most (fit controls - 1): the rest hold no variance of the
controls. Component signs follow ``sklearn``'s ``svd_flip`` (each component's largest entry
positive), so the result does not depend on the eigensolver. A domain needs at least
``MIN_CONTROLS`` controls: its standardisation needs a spread and its covariance (ddof 1) two
rows; with fewer than ``num_components + 1`` the ridge dominates the directions its controls do
not span, so TVN mostly rescales it.
"""
from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

MIN_CONTROLS = 2          # per domain: a spread to standardise with, a covariance with ddof 1
RIDGE = 0.5               # added to every covariance (EFAAR, the reference)
_TINY = 1e-6              # a standard deviation below this is a constant: scale 1 instead


@flax.struct.dataclass
class TVNParams:
  """The fitted transform: a small pytree of arrays (G domains, D features, k components)."""
  mean: jax.Array             # (D,) of the fit controls
  scale: jax.Array            # (D,)
  pca_mean: jax.Array         # (D,) of the standardised fit controls (zero up to rounding)
  components: jax.Array       # (D, k), columns by decreasing variance
  domain_mean: jax.Array      # (G, k) of each domain's controls in PCA space
  domain_scale: jax.Array     # (G, k)
  transform: jax.Array        # (G, k, k): C_g^{-1/2} C_T^{1/2}
  final_mean: jax.Array       # (k,) of ``standardize_on``'s rows (0 until then)
  final_scale: jax.Array      # (k,) (1 until then)


def control_counts(domain: np.ndarray, is_control: np.ndarray, num_domains: int) -> np.ndarray:
  return np.bincount(np.asarray(domain)[np.asarray(is_control, bool)], minlength=num_domains)


def check_controls(counts: np.ndarray, names: Sequence[str], what: str = 'domain') -> None:
  """Raises ValueError naming the first domain with fewer than ``MIN_CONTROLS`` controls."""
  short = [(n, int(c)) for n, c in zip(names, counts) if c < MIN_CONTROLS]
  if short:
    name, count = short[0]
    raise ValueError(f'TVN: {what} {name} has {count} control images; TVN standardises and '
                     f'whitens each {what} with its own controls and needs at least '
                     f'{MIN_CONTROLS} ({len(short)} such {what}s)')


def group_controls(x: np.ndarray, domain: np.ndarray, is_control: np.ndarray, num_domains: int,
                   fit_rows: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(controls (G, M, D), mask (G, M), fit mask (G, M)): each domain's control rows of ``x``,
  zero-padded to the largest domain's count M (static shapes for ``fit``); the fit mask marks
  those among ``fit_rows`` (default: all), the controls the scaler, PCA and target are fitted on."""
  x, domain = np.asarray(x, np.float32), np.asarray(domain)
  is_control = np.asarray(is_control, bool)
  fit_rows = np.ones(len(x), bool) if fit_rows is None else np.asarray(fit_rows, bool)
  counts = control_counts(domain, is_control, num_domains)
  out = np.zeros((num_domains, max(int(counts.max(initial=0)), 1), x.shape[1]), np.float32)
  mask, fit_mask = np.zeros(out.shape[:2], np.float32), np.zeros(out.shape[:2], np.float32)
  for g in range(num_domains):
    rows = is_control & (domain == g)
    n = int(rows.sum())
    out[g, :n], mask[g, :n], fit_mask[g, :n] = x[rows], 1.0, fit_rows[rows]
  return out, mask, fit_mask


def _scale(var: jax.Array) -> jax.Array:
  std = jnp.sqrt(jnp.maximum(var, 0.0))
  return jnp.where(std > _TINY, std, 1.0)


def _moments(x: jax.Array, w: jax.Array, axes) -> tuple[jax.Array, jax.Array]:
  """Weighted mean and population variance of ``x`` over ``axes`` (weights ``w`` broadcast)."""
  n = jnp.sum(w, axis=axes, keepdims=True)
  mean = jnp.sum(w * x, axis=axes, keepdims=True) / n
  var = jnp.sum(w * (x - mean) ** 2, axis=axes, keepdims=True) / n
  return mean, var


def _power(c: jax.Array, p: float) -> jax.Array:
  """A symmetric positive definite matrix to the power ``p`` (eigenvalues clipped at 1e-10)."""
  lam, q = jnp.linalg.eigh(c)
  return (q * jnp.maximum(lam, 1e-10)[..., None, :] ** p) @ jnp.swapaxes(q, -1, -2)


def _cov(z: jax.Array, w: jax.Array) -> jax.Array:
  """Weighted covariance with ddof 1 of rows ``z`` (..., M, k), weights ``w`` (..., M)."""
  n = jnp.sum(w, axis=-1)[..., None, None]
  mean = jnp.sum(w[..., None] * z, axis=-2, keepdims=True) / n
  c = z - mean
  return jnp.einsum('...mk,...ml->...kl', w[..., None] * c, c) / (n - 1)


def fit(controls: jax.Array, mask: jax.Array, fit_mask: jax.Array, num_components: int,
        ridge: float = RIDGE) -> TVNParams:
  """TVN fitted on ``controls`` (G, M, D) with ``mask`` (G, M) (``group_controls``): scaler, PCA
  and target covariance on the controls where ``fit_mask`` (G, M) is 1, each domain's
  standardisation and whitening on its own controls. ``num_components`` is static."""
  controls = controls.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  w = mask * fit_mask.astype(jnp.float32)                             # (G, M)
  mean, var = _moments(controls, w[..., None], (0, 1))
  mean, scale = mean[0, 0], _scale(var[0, 0])
  xs = (controls - mean) / scale
  pca_mean, _ = _moments(xs, w[..., None], (0, 1))
  pca_mean = pca_mean[0, 0]
  centred = (xs - pca_mean).reshape(-1, xs.shape[-1])
  flat_w = w.reshape(-1)
  cov = jnp.einsum('nd,ne->de', flat_w[:, None] * centred, centred) / jnp.sum(flat_w)
  _, vectors = jnp.linalg.eigh(cov)                                   # ascending eigenvalues
  components = vectors[:, ::-1][:, :num_components]
  biggest = jnp.argmax(jnp.abs(components), axis=0)                   # sklearn's svd_flip
  components = components * jnp.sign(components[biggest, jnp.arange(num_components)])
  p = (xs - pca_mean) @ components                                    # (G, M, k)
  d_mean, d_var = _moments(p, mask[..., None], 1)
  d_scale = _scale(d_var)
  z = (p - d_mean) / d_scale
  eye = jnp.eye(num_components, dtype=jnp.float32)
  source = _cov(z, mask) + ridge * eye                                # (G, k, k)
  target = _cov(z.reshape(-1, num_components), flat_w) + ridge * eye  # pooled fit controls
  transform = _power(source, -0.5) @ _power(target, 0.5)
  return TVNParams(mean, scale, pca_mean, components, d_mean[:, 0], d_scale[:, 0], transform,
                   jnp.zeros(num_components, jnp.float32), jnp.ones(num_components, jnp.float32))


def _normalized(params: TVNParams, x: jax.Array, domain: jax.Array, batch_size: int) -> jax.Array:
  """Steps 1-3 of rows ``x`` (N, D) of domains ``domain`` (N,) ints."""
  p = ((x.astype(jnp.float32) - params.mean) / params.scale - params.pca_mean) @ params.components
  z = (p - params.domain_mean[domain]) / params.domain_scale[domain]
  return jax.lax.map(lambda a: a[0] @ params.transform[a[1]], (z, domain),
                     batch_size=batch_size)                           # memory: batch x k x k


def standardize_on(params: TVNParams, x: jax.Array, domain: jax.Array, weights: jax.Array,
                   batch_size: int = 128) -> TVNParams:
  """``params`` with the final standardisation fitted on the rows of ``x`` of weight 1 (e.g. the
  training rows; weights 0 elsewhere)."""
  y = _normalized(params, x, domain, batch_size)
  mean, var = _moments(y, weights.astype(jnp.float32)[:, None], 0)
  return params.replace(final_mean=mean[0], final_scale=_scale(var[0]))


def apply(params: TVNParams, x: jax.Array, domain: jax.Array, batch_size: int = 128) -> jax.Array:
  """TVN of rows ``x`` (N, D) whose domains are ``domain`` (N,) ints: (N, k) float32."""
  return (_normalized(params, x, domain, batch_size) - params.final_mean) / params.final_scale
