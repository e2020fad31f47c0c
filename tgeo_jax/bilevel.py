"""Hypergradients of a per-sample fusion ratio (docs/methods.md §2, "Bilevel optimisation", and §7,
"Meta-gradients beyond one step").

The problem. The student's training loss mixes a soft (teacher) and a hard (label) per-sample loss with a ratio
``alpha_i in (0, 1)`` produced by meta-parameters ``phi`` (TGeo-KD's fusion net on geometry features, or RW-KD's
free per-sample table); phi is learnt by the student's validation loss after the student's step::

    L_train(theta; alpha) = mean_i [alpha_i soft_i(theta) + (1 - alpha_i) hard_i(theta)]
    alpha = weight_fn(phi, stop_gradient(context))
    theta'(phi) = U(grad_theta L_train(theta; alpha(phi))),  U(g) = apply_updates(theta, tx.update(g, opt_state, theta))
    meta objective: L_val(theta'(phi))

The inner gradient treats alpha as a constant, and alpha depends on phi only directly: the context the weight
network reads (the student's logits, teacher logits, labels, features...) is stop-gradient, never a function of
the student's parameters. ``tx`` is the student's own configured optax optimizer (any ``GradientTransformation``:
SGD with momentum or Nesterov, coupled weight decay, Adam, global-norm clipping, schedules...), so the lookahead
step is exactly the step the student takes.

Conventions, shared by every function:

* the student is a ``StudentState(params, rest, opt_state)`` (``rest``: BatchNorm statistics and other
  non-parameter state);
* ``per_sample_fn(params, rest, batch) -> ((soft [N], hard [N]), (new_rest, context))`` is one train-mode
  forward; ``context`` is a dict of whatever the weight network reads (``"student_logits"`` [N, K], when present,
  is reported in ``diagnostics``; absent, that entry is None);
* ``weight_fn(meta_params, context) -> alpha [N]`` (or a scalar, one weight for the batch); it receives the
  stop-gradient context. alpha is used as returned: in [0, 1] the loss is a convex mix (a sigmoid output keeps it
  in (0, 1)); outside it the affine mix is still differentiated exactly, nothing clips it;
* ``val_loss_fn(params, rest, val_batch) -> scalar``, the outer objective (the caller picks the BatchNorm mode
  inside);
* every variant returns a ``HypergradResult(meta_grad, student, diagnostics)``; the student is the real step(s)
  the hypergradient is about ("reuse" ordering).

The one-step lookahead in explicit form. ``one_step_autodiff`` is the literal definition (``jax.grad`` through
``jax.grad``, ``tx.update`` and ``optax.apply_updates``). ``one_step`` computes the same number in explicit form,
using that alpha enters the training gradient linearly::

    g(phi) = (1/N) sum_i [alpha_i grad soft_i + (1 - alpha_i) grad hard_i]
    dL_val/dalpha_i = (1/N) <g_bar, grad_theta (soft_i - hard_i)(theta)>,   g_bar = (dU/dg)^T grad L_val(theta')
    dL_val/dphi = VJP of alpha(phi) applied to dL_val/dalpha

``g_bar`` is a VJP through the optimizer update alone (element-wise maps and global norms: cheap), and the N
inner products are ONE forward-mode JVP of the per-sample vectors ``(soft, hard)(theta)`` in the direction
``g_bar``. The train forward is linearized once and its linear map serves both the training gradient (its
transpose) and that JVP, so the forward pass is not repeated. For SGD-type steps ``dU/dg`` is a multiple of the
identity and the formula is the closed-form identity of docs/methods.md §2 (``alpha_hypergrad_jvp_oracle``, a
test oracle).

The autodiff reference compiles to the same FLOPs and memory: phi reaches the inner backward pass only through
its cotangent seed, and JAX's symbolic zeros reduce reverse-over-reverse to the transpose of that linear map,
i.e. the same JVP. The explicit form is kept because it has that cost by construction, before any XLA
optimisation (a ``jax.vjp`` + ``jax.jvp`` pair instead carries a second forward pass that only
common-subexpression elimination removes), and it compiles faster (small CNN on CPU: about 1.0 s against
1.6-1.8 s).

Which variant when. Costs are per student step, relative to TGeo-KD's plain KD-like step, as
``bench/hypergrad_cost.py`` measures them (XLA FLOP counts of loop-free programs; cnn_small, batch = validation
batch = 128, cached teacher logits, SGD-momentum; docs/benchmarks.md has the table):

* ``one_step`` (2.66x FLOPs): the default. Exact one-step lookahead; the returned student is the real step.
* ``head_only`` (1.66x): the lookahead restricted to the classifier head, no backward or tangent through the
  body; exact for a linear student, an approximation otherwise (cnn_small: cosine 0.90 to ``one_step``'s
  meta-gradient, 31% of its norm). For large bodies where ``one_step``'s extra backward is too dear.
* ``unroll`` / ``unroll_from_trajectory`` (4.1-4.4x per student step with remat, 2.8-2.9x without, for
  K = 2..8): the truncated K-step unroll over K real batches, less greedy than one step (truncation bias shrinks
  with K); memory K x (theta + optimizer state) with remat. ``unroll_from_trajectory`` when the trainer has
  already taken the K steps.
* ``implicit`` (4.6x for J = 0, +1.9x per Neumann term / CG iteration): the IFT hypergradient at the current theta,
  long-horizon without storing a trajectory; exact at a minimiser of the inner problem, a heuristic mid-training;
  read ``diagnostics['solve_residual']``.
* ``one_step_autodiff``, ``unroll_python_loop``, ``alpha_hypergrad_jvp_oracle``: literal definitions and the
  closed-form identity, test oracles.
* ``weighted_step``: one real step with alpha(phi), no hypergradient (the steps between meta updates).

All functions are pure and jit-able when called inside a jitted function (the callables close over static
graphdefs; they are not jit arguments themselves).
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import numbers
import threading
import traceback
from typing import Any, Callable, NamedTuple
import warnings

import jax
import jax.numpy as jnp
import optax

from tgeo_jax import losses

__all__ = ["Context", "WeightFn", "PerSampleFn", "ValLossFn", "HeadPredicate", "train_loss", "optimizer_step",
           "StudentState", "HypergradResult", "HypergradSolveWarning", "SOLVERS", "weighted_step", "one_step",
           "one_step_autodiff", "alpha_hypergrad_jvp_oracle", "unroll", "unroll_python_loop",
           "unroll_from_trajectory", "implicit", "linear_solve", "head_by_name", "DEFAULT_HEAD", "head_only"]

# context: {"student_logits": [N, K] (optional), ...}, any pytree of arrays in a dict.
Context = Mapping[str, Any]
# weight_fn(meta_params, context) -> alpha [N] (or a scalar); it receives a stop-gradient context.
WeightFn = Callable[[Any, Context], jax.Array]
# per_sample_fn(params, rest, batch) -> ((soft [N], hard [N]), (new_rest, context)): one train-mode forward.
PerSampleFn = Callable[[Any, Any, Any], tuple[tuple[jax.Array, jax.Array], tuple[Any, Context]]]
# val_loss_fn(params, rest, val_batch) -> scalar validation loss of the student.
ValLossFn = Callable[[Any, Any, Any], jax.Array]
# A head predicate: is_head(key_path) -> bool, key_path as jax.tree_util.tree_flatten_with_path gives it.
HeadPredicate = Callable[[tuple], bool]


def train_loss(alpha: jax.Array, soft: jax.Array, hard: jax.Array) -> jax.Array:
  """``mean_i [alpha_i soft_i + (1 - alpha_i) hard_i]`` for ``alpha, soft, hard`` of shape ``[N]``."""
  return jnp.mean(losses.convex_mix(alpha, soft, hard))


def optimizer_step(tx: optax.GradientTransformation, grads, opt_state, params) -> tuple[Any, Any]:
  """``(new_params, new_opt_state)``: one step of ``tx`` from ``params`` along ``grads``."""
  updates, new_opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), new_opt_state


class StudentState(NamedTuple):
  """The student: ``params`` (theta), ``rest`` (BatchNorm statistics and other non-parameter state) and the state
  of its optimizer ``tx``. Stacked along a leading axis K it is a trajectory (``unroll_from_trajectory``)."""

  params: Any
  rest: Any
  opt_state: Any


class HypergradResult(NamedTuple):
  """What every variant returns.

  ``diagnostics`` always holds ``train_loss`` (scalar), ``val_loss`` (scalar), ``alpha`` ([N]) and
  ``student_logits`` ([N, K]); ``unroll`` stacks ``alpha`` [K_steps, N] and ``student_logits`` [K_steps, N, K],
  adds ``train_losses`` [K_steps] and reports their mean as ``train_loss``; ``implicit`` adds ``solve_residual``
  and ``solve_converged``. All values are arrays.
  """

  meta_grad: Any  # d L_val / d phi, same tree as meta_params.
  student: StudentState  # The student after the real step(s) the hypergradient is about (stop-gradient).
  diagnostics: dict


class HypergradSolveWarning(RuntimeWarning):
  """An implicit hypergradient's linear solve did not converge (see ``implicit``)."""


