"""Pure distillation losses (docs/methods.md §1, §3; reference: docs/api.md).

Per-sample functions return one value per row (``[N]`` for ``[N, K]`` logits, or ``[...]`` for ``[..., K]``);
batch reductions are the callers' (``jnp.mean``) so that re-weighting methods can weight samples.
Notation: ``p(z; tau) = softmax(z / tau)`` over the last axis.

Contract shared by every loss in the library (``tgeo_jax.argchecks`` holds the checks):

* **dtype.** Computation happens in ``promote_types(input dtype, float32)``: bfloat16 / float16 logits compute in
  float32 and return float32; float32 stays float32; float64 (under ``jax_enable_x64``) stays float64, so
  ``jax.test_util.check_grads`` works in float64.
* **Masked classes.** A logit of ``-inf`` is a class with probability 0. Terms where the target distribution has
  probability 0 contribute exactly 0 (masked with ``where``, never ``0 * inf``), so the losses and their
  gradients stay finite wherever the math is. A student ``-inf`` on a class the teacher gives mass is an infinite
  KL, as the math says.
* **Checks.** Static arguments are checked at trace time (``ValueError`` naming the argument); data-dependent
  ones (labels in range, a traced ``alpha``) with ``validate=True`` through ``checkify``. An out-of-range label
  gives NaN, never a finite wrong number.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tgeo_jax import argchecks

__all__ = ["cross_entropy", "kl_divergence", "kd_loss", "fused_kd_ce", "convex_mix", "accuracy",
           "masked_log_softmax_terms"]


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
                  validate: bool = False) -> jax.Array:
  r"""Per-sample cross-entropy ``CE(z, y) = -log softmax(z)_y``, optionally against smoothed targets.

  With ``label_smoothing = eps`` the target is ``(1 - eps) onehot(y) + eps / K'`` where ``K'`` counts the classes
  that are not masked (``-inf`` logits get no smoothing mass); ``CE = -sum_k target_k log softmax(z)_k``.
  Built on ``optax.softmax_cross_entropy_with_integer_labels`` after subtracting each row's maximum (same value
  and gradient; keeps float32 precise at logits of ±1e4).

  Args:
    logits: ``[..., K]`` floating, ``K >= 2``; ``-inf`` marks a masked class.
    labels: ``[...]`` integer classes in ``[0, K)``; an out-of-range label gives NaN.
    label_smoothing: ``eps`` in ``[0, 1]`` (static).
    validate: check the labels' range with ``checkify`` (see ``tgeo_jax.argchecks``).
  Returns:
    ``[...]`` in ``promote_types(logits.dtype, float32)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax import losses
    >>> z = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0]])
    >>> print(losses.cross_entropy(z, jnp.array([1, 0])).round(5))   # log 2, -log(3/4)
    [0.69315 0.28768]
  """
  fn = "cross_entropy"
  argchecks.check_logits(fn, "logits", logits)
  argchecks.check_labels(fn, labels, logits)
  argchecks.check_unit_interval(fn, "label_smoothing", label_smoothing)
  k = logits.shape[-1]
  argchecks.value_checks(fn, validate, labels=labels, num_classes=k)
  z = logits.astype(argchecks.compute_dtype(logits))
  z = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  valid = argchecks.valid_labels(labels, k)  # before the cast: a huge int64 label must not wrap into range
  labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  if argchecks.is_static(label_smoothing) and label_smoothing == 0:
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(z, labels)
  else:
    eps = argchecks.as_static(label_smoothing, z.dtype)
    present = z > -jnp.inf
    onehot = jax.nn.one_hot(labels, k, dtype=jnp.bool_)
    # optax's smoothing over the classes that are present; a masked class gets no smoothing mass, but a masked
    # label keeps its (1 - eps): its log-probability is -inf, so the CE is +inf, as without smoothing.
    targets = optax.losses.smooth_labels(onehot.astype(z.dtype), eps, where=present)
    targets = jnp.where(present, targets, jnp.where(onehot, 1.0 - eps, 0.0))
    counted = present | (onehot & (targets > 0))
    ce = -jnp.sum(masked_log_softmax_terms(targets, jax.nn.log_softmax(z, axis=-1), counted), axis=-1)
  return jnp.where(valid, ce, jnp.nan)


def masked_log_softmax_terms(weights: jax.Array, log_probs: jax.Array, present: jax.Array) -> jax.Array:
  """``weights * log_probs`` where ``present``, exactly 0 elsewhere (value and gradient: no ``0 * inf``).

  Args:
    weights, log_probs, present: ``[..., K]`` (``present`` bool).
  Returns:
    ``[..., K]`` in the dtype of ``weights * log_probs``.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax import losses
    >>> print(losses.masked_log_softmax_terms(jnp.array([0.0, 1.0]), jnp.array([-jnp.inf, 0.0]),
    ...                                       jnp.array([False, True])))
    [0. 0.]
  """
  safe_log = jnp.where(present, log_probs, 0.0)
  return jnp.where(present, weights * safe_log, 0.0)


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float,
                  validate: bool = False) -> jax.Array:
  r"""Per-sample ``KL_tau(t || s) = sum_k p_t,k (log p_t,k - log p_s,k)`` with ``p = softmax(z / tau)``.

  Not multiplied by ``tau^2`` (see ``kd_loss``); the teacher side is not stop-gradient'ed here: callers decide.
  Classes with ``p_t,k = 0`` (teacher logit ``-inf``) contribute exactly 0. Built on
  ``optax.losses.kl_divergence_with_log_targets`` with ``where=`` over the teacher's classes of positive mass.

  Args:
    student_logits: ``[..., K]`` floating, ``K >= 2``.
    teacher_logits: ``[..., K]``, same shape.
    temperature: ``tau > 0`` (static, or traced and checked with ``validate=True``).
    validate: check a traced temperature with ``checkify``.
  Returns:
    ``[...]`` in ``promote_types(student, teacher, float32)``; ``>= 0`` up to rounding, 0 iff the two
    distributions are equal.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax import losses
    >>> s = jnp.array([[0.0, 0.0]]); t = jnp.array([[jnp.log(3.0), 0.0]])   # p_s = (1/2, 1/2), p_t = (3/4, 1/4)
    >>> print(losses.kl_divergence(s, t, temperature=1.0).round(5))   # 3/4 log(3/2) + 1/4 log(1/2)
    [0.13081]
  """
  return _kl_divergence("kl_divergence", student_logits, teacher_logits, temperature, validate)


def _kl_divergence(fn: str, student_logits, teacher_logits, temperature, validate: bool) -> jax.Array:
  argchecks.check_logit_pair(fn, student_logits, teacher_logits)
  argchecks.check_positive(fn, "temperature", temperature)
  argchecks.value_checks(fn, validate, temperature=temperature)
  dtype = argchecks.compute_dtype(student_logits, teacher_logits)
  temperature = argchecks.as_static(temperature, dtype)
  log_s = jax.nn.log_softmax(student_logits.astype(dtype) / temperature, axis=-1)
  log_t = jax.nn.log_softmax(teacher_logits.astype(dtype) / temperature, axis=-1)
  present = log_t > -jnp.inf
  # Both sides replaced by 0 on the teacher's zero-mass classes before any product: the optax formula then never
  # meets 0 * (-inf), in the value or in either side's gradient, and ``where=`` leaves those terms out.
  return optax.losses.kl_divergence_with_log_targets(jnp.where(present, log_s, 0.0), jnp.where(present, log_t, 0.0),
                                                     where=present)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float,
            validate: bool = False) -> jax.Array:
  r"""Per-sample Hinton soft loss ``tau^2 KL_tau(t || s)``; the teacher is stop-gradient.

  Its gradient is ``d/dz_s = tau (p_s - p_t)`` at temperature ``tau`` (Hinton et al. 2015).

  Args:
    student_logits, teacher_logits: ``[..., K]``, same shape, ``K >= 2``.
    temperature: ``tau > 0``.
    validate: check a traced temperature with ``checkify``.
  Returns:
    ``[...]`` in ``promote_types(student, teacher, float32)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax import losses
    >>> s = jnp.array([[0.0, 0.0]]); t = jnp.array([[jnp.log(3.0), 0.0]])
    >>> # tau = 2: p_t = (sqrt 3, 1) / (sqrt 3 + 1), p_s = (1/2, 1/2); 4 sum_k p_t,k log(2 p_t,k)
    >>> print(losses.kd_loss(s, t, temperature=2.0).round(5))
    [0.14536]
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  kl = _kl_divergence("kd_loss", student_logits, teacher_logits, temperature, validate)
  return argchecks.as_static(temperature, kl.dtype)**2 * kl


