"""Tests for tgeo_jax.horizon_toy: the noisy-quadratic short-horizon-bias toy (docs/horizon_toy.md).

Closed forms against Monte-Carlo and brute-force minimisation; the library's hypergradients (``bilevel.one_step``,
``unroll``, ``implicit``) against plain ``jax.grad`` definitions per draw, and in expectation against the
closed-form expected derivatives; online meta-learning settling at the closed-form fixed points.

Every Monte-Carlo tolerance is ``Z`` standard errors estimated from the sample itself (fixed seeds), so a
failure means a bias, not bad luck. Compilation dominates the run time on CPU, so each hypergradient method
compiles ONE simulation program, used both for its fixed-alpha Monte-Carlo check (meta lr 0, three alphas x
the chains per alpha of ``SIZES``) and its online run (all chains from ``ALPHA0``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tgeo_jax import bilevel
from tgeo_jax import horizon_toy as ht
from conftest import RUN_TIME_BOUND

TOY = ht.Toy()  # d = 8, eta = 0.1, sigma_y = 1, sigma_t = 0.1, |b|^2 = 0.5
ALPHAS = (0.3, 0.5, 0.7)
Z = 4.5  # standard errors: a false alarm ~1e-5 per Gaussian check
META_LR = 0.2  # per real step (ht.window_meta_lr scales it for K-step windows)
ALPHA0 = 0.2  # online runs start below every fixed point but the implicit one (alpha = 0)
# (steps, chains per alpha) per program; implicit runs its chains sequentially (ht._batched), so it gets fewer.
SIZES = {"one_step": (12_000, 4), "unroll": (12_000, 4), "implicit": (4_000, 2)}
# Online settling tolerance: Z replica-spread standard errors of the tail mean plus an allowance for the
# O(meta lr) bias of online meta-learning (theta lags alpha, phi's noise correlates with theta's); measured
# at most ~0.002 here, at meta lr 0.1 to 0.3.
ONLINE_BIAS = 0.005


def _phi(alpha):
  return float(np.log(alpha) - np.log1p(-alpha))


@functools.lru_cache(maxsize=None)
def _run(method, horizon=1, terms=0, online=True):
  steps, per_alpha = SIZES[method]
  replicas = per_alpha * len(ALPHAS)
  if online:
    return ht.simulate(TOY, method, horizon=horizon, terms=terms, steps=steps, meta_lr=META_LR,
                       replicas=replicas, phi0=_phi(ALPHA0), seed=1)
  return ht.hypergrad_at(TOY, method, ALPHAS, per_alpha=per_alpha, steps=steps, horizon=horizon, terms=terms,
                         seed=2)


def _check_expected(method, expected, **kwargs):
  mean, se = _run(method, online=False, **kwargs)
  for a, m, s in zip(ALPHAS, mean, se):
    assert abs(m - expected(a)) < Z * s, (method, kwargs, a, m, expected(a), s)


def _assert_settles(mean_se, target):
  mean, se = mean_se
  assert abs(mean - target) < ONLINE_BIAS + Z * se, (mean, se, target)


# ------------------------------------------------------------------------------------------------ closed forms

def test_parameters_separate_greedy_from_long_run():
  assert ht.greedy_alpha(TOY) - ht.long_run_alpha(TOY) > 0.15
  alphas = [ht.unrolled_alpha(k, TOY) for k in (1, 2, 4, 8, 16, 64, 1024)]
  assert alphas[0] == pytest.approx(ht.greedy_alpha(TOY))
  assert all(a > b for a, b in zip(alphas, alphas[1:]))
  assert alphas[-1] == pytest.approx(ht.long_run_alpha(TOY), abs=1e-12)


def test_stationary_moments_match_monte_carlo():
  n = 20_000
  # 64M normal draws: XLA's default optimisation, not the suite's compile-fast flags (1.2 s, not 7.2 s).
  sample = jax.jit(jax.vmap(lambda k, a: ht.stationary_samples(k, a, TOY, chains=n)), compiler_options=RUN_TIME_BOUND)
  thetas = np.asarray(sample(jax.random.split(jax.random.PRNGKey(1), 2), jnp.array([0.2, 0.6])), np.float64)
  for alpha, theta in zip((0.2, 0.6), thetas):
    var = ht.stationary_var(alpha, TOY)
    # Mean per coordinate: standard error sqrt(var / n).
    np.testing.assert_array_less(np.abs(theta.mean(0) - ht.stationary_mean(alpha, TOY)), Z * math.sqrt(var / n))
    # Variance per coordinate: standard error var sqrt(2 / (n - 1)) (theta is Gaussian).
    np.testing.assert_array_less(np.abs(theta.var(0, ddof=1) - var), Z * var * math.sqrt(2.0 / (n - 1)))
    # Isotropic: the off-diagonal covariances vanish (standard error var / sqrt(n)).
    off = np.cov(theta, rowvar=False)[~np.eye(TOY.dim, dtype=bool)]
    assert np.max(np.abs(off)) < Z * var / math.sqrt(n)
    # The long-run validation loss, standard error from the sample.
    val = 0.5 * np.sum(theta**2, axis=1)
    assert abs(val.mean() - ht.expected_val_loss(alpha, TOY)) < Z * val.std() / math.sqrt(n)


def test_closed_forms_against_brute_force():
  grid = np.linspace(0.0, 1.0, 2_000_001)
  assert grid[np.argmin(ht.expected_val_loss(grid, TOY))] == pytest.approx(ht.long_run_alpha(TOY), abs=1e-6)
  # The infinite-horizon expected hypergradient is d E L_val / d alpha (central differences).
  h = 1e-5
  for a in ALPHAS:
    fd = (ht.expected_val_loss(a + h, TOY) - ht.expected_val_loss(a - h, TOY)) / (2 * h)
    assert ht.expected_unrolled_grad(a, math.inf, TOY) == pytest.approx(fd, rel=1e-6)
  # The K-step fixed points are the roots of the K-step expected hypergradients (grid sign change).
  for k in (1, 2, 4, 16):
    root = grid[np.argmax(ht.expected_unrolled_grad(grid, k, TOY) > 0)]
    assert root == pytest.approx(ht.unrolled_alpha(k, TOY), abs=1e-6)
  # A_K and B_K against the sums they stand for: the step weights a_k = eta (1 - eta)^(K-1-k) of the unroll.
  eta, q = TOY.lr, 1.0 - TOY.lr
  for k in (1, 3, 10):
    a_k = sum(eta * q ** (k - 1 - j) for j in range(k))
    b_k = sum((eta * q ** (k - 1 - j)) ** 2 for j in range(k))
    for a in ALPHAS:
      direct = a_k * a * TOY.bias_norm2 + b_k * TOY.dim * (a * TOY.sigma_teacher**2 - (1 - a) * TOY.sigma_label**2)
      assert ht.expected_unrolled_grad(a, k, TOY) == pytest.approx(direct, rel=1e-12)
  # The Neumann partial sums of H^-1 = I.
  for j in (0, 1, 5):
    assert ht.neumann_scale(j, TOY) == pytest.approx(eta * sum(q**i for i in range(j + 1)), rel=1e-12)


# ------------------------------------------------------------------------------- the library against literals

def test_library_hypergradients_equal_literal_definitions():
  """Per draw (same theta, same noise), bilevel's hypergradients equal plain jax.grad / dense-matrix ones."""
  per_sample_fn = ht.make_per_sample_fn(TOY)
  tx = optax.sgd(TOY.lr)
  terms = (0, 30)

  @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
  def compute(theta, phi, batches):
    student = bilevel.StudentState(theta, {}, tx.init(theta))
    common = (ht.weight_fn, {"phi": phi}, per_sample_fn)
    tail = (ht.val_loss_fn, None, student, tx)
    batch = jax.tree.map(lambda x: x[0], batches)
    out = {"literal_one_step": ht.literal_one_step(*common, batch, *tail),
           "one_step": bilevel.one_step(*common, batch, *tail),
           "unroll_1": bilevel.unroll(*common, jax.tree.map(lambda x: x[:1], batches), *tail),
           "literal_unroll_5": ht.literal_unroll(*common, batches, *tail),
           "unroll_5": bilevel.unroll(*common, batches, *tail)}
    for j in terms:
      kwargs = ht.implicit_kwargs(TOY, j)
      out[f"implicit_{j}"] = bilevel.implicit(*common, batch, *tail, **kwargs)
      out[f"literal_implicit_{j}"] = ht.literal_implicit(*common, batch, *tail, **kwargs)
    return out

  theta = ht.stationary_samples(jax.random.PRNGKey(3), 0.4, TOY, chains=1)[0]
  phi = jnp.asarray(-0.3)
  batches = ht.draw_batches(jax.random.PRNGKey(4), TOY, 5)
  out = compute(theta, phi, batches)

  def close(got, want):
    np.testing.assert_allclose(out[got].meta_grad["phi"], out[want].meta_grad["phi"], rtol=2e-5, err_msg=got)

  close("one_step", "literal_one_step")
  close("unroll_1", "literal_one_step")  # unroll over K = 1 is the one-step lookahead
  close("unroll_5", "literal_unroll_5")
  np.testing.assert_allclose(out["unroll_5"].student.params, out["literal_unroll_5"].student.params, rtol=1e-6)
  w = np.asarray(TOY.bias() + batches["delta"][0, 0] - batches["eps"][0, 0])  # -grad(soft - hard)
  s = float(jax.nn.sigmoid(phi))
  for j in terms:
    close(f"implicit_{j}", f"literal_implicit_{j}")
    res = out[f"implicit_{j}"]
    # The real one step, and a contracting series (H = I): no warning; converged only if the residual hit tol.
    np.testing.assert_allclose(res.student.params, out["literal_one_step"].student.params, rtol=1e-6)
    assert bool(res.diagnostics["solve_contracting"])
    assert bool(res.diagnostics["solve_converged"]) == (float(res.diagnostics["solve_residual"]) <= 1e-6)
    # With H = I the J-term Neumann estimate is v = s_J theta: meta_grad = s_J <theta, w> sigmoid'(phi).
    np.testing.assert_allclose(res.meta_grad["phi"], ht.neumann_scale(j, TOY) * float(theta @ w) * s * (1 - s),
                               rtol=2e-5)