SOLVERS = ("neumann", "cg")


# ------------------------------------------------------------------------------------------------------ helpers

def _checked_context(context, where: str):
  # Stop-gradient: alpha must depend on phi alone (the weighting network reads, it does not steer theta), and
  # the alpha-fixed training loss then has a symmetric Hessian (implicit).
  if not isinstance(context, Mapping):
    raise ValueError(f"{where}: per_sample_fn must return (new_rest, context) with context a dict (what weight_fn "
                     f"reads; 'student_logits' [N, K] is reported in diagnostics when present); got "
                     f"{type(context).__name__}")
  return jax.lax.stop_gradient(dict(context))


def _checked_student(student, where: str) -> StudentState:
  if not isinstance(student, tuple) or len(student) != 3:
    raise ValueError(f"{where}: student must be a StudentState(params, rest, opt_state), got "
                     f"{type(student).__name__}")
  return StudentState(*student)


def _checked_alpha(alpha, soft, hard, where: str):
  # A [N, 1] alpha (or soft) would broadcast alpha * soft to [N, N] without an error: refuse it at trace time.
  n = jnp.shape(soft)
  if len(n) != 1 or jnp.shape(hard) != n:
    raise ValueError(f"{where}: per_sample_fn must return soft and hard of shape [N]; got {jnp.shape(soft)} and "
                     f"{jnp.shape(hard)}")
  if jnp.shape(alpha) == ():  # one weight for the whole batch
    return jnp.broadcast_to(alpha, n)
  if jnp.shape(alpha) != n:
    raise ValueError(f"{where}: weight_fn must return alpha of shape [N] = {n} or a scalar; got {jnp.shape(alpha)}")
  return alpha


def _mix_cotangent(alpha, soft, hard):
  # The cotangent of (soft, hard) whose pull-back is grad L_train: (alpha / N, (1 - alpha) / N).
  n = soft.shape[0]
  return (alpha / n).astype(soft.dtype), ((1.0 - alpha) / n).astype(hard.dtype)


def _tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _tree_norm(a):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(a)))


def _is_inexact(x) -> bool:
  return bool(jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def _float_leaves(tree) -> list:
  # The differentiable leaves (floating point). Integer leaves (Adam's count, schedule steps, RNG counters) are
  # carried through as constants: reverse mode has nothing to send them.
  return [x for x in jax.tree.leaves(tree) if _is_inexact(x)]


def _with_float_leaves(tree, floats):
  """``tree`` with its floating-point leaves replaced, in order, by ``floats``."""
  leaves, treedef = jax.tree.flatten(tree)
  it = iter(floats)
  return treedef.unflatten([next(it) if _is_inexact(x) else x for x in leaves])


def _num_steps(batches, name: str = "batches") -> int:
  leaves = jax.tree.leaves(batches)
  if not leaves:
    raise ValueError(f"{name}: empty; pass a pytree whose leaves have a leading axis K >= 1 (one entry per step)")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) >= 1 else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(f"{name}: every leaf needs the same leading axis K (one entry per step); got leading sizes "
                     f"{sorted(str(s) for s in sizes)}")
  (k,) = sizes
  if k < 1:
    raise ValueError(f"{name}: K = {k} steps; need K >= 1")
  return int(k)