def fused_kd_ce(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, alpha, *,
                temperature: float, validate: bool = False) -> jax.Array:
  r"""Per-sample convex fusion ``alpha tau^2 KL_tau(t || s) + (1 - alpha) CE(s, y)``.

  Vanilla KD with ``w_kd = alpha`` and the loss of every re-weighting method (TGeo-KD, ANL/ADA/WLS/RW-KD).

  Args:
    student_logits, teacher_logits: ``[..., K]``, same shape.
    labels: ``[...]`` integer classes.
    alpha: a scalar or ``[...]`` in ``[0, 1]`` (static values checked at trace time; traced ones with
      ``validate=True``).
    temperature: ``tau > 0``.
    validate: check labels, a traced ``alpha`` and a traced temperature with ``checkify``.
  Returns:
    ``[...]`` in ``promote_types(student, teacher, float32)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax import losses
    >>> s = jnp.array([[0.0, 0.0]]); t = jnp.array([[jnp.log(3.0), 0.0]])
    >>> print(losses.fused_kd_ce(s, t, jnp.array([0]), 0.5, temperature=1.0).round(5))   # (0.13081 + log 2) / 2
    [0.41198]
  """
  fn = "fused_kd_ce"
  argchecks.check_unit_interval(fn, "alpha", alpha)
  argchecks.value_checks(fn, validate, alpha=alpha)
  soft = kd_loss(student_logits, teacher_logits, temperature=temperature, validate=validate)
  hard = cross_entropy(student_logits, labels, validate=validate)
  return convex_mix(alpha, soft, hard)


