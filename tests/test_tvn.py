"""TVN (csarm_jax.features.tvn) against a numpy / scikit-learn / scipy oracle, and what it does to a
domain's controls."""
import jax
import numpy as np
import pytest
from scipy import linalg
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from csarm_jax.features import tvn

D, K, G = 12, 8, 4


def _data(seed=0, controls=(30, 25, 40, 18), perturbed=20):
  """Rows of G domains, each with its own offset and per-feature scaling (a batch effect)."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(D, D))
  xs, domain, is_control = [], [], []
  for g, n_ctrl in enumerate(controls):
    n = n_ctrl + perturbed
    z = rng.normal(size=(n, D)) @ mix
    z[n_ctrl:] += rng.normal(size=D) * 2          # the perturbed rows' phenotype
    xs.append(z * rng.uniform(0.5, 2.0, D) + rng.normal(size=D) * 3)
    domain += [g] * n
    is_control += [True] * n_ctrl + [False] * perturbed
  return (np.concatenate(xs).astype(np.float32), np.array(domain), np.array(is_control))


def _oracle(x, domain, is_control, fit_domains, final_rows, ridge=0.5):
  """The reference's TVN (plt/data/transforms.TVN) in float64, with a K-component PCA."""
  x = x.astype(np.float64)
  fit_ctrl = is_control & np.isin(domain, np.flatnonzero(fit_domains))
  scaler = StandardScaler().fit(x[fit_ctrl])
  pca = PCA(n_components=K, svd_solver='full').fit(scaler.transform(x[fit_ctrl]))
  p = pca.transform(scaler.transform(x))
  z = np.empty_like(p)
  for g in range(G):
    rows = domain == g
    z[rows] = StandardScaler().fit(p[rows & is_control]).transform(p[rows])
  target = np.cov(z[fit_ctrl], rowvar=False) + ridge * np.eye(K)
  y = np.empty_like(z)
  for g in range(G):
    rows = domain == g
    source = np.cov(z[rows & is_control], rowvar=False) + ridge * np.eye(K)
    y[rows] = (z[rows] @ np.real(linalg.fractional_matrix_power(source, -0.5))
               @ np.real(linalg.fractional_matrix_power(target, 0.5)))
  return StandardScaler().fit(y[final_rows]).transform(y)


def _fit(x, domain, is_control, fit_domains, final_rows, ridge=0.5):
  groups = tvn.group_controls(x, domain, is_control, G, fit_rows=fit_domains[domain])
  params = jax.jit(tvn.fit, static_argnums=3)(*groups, K, ridge)
  params = jax.jit(tvn.standardize_on)(params, x, domain, final_rows.astype(np.float32))
  return params, np.asarray(jax.jit(tvn.apply)(params, x, domain))


@pytest.mark.parametrize('fit_domains', [[True] * G, [True, True, True, False]],
                         ids=['all_controls', 'training_controls'])
def test_matches_numpy_sklearn_oracle(fit_domains):
  x, domain, is_control = _data()
  fit_domains = np.array(fit_domains)
  final_rows = ~is_control & (domain < 3)             # e.g. the training rows
  _, got = _fit(x, domain, is_control, fit_domains, final_rows)
  want = _oracle(x, domain, is_control, fit_domains, final_rows)
  assert got.shape == (len(x), K) and got.dtype == np.float32
  # A principal component's sign is arbitrary: align each column's before comparing.
  signs = np.sign(np.sum(got * want, axis=0))
  np.testing.assert_allclose(got * signs, want, atol=2e-4)


def test_component_signs_follow_svd_flip():
  x, domain, is_control = _data(seed=3)
  params, _ = _fit(x, domain, is_control, np.ones(G, bool), ~is_control)
  c = np.asarray(params.components)
  assert np.all(c[np.argmax(np.abs(c), axis=0), np.arange(K)] > 0)
  np.testing.assert_allclose(c.T @ c, np.eye(K), atol=1e-5)


def test_each_domain_controls_are_whitened_then_coloured():
  """What holds exactly, before the final standardisation, in PCA space: with S_g the covariance
  (ddof 1) of domain g's standardised controls, C_g = S_g + r*I and C_T the pooled target (+ r*I),
  the domain's TVN controls have covariance C_T^{1/2} (I - r*C_g^{-1}) C_T^{1/2}: with r = 0
  exactly the pooled covariance of the fit controls, the same for every domain; whitened alone
  (C_T = I) they would have identity covariance."""
  x, domain, is_control = _data(seed=1)
  for ridge in (0.0, 0.5):
    params = tvn.fit(*tvn.group_controls(x, domain, is_control, G), K, ridge)   # final: identity
    y = np.asarray(tvn.apply(params, x, domain), np.float64)
    p = (((x - params.mean) / params.scale - params.pca_mean) @ params.components)
    z = np.empty_like(p, dtype=np.float64)
    for g in range(G):
      z[domain == g] = StandardScaler().fit(p[(domain == g) & is_control]).transform(
          p[domain == g])
    target = np.cov(z[is_control], rowvar=False) + ridge * np.eye(K)
    root = np.real(linalg.fractional_matrix_power(target, 0.5))
    for g in range(G):
      got = np.cov(y[(domain == g) & is_control], rowvar=False)
      c_g = np.cov(z[(domain == g) & is_control], rowvar=False) + ridge * np.eye(K)
      want = root @ (np.eye(K) - ridge * np.linalg.inv(c_g)) @ root
      np.testing.assert_allclose(got, want, atol=2e-3)
      if ridge == 0.0:
        np.testing.assert_allclose(got, target, atol=2e-3)
        assert np.all(np.abs(y[(domain == g) & is_control].mean(0)) < 1e-4)


def test_domain_without_controls_is_named():
  _, domain, is_control = _data()
  counts = tvn.control_counts(domain, is_control & (domain != 2), G)
  with pytest.raises(ValueError, match=r'plate P2 has 0 control images.*at least 2'):
    tvn.check_controls(counts, ['P0', 'P1', 'P2', 'P3'], what='plate')
  counts = tvn.control_counts(domain, is_control, G)
  counts[1] = 1
  with pytest.raises(ValueError, match=r'batch B1 has 1 control images'):
    tvn.check_controls(counts, ['B0', 'B1', 'B2', 'B3'], what='batch')
  tvn.check_controls(tvn.control_counts(domain, is_control, G), ['a', 'b', 'c', 'd'])