def _real_step(weight_fn, per_sample_fn, tx, meta_params, state: StudentState, batch, where: str):
  """One real training step: ``(new_state, (train_loss, alpha, student_logits))``.

  Differentiable in ``meta_params`` and in the float leaves of ``state`` (reverse over it is the unrolled
  meta-gradient); alpha is a constant for the inner gradient (context stop-gradient).
  """
  params, rest, opt_state = state
  (soft, hard), vjp_fn, (new_rest, context) = jax.vjp(lambda p: per_sample_fn(p, rest, batch), params,
                                                      has_aux=True)
  context = _checked_context(context, where)
  alpha = _checked_alpha(weight_fn(meta_params, context), soft, hard, where).astype(soft.dtype)
  (grads,) = vjp_fn(_mix_cotangent(alpha, soft, hard))
  new_params, new_opt_state = optimizer_step(tx, grads, opt_state, params)
  aux = (train_loss(alpha, soft, hard), alpha, context.get("student_logits"))
  return StudentState(new_params, new_rest, new_opt_state), aux


def weighted_step(weight_fn: WeightFn, meta_params, per_sample_fn: PerSampleFn, batch,
                  student: StudentState, tx: optax.GradientTransformation):
  """One real student step on ``L_train(theta; alpha(phi))`` with alpha a constant of theta: the step every
  variant's window or lookahead is made of. ``(new StudentState, (train_loss, alpha [N], student_logits [N, K]))``.

  Pass ``jax.lax.stop_gradient(meta_params)`` for a plain step (phi fixed); reverse mode through it with respect
  to ``meta_params`` and ``student`` is the unrolled meta-gradient.
  """
  return _real_step(weight_fn, per_sample_fn, tx, meta_params, student, batch, "weighted_step")


def _diagnostics(train_loss_value, val_loss, alpha, student_logits, **extra) -> dict:
  out = {"train_loss": train_loss_value, "val_loss": val_loss, "alpha": alpha, "student_logits": student_logits}
  out.update(extra)
  return jax.lax.stop_gradient(out)


def _one_step_result(meta_grad, student: StudentState, alpha, soft, hard, val_loss, context,
                     **extra) -> HypergradResult:
  """The result of a variant that takes one real step (one_step, implicit, head_only)."""
  return HypergradResult(meta_grad=meta_grad, student=jax.lax.stop_gradient(student),
                         diagnostics=_diagnostics(train_loss(alpha.astype(soft.dtype), soft, hard), val_loss,
                                                  alpha, context.get("student_logits"), **extra))


# --------------------------------------------------------------------------------------------- one-step lookahead

def one_step(weight_fn: WeightFn, meta_params, per_sample_fn: PerSampleFn, batch,
             val_loss_fn: ValLossFn, val_batch, student: StudentState,
             tx: optax.GradientTransformation) -> HypergradResult:
  """Exact one-step lookahead hypergradient ``dL_val(theta'(phi))/dphi``, ``theta' = U(grad L_train(theta; phi))``.

  The explicit form of the module docstring, equal to ``one_step_autodiff`` (up to rounding) for any ``tx``: the
  train forward is linearized once; its transpose gives the training gradient g,
  ``g_bar = (dU/dg)^T grad L_val(theta')`` is a VJP through ``tx`` alone, and
  ``dL_val/dalpha_i = (1/N) <g_bar, grad (soft_i - hard_i)(theta)>`` is ONE JVP of the same linear map; the
  meta-gradient is ``weight_fn``'s VJP of that ``[N]`` vector.

  Cost: a train forward + backward, a validation forward + backward, one JVP; measured 2.66x the FLOPs of a plain
  step (see the module docstring). Memory: one step's activations (the linearization) plus one validation
  forward/backward (1.44x a plain step's temporaries). Use it by default:
  the returned student IS the real step ("reuse" ordering), so meta-learning costs one extra backward a step.

  Args:
    weight_fn: ``(meta_params, context) -> alpha [N]``.
    meta_params: phi, any pytree.
    per_sample_fn: ``(params, rest, batch) -> ((soft [N], hard [N]), (new_rest, context))``.
    batch: the training batch (passed to ``per_sample_fn`` only).
    val_loss_fn: ``(params, rest, val_batch) -> scalar``, evaluated at ``(theta', new_rest)``.
    val_batch: the validation batch.
    student: ``StudentState`` theta before the step.
    tx: the student's optimizer (any optax ``GradientTransformation``).
  Returns:
    ``HypergradResult``; ``student`` is ``(theta', new_rest, new_opt_state)``.
  """
  params, rest, opt_state = _checked_student(student, "one_step")
  (soft, hard), lin, (new_rest, context) = jax.linearize(lambda p: per_sample_fn(p, rest, batch), params,
                                                         has_aux=True)
  context = _checked_context(context, "one_step")
  alpha, alpha_vjp = jax.vjp(lambda m: _checked_alpha(weight_fn(m, context), soft, hard, "one_step"), meta_params)
  n = soft.shape[0]
  (grads,) = jax.linear_transpose(lin, params)(_mix_cotangent(alpha, soft, hard))
  # theta and its optimizer state do not depend on phi: the VJP of U is taken with respect to g only.
  new_params, step_vjp, new_opt_state = jax.vjp(lambda g: optimizer_step(tx, g, opt_state, params), grads,
                                                has_aux=True)
  val_loss, val_grads = jax.value_and_grad(val_loss_fn)(new_params, new_rest, val_batch)
  (grad_bar,) = step_vjp(val_grads)
  dsoft, dhard = lin(grad_bar)
  (meta_grad,) = alpha_vjp(((dsoft - dhard) / n).astype(alpha.dtype))
  return _one_step_result(meta_grad, StudentState(new_params, new_rest, new_opt_state), alpha, soft, hard,
                          val_loss, context)