# ----------------------------------------------------------------- expected hypergradients (Monte-Carlo, library)

def test_one_step_hypergradient_matches_greedy_closed_form():
  _check_expected("one_step", lambda a: ht.expected_greedy_grad(a, TOY))


@pytest.mark.parametrize("horizon", (4, 16))
def test_unrolled_hypergradient_matches_closed_form(horizon):
  _check_expected("unroll", lambda a: ht.expected_unrolled_grad(a, horizon, TOY), horizon=horizon)


@pytest.mark.parametrize("terms", (0, 3))
def test_implicit_hypergradient_matches_closed_form(terms):
  _check_expected("implicit", lambda a: ht.expected_implicit_grad(a, terms, TOY), terms=terms)


# -------------------------------------------------------------------------------------- online meta-learning

def test_online_one_step_settles_at_greedy_alpha():
  _assert_settles(ht.settled_alpha(_run("one_step")), ht.greedy_alpha(TOY))


def test_online_unroll_moves_towards_long_run_alpha():
  settled = [ht.settled_alpha(_run("one_step"))]  # K = 1 (bilevel.unroll over one step IS one_step, above)
  for k in (4, 16):
    settled.append(ht.settled_alpha(_run("unroll", horizon=k)))
    _assert_settles(settled[-1], ht.unrolled_alpha(k, TOY))
  # Monotone in K, each step resolved beyond the combined standard errors, and still above alpha*.
  for (m1, s1), (m2, s2) in zip(settled, settled[1:]):
    assert m1 - m2 > Z * math.hypot(s1, s2), settled
  assert settled[-1][0] - ht.long_run_alpha(TOY) > Z * settled[-1][1]


