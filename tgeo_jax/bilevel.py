"""One-step lookahead hypergradient of a per-sample fusion ratio (docs/methods.md §2, "Bilevel optimisation").

The student's training loss mixes a soft (teacher) and a hard (label) per-sample loss with a ratio
``alpha_i in (0, 1)`` produced by meta-parameters ``phi`` (TGeo-KD's fusion net on geometry features, or
RW-KD's free per-sample table)::

    L_train(theta; phi) = mean_i [alpha_i soft_i(theta) + (1 - alpha_i) hard_i(theta)]
    alpha = weight_fn(phi, stop_gradient(student_logits))
    theta'(phi) = U(grad_theta L_train(theta; phi))      U(g) = apply_updates(theta, tx.update(g, opt_state, theta))
    meta objective: L_val(theta'(phi))

``tx`` is the student's own configured optax optimizer (any ``GradientTransformation``: SGD with momentum or
Nesterov, coupled weight decay, Adam, global-norm clipping, schedules...), so the lookahead step is exactly the
step the student takes.

``lookahead_hypergrad_autodiff`` is the literal definition (``jax.grad`` through ``jax.grad``, ``tx.update`` and
``optax.apply_updates``). ``lookahead_hypergrad`` computes the same number in explicit form, using that alpha
enters the training gradient linearly::

    g(phi) = (1/N) sum_i [alpha_i grad soft_i + (1 - alpha_i) grad hard_i]
    dL_val/dalpha_i = (1/N) <g_bar, grad_theta (soft_i - hard_i)(theta)>,   g_bar = (dU/dg)^T grad L_val(theta')
    dL_val/dphi = VJP of alpha(phi) applied to dL_val/dalpha

``g_bar`` is a VJP through the optimizer update alone (element-wise maps and global norms: cheap), and the N
inner products are ONE forward-mode JVP of the per-sample vectors ``(soft, hard)(theta)`` in the direction
``g_bar``. The train forward is linearized once and its linear map serves both the training gradient (its
transpose) and that JVP, so the forward pass is not repeated.

Cost, measured with XLA's cost analysis: about 2.5-2.7x the FLOPs of a plain KD step (train forward + backward,
validation forward + backward on a batch as large, one JVP). The autodiff reference compiles to the same
FLOPs and memory: phi reaches the inner backward pass only through its cotangent seed, and JAX's symbolic zeros
reduce reverse-over-reverse to the transpose of that linear map, i.e. the same JVP. The explicit form is kept
because it has that cost by construction, before any XLA optimisation (a ``jax.vjp`` + ``jax.jvp`` pair instead
carries a second forward pass that only common-subexpression elimination removes), and it compiles faster
(small CNN on CPU: about 1.0 s against 1.6-1.8 s).

All functions are pure and jit-able when called inside a jitted function (the callables close over static
graphdefs and batches; they are not jit arguments themselves).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

# weight_fn(meta_params, student_logits [N, K]) -> alpha [N] in (0, 1).
WeightFn = Callable[[Any, jax.Array], jax.Array]
# per_sample_fn(params, rest) -> ((soft [N], hard [N]), (new_rest, student_logits [N, K])): one train forward.
PerSampleFn = Callable[[Any, Any], tuple[tuple[jax.Array, jax.Array], tuple[Any, jax.Array]]]
# val_loss_fn(params, rest) -> scalar validation loss of the student.
ValLossFn = Callable[[Any, Any], jax.Array]


class LookaheadResult(NamedTuple):
  """What one lookahead gives; in the "reuse" ordering ``params``/``rest``/``opt_state`` ARE the real step."""

  meta_grad: Any  # d L_val(theta'(phi)) / d phi, same tree as meta_params.
  params: Any  # theta', stop-gradient: the student's updated parameters.
  rest: Any  # New non-parameter state (BatchNorm running statistics) from the train forward.
  opt_state: Any  # The student's optimizer state after the step.
  train_loss: jax.Array  # Scalar L_train(theta; phi).
  val_loss: jax.Array  # Scalar L_val(theta').
  alpha: jax.Array  # [N] alpha(phi) used in the step (stop-gradient).
  student_logits: jax.Array  # [N, K] from the train forward.


def train_loss(alpha: jax.Array, soft: jax.Array, hard: jax.Array) -> jax.Array:
  """``mean_i [alpha_i soft_i + (1 - alpha_i) hard_i]`` for ``alpha, soft, hard`` of shape ``[N]``."""
  return jnp.mean(alpha * soft + (1.0 - alpha) * hard)


def optimizer_step(tx: optax.GradientTransformation, grads, opt_state, params) -> tuple[Any, Any]:
  """``(new_params, new_opt_state)``: one step of ``tx`` from ``params`` along ``grads``."""
  updates, new_opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), new_opt_state


def lookahead_hypergrad(weight_fn: WeightFn, meta_params, per_sample_fn: PerSampleFn, val_loss_fn: ValLossFn,
                        params, rest, opt_state, tx: optax.GradientTransformation) -> LookaheadResult:
  """Exact one-step lookahead hypergradient ``dL_val(theta'(phi))/dphi``, without nested ``jax.grad``.

  Equal to ``lookahead_hypergrad_autodiff`` (up to rounding) for any ``tx``. Work: one train forward, its
  transpose (the training gradient), one JVP through the same linearization, a forward + backward of
  ``val_loss_fn``, and VJPs through ``tx.update`` and ``weight_fn``. Call it inside the jitted train step.

  Args:
    weight_fn: ``(meta_params, student_logits [N, K]) -> alpha [N]``; it receives stop-gradient logits.
    meta_params: phi, any pytree.
    per_sample_fn: ``(params, rest) -> ((soft [N], hard [N]), (new_rest, student_logits [N, K]))``, one
      train-mode forward of the student on the training batch.
    val_loss_fn: ``(params, rest) -> scalar``, the outer objective at theta' (called with the ``new_rest`` of
      the train forward; the caller picks the BatchNorm mode inside).
    params, rest, opt_state: the student's state theta before the step.
    tx: the student's optimizer.
  Returns:
    ``LookaheadResult``.
  """
  # The train forward, linearized once in theta. `lin` maps a parameter tangent to the tangents of (soft, hard)
  # using the stored residuals: transposed it gives the training gradient, applied it gives the JVP below.
  (soft, hard), lin, (new_rest, logits) = jax.linearize(lambda p: per_sample_fn(p, rest), params, has_aux=True)
  logits = jax.lax.stop_gradient(logits)
  alpha, alpha_vjp = jax.vjp(lambda m: weight_fn(m, logits), meta_params)
  n = soft.shape[0]

  # g = (1/N) J^T [alpha; 1 - alpha], J the Jacobian of (soft, hard) w.r.t. theta.
  (grads,) = jax.linear_transpose(lin, params)(((alpha / n).astype(soft.dtype),
                                                ((1.0 - alpha) / n).astype(hard.dtype)))

  # theta' = U(g) and the VJP of U with respect to g only (theta and the optimizer state do not depend on phi).
  new_params, step_vjp, new_opt_state = jax.vjp(lambda g: optimizer_step(tx, g, opt_state, params), grads,
                                                has_aux=True)
  val_loss, val_grads = jax.value_and_grad(val_loss_fn)(new_params, new_rest)
  (grad_bar,) = step_vjp(val_grads)

  # dL_val/dalpha_i = (1/N) <g_bar, grad (soft_i - hard_i)>: one JVP of the per-sample losses along g_bar.
  dsoft, dhard = lin(grad_bar)
  dalpha = ((dsoft - dhard) / n).astype(alpha.dtype)
  (meta_grad,) = alpha_vjp(dalpha)

  return LookaheadResult(
      meta_grad=meta_grad,
      params=jax.lax.stop_gradient(new_params),
      rest=new_rest,
      opt_state=new_opt_state,
      train_loss=train_loss(alpha.astype(soft.dtype), soft, hard),
      val_loss=val_loss,
      alpha=jax.lax.stop_gradient(alpha),
      student_logits=logits,
  )


def lookahead_hypergrad_autodiff(weight_fn: WeightFn, meta_params, per_sample_fn: PerSampleFn,
                                 val_loss_fn: ValLossFn, params, rest, opt_state,
                                 tx: optax.GradientTransformation) -> LookaheadResult:
  """The reference: ``jax.grad`` of ``phi -> L_val(theta'(phi))`` through the inner gradient and ``tx``.

  Same arguments and result as ``lookahead_hypergrad``; differentiates through the student's backward pass.
  The definition the explicit form is tested against (after XLA's optimisations it costs the same FLOPs).
  """

  def outer(meta):
    def inner(p):
      (soft, hard), (new_rest, logits) = per_sample_fn(p, rest)
      logits = jax.lax.stop_gradient(logits)
      alpha = weight_fn(meta, logits)
      return train_loss(alpha.astype(soft.dtype), soft, hard), (new_rest, logits, alpha)

    (loss, (new_rest, logits, alpha)), grads = jax.value_and_grad(inner, has_aux=True)(params)
    new_params, new_opt_state = optimizer_step(tx, grads, opt_state, params)
    val_loss = val_loss_fn(new_params, new_rest)
    return val_loss, (new_params, new_rest, new_opt_state, loss, alpha, logits)

  (val_loss, aux), meta_grad = jax.value_and_grad(outer, has_aux=True)(meta_params)
  new_params, new_rest, new_opt_state, loss, alpha, logits = aux
  return LookaheadResult(meta_grad=meta_grad, params=new_params, rest=new_rest, opt_state=new_opt_state,
                         train_loss=loss, val_loss=val_loss, alpha=alpha, student_logits=logits)


def alpha_hypergrad_jvp_oracle(per_sample_fn: PerSampleFn, val_grad_at_lookahead, params, rest, lr,
                               num_samples: int, grad_scale=1.0) -> jax.Array:
  """``dL_val(theta')/dalpha`` ``[N]`` from the identity of docs/methods.md §2, for SGD-type lookaheads.

  When the step is affine in the gradient with ``dtheta'/dg = -lr * grad_scale * I``::

      dL_val/dalpha_i = -(lr * grad_scale / N) <grad_theta (soft_i - hard_i)(theta), grad L_val(theta')>,

  computed as one ``jax.jvp`` of the per-sample vector ``(soft - hard)(theta)`` in the direction
  ``grad L_val(theta')``. ``grad_scale`` is 1 for ``optax.sgd(lr, momentum=mu)`` (update ``-lr (mu m + g)``),
  also with ``add_decayed_weights`` in front (it adds ``wd * theta``, independent of ``g``), and ``1 + mu`` for
  ``optax.sgd(lr, momentum=mu, nesterov=True)`` (update ``-lr (mu m_new + g)`` with ``m_new = mu m + g``).
  It does not hold for Adam or gradient clipping, whose step is not affine in ``g``.

  Args:
    per_sample_fn: as in ``lookahead_hypergrad``.
    val_grad_at_lookahead: ``grad L_val(theta')``, same tree as ``params``.
    params, rest: theta, the point the lookahead started from.
    lr: the learning rate of that step.
    num_samples: N, the batch size of the mean in ``L_train``.
    grad_scale: see above.
  Returns:
    ``[N]``; chain it through ``weight_fn``'s VJP to get ``dL_val/dphi``.
  """

  def soft_minus_hard(p):
    (soft, hard), _ = per_sample_fn(p, rest)
    return soft - hard

  _, directional = jax.jvp(soft_minus_hard, (params,), (val_grad_at_lookahead,))
  return -(lr * grad_scale / num_samples) * directional


def unrolled_hypergrad(weight_fn: WeightFn, meta_params, per_sample_fns: Sequence[PerSampleFn],
                       val_loss_fn: ValLossFn, params, rest, opt_state,
                       tx: optax.GradientTransformation) -> tuple[Any, jax.Array]:
  """n-step unrolled lookahead, ``(dL_val(theta_n(phi))/dphi, L_val(theta_n))``, by plain ``jax.grad``.

  ``theta_{k+1} = U_k(grad_theta L_train_k(theta_k; phi))`` with ``per_sample_fns[k]`` (one per unrolled step,
  each closing over its own batch) and ``alpha_k = weight_fn(phi, student_logits(theta_k))`` recomputed at every
  step. The student's inner gradient treats ``alpha_k`` as a constant (as in training), but the meta-gradient is
  the exact derivative of ``L_val(theta_n(phi))``: for k >= 1 it includes ``alpha_k``'s dependence on ``phi``
  through the logits at ``theta_k(phi)``. (For n = 1 that path does not exist and the result equals
  ``lookahead_hypergrad``.) Cost and memory grow linearly with n; for research on the truncation bias of the
  one-step lookahead.

  Args:
    weight_fn, meta_params, val_loss_fn, params, rest, opt_state, tx: as in ``lookahead_hypergrad``.
    per_sample_fns: the n per-sample loss functions, in step order.
  Returns:
    ``(meta_grad, val_loss)``.
  """
  if not per_sample_fns:
    raise ValueError("unrolled_hypergrad needs at least one step (per_sample_fns is empty)")

  def outer(meta):
    p, r, s = params, rest, opt_state
    for per_sample_fn in per_sample_fns:
      # A VJP rather than jax.grad of the mixed loss: alpha_k needs the logits of this very forward, and must
      # stay a constant for the inner gradient while remaining a function of theta_k for the outer one.
      (soft, hard), vjp_fn, (r, logits) = jax.vjp(lambda q, fn=per_sample_fn, r=r: fn(q, r), p, has_aux=True)
      alpha = weight_fn(meta, logits).astype(soft.dtype)
      n = soft.shape[0]
      (grads,) = vjp_fn((alpha / n, (1.0 - alpha) / n))
      p, s = optimizer_step(tx, grads, s, p)
    return val_loss_fn(p, r)

  val_loss, meta_grad = jax.value_and_grad(outer)(meta_params)
  return meta_grad, val_loss