def one_step_autodiff(weight_fn: WeightFn, meta_params, per_sample_fn: PerSampleFn, batch,
                      val_loss_fn: ValLossFn, val_batch, student: StudentState,
                      tx: optax.GradientTransformation) -> HypergradResult:
  """The literal definition of ``one_step``: ``jax.grad`` of ``phi -> L_val(U(jax.grad L_train))``.

  Same arguments and result as ``one_step``; a test oracle (XLA usually reduces it to the same FLOPs, but it
  compiles slower and its cost is not guaranteed by construction).
  """
  params, rest, opt_state = _checked_student(student, "one_step_autodiff")

  def outer(meta):
    def inner(p):
      (soft, hard), (new_rest, context) = per_sample_fn(p, rest, batch)
      context = _checked_context(context, "one_step_autodiff")
      alpha = _checked_alpha(weight_fn(meta, context), soft, hard, "one_step_autodiff")
      return train_loss(alpha.astype(soft.dtype), soft, hard), (new_rest, context, alpha)

    (loss, (new_rest, context, alpha)), grads = jax.value_and_grad(inner, has_aux=True)(params)
    new_params, new_opt_state = optimizer_step(tx, grads, opt_state, params)
    val_loss = val_loss_fn(new_params, new_rest, val_batch)
    return val_loss, (StudentState(new_params, new_rest, new_opt_state), loss, alpha, context.get("student_logits"))

  (val_loss, (new_student, loss, alpha, logits)), meta_grad = jax.value_and_grad(outer, has_aux=True)(meta_params)
  return HypergradResult(meta_grad=meta_grad, student=jax.lax.stop_gradient(new_student),
                         diagnostics=_diagnostics(loss, val_loss, alpha, logits))


def alpha_hypergrad_jvp_oracle(per_sample_fn: PerSampleFn, batch, val_grad, params, rest, lr, num_samples: int,
                               grad_scale=1.0) -> jax.Array:
  """``dL_val/dalpha`` ``[N]`` from the closed-form identity of docs/methods.md §2, for SGD-type steps.

  When the step is affine in the gradient with ``dtheta'/dg = -lr * grad_scale * I``::

      dL_val/dalpha_i = -(lr * grad_scale / N) <grad_theta (soft_i - hard_i)(theta), val_grad>

  computed as one ``jax.jvp`` of the per-sample vector ``(soft - hard)(theta)`` on ``batch`` in the direction
  ``val_grad``. With ``val_grad = grad L_val(theta')`` it is ``one_step``'s ``dL_val/dalpha``; with
  ``grad L_val(theta)`` it is ``implicit``'s Neumann estimate with no terms beyond the first (``lr`` = its
  ``neumann_lr``). ``grad_scale`` is 1 for ``optax.sgd(lr, momentum=mu)`` (update ``-lr (mu m + g)``), also with
  ``add_decayed_weights`` in front (it adds ``wd * theta``, independent of ``g``), and ``1 + mu`` for
  ``optax.sgd(lr, momentum=mu, nesterov=True)`` (update ``-lr (mu m_new + g)`` with ``m_new = mu m + g``). It
  does not hold for Adam or gradient clipping, whose step is not affine in ``g``. A test oracle, independent of
  ``one_step``'s linearization and of ``tx``.

  Args:
    per_sample_fn: as in ``one_step``.
    batch: the training batch of the step.
    val_grad: the validation gradient, same tree as ``params`` (``grad L_val(theta')`` for the lookahead).
    params, rest: theta, the point the step started from.
    lr: the learning rate of that step.
    num_samples: N, the batch size of the mean in ``L_train``.
    grad_scale: see above.
  Returns:
    ``[N]``; chain it through ``weight_fn``'s VJP (at the stop-gradient context) to get ``dL_val/dphi``.
  """

  def soft_minus_hard(p):
    (soft, hard), _ = per_sample_fn(p, rest, batch)
    return soft - hard

  _, directional = jax.jvp(soft_minus_hard, (params,), (val_grad,))
  return -(lr * grad_scale / num_samples) * directional

# ----------------------------------------------------------------------------------------------- truncated unroll

def _unroll_diagnostics(aux, val_loss) -> dict:
  losses, alphas, logits = aux
  return _diagnostics(jnp.mean(losses), val_loss, alphas, logits, train_losses=losses)


# Loops of at most this many trips are traced fully unrolled; 0 (the default) keeps every loop a loop. XLA:CPU
# rewrites convolutions into the layout of its fast kernels only in a module's entry computation, so lax's
# backward convolutions inside a while-loop body (a scan, a fori_loop) run on a generic kernel, 5-15x slower than
# their FLOPs. The models' convolutions (tgeo_jax.models.conv) write their gradients in that layout themselves:
# as loops the unroll window, the Neumann series and CG run at or below their FLOP ratios, faster than unrolled
# and compiling in a fraction of the time (docs/benchmarks.md, "Loops of convolutions"). A model whose
# convolutions are plain lax.conv_general_dilated can set 16 (the workaround before; costs compile time).
FULL_UNROLL_MAX_TRIPS = 0


def _unroll_trips(trips: int):
  """``unroll=`` for a loop of ``trips`` static trips: all of them when within ``FULL_UNROLL_MAX_TRIPS``."""
  return True if 0 < trips <= FULL_UNROLL_MAX_TRIPS else 1


def _reverse_sweep(weight_fn, meta_params, per_sample_fn, batches, trajectory: StudentState, final: StudentState,
                   val_loss_fn, val_batch, tx):
  """``(meta_grad, val_loss)``: reverse mode over a recorded trajectory, one step's VJP at a time.

  The cotangent of the float leaves of (theta_k, rest_k, opt_state_k) flows backwards from
  ``grad L_val(theta_K, rest_K)``; each step's forward (train forward + backward + tx) is recomputed inside its
  VJP, so only one step's activations are alive at a time: per-step rematerialisation by construction.
  """
  opt_template = jax.tree.map(lambda x: x[0], trajectory.opt_state)
  end = (final.params, final.rest)
  val_loss, end_cot = jax.value_and_grad(
      lambda floats: val_loss_fn(*_with_float_leaves(end, floats), val_batch))(_float_leaves(end))
  # The validation loss does not read the optimizer state: its cotangent at step K is zero.
  cot = list(end_cot) + [jnp.zeros_like(x) for x in _float_leaves(opt_template)]

  def body(carry, xs):
    cot, meta_acc = carry
    state, batch = xs

    def step(floats, meta):
      new_state, _ = _real_step(weight_fn, per_sample_fn, tx, meta, _with_float_leaves(state, floats), batch,
                                "unroll")
      return _float_leaves(new_state)

    _, step_vjp = jax.vjp(step, _float_leaves(state), meta_params)
    cot_prev, meta_bar = step_vjp(cot)
    return (cot_prev, _tree_add(meta_acc, meta_bar)), None

  meta_zero = jax.tree.map(jnp.zeros_like, meta_params)
  trips = jax.tree.leaves(batches)[0].shape[0]
  (_, meta_grad), _ = jax.lax.scan(body, (cot, meta_zero), (trajectory, batches), reverse=True,
                                   unroll=_unroll_trips(trips))
  return meta_grad, val_loss


