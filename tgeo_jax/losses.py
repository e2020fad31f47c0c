"""Pure distillation losses (docs/methods.md §1, §3).

Per-sample functions return ``[N]``; batch reductions are the callers' (``jnp.mean``) so that re-weighting
methods can weight samples. All reductions happen in float32 whatever the logits' dtype.
Notation: ``p(z; tau) = softmax(z / tau)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
  """Per-sample ``CE(z, y) = -log p(z; 1)_y`` (optionally against smoothed one-hot targets).

  Args:
    logits: ``[N, K]``.
    labels: ``[N]`` integer classes in ``[0, K)``.
  Returns:
    ``[N]`` float32.
  """
  logits = logits.astype(jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  if label_smoothing:
    k = logits.shape[-1]
    targets = jax.nn.one_hot(labels, k) * (1.0 - label_smoothing) + label_smoothing / k
    return -jnp.sum(targets * log_p, axis=-1)
  return -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float) -> jax.Array:
  """Per-sample ``KL_tau(t || s) = sum_k p_t,k (log p_t,k - log p_s,k)`` at temperature ``tau``.

  Not multiplied by tau^2 (see ``kd_loss``). The teacher side is not stop-gradient'ed here: callers decide.

  Args:
    student_logits, teacher_logits: ``[N, K]``.
  Returns:
    ``[N]`` float32, >= 0.
  """
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float) -> jax.Array:
  """Per-sample Hinton soft loss ``tau^2 * KL_tau(t || s)``, ``[N]``; the teacher is stop-gradient."""
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  return temperature**2 * kl_divergence(student_logits, teacher_logits, temperature=temperature)


def fused_kd_ce(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, alpha: jax.Array, *,
                temperature: float) -> jax.Array:
  """Per-sample convex fusion ``alpha * tau^2 KL_tau(t||s) + (1 - alpha) * CE(s, y)``, ``[N]``.

  ``alpha`` is a scalar or ``[N]``; this is vanilla KD with ``w_kd = alpha`` and the loss of every
  re-weighting method (TGeo-KD, ANL/ADA/WLS/RW-KD).
  """
  soft = kd_loss(student_logits, teacher_logits, temperature=temperature)
  hard = cross_entropy(student_logits, labels)
  return convex_mix(alpha, soft, hard)


def convex_mix(alpha: jax.Array, soft: jax.Array, hard: jax.Array) -> jax.Array:
  """``alpha * soft + (1 - alpha) * hard``, element-wise: the per-sample loss of every re-weighting method."""
  return alpha * soft + (1.0 - alpha) * hard


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-sample top-1 correctness ``[N]`` float32."""
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