def convex_mix(alpha, soft: jax.Array, hard: jax.Array) -> jax.Array:
  r"""``alpha * soft + (1 - alpha) * hard``, element-wise: the per-sample loss of every re-weighting method.

  Args:
    alpha: a scalar or an array broadcastable to ``soft``, in ``[0, 1]`` (static values checked at trace time).
    soft, hard: ``[N]`` per-sample losses.
  Returns:
    ``[N]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax import losses
    >>> print(losses.convex_mix(jnp.array([0.0, 0.25]), jnp.array([4.0, 4.0]), jnp.array([0.0, 0.0])))
    [0. 1.]
  """
  argchecks.check_unit_interval("convex_mix", "alpha", alpha)
  alpha = argchecks.as_static(alpha, jnp.result_type(soft))
  return alpha * soft + (1.0 - alpha) * hard


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-sample top-1 correctness: 1 where ``argmax_k logits == label``, else 0 (ties: the first maximum).

  Args:
    logits: ``[..., K]``; labels: ``[...]`` integer classes.
  Returns:
    ``[...]`` float32 (an indicator, whatever the logits' dtype).

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax import losses
    >>> print(losses.accuracy(jnp.array([[0.0, 1.0], [2.0, 1.0]]), jnp.array([1, 1])))
    [1. 0.]
  """
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