def unroll(weight_fn: WeightFn, meta_params, per_sample_fn: PerSampleFn, batches,
           val_loss_fn: ValLossFn, val_batch, student: StudentState, tx: optax.GradientTransformation, *,
           remat: bool = True) -> HypergradResult:
  """Truncated unroll over K real steps: ``dL_val(theta_K(phi), rest_K(phi))/dphi``.

  ``theta_{k+1} = U_k(grad L_train,k(theta_k; alpha_k))`` on ``batches[k]`` with
  ``alpha_k = weight_fn(phi, stop_gradient(context_k(theta_k)))`` recomputed at every step (a function of phi,
  not of theta_k). The derivative is exact for that map, through theta, ``rest`` (as far as the model lets
  autodiff see it: see the BatchNorm caveat) and the optimizer state of all K steps (per step of the reverse
  pass: a VJP through U, a Hessian-vector product of L_train,k, and the per-sample JVP feeding alpha_k). K = 1 is
  ``one_step``.

  BatchNorm caveat: flax's ``nnx.BatchNorm`` wraps its running-statistics update in ``stop_gradient``, so the
  path phi -> theta_k -> rest_K is invisible to autodiff. With an eval-mode (running-statistics) ``val_loss_fn``
  and K >= 2 the result misses it (tiny CNN, K = 3: 1% with SGD-momentum, 8% with Adam, against finite
  differences); a train-mode validation forward does not read rest and is exact. A ``rest`` that is
  differentiable is carried through exactly.

  ``remat=True``: a forward ``lax.scan`` records (theta_k, rest_k, opt_state_k) and the reverse sweep of
  ``unroll_from_trajectory`` recomputes each step inside its VJP (per-step rematerialisation, as
  ``jax.checkpoint`` on the scan body would do). Memory ~K x (theta + rest + opt_state) plus ONE step's
  activations. ``remat=False``: ``jax.grad`` through ``lax.scan`` without checkpointing: memory ~K x
  activations, no recomputation; for cost comparisons and as an independent check. Measured per student step (module
  docstring's setting): 4.06x a plain step's FLOPs and 2.2x its temporaries with remat at K = 8, 2.9x and 17.7x
  without.

  Use it to reduce the one-step lookahead's truncation bias (Shaban et al. 2019), with the K steps taken as the
  student's real steps: phi is held fixed over the window and updated once per window.

  Args:
    batches: a pytree whose leaves have a leading axis K >= 1: K consecutive training batches.
    student: theta_0.
    Others: as in ``one_step``.
  Returns:
    ``HypergradResult``; ``student`` is (theta_K, rest_K, opt_state_K); diagnostics as documented there.
  """
  _num_steps(batches)
  student = _checked_student(student, "unroll")

  def step(meta, state, batch):
    return _real_step(weight_fn, per_sample_fn, tx, meta, state, batch, "unroll")

  if remat:
    def record(state, batch):
      new_state, aux = step(meta_params, state, batch)
      return new_state, (state, aux)

    final, (trajectory, aux) = jax.lax.scan(record, student, batches, unroll=_unroll_trips(_num_steps(batches)))
    meta_grad, val_loss = _reverse_sweep(weight_fn, meta_params, per_sample_fn, batches, trajectory, final,
                                         val_loss_fn, val_batch, tx)
  else:
    def objective(meta):
      final, aux = jax.lax.scan(lambda s, b: step(meta, s, b), student, batches,
                                unroll=_unroll_trips(_num_steps(batches)))
      return val_loss_fn(final.params, final.rest, val_batch), (final, aux)

    (val_loss, (final, aux)), meta_grad = jax.value_and_grad(objective, has_aux=True)(meta_params)
  return HypergradResult(meta_grad=meta_grad, student=jax.lax.stop_gradient(final),
                         diagnostics=_unroll_diagnostics(aux, val_loss))


def unroll_python_loop(weight_fn: WeightFn, meta_params, per_sample_fn: PerSampleFn, batches,
                       val_loss_fn: ValLossFn, val_batch, student: StudentState,
                       tx: optax.GradientTransformation) -> HypergradResult:
  """``unroll`` as a plain Python loop under ``jax.value_and_grad``: the reference (K copies of the step in the
  compiled program, memory ~K x activations). Same arguments (no ``remat``) and result."""
  k_steps = _num_steps(batches)
  student = _checked_student(student, "unroll_python_loop")

  def objective(meta):
    state, auxes = student, []
    for k in range(k_steps):
      batch = jax.tree.map(lambda x, k=k: x[k], batches)
      state, aux = _real_step(weight_fn, per_sample_fn, tx, meta, state, batch, "unroll_python_loop")
      auxes.append(aux)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes)
    return val_loss_fn(state.params, state.rest, val_batch), (state, stacked)

  (val_loss, (final, aux)), meta_grad = jax.value_and_grad(objective, has_aux=True)(meta_params)
  return HypergradResult(meta_grad=meta_grad, student=jax.lax.stop_gradient(final),
                         diagnostics=_unroll_diagnostics(aux, val_loss))


