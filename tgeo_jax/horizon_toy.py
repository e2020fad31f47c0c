"""A noisy-quadratic distillation toy with a known answer for the short-horizon bias of meta-gradients.

After Wu et al. (ICLR 2018), "Understanding short-horizon bias in stochastic meta-optimization"; derivation in
docs/horizon_toy.md. Setting (truth theta_0 = 0)::

    theta in R^d;  per step t: label target eps_t ~ N(0, sigma_y^2 I) (unbiased, noisy),
                               teacher target b + delta_t, delta_t ~ N(0, sigma_t^2 I) (biased, low noise)
    soft(theta) = 1/2 |theta - (b + delta)|^2,  hard(theta) = 1/2 |theta - eps|^2,  N = 1 sample per step
    L_train = alpha soft + (1 - alpha) hard,     alpha = sigmoid(phi)   (phi: a scalar meta-parameter)
    L_val(theta) = 1/2 |theta|^2                  (exact, no noise: the distance to the truth)
    SGD(eta): theta' = (1 - eta) theta + eta u,   u = alpha (b + delta) + (1 - alpha) eps

Closed forms (all per docs/horizon_toy.md; ``B2 = |b|^2``, ``V(alpha) = alpha^2 sigma_t^2 + (1-alpha)^2
sigma_y^2``, ``S = sigma_t^2 + sigma_y^2``)::

    stationary theta ~ mean alpha b, covariance eta V / (2 - eta) I
    E L_val(alpha)  = 1/2 [alpha^2 B2 + c_inf V(alpha)],             c_inf = d eta / (2 - eta)
    K-step unroll, expected d L_val(theta_K)/d alpha from stationarity
                    = A_K alpha B2 + B_K d (alpha S - sigma_y^2),
                      A_K = 1 - (1-eta)^K,  B_K = eta (1 - (1-eta)^(2K)) / (2 - eta)
    its root        alpha(c_K) with alpha(c) = c sigma_y^2 / (B2 + c S),  c_K = d eta (1 + (1-eta)^K) / (2 - eta)
    greedy (K = 1): c_1 = d eta;   long run (K -> inf): c_inf;   alpha(c) increases with c, so
                    alpha_greedy = alpha(c_1) > alpha_K > alpha_{K+1} > alpha* = alpha(c_inf)   (0 < eta < 1)
    implicit (IFT, J Neumann terms, grad L_val at theta): E = s_J alpha B2, s_J = 1 - (1-eta)^(J+1): alpha -> 0

The simulation meta-learns phi online (theta and phi updated together over T real steps with fresh noise) from a
pluggable hypergradient: the library's own ``bilevel.one_step``, ``bilevel.unroll`` and ``bilevel.implicit``
(``literal_one_step`` / ``literal_unroll`` / ``literal_implicit`` are plain ``jax.grad`` / dense-matrix
definitions of the same quantities, cross-checks for the tests).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tgeo_jax import bilevel

__all__ = ["Toy", "noise_var", "stationary_mean", "stationary_var", "expected_val_loss", "horizon_c", "alpha_for_c",
           "long_run_alpha", "greedy_alpha", "unrolled_alpha", "expected_unrolled_grad", "expected_greedy_grad",
           "neumann_scale", "expected_implicit_grad", "weight_fn", "make_per_sample_fn", "val_loss_fn",
           "draw_batches", "implicit_kwargs", "library_functions", "literal_unroll", "literal_one_step",
           "literal_implicit", "window_meta_lr", "SimResult", "simulate", "settled_alpha", "hypergrad_at",
           "stationary_samples", "mean_field_alpha"]


class Toy(NamedTuple):
  """The problem's constants. ``b = sqrt(bias_norm2 / dim) * ones(dim)`` (only ``|b|^2`` enters the closed forms)."""

  dim: int = 8  # d
  lr: float = 0.1  # eta, the student's SGD step
  sigma_label: float = 1.0  # sigma_y
  sigma_teacher: float = 0.1  # sigma_t
  bias_norm2: float = 0.5  # |b|^2

  def bias(self) -> np.ndarray:
    """``b`` ``[dim]``."""
    return np.full((self.dim,), math.sqrt(self.bias_norm2 / self.dim), np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Closed forms (NumPy / Python floats; alpha may be a float or an array).
# ---------------------------------------------------------------------------------------------------------------


def noise_var(alpha, toy: Toy):
  """``V(alpha) = alpha^2 sigma_t^2 + (1 - alpha)^2 sigma_y^2``: per-coordinate variance of the step's target u."""
  alpha = np.asarray(alpha, np.float64)
  return alpha**2 * toy.sigma_teacher**2 + (1.0 - alpha) ** 2 * toy.sigma_label**2


def stationary_mean(alpha, toy: Toy) -> np.ndarray:
  """``E theta = alpha b`` ``[dim]`` under a constant ``alpha`` (a float)."""
  return float(alpha) * toy.bias().astype(np.float64)


def stationary_var(alpha, toy: Toy):
  """Per-coordinate stationary variance ``eta V(alpha) / (2 - eta)`` (the covariance is that times I)."""
  return toy.lr * noise_var(alpha, toy) / (2.0 - toy.lr)


def expected_val_loss(alpha, toy: Toy):
  """Long-run ``E L_val = 1/2 (alpha^2 |b|^2 + d eta V(alpha) / (2 - eta))`` under a constant ``alpha``."""
  alpha = np.asarray(alpha, np.float64)
  return 0.5 * (alpha**2 * toy.bias_norm2 + toy.dim * stationary_var(alpha, toy))


def horizon_c(horizon, toy: Toy) -> float:
  """``c_K = d eta (1 + (1 - eta)^K) / (2 - eta)``; ``horizon=math.inf`` gives ``c_inf = d eta / (2 - eta)``.

  ``c_1 = d eta`` (greedy). The noise weight in the root ``alpha(c)`` of the horizon-K expected hypergradient.
  """
  decay = 0.0 if math.isinf(horizon) else (1.0 - toy.lr) ** horizon
  return toy.dim * toy.lr * (1.0 + decay) / (2.0 - toy.lr)


def alpha_for_c(c, toy: Toy) -> float:
  """``alpha(c) = c sigma_y^2 / (|b|^2 + c (sigma_t^2 + sigma_y^2))``, increasing in ``c > 0``."""
  s = toy.sigma_teacher**2 + toy.sigma_label**2
  return c * toy.sigma_label**2 / (toy.bias_norm2 + c * s)


def long_run_alpha(toy: Toy) -> float:
  """``alpha* = argmin E L_val(alpha) = alpha(c_inf)``, ``c_inf = d eta / (2 - eta)``."""
  return alpha_for_c(horizon_c(math.inf, toy), toy)


def greedy_alpha(toy: Toy) -> float:
  """Root of the expected one-step lookahead hypergradient at stationarity: ``alpha(d eta)``."""
  return alpha_for_c(horizon_c(1, toy), toy)


def unrolled_alpha(horizon: int, toy: Toy) -> float:
  """Root of the expected K-step unrolled hypergradient at stationarity: ``alpha(c_K)``; K=1 is greedy."""
  return alpha_for_c(horizon_c(horizon, toy), toy)


def expected_unrolled_grad(alpha, horizon, toy: Toy):
  """``E d L_val(theta_K)/d alpha = A_K alpha |b|^2 + B_K d (alpha S - sigma_y^2)`` from stationarity of ``alpha``.

  ``A_K = 1 - (1 - eta)^K``, ``B_K = eta (1 - (1 - eta)^(2K)) / (2 - eta)``, ``S = sigma_t^2 + sigma_y^2``; the
  expectation is over the stationary theta_0 and the K steps' noise. ``horizon=1`` is the greedy one-step value
  ``eta [alpha |b|^2 + eta d (alpha S - sigma_y^2)]``; ``horizon=math.inf`` is ``d E L_val / d alpha``.
  """
  alpha = np.asarray(alpha, np.float64)
  q = 0.0 if math.isinf(horizon) else (1.0 - toy.lr) ** horizon
  a_k = 1.0 - q
  b_k = toy.lr * (1.0 - q * q) / (2.0 - toy.lr)
  s = toy.sigma_teacher**2 + toy.sigma_label**2
  return a_k * alpha * toy.bias_norm2 + b_k * toy.dim * (alpha * s - toy.sigma_label**2)


def expected_greedy_grad(alpha, toy: Toy):
  """The one-step case of ``expected_unrolled_grad``."""
  return expected_unrolled_grad(alpha, 1, toy)


def neumann_scale(terms: int, toy: Toy) -> float:
  """``eta sum_{j=0..J} (1 - eta)^j = 1 - (1 - eta)^(J+1)``: the Neumann estimate of ``H^-1 = I`` (H = I here).

  ``terms`` is J, the highest power; J = 0 is the single term ``eta I`` (the one-step SGD lookahead's factor).
  """
  return 1.0 - (1.0 - toy.lr) ** (terms + 1)


def expected_implicit_grad(alpha, terms, toy: Toy):
  """Expected IFT/Neumann hypergradient ``d L_val / d alpha`` at stationarity: ``s_J alpha |b|^2``.

  ``bilevel.implicit`` estimates ``<v, w>`` with ``w = b + delta - eps = -grad(soft - hard)`` and
  ``v = s_J grad L_val(theta) = s_J theta`` (H = I; ``s_J = neumann_scale(J)``), theta the iterate BEFORE the
  step: independent of the step's noise, so only the bias survives the expectation (docs/horizon_toy.md §3b).
  Positive for every alpha > 0 and every J: the implicit meta-gradient drives alpha to 0.
  """
  return neumann_scale(terms, toy) * np.asarray(alpha, np.float64) * toy.bias_norm2


# ---------------------------------------------------------------------------------------------------------------
# The toy as a library problem (bilevel's per_sample_fn / weight_fn / val_loss_fn conventions).
# ---------------------------------------------------------------------------------------------------------------


def weight_fn(meta, context):
  """``alpha = sigmoid(meta["phi"])`` for every sample: ``[N]``, N from ``context["student_logits"] [N, K]``."""
  return jnp.full((context["student_logits"].shape[0],), jax.nn.sigmoid(meta["phi"]))


def make_per_sample_fn(toy: Toy):
  """``per_sample_fn(params, rest, batch) -> ((soft [1], hard [1]), (rest, {"student_logits": theta[None]}))``.

  ``params`` is theta ``[d]``; ``batch = {"eps": [1, d], "delta": [1, d]}`` is the step's noise draw (N = 1);
  ``soft = 1/2 |theta - (b + delta)|^2`` and ``hard = 1/2 |theta - eps|^2``, each ``[1]``. theta itself plays
  the student logits ``[1, d]`` (``weight_fn`` reads only their shape).
  """
  b = jnp.asarray(toy.bias())

  def per_sample_fn(params, rest, batch):
    soft = 0.5 * jnp.sum((params[None, :] - (b + batch["delta"])) ** 2, axis=-1)
    hard = 0.5 * jnp.sum((params[None, :] - batch["eps"]) ** 2, axis=-1)
    return (soft, hard), (rest, {"student_logits": params[None, :]})

  return per_sample_fn


def val_loss_fn(params, rest, val_batch=None):
  """``L_val = 1/2 |theta|^2``: exact (theta_0 = 0), no validation noise; ``rest`` and ``val_batch`` unused."""
  del rest, val_batch
  return 0.5 * jnp.sum(params**2)


def draw_batches(key, toy: Toy, num: int) -> dict:
  """``num`` steps of noise: ``{"eps": [num, 1, d] ~ N(0, sigma_y^2), "delta": [num, 1, d] ~ N(0, sigma_t^2)}``."""
  k_eps, k_delta = jax.random.split(key)
  return {"eps": toy.sigma_label * jax.random.normal(k_eps, (num, 1, toy.dim)),
          "delta": toy.sigma_teacher * jax.random.normal(k_delta, (num, 1, toy.dim))}


def implicit_kwargs(toy: Toy, terms: int) -> dict:
  """Keyword arguments of ``bilevel.implicit`` for a J-term Neumann series with step eta and no damping."""
  return {"solver": "neumann", "terms": terms, "neumann_lr": toy.lr, "damping": 0.0}


def library_functions() -> dict:
  """The hypergradients the simulation calls: ``bilevel.one_step``, ``bilevel.unroll``, ``bilevel.implicit``."""
  return {"one_step": bilevel.one_step, "unroll": bilevel.unroll, "implicit": bilevel.implicit}


# ---------------------------------------------------------------------------------------------------------------
# Literal hypergradients (plain jax.grad through the SGD steps) with bilevel's signatures: test cross-checks.
# ---------------------------------------------------------------------------------------------------------------


def _sgd_step(weight_fn_, meta, per_sample_fn, batch, student, tx):
  def loss(p):
    (soft, hard), (new_rest, context) = per_sample_fn(p, student.rest, batch)
    alpha = weight_fn_(meta, jax.tree.map(jax.lax.stop_gradient, context))
    return bilevel.train_loss(alpha, soft, hard), new_rest

  grads, new_rest = jax.grad(loss, has_aux=True)(student.params)
  params, opt_state = bilevel.optimizer_step(tx, grads, student.opt_state, student.params)
  return bilevel.StudentState(params, new_rest, opt_state)


def literal_unroll(weight_fn_, meta, per_sample_fn, batches, val_loss_fn_, val_batch, student, tx):
  """``d L_val(theta_K(phi)) / d phi`` by ``jax.grad`` through K steps (``batches`` leaves ``[K, ...]``)."""

  def outer(m):
    s = student
    for k in range(jax.tree.leaves(batches)[0].shape[0]):
      s = _sgd_step(weight_fn_, m, per_sample_fn, jax.tree.map(lambda x, k=k: x[k], batches), s, tx)
    return val_loss_fn_(s.params, s.rest, val_batch), s

  (val, s), g = jax.value_and_grad(outer, has_aux=True)(meta)
  return bilevel.HypergradResult(g, jax.lax.stop_gradient(s), {"val_loss": val})


def literal_one_step(weight_fn_, meta, per_sample_fn, batch, val_loss_fn_, val_batch, student, tx):
  """The K = 1 case of ``literal_unroll`` (``batch`` without the leading axis)."""
  return literal_unroll(weight_fn_, meta, per_sample_fn, jax.tree.map(lambda x: x[None], batch), val_loss_fn_,
                        val_batch, student, tx)


def literal_implicit(weight_fn_, meta, per_sample_fn, batch, val_loss_fn_, val_batch, student, tx, *, terms,
                     neumann_lr, damping=0.0, **_):
  """IFT with a J-term Neumann series, from dense matrices (small toys only).

  ``dL/dalpha_i = -(1/N) <v, grad (soft_i - hard_i)(theta)>``, ``v = eta sum_{j=0..J} (I - eta (H + damping I))^j
  grad L_val(theta)`` with H the dense Hessian of L_train(.; alpha) at theta and eta = ``neumann_lr``. Returns
  the real one-step student.
  """
  params, rest = student.params, student.rest
  (soft, hard), (_, context) = per_sample_fn(params, rest, batch)
  context = jax.tree.map(jax.lax.stop_gradient, context)
  alpha, alpha_vjp = jax.vjp(lambda m: weight_fn_(m, context), meta)

  def l_train(p):
    (s_, h_), _ = per_sample_fn(p, rest, batch)
    return bilevel.train_loss(jax.lax.stop_gradient(alpha), s_, h_)

  hess = jax.hessian(l_train)(params) + damping * jnp.eye(params.size)
  step = jnp.eye(params.size) - neumann_lr * hess
  series = sum(jnp.linalg.matrix_power(step, j) for j in range(terms + 1))
  v = neumann_lr * series @ jax.grad(val_loss_fn_)(params, rest, val_batch)
  dsoft, dhard = jax.jacrev(lambda p: per_sample_fn(p, rest, batch)[0])(params)  # [N, d] each
  (meta_grad,) = alpha_vjp((-(dsoft - dhard) @ v / soft.shape[0]).astype(alpha.dtype))
  return bilevel.HypergradResult(meta_grad, _sgd_step(weight_fn_, meta, per_sample_fn, batch, student, tx), {})


# ---------------------------------------------------------------------------------------------------------------
# Online meta-learning.
# ---------------------------------------------------------------------------------------------------------------


def _batched(fn, *xs, sequential: bool):
  """``jax.vmap(fn)(*xs)``, or ``jax.lax.map`` when ``sequential``.

  ``bilevel.implicit`` guards its not-converged warning with ``lax.cond(converged, ...)``; under ``vmap`` the
  predicate is batched, both branches run and the host callback fires for every element: a false
  ``HypergradSolveWarning`` and a host round trip per element and step. ``lax.map`` keeps the predicate scalar.
  """
  if sequential:
    return jax.lax.map(lambda args: fn(*args), xs)
  return jax.vmap(fn)(*xs)


def window_meta_lr(meta_lr: float, horizon: int, toy: Toy) -> float:
  """``meta_lr * K / sum_{i<K} (1 - eta)^i``: the meta step of a K-step window, from a per-real-step ``meta_lr``.

  ``d theta_K / d alpha`` sums the K steps' effects, the i-th from the end decayed by ``(1 - eta)^i``, so a
  K-step hypergradient is about ``sum_{i<K} (1 - eta)^i`` one-step ones (its bias part exactly: the
  ``A_K / eta`` of ``expected_unrolled_grad``). K updates' worth of step divided by that keeps the drift per
  real step about equal across K (within 25% for the default toy). Equal to ``meta_lr`` for K = 1.
  """
  return meta_lr * horizon * toy.lr / (1.0 - (1.0 - toy.lr) ** horizon)


class SimResult(NamedTuple):
  """What ``simulate`` records, one entry per window (per meta update)."""

  alpha: np.ndarray  # [replicas, windows]: alpha in force during each window.
  meta_grad: np.ndarray  # [replicas, windows]: the window's hypergradient d/dalpha (d/dphi over sigmoid'(phi)).
  step: np.ndarray  # [windows]: the real step at which each window starts.
  window: int  # real steps per meta update (K for unroll, else 1).


# Optimisation level 0 about halves XLA's CPU compile time for these tiny programs (compilation dominates).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def _program(toy: Toy, method: str, window: int, terms: int, windows: int, replicas: int):
  """The jitted simulation ``(key, phi0 [replicas], window_lr) -> (alpha, meta_grad)``, each [replicas, windows]."""
  fns = library_functions()
  if method not in fns:
    raise ValueError(f"method: expected one of {sorted(fns)}, got {method!r}")
  tx = optax.sgd(toy.lr)
  per_sample_fn = make_per_sample_fn(toy)
  kwargs = implicit_kwargs(toy, terms) if method == "implicit" else {}

  def hypergrad(meta, batches, student):
    if method == "unroll":
      return fns["unroll"](weight_fn, meta, per_sample_fn, batches, val_loss_fn, None, student, tx)
    batch = jax.tree.map(lambda x: x[0], batches)
    return fns[method](weight_fn, meta, per_sample_fn, batch, val_loss_fn, None, student, tx, **kwargs)

  def chain(key, phi0, window_lr):
    meta_tx = optax.sgd(window_lr)
    params = jnp.zeros((toy.dim,), jnp.float32)
    student = bilevel.StudentState(params, {}, tx.init(params))
    meta = {"phi": phi0.astype(jnp.float32)}

    def body(carry, key):
      student, meta, meta_state = carry
      alpha = jax.nn.sigmoid(meta["phi"])
      res = hypergrad(meta, draw_batches(key, toy, window), student)
      updates, meta_state = meta_tx.update(res.meta_grad, meta_state, meta)
      meta = optax.apply_updates(meta, updates)
      return (bilevel.StudentState(*res.student), meta, meta_state), (alpha,
                                                                      res.meta_grad["phi"] / (alpha * (1 - alpha)))

    _, out = jax.lax.scan(body, (student, meta, meta_tx.init(meta)), jax.random.split(key, windows))
    return out

  def run(key, phi0, window_lr):
    keys = jax.random.split(key, replicas)
    return _batched(lambda k, p: chain(k, p, window_lr), keys, phi0, sequential=method == "implicit")

  return _jit(run)


def simulate(toy: Toy, method: str, *, horizon: int = 1, terms: int = 0, steps: int = 20_000, meta_lr: float = 0.2,
             replicas: int = 8, seed: int = 0, phi0=0.0) -> SimResult:
  """Meta-learn ``phi`` online: theta and phi updated together over ``steps`` real SGD steps with fresh noise.

  Methods (the library's hypergradients, ``library_functions()``):

  * ``"one_step"``: ``bilevel.one_step`` every step; the returned student is the real step.
  * ``"unroll"``: windows of ``horizon`` = K consecutive real steps; ``bilevel.unroll`` over the window's K
    fresh noise draws from the window's start gives ``d L_val(theta_K)/d phi`` and theta_K (the real
    trajectory: the K steps ARE the training steps); phi is updated once per window.
  * ``"implicit"``: ``bilevel.implicit`` with ``terms`` = J Neumann terms (step eta, no damping) every step; the
    returned student is the real step.

  phi follows ``optax.sgd`` from ``phi0`` (a float, or one per replica); theta starts at 0. ``meta_lr`` is per
  real step: a K-step window uses ``window_meta_lr(meta_lr, K, toy)``, so all horizons relax at about the same
  rate in real steps (the speed only, not the fixed point). ``meta_lr=0`` keeps alpha fixed: the recorded
  hypergradients are then Monte-Carlo draws at that alpha (theta stationary after ~5/eta steps).
  ``replicas`` independent chains from ``jax.random.PRNGKey(seed)`` (vmapped; ``lax.map`` for implicit, see
  ``_batched``). The validation loss is exact: ``1/2 |theta|^2``. One compiled program per
  ``(toy, method, horizon, terms, steps, replicas)``, reused across seeds, ``phi0`` and ``meta_lr``.
  """
  window = horizon if method == "unroll" else 1
  windows = steps // window
  phi0 = jnp.broadcast_to(jnp.asarray(phi0, jnp.float32), (replicas,))
  run = _program(toy, method, window, terms if method == "implicit" else 0, windows, replicas)
  alphas, grads = run(jax.random.PRNGKey(seed), phi0, jnp.float32(window_meta_lr(meta_lr, window, toy)))
  return SimResult(np.asarray(alphas), np.asarray(grads), np.arange(windows) * window, window)


def settled_alpha(result: SimResult, tail: float = 0.5) -> tuple[float, float]:
  """``(mean, standard error)`` of alpha over the last ``tail`` fraction of the windows, pooled over replicas.

  The standard error treats the replicas' tail means as independent (the chains share no noise): the std of
  the per-chain means over sqrt(replicas).
  """
  return _tail_mean(result.alpha, tail)


def hypergrad_at(toy: Toy, method: str, alphas, *, per_alpha: int, steps: int, horizon: int = 1, terms: int = 0,
                 seed: int = 0, burn_in: int = 200, batches: int = 20) -> tuple[np.ndarray, np.ndarray]:
  """Monte-Carlo ``E d/dalpha`` of a method's hypergradient at each alpha, from stationarity: ``(mean, se)`` [A].

  ``per_alpha`` chains per alpha run with alpha fixed (``simulate(meta_lr=0)``; the same compiled program as
  an online run with ``replicas = len(alphas) * per_alpha`` and the same ``steps``). The windows starting
  before real step ``burn_in`` are dropped (theta starts at 0 and is stationary after ~5/eta steps). The
  standard error is from batch means: each chain's remaining windows in ``batches`` consecutive blocks, far
  longer than theta's correlation time 1/eta, so the ``per_alpha * batches`` block means are ~independent.
  """
  alphas = np.asarray(alphas, np.float64)
  phi0 = np.repeat(np.log(alphas) - np.log1p(-alphas), per_alpha)
  res = simulate(toy, method, horizon=horizon, terms=terms, steps=steps, meta_lr=0.0,
                 replicas=len(phi0), seed=seed, phi0=phi0)
  g = res.meta_grad[:, int(np.searchsorted(res.step, burn_in)):].astype(np.float64)
  g = g[:, : g.shape[1] // batches * batches].reshape(len(alphas), per_alpha * batches, -1).mean(axis=2)
  return g.mean(axis=1), g.std(axis=1, ddof=1) / math.sqrt(g.shape[1])


def _tail_mean(values: np.ndarray, tail: float) -> tuple[float, float]:
  start = int(round((1.0 - tail) * values.shape[1]))
  per_chain = values[:, start:].mean(axis=1)
  return float(per_chain.mean()), float(per_chain.std(ddof=1) / math.sqrt(len(per_chain)))


@functools.partial(jax.jit, static_argnames=("toy", "chains", "burn_in"))
def stationary_samples(key, alpha, toy: Toy, *, chains: int = 4096, burn_in: int = 200) -> jax.Array:
  """theta after ``burn_in`` SGD steps from 0 at a constant alpha, ``chains`` independent chains: ``[chains, d]``.

  The update is written out directly (``(1 - eta) theta + eta u``), independently of the library.
  """
  b = jnp.asarray(toy.bias())

  def step(theta, key):
    k1, k2 = jax.random.split(key)
    eps = toy.sigma_label * jax.random.normal(k1, theta.shape)
    delta = toy.sigma_teacher * jax.random.normal(k2, theta.shape)
    return (1 - toy.lr) * theta + toy.lr * (alpha * (b + delta) + (1 - alpha) * eps), None

  theta, _ = jax.lax.scan(step, jnp.zeros((chains, toy.dim)), jax.random.split(key, burn_in))
  return theta


def mean_field_alpha(toy: Toy, method: str, *, horizon: int = 1, terms: int = 0, steps: int = 20_000,
                     meta_lr: float = 0.2, alpha0: float = 0.5) -> np.ndarray:
  """The noise-free ("mean-field") counterpart of ``simulate``: alpha per window, ``[steps // window]``.

  ``phi_{n+1} = phi_n - lr_w sigmoid'(phi_n) E[g](sigmoid(phi_n))`` with the closed-form expected
  hypergradient of the method (``expected_unrolled_grad``, K = 1 for one_step, or ``expected_implicit_grad``)
  and ``lr_w = window_meta_lr(meta_lr, window)``: theta assumed stationary for the current alpha, the
  hypergradient's noise ignored. NumPy.
  """
  window = horizon if method == "unroll" else 1
  lr_w = window_meta_lr(meta_lr, window, toy)
  phi = math.log(alpha0) - math.log1p(-alpha0)
  out = np.empty(steps // window)
  for n in range(out.size):
    alpha = 1.0 / (1.0 + math.exp(-phi))
    out[n] = alpha
    if method == "implicit":
      grad = float(expected_implicit_grad(alpha, terms, toy))
    else:
      grad = float(expected_unrolled_grad(alpha, window, toy))
    phi -= lr_w * alpha * (1.0 - alpha) * grad
  return out