def test_online_implicit_decays_to_zero_faster_with_more_terms():
  # The expected implicit hypergradient s_J alpha |b|^2 is positive for every alpha and J: alpha falls past
  # alpha* towards 0 (it does not move towards alpha*), at a rate growing with s_J, i.e. with J.
  settled = {}
  steps = SIZES["implicit"][0]
  for terms in (0, 3):
    run = _run("implicit", terms=terms)
    settled[terms] = ht.settled_alpha(run)
    # Where the noise-free dynamics with the closed-form drift put alpha over the same (last-half) window.
    field = ht.mean_field_alpha(TOY, "implicit", terms=terms, steps=steps, meta_lr=META_LR, alpha0=ALPHA0)
    _assert_settles(settled[terms], field[field.size // 2:].mean())
    # Still falling: each replica's first-half mean above its second-half mean (replica-spread standard error).
    halves = run.alpha.reshape(run.alpha.shape[0], 2, -1).mean(axis=2)
    drop = halves[:, 0] - halves[:, 1]
    assert drop.mean() > Z * drop.std(ddof=1) / math.sqrt(drop.size), (terms, drop)
  assert settled[0][0] < ht.long_run_alpha(TOY) / 2
  assert settled[0][0] - settled[3][0] > Z * math.hypot(settled[0][1], settled[3][1])