def unroll_from_trajectory(weight_fn: WeightFn, meta_params, per_sample_fn: PerSampleFn, batches,
                           trajectory: StudentState, final: StudentState, val_loss_fn: ValLossFn, val_batch,
                           tx: optax.GradientTransformation) -> tuple[Any, jax.Array]:
  """``unroll``'s meta-gradient when the K real steps were already taken, one per train call.

  Equals ``unroll(...).meta_grad`` exactly (``unroll`` with ``remat=True`` is a forward scan plus this sweep):
  a ``lax.scan(reverse=True)`` over the stored states applying the VJP of the single step map
  ``(theta_k, rest_k, opt_state_k, phi) -> (theta_{k+1}, rest_{k+1}, opt_state_{k+1})``, started from
  ``grad L_val(theta_K, rest_K)``. Cost: K x (one step recomputed + its VJP, ~4.5 plain steps) and a validation
  forward + backward, on top of the K real steps already taken; memory: the stored trajectory plus one step's
  activations.

  The steps must have been taken with the same ``meta_params`` (phi fixed over the window), the same ``tx`` and
  the same batches; otherwise the result is the derivative of a different map.

  Args:
    batches: the K training batches, leaves stacked ``[K, ...]`` in step order.
    trajectory: ``StudentState`` whose leaves are stacked ``[K, ...]``: (theta_k, rest_k, opt_state_k), the state
      BEFORE step k, k = 0..K-1.
    final: (theta_K, rest_K, ...) after the last step; its ``opt_state`` is not read (may be None).
    Others: as in ``one_step``.
  Returns:
    ``(meta_grad, val_loss)`` with ``val_loss = L_val(theta_K, rest_K)``.
  """
  k_steps = _num_steps(batches)
  trajectory = _checked_student(trajectory, "unroll_from_trajectory (trajectory)")
  final = _checked_student(final, "unroll_from_trajectory (final)")
  k_traj = _num_steps(trajectory, "trajectory")
  if k_traj != k_steps:
    raise ValueError(f"trajectory: {k_traj} stored states but batches has K = {k_steps} steps; store the state "
                     f"before each of the K steps")
  return _reverse_sweep(weight_fn, meta_params, per_sample_fn, batches, trajectory, final, val_loss_fn,
                        val_batch, tx)


# ------------------------------------------------------------------------------------------------------- implicit

_solve_warning_lock = threading.Lock()
_solve_warning_counts: dict[str, int] = {}


def _warn_not_converged(residual, converged, *, site: str, solver: str, terms: int, damping: float, tol: float):
  # Host side of jax.debug.callback. Rate-limited per call site: the 1st, 10th, 100th... failure warns, so a
  # persistent failure is visible in every run without flooding the log once per step. ``converged`` is checked
  # here too: under jax.vmap the lax.cond that guards the callback runs both branches for every element.
  if bool(converged):
    return
  with _solve_warning_lock:
    count = _solve_warning_counts.get(site, 0) + 1
    _solve_warning_counts[site] = count
  if str(count).rstrip("0") == "1":  # 1, 10, 100, ...
    # warn_explicit: raised from a jax.debug.callback, a plain warn would point at JAX's callback machinery and
    # print its source line; this names the library function instead, with no source line.
    warnings.warn_explicit(
        f"implicit hypergradient at {site}: the {solver} solve (terms={terms}, damping={damping:g}) did not "
        f"converge: relative residual {float(residual):.3g} (tol {tol:g}); failure #{count} at this call site "
        f"(warned at the 1st, 10th, 100th...). The meta-gradient is unreliable; see diagnostics['solve_residual'].",
        HypergradSolveWarning, filename="tgeo_jax.bilevel.implicit", lineno=0, module="tgeo_jax.bilevel")


def linear_solve(matvec, g, *, solver: str, terms: int, neumann_lr: float, damping: float, tol: float,
                 site: str):
  """``v ~ A^-1 g`` for the symmetric ``matvec(u) = A u`` (``A = H + damping I``) by ``solver``, with its report:
  ``(v, residual, converged, contracting)`` -- ``residual = ||A v - g|| / ||g||`` (one extra matvec; ``||r||``
  itself if g = 0), ``converged = residual <= tol``, ``contracting`` (Neumann: the truncated series still shrinks
  its residual, ``||(I - eta A)^{J+1} g|| < ||(I - eta A)^J g||``; CG: ``converged``). A non-finite solve gives a
  NaN ``v``, never a silent zero; a solve neither converged nor contracting warns once per call site (rate-limited,
  ``HypergradSolveWarning`` naming ``site``). Shared by every implicit hypergradient (``implicit`` here,
  ``tgeo_jax.hypergrad.implicit``)."""
  g_norm = _tree_norm(g)

  def relative(r_norm):
    return jnp.where(g_norm > 0, r_norm / jnp.where(g_norm > 0, g_norm, 1.0), r_norm)

  if solver == "neumann":
    def term(_, carry):
      v, p = carry
      p = jax.tree.map(lambda a, b: a - neumann_lr * b, p, matvec(p))  # p_j = (I - eta A)^j g
      return jax.tree.map(lambda a, b: a + neumann_lr * b, v, p), p

    v0 = jax.tree.map(lambda a: neumann_lr * a, g)
    v, p_last = jax.lax.fori_loop(0, terms, term, (v0, g), unroll=bool(_unroll_trips(terms) is True))
    previous = relative(_tree_norm(p_last))  # the residual of the partial sum with one term fewer
  else:
    v, _ = jax.scipy.sparse.linalg.cg(matvec, g, tol=tol, maxiter=terms)
    previous = None
  residual = relative(_tree_norm(jax.tree.map(jnp.subtract, matvec(v), g)))
  finite = jnp.isfinite(residual)
  converged = finite & (residual <= tol)  # what "converged" means for both solvers: the linear system is solved
  # A truncated Neumann series is an approximation by design: it is acceptable (no warning) while it contracts,
  # but it is reported as converged only when the residual reaches tol.
  contracting = (finite & (residual < 1.0) & (residual < previous)) if previous is not None else converged
  acceptable = converged | contracting
  # Non-finite anywhere in the solve: NaN out, never a zero meta-gradient that looks like "nothing to learn".
  v = jax.tree.map(lambda a: jnp.where(finite, a, jnp.nan), v)

  report = functools.partial(_warn_not_converged, site=site, solver=solver, terms=terms, damping=float(damping),
                             tol=float(tol))
  jax.lax.cond(acceptable, lambda r, c: None, lambda r, c: jax.debug.callback(report, r, c), residual, acceptable)
  return v, residual, converged, contracting


