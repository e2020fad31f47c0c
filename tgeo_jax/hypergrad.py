"""Meta-gradients of any inner problem: a hyperparameter inside the loss or the optimizer (docs/bilevel.md).

``tgeo_jax.bilevel`` solves one problem fast, a per-sample convex mix of two losses (TGeo-KD, RW-KD, MW-Net-style
weights). This module is the general form, where the inner loss *receives* the meta-parameters φ (any pytree: a
temperature, per-sample or per-class weights, label smoothing...) and the optimizer may read some of them too (a
learning-rate or weight-decay multiplier through ``optax.inject_hyperparams``)::

    inner_loss_fn(params, rest, meta_params, batch) -> (loss, (new_rest, aux))      # L_in(θ; φ), one train forward
    θ'(φ) = U(θ, ∇_θ L_in(θ; φ); hyperparams_fn(φ))                                # the student's own optimizer tx
    val_loss_fn(params, rest, val_batch) -> scalar                                  # L_val, the outer objective

Three variants, each returning ``bilevel.HypergradResult(meta_grad, student, diagnostics)``:

* ``one_step``: ``d L_val(θ'(φ)) / dφ``, reverse mode through the inner gradient and the optimizer update.
* ``unroll``: the same through K real steps on K batches (``lax.scan``, each step rematerialised; the models'
  convolutions keep XLA:CPU's fast kernels inside the loop: ``tgeo_jax.models.conv``).
* ``implicit``: the implicit-function theorem at the current θ::

      dL_val/dφ = -(∂_φ ∇_θ L_in)^T v,    v ~ (∇²_θ L_in + damping I)^-1 ∇_θ L_val(θ)

  by ``bilevel.linear_solve`` (Neumann or CG, with its residual and convergence report). It differentiates the
  loss only: an optimizer hyperparameter has no implicit meta-gradient (refused).

The α-mix of ``tgeo_jax.bilevel`` is an instance (``AlphaMix(weight_fn, per_sample_fn)``, an inner loss): given
one, every function here runs ``bilevel``'s explicit-JVP fast path automatically when it applies (``path="auto"``;
the same numbers, by construction at the cost XLA reaches for the general path: ``bench/general_vs_fast.py``), and
the general path where only it applies (``hyperparams_fn``, ``axis_name``); ``path="general"`` or ``"fast"``
chooses by name.

**Parallel programs.** With ``axis_name`` every function runs inside ``jax.shard_map`` (or ``pmap``) on per-device
batches: the inner loss and gradient are averaged over the axis before the optimizer update (every device takes the
same step), so is the validation loss, and the meta-gradient, taken by reverse mode through those collectives, is
the full-batch one on every device. BatchNorm statistics (``rest``) are averaged too with ``reduce_rest=True``
(models whose statistics are per-device by design leave it off). Equal per-device batch sizes are assumed (a
mean of means). This relies on ``shard_map``'s varying-axes typing (``check_vma=True``, the default): the
per-device gradient is taken at θ marked varying (``jax.lax.pcast``), averaged with ``pmean``, and reverse mode
through those collectives sums every device's contribution to dL_val/dφ. ``tests/test_hypergrad.py`` holds
one_step, unroll and implicit inside ``shard_map`` on 4 devices equal to one device and to ``jit`` over a
``NamedSharding`` (float64).

All functions are pure and jit-able inside a jitted (or shard-mapped) function.

Example (a KD temperature learned on a validation batch, plain SGD)::

    def inner_loss_fn(params, rest, meta, batch):
      logits = model(params, batch["x"])
      tau = jnp.exp(meta["log_tau"])
      loss = jnp.mean(losses.kd_loss(logits, batch["teacher_logits"], temperature=tau))
      return loss, (rest, {})

    result = hypergrad.one_step(inner_loss_fn, {"log_tau": jnp.log(4.0)}, batch, val_loss_fn, val_batch,
                                bilevel.StudentState(params, None, tx.init(params)), tx)
    result.meta_grad["log_tau"]    # d L_val / d log τ
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from tgeo_jax import bilevel
from tgeo_jax.bilevel import HypergradResult, StudentState

__all__ = ["InnerLossFn", "HyperparamsFn", "PATHS", "AlphaMix", "one_step", "unroll", "implicit", "mix_inner_loss"]

# inner_loss_fn(params, rest, meta_params, batch) -> (scalar loss, (new_rest, aux)); aux: any pytree (diagnostics).
InnerLossFn = Callable[[Any, Any, Any, Any], tuple[jax.Array, tuple[Any, Any]]]
# hyperparams_fn(meta_params) -> {name: value} written into ``opt_state.hyperparams`` (optax.inject_hyperparams).
HyperparamsFn = Callable[[Any], dict]


def _pmean(tree, axis_name):
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _per_device(tree, axis_name):
  """``tree`` marked as varying over ``axis_name`` (shard_map's ``check_vma`` typing): the gradient at it is then
  this device's own, which ``_pmean`` averages. Differentiating at the axis-invariant value instead would give the
  sum of every device's gradient (the transpose of the implicit broadcast is a ``psum``)."""
  if axis_name is None:
    return tree

  def one(x):
    if axis_name in getattr(jax.typeof(x), "vma", frozenset()):
      return x
    return jax.lax.pcast(x, axis_name, to="varying")

  return jax.tree.map(one, tree)


def _with_hyperparams(tx_state, hyperparams_fn, meta_params, where: str):
  """``tx_state`` with ``hyperparams_fn(meta_params)`` written into its ``hyperparams`` (a differentiable path from
  φ to the update); unchanged without ``hyperparams_fn``."""
  if hyperparams_fn is None:
    return tx_state
  hyperparams = getattr(tx_state, "hyperparams", None)
  if not isinstance(hyperparams, dict):
    raise ValueError(f"{where}: hyperparams_fn needs the student's optimizer built with optax.inject_hyperparams "
                     f"(its state has .hyperparams); got a state of type {type(tx_state).__name__}")
  new = hyperparams_fn(meta_params)
  unknown = sorted(set(new) - set(hyperparams))
  if unknown:
    raise ValueError(f"{where}: hyperparams_fn returned {unknown}, not hyperparameters of the optimizer "
                     f"({sorted(hyperparams)})")
  cast = {k: jnp.asarray(v, jnp.result_type(hyperparams[k])) for k, v in new.items()}
  return tx_state._replace(hyperparams={**hyperparams, **cast})


def _inner_step(inner_loss_fn, tx, meta_params, student: StudentState, batch, *, hyperparams_fn, axis_name,
                reduce_rest, where):
  """One real step on ``L_in(θ; φ)``: ``(new StudentState, (loss, aux))``, differentiable in φ and the student's
  float leaves."""
  params, rest, opt_state = student

  def loss_fn(p):
    loss, (new_rest, aux) = inner_loss_fn(p, rest, meta_params, batch)
    if jnp.shape(loss) != ():
      raise ValueError(f"{where}: inner_loss_fn must return a scalar loss first; got shape {jnp.shape(loss)}")
    return loss, (new_rest, aux)

  (loss, (new_rest, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(_per_device(params, axis_name))
  grads, loss = _pmean(grads, axis_name), _pmean(loss, axis_name)
  if reduce_rest:
    new_rest = _pmean(new_rest, axis_name)
  opt_state = _with_hyperparams(opt_state, hyperparams_fn, meta_params, where)
  new_params, new_opt_state = bilevel.optimizer_step(tx, grads, opt_state, params)
  return StudentState(new_params, new_rest, new_opt_state), (loss, aux)


def _checked(student, where):
  return bilevel._checked_student(student, where)  # noqa: SLF001 (the same check as the fast path's)


def _result(meta_grad, student, val_loss, train_loss, aux, **extra) -> HypergradResult:
  # Under axis_name the meta-gradient is already the same on every device: it is the derivative of the
  # axis-averaged validation loss, with the implicit broadcasts of φ and θ transposed into sums.
  diagnostics = jax.lax.stop_gradient({"train_loss": train_loss, "val_loss": val_loss, "aux": aux, **extra})
  return HypergradResult(meta_grad, jax.lax.stop_gradient(student), diagnostics)


def one_step(inner_loss_fn: InnerLossFn, meta_params, batch, val_loss_fn: bilevel.ValLossFn, val_batch,
             student: StudentState, tx: optax.GradientTransformation, *, hyperparams_fn: HyperparamsFn | None = None,
             axis_name: str | None = None, reduce_rest: bool = False, path: str = "auto") -> HypergradResult:
  """The one-step lookahead meta-gradient ``d L_val(θ'(φ)) / dφ`` of a general inner problem.

  Args:
    inner_loss_fn: ``(params, rest, meta_params, batch) -> (scalar, (new_rest, aux))``, one train-mode forward.
    meta_params: φ, any pytree of float arrays.
    batch, val_batch: whatever ``inner_loss_fn`` / ``val_loss_fn`` read (per-device batches under ``axis_name``).
    val_loss_fn: ``(params, rest, val_batch) -> scalar``, at the lookahead parameters and statistics.
    student: ``StudentState(params, rest, opt_state)`` with ``opt_state = tx.init(params)`` (or later).
    tx: the student's optax optimizer; with ``hyperparams_fn`` built by ``optax.inject_hyperparams``.
    hyperparams_fn: ``meta_params -> {name: value}`` overriding the optimizer's injected hyperparameters for this
      step (e.g. ``lambda m: {"learning_rate": base_lr * jnp.exp(m["log_lr_scale"])}``).
    axis_name: the mapped axis inside ``shard_map``/``pmap`` (module docstring); None outside.
    reduce_rest: average ``rest`` (BatchNorm statistics) over ``axis_name`` after the forward.
    path: 'auto' (``bilevel``'s fast path for an ``AlphaMix`` when it applies), 'general' or 'fast'.
  Returns:
    ``HypergradResult``: ``meta_grad`` (tree of φ), ``student`` after the real step, ``diagnostics``
    ``{"train_loss", "val_loss" (at θ'), "aux"}`` (the fast path's own diagnostics on that path).
  """
  if _fast(inner_loss_fn, path, "one_step", hyperparams_fn=hyperparams_fn, axis_name=axis_name,
           reduce_rest=reduce_rest):
    return bilevel.one_step(inner_loss_fn.weight_fn, meta_params, inner_loss_fn.per_sample_fn, batch, val_loss_fn,
                            val_batch, student, tx)
  student = _checked(student, "one_step")

  def outer(meta):
    new_student, (loss, aux) = _inner_step(inner_loss_fn, tx, meta, student, batch, hyperparams_fn=hyperparams_fn,
                                           axis_name=axis_name, reduce_rest=reduce_rest, where="one_step")
    val = _pmean(val_loss_fn(new_student.params, new_student.rest, val_batch), axis_name)
    return val, (new_student, loss, aux)

  (val, (new_student, loss, aux)), meta_grad = jax.value_and_grad(outer, has_aux=True)(meta_params)
  return _result(meta_grad, new_student, val, loss, aux)


def unroll(inner_loss_fn: InnerLossFn, meta_params, batches, val_loss_fn: bilevel.ValLossFn, val_batch,
           student: StudentState, tx: optax.GradientTransformation, *, hyperparams_fn: HyperparamsFn | None = None,
           axis_name: str | None = None, reduce_rest: bool = False, remat: bool = True,
           path: str = "auto") -> HypergradResult:
  """The K-step unrolled meta-gradient ``d L_val(θ_K(φ)) / dφ`` over K real batches.

  Args:
    batches: a pytree whose leaves have a leading axis K >= 1, one batch per step.
    remat: rematerialise each step in the backward pass (memory K x (θ + optimizer state) instead of every
      activation of every step).
    (the rest as ``one_step``)
  Returns:
    ``HypergradResult`` with ``diagnostics["train_losses"]`` [K] and ``train_loss`` their mean, ``aux`` stacked.
  """
  if _fast(inner_loss_fn, path, "unroll", hyperparams_fn=hyperparams_fn, axis_name=axis_name,
           reduce_rest=reduce_rest):
    return bilevel.unroll(inner_loss_fn.weight_fn, meta_params, inner_loss_fn.per_sample_fn, batches, val_loss_fn,
                          val_batch, student, tx, remat=remat)
  student = _checked(student, "unroll")
  k = bilevel._num_steps(batches)  # noqa: SLF001

  def outer(meta):
    def body(state, batch):
      return _inner_step(inner_loss_fn, tx, meta, StudentState(*state), batch, hyperparams_fn=hyperparams_fn,
                         axis_name=axis_name, reduce_rest=reduce_rest, where="unroll")

    step = jax.checkpoint(body) if remat else body
    final, (losses, aux) = jax.lax.scan(step, student, batches, unroll=bilevel._unroll_trips(k))  # noqa: SLF001
    final = StudentState(*final)
    val = _pmean(val_loss_fn(final.params, final.rest, val_batch), axis_name)
    return val, (final, losses, aux)

  (val, (final, losses, aux)), meta_grad = jax.value_and_grad(outer, has_aux=True)(meta_params)
  return _result(meta_grad, final, val, jnp.mean(losses), aux, train_losses=losses)


def implicit(inner_loss_fn: InnerLossFn, meta_params, batch, val_loss_fn: bilevel.ValLossFn, val_batch,
             student: StudentState, tx: optax.GradientTransformation, *, solver: str = "neumann", terms: int = 5,
             neumann_lr: float = 1e-2, damping: float = 0.0, tol: float = 1e-6, axis_name: str | None = None,
             reduce_rest: bool = False, path: str = "auto") -> HypergradResult:
  """The implicit-function meta-gradient at the current θ (module docstring), then one real step.

  ``-(∂_φ ∇_θ L_in(θ; φ))^T v`` with ``v`` solved from ``(∇²_θ L_in + damping I) v = ∇_θ L_val(θ)`` by
  ``bilevel.linear_solve`` (``solver`` 'neumann' | 'cg', ``terms``, ``neumann_lr``, ``tol``: as
  ``bilevel.implicit``). Exact at a minimiser of the inner problem, a heuristic mid-training. The Hessian-vector
  products use one linearization of the (axis-averaged) inner gradient; ``rest`` is the train forward's.

  Returns:
    ``HypergradResult`` with ``val_loss`` = L_val(θ) and ``solve_residual``, ``solve_converged``,
    ``solve_contracting`` in ``diagnostics``; a non-finite solve gives a NaN meta-gradient.
  """
  if solver not in bilevel.SOLVERS:
    raise ValueError(f"solver: expected one of {bilevel.SOLVERS}, got {solver!r}")
  if int(terms) < (1 if solver == "cg" else 0):
    raise ValueError(f"terms: expected >= {1 if solver == 'cg' else 0} for {solver}, got {terms!r}")
  if not float(neumann_lr) > 0.0:
    raise ValueError(f"neumann_lr: expected > 0, got {neumann_lr!r}")
  if not float(damping) >= 0.0 or not float(tol) > 0.0:
    raise ValueError(f"damping >= 0 and tol > 0 expected, got damping={damping!r}, tol={tol!r}")
  if _fast(inner_loss_fn, path, "implicit", axis_name=axis_name, reduce_rest=reduce_rest):
    return bilevel.implicit(inner_loss_fn.weight_fn, meta_params, inner_loss_fn.per_sample_fn, batch, val_loss_fn,
                            val_batch, student, tx, solver=solver, terms=terms, neumann_lr=neumann_lr,
                            damping=damping, tol=tol)
  caller = traceback.extract_stack(limit=2)[0]
  site = f"{caller.filename}:{caller.lineno}"
  params, rest, opt_state = _checked(student, "implicit")

  def grad_at(p, meta):
    (loss, (new_rest, aux)), g = jax.value_and_grad(lambda q: inner_loss_fn(q, rest, meta, batch), has_aux=True)(
        _per_device(p, axis_name))
    new_rest = _pmean(new_rest, axis_name) if reduce_rest else new_rest
    return _pmean(g, axis_name), (_pmean(loss, axis_name), new_rest, aux)

  grads, hvp, (loss, new_rest, aux) = jax.linearize(lambda p: grad_at(p, meta_params), params, has_aux=True)
  damping = float(damping)

  def matvec(u):
    hu = hvp(u)
    return hu if damping == 0.0 else jax.tree.map(lambda a, b: a + damping * b, hu, u)

  val_loss, val_grads = jax.value_and_grad(lambda p: val_loss_fn(p, new_rest, val_batch))(
      _per_device(params, axis_name))
  val_loss, val_grads = _pmean(val_loss, axis_name), _pmean(val_grads, axis_name)
  v, residual, converged, contracting = bilevel.linear_solve(
      matvec, val_grads, solver=solver, terms=int(terms), neumann_lr=float(neumann_lr), damping=damping,
      tol=float(tol), site=site)
  _, mixed_vjp = jax.vjp(lambda meta: grad_at(params, meta)[0], meta_params)
  (meta_grad,) = mixed_vjp(jax.tree.map(jnp.negative, v))
  new_params, new_opt_state = bilevel.optimizer_step(tx, grads, opt_state, params)
  return _result(meta_grad, StudentState(new_params, new_rest, new_opt_state), val_loss, loss, aux,
                 solve_residual=residual, solve_converged=converged, solve_contracting=contracting)


class AlphaMix:
  """The α-mix of ``tgeo_jax.bilevel`` as a general inner loss (it is callable as one):
  ``mean_i [α_i soft_i + (1 - α_i) hard_i]`` with ``α = weight_fn(φ, stop_gradient(context))``; aux =
  ``{"alpha", "student_logits"}``.

  Passed to ``one_step`` / ``unroll`` / ``implicit`` with ``path="auto"`` (the default) it runs on ``bilevel``'s
  explicit-JVP fast path whenever that applies (no ``hyperparams_fn``, no ``axis_name``; the same numbers, see
  docs/bilevel.md), else through the general path; ``path="general"`` / ``"fast"`` choose by name.
  """

  def __init__(self, weight_fn: bilevel.WeightFn, per_sample_fn: bilevel.PerSampleFn):
    self.weight_fn, self.per_sample_fn = weight_fn, per_sample_fn

  def __call__(self, params, rest, meta_params, batch):
    (soft, hard), (new_rest, context) = self.per_sample_fn(params, rest, batch)
    context = bilevel._checked_context(context, "AlphaMix")  # noqa: SLF001
    alpha = bilevel._checked_alpha(self.weight_fn(meta_params, context), soft, hard, "AlphaMix")  # noqa: SLF001
    alpha = alpha.astype(soft.dtype)
    return bilevel.train_loss(alpha, soft, hard), (new_rest, {"alpha": alpha,
                                                              "student_logits": context.get("student_logits")})


def mix_inner_loss(weight_fn: bilevel.WeightFn, per_sample_fn: bilevel.PerSampleFn) -> AlphaMix:
  """``AlphaMix(weight_fn, per_sample_fn)``: the α-mix as an inner loss (see ``AlphaMix``)."""
  return AlphaMix(weight_fn, per_sample_fn)


PATHS = ("auto", "general", "fast")


def _fast(inner_loss_fn, path: str, where: str, **general_only) -> bool:
  """Whether to run ``bilevel``'s fast path: ``path`` 'auto' picks it for an ``AlphaMix`` when nothing only the
  general path has is asked for (``general_only``: hyperparams_fn, axis_name, reduce_rest)."""
  if path not in PATHS:
    raise ValueError(f"{where}: path {path!r}, expected one of {PATHS}")
  needs_general = sorted(k for k, v in general_only.items() if v)
  if path == "fast":
    if not isinstance(inner_loss_fn, AlphaMix):
      raise ValueError(f"{where}: path='fast' needs an AlphaMix inner loss (hypergrad.mix_inner_loss(weight_fn, "
                       f"per_sample_fn)); got {type(inner_loss_fn).__name__}")
    if needs_general:
      raise ValueError(f"{where}: path='fast' has no {', '.join(needs_general)}; use path='auto' or 'general'")
    return True
  return path == "auto" and isinstance(inner_loss_fn, AlphaMix) and not needs_general