def implicit(weight_fn: WeightFn, meta_params, per_sample_fn: PerSampleFn, batch,
             val_loss_fn: ValLossFn, val_batch, student: StudentState, tx: optax.GradientTransformation, *,
             solver: str = "neumann", terms: int = 5, neumann_lr: float = 1e-2, damping: float = 0.0,
             tol: float = 1e-6) -> HypergradResult:
  """Implicit-function (IFT) hypergradient at the current theta (docs/methods.md §7, "Implicit").

  Treating theta as a stationary point of the alpha-fixed training loss on ``batch``::

      dL_val/dalpha_i = -(1/N) <v, grad_theta (soft_i - hard_i)(theta)>,   v ~ (H + damping I)^-1 grad L_val(theta)

  with H the Hessian of L_train(.; alpha) on ``batch`` at theta (BatchNorm in train mode as ``per_sample_fn``
  has it; context stop-gradient, so H is symmetric), applied by forward-over-reverse Hessian-vector products of
  ONE linearization of the training gradient. The N derivatives are one JVP of ``(soft - hard)`` along v, the
  meta-gradient ``weight_fn``'s VJP. The validation gradient is taken at theta with the train forward's
  ``new_rest``.

  Mid-training theta is not stationary, so this is a heuristic there (Lorraine et al. 2020 use it anyway); it
  is exact at a minimiser of the inner problem (ridge regression: see the tests).

  Solvers (``terms`` = J):
    * ``"neumann"``: ``v = eta sum_{j=0..J} (I - eta (H + damping I))^j g``, eta = ``neumann_lr``; needs
      ``eta (lambda_max(H) + damping) < 1`` and H + damping I positive definite to converge. J = 0 is
      ``-(eta/N) <grad L_val(theta), grad (soft_i - hard_i)>``, the one-step SGD lookahead with the validation
      gradient at theta; J terms equal J + 1 SGD steps (lr eta) unrolled from a stationary point.
    * ``"cg"``: ``jax.scipy.sparse.linalg.cg`` with ``maxiter=terms`` and relative ``tol`` (needs H + damping I
      positive definite: use damping away from a minimum).

  Convergence is never silent: ``diagnostics['solve_residual']`` = ``||(H + damping I) v - g|| / ||g||`` (one
  extra HVP; ``||r||`` itself if g = 0); ``diagnostics['solve_converged']`` = residual <= tol, for both solvers;
  ``diagnostics['solve_contracting']``: for Neumann (a truncated series, rarely at tol) whether the series still
  contracts -- the residual is finite, below 1 (that of v = 0) and below the previous partial sum's
  (``||(I - eta A)^{J+1} g||`` < ``||(I - eta A)^J g||``); for CG equal to ``solve_converged``. A solve that is
  neither converged nor contracting issues a ``HypergradSolveWarning`` on the host (``jax.debug.callback``,
  rate-limited per call site). A non-finite residual turns the whole meta-gradient
  into NaN (CG would otherwise stop at once and return v = 0, a silent zero).

  Cost: train forward + backward (also the real step) linearized once, J + 1 HVPs (one for the residual), a
  validation forward + backward at theta and one JVP; measured 4.6x a plain step's FLOPs for J = 0 and +1.9x
  per term (J = 5: 14.2x, J = 10: 23.9x; CG about the same per iteration).
  Memory: the linearization's residuals (~2 x one step's activations) plus a few parameter-sized vectors. Use it
  for long-horizon effects without storing a trajectory, near convergence of the student (fine-tuning,
  ridge-like inner problems), always with an eye on ``solve_residual``.

  The returned student is the real step with alpha(phi) at the current phi ("reuse" ordering): the training
  gradient at theta, one ``tx`` step.

  Args:
    solver: ``"neumann"`` or ``"cg"``.
    terms: J >= 0 Neumann terms beyond the first, or the CG iteration limit (>= 1).
    neumann_lr: eta > 0 (Neumann only, but always validated); the student's learning rate is the natural choice.
    damping: lambda >= 0 added to H.
    tol: relative residual tolerance (> 0).
    Others: as in ``one_step``.
  Returns:
    ``HypergradResult`` with ``val_loss`` = L_val(theta) and ``solve_residual``, ``solve_converged``.
  """
  if solver not in SOLVERS:
    raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
  if not isinstance(terms, numbers.Integral) or isinstance(terms, bool) or terms < 0:
    raise ValueError(f"terms: expected an int >= 0, got {terms!r}")
  if solver == "cg" and terms < 1:
    raise ValueError(f"terms: CG needs at least one iteration (terms >= 1), got {terms}")
  if not float(damping) >= 0.0:  # also rejects NaN
    raise ValueError(f"damping: expected >= 0, got {damping!r}")
  if not float(neumann_lr) > 0.0:
    raise ValueError(f"neumann_lr: expected > 0, got {neumann_lr!r}")
  if not float(tol) > 0.0:
    raise ValueError(f"tol: expected > 0, got {tol!r}")
  terms, damping, neumann_lr, tol = int(terms), float(damping), float(neumann_lr), float(tol)
  # The call site (at trace time) keys the rate limit of the not-converged warning.
  caller = traceback.extract_stack(limit=2)[0]
  site = f"{caller.filename}:{caller.lineno}"

  params, rest, opt_state = _checked_student(student, "implicit")

  def fwd(p):
    return per_sample_fn(p, rest, batch)

  def train_grad(p):
    (soft, hard), vjp_fn, (new_rest, context) = jax.vjp(fwd, p, has_aux=True)
    context = _checked_context(context, "implicit")
    # alpha is a constant of theta (and phi does not enter the solve): H is the Hessian of L_train(.; alpha).
    alpha = jax.lax.stop_gradient(weight_fn(meta_params, context))
    alpha = _checked_alpha(alpha, soft, hard, "implicit").astype(soft.dtype)
    (g,) = vjp_fn(_mix_cotangent(alpha, soft, hard))
    return g, (soft, hard, new_rest, context)

  # One linearization of the training gradient: its value is the real step's gradient, its linear map the HVP.
  grads, hvp, (soft, hard, new_rest, context) = jax.linearize(train_grad, params, has_aux=True)
  alpha, alpha_vjp = jax.vjp(lambda m: _checked_alpha(weight_fn(m, context), soft, hard, "implicit"), meta_params)
  n = soft.shape[0]

  def matvec(u):
    hu = hvp(u)
    return hu if damping == 0.0 else jax.tree.map(lambda a, b: a + damping * b, hu, u)

  val_loss, val_grads = jax.value_and_grad(val_loss_fn)(params, new_rest, val_batch)
  v, residual, converged, contracting = linear_solve(matvec, val_grads, solver=solver, terms=terms,
                                                     neumann_lr=neumann_lr, damping=damping, tol=tol, site=site)

  _, (dsoft, dhard) = jax.jvp(lambda p: fwd(p)[0], (params,), (v,))
  (meta_grad,) = alpha_vjp((-(dsoft - dhard) / n).astype(alpha.dtype))
  new_params, new_opt_state = optimizer_step(tx, grads, opt_state, params)
  return _one_step_result(meta_grad, StudentState(new_params, new_rest, new_opt_state), alpha, soft, hard,
                          val_loss, context, solve_residual=residual, solve_converged=converged,
                          solve_contracting=contracting)


# ------------------------------------------------------------------------------------------------------ head-only

def head_by_name(*names: str) -> HeadPredicate:
  """A ``head_only`` predicate: a parameter belongs to the head when its top-level key is one of ``names``.

  The registered models name their classifier ``head`` (tgeo_jax.models.small), ``fc`` (the CIFAR/ImageNet zoo)
  or ``out`` (Wide&Deep's DNN output; its wide part is not in the head).
  """
  names = tuple(names)
  if not names:
    raise ValueError("head_by_name: give at least one top-level parameter name")

  def is_head(path) -> bool:
    if not path:
      return False
    key = path[0]
    return getattr(key, "key", getattr(key, "name", None)) in names

  return is_head


DEFAULT_HEAD = head_by_name("head", "fc", "out")


def head_only(weight_fn: WeightFn, meta_params, per_sample_fn: PerSampleFn, batch,
              val_loss_fn: ValLossFn, val_batch, student: StudentState, tx: optax.GradientTransformation, *,
              is_head: HeadPredicate = DEFAULT_HEAD) -> HypergradResult:
  """One-step lookahead with the hypergradient's tangent restricted to the classifier head W (FaMUS-like).

  The student takes its real, full step theta' = U(g) (g the full training gradient); the meta-gradient keeps
  only the path through the head's update::

      dL_val/dalpha_i ~ (1/N) <g_bar_W, grad_W (soft_i - hard_i)(theta)>,
      g_bar_W = [(dU/dg)^T (0_body, grad_W L_val(body', W'))]_W

  i.e. the validation loss is differentiated with respect to the head only, at the real step theta' (the
  validation forward runs once, at theta' = (body', W'); the body is a constant: its features are
  stop-gradient), and the per-sample JVP moves the head only, with the body held at theta (its features on
  ``batch`` are constants). Neither needs a backward (or a tangent) through the body. Exact, equal to
  ``one_step``, when the student is only a head (a linear / logistic model); an approximation otherwise, which
  drops the body's contribution to the lookahead.

  Cost: a plain KD step (train forward + backward), a validation forward with a head-only backward, the VJP
  through ``tx`` (element-wise) and a head-only JVP (its body forward is the train forward's, shared by XLA's
  CSE under jit): measured 1.66x a plain step's FLOPs against 2.66x for ``one_step`` (module docstring's setting).
  Memory: as a plain step plus a validation forward. Use it when ``one_step``'s extra backward is too expensive
  (large bodies), or as a cheap baseline.

  Args:
    is_head: ``(key_path) -> bool`` on the paths of ``jax.tree_util.tree_flatten_with_path(params)``; the default
      takes top-level ``head``, ``fc`` or ``out`` (see ``head_by_name``). It must select at least one leaf.
    Others: as in ``one_step``.
  Returns:
    ``HypergradResult`` as ``one_step``'s (``student`` is the full real step).
  """
  params, rest, opt_state = _checked_student(student, "head_only")
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  mask = tuple(bool(is_head(path)) for path, _ in with_path)
  if not any(mask):
    raise ValueError(f"is_head: selects no parameter; paths are "
                     f"{[jax.tree_util.keystr(path) for path, _ in with_path][:8]}")

  def split(tree):
    leaves = treedef.flatten_up_to(tree)
    return ([x for x, m in zip(leaves, mask) if not m], [x for x, m in zip(leaves, mask) if m])

  def merge(body, head):
    body_it, head_it = iter(body), iter(head)
    return treedef.unflatten([next(head_it) if m else next(body_it) for m in mask])

  def fwd(p):
    return per_sample_fn(p, rest, batch)

  (soft, hard), vjp_fn, (new_rest, context) = jax.vjp(fwd, params, has_aux=True)
  context = _checked_context(context, "head_only")
  alpha, alpha_vjp = jax.vjp(lambda m: _checked_alpha(weight_fn(m, context), soft, hard, "head_only"), meta_params)
  n = soft.shape[0]
  (grads,) = vjp_fn(_mix_cotangent(alpha, soft, hard))
  new_params, step_vjp, new_opt_state = jax.vjp(lambda g: optimizer_step(tx, g, opt_state, params), grads,
                                                has_aux=True)
  new_body, new_head = split(new_params)
  val_loss, val_head_grads = jax.value_and_grad(
      lambda head: val_loss_fn(merge(new_body, head), new_rest, val_batch))(new_head)
  (grad_bar,) = step_vjp(merge([jnp.zeros_like(x) for x in new_body], val_head_grads))
  body, head = split(params)
  _, (dsoft, dhard) = jax.jvp(lambda h: fwd(merge(body, h))[0], (head,), (split(grad_bar)[1],))
  (meta_grad,) = alpha_vjp(((dsoft - dhard) / n).astype(alpha.dtype))
  return _one_step_result(meta_grad, StudentState(new_params, new_rest, new_opt_state), alpha, soft, hard,
                          val_loss, context)
