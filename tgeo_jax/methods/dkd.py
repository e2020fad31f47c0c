"""DKD — Decoupled Knowledge Distillation (Zhao et al., CVPR 2022; docs/methods.md §8).

Hinton's KL splits exactly into a binary target/non-target part and a part among the non-target classes,
``KL(p_t || p_s) = KL(b_t || b_s) + (1 - p_t,y) KL(p^_t || p^_s)``; DKD drops the coupling factor
``1 - p_t,y`` and weights the two parts freely:

    L = w_ce CE(z_s, y) + w(epoch) (alpha TCKD + beta NCKD)
    TCKD = tau^2 KL(b_t || b_s),   b = [p_y, 1 - p_y],           p = softmax(z / tau)
    NCKD = tau^2 KL(p^_t || p^_s), p^ = softmax over the classes k != y of z / tau
    w(epoch) = min(epoch / warmup_epochs, 1), epoch = 1, 2, ... (1-based and constant within an epoch)

each term a mean over the batch (the official code's sum / batch size).

Everything is computed in log space: ``log(1 - p_y) = logsumexp_{k != y} z_k/tau - logsumexp_k z_k/tau``, and the
target class is left out of the non-target softmax exactly. The official code instead takes ``log`` of summed
probabilities (``-inf`` once ``1 - p_y`` or ``p_y`` underflows, which float32 reaches at logit gaps of ~100 tau)
and masks the target by subtracting 1000 from its scaled logit (exact only while the target's scaled logit is
less than ~900 above the others); wherever both are accurate they agree to rounding (``tests/test_dkd.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tgeo_jax import argchecks, config_checks, losses
from tgeo_jax.methods import base

__all__ = ["dkd_terms", "warmup_weight", "dkd_loss", "DKD"]


def _kl_terms(log_q_t: jax.Array, log_q_s: jax.Array, present: jax.Array) -> jax.Array:
  """Elementwise ``q_t (log q_t - log q_s)`` where ``present``, exactly 0 elsewhere (no ``0 * inf`` in the value or
  the gradient: a masked or left-out class has ``log q = -inf``)."""
  log_q_t = jnp.where(present, log_q_t, 0.0)
  log_q_s = jnp.where(present, log_q_s, 0.0)
  return jnp.where(present, jnp.exp(log_q_t) * (log_q_t - log_q_s), 0.0)


def _shift(scaled: jax.Array) -> jax.Array:
  """``scaled - max_k scaled`` per row (stop-gradient: a constant per row changes no log-probability).

  Forming ``z_y - logsumexp(z)`` from unshifted logits rounds ``logsumexp``'s ``max + log(...)`` at the scale of
  the logits; after the shift the row maximum is 0 and the log-probabilities are as precise as ``log_softmax``'s.
  """
  row_max = jnp.max(scaled, axis=-1, keepdims=True)
  # A row with no finite entry (every class masked) keeps its -inf entries instead of -inf - (-inf) = NaN.
  return scaled - jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))


def _logsumexp(x: jax.Array, *, keepdims: bool = False) -> jax.Array:
  """``logsumexp`` over the last axis that is ``-inf`` with a zero gradient for a row with no finite entry (the
  non-target classes of a row whose every other class is masked), where ``jax.nn.logsumexp``'s gradient is NaN."""
  some = jnp.any(x > -jnp.inf, axis=-1, keepdims=True)
  out = jnp.where(some, jax.nn.logsumexp(jnp.where(some, x, 0.0), axis=-1, keepdims=True), -jnp.inf)
  return out if keepdims else out[..., 0]


def _binary_log_probs(scaled: jax.Array, target: jax.Array) -> jax.Array:
  """``[..., 2]``: ``(log p_y, log(1 - p_y))`` of ``softmax(scaled)``; ``scaled [..., K]``, ``target`` bool.

  ``log(1 - p_y)`` as a difference of two logsumexps, not ``log1p(-p_y)``: finite however close ``p_y`` is to 1.
  """
  scaled = _shift(scaled)
  lse_all = _logsumexp(scaled)
  logit_target = jnp.sum(jnp.where(target, scaled, 0.0), axis=-1)  # exactly one target per row
  lse_other = _logsumexp(jnp.where(target, -jnp.inf, scaled))
  return jnp.stack([logit_target - lse_all, lse_other - lse_all], axis=-1)


def _non_target_log_probs(scaled: jax.Array, target: jax.Array) -> jax.Array:
  """``[..., K]``: log-softmax of ``scaled`` over the classes ``k != y``; the target entry is ``-inf``."""
  scaled = _shift(jnp.where(target, -jnp.inf, scaled))
  present = scaled > -jnp.inf
  return jnp.where(present, jnp.where(present, scaled, 0.0) - _logsumexp(scaled, keepdims=True), -jnp.inf)


def dkd_terms(student_logits, teacher_logits, labels, *, temperature: float,
              validate: bool = False) -> tuple[jax.Array, jax.Array]:
  r"""Per-sample ``(TCKD, NCKD)``, each already multiplied by ``tau^2``; the teacher is stop-gradient.

  ``TCKD = tau^2 KL(b_t || b_s)`` with ``b = [p_y, 1 - p_y]``, ``NCKD = tau^2 KL(p^_t || p^_s)`` with ``p^`` the
  softmax of ``z / tau`` over the classes ``k != y``. Classes the teacher masks (``-inf``) contribute 0.

  Args:
    student_logits, teacher_logits: ``[..., K]``, same shape, ``K >= 2``.
    labels: ``[...]`` integer classes in ``[0, K)``; an out-of-range label gives NaN in both terms.
    temperature: ``tau > 0`` of every softmax.
    validate: check the labels' range (and a traced temperature) with ``checkify``.
  Returns:
    ``(tckd, nckd)``, each ``[...]`` in ``promote_types(student, teacher, float32)``, ``>= 0`` up to rounding.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax.methods import dkd
    >>> s = jnp.array([[1.0, 0.0, 0.0]]); t = jnp.array([[2.0, 1.0, 0.0]])
    >>> tckd, nckd = dkd.dkd_terms(s, t, jnp.array([0]), temperature=1.0)
    >>> print(tckd, nckd)   # NCKD = KL((e, 1)/(e + 1) || (1/2, 1/2)) = 0.1109441
    [0.01666858] [0.11094414]
  """
  fn = "dkd_terms"
  _check_terms_args(fn, student_logits, teacher_logits, labels, temperature)
  k = student_logits.shape[-1]
  argchecks.value_checks(fn, validate, labels=labels, num_classes=k, temperature=temperature)
  dtype = argchecks.compute_dtype(student_logits, teacher_logits)
  temperature = argchecks.as_static(temperature, dtype)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  valid = argchecks.valid_labels(labels, k)  # before the cast: a huge int64 label must not wrap into range
  labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  s = student_logits.astype(dtype) / temperature
  t = teacher_logits.astype(dtype) / temperature
  target = jax.nn.one_hot(labels, k, dtype=jnp.bool_)
  b_t = _binary_log_probs(t, target)
  tckd = jnp.sum(_kl_terms(b_t, _binary_log_probs(s, target), b_t > -jnp.inf), axis=-1)
  q_t = _non_target_log_probs(t, target)
  nckd = jnp.sum(_kl_terms(q_t, _non_target_log_probs(s, target), q_t > -jnp.inf), axis=-1)
  return (jnp.where(valid, temperature**2 * tckd, jnp.nan), jnp.where(valid, temperature**2 * nckd, jnp.nan))


def _check_terms_args(fn: str, student_logits, teacher_logits, labels, temperature) -> None:
  """The static checks of ``dkd_terms``: logits ``[..., K]`` of one shape, integer labels, ``temperature > 0``."""
  argchecks.check_logit_pair(fn, student_logits, teacher_logits)
  argchecks.check_labels(fn, labels, student_logits)
  argchecks.check_positive(fn, "temperature", temperature)


def warmup_weight(step, *, steps_per_epoch: int, warmup_epochs: float) -> jax.Array:
  """``w = min(epoch / warmup_epochs, 1)`` with mdistiller's 1-based integer epoch ``step // steps_per_epoch + 1``.

  ``step`` is the number of steps already taken (0 for the first step of the run), so steps 0 .. spe-1 are epoch
  1 (``w = 1 / warmup_epochs``), and from epoch ``ceil(warmup_epochs)`` on ``w = 1``. ``warmup_epochs = 0``:
  no warm-up.

  Args:
    step: a scalar integer (traced or not).
    steps_per_epoch: an integer ``>= 1`` (static).
    warmup_epochs: a number ``>= 0`` (static).
  Returns:
    a float32 scalar in ``(0, 1]``.

  Example:
    >>> from tgeo_jax.methods import dkd
    >>> print(dkd.warmup_weight(250, steps_per_epoch=100, warmup_epochs=20))   # epoch 3 of 20
    0.15
  """
  if not (isinstance(steps_per_epoch, (int, np.integer)) and steps_per_epoch >= 1):
    raise ValueError(f"warmup_weight: steps_per_epoch: expected an integer >= 1, got {steps_per_epoch!r}")
  argchecks.check_nonnegative("warmup_weight", "warmup_epochs", warmup_epochs)
  if warmup_epochs == 0:
    return jnp.ones((), jnp.float32)
  epoch = jnp.asarray(step) // steps_per_epoch + 1
  return jnp.minimum(epoch.astype(jnp.float32) / warmup_epochs, 1.0)


def dkd_loss(student_logits, teacher_logits, labels, *, temperature: float, alpha: float, beta: float,
             w_ce: float = 1.0, kd_weight=1.0, validate: bool = False):
  r"""``w_ce CE + kd_weight (alpha TCKD + beta NCKD)``, each a mean over the batch.

  Args:
    student_logits, teacher_logits: ``[N, K]``, ``K >= 2``; labels ``[N]``.
    temperature, alpha, beta, w_ce: as in the module docstring (``tau > 0``, weights ``>= 0``).
    kd_weight: the warm-up factor ``w`` (a scalar, e.g. ``warmup_weight(step, ...)``).
    validate: check the labels' range with ``checkify`` (``tgeo_jax.argchecks``).
  Returns:
    ``(loss, {"ce", "tckd", "nckd", "kd_weight"})``: scalars in ``promote_types(logits dtype, float32)``;
    ``tckd``/``nckd`` include ``tau^2`` and exclude ``alpha``, ``beta`` and ``w``.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax.methods import dkd
    >>> s = jnp.array([[1.0, 0.0, 0.0]]); t = jnp.array([[2.0, 1.0, 0.0]])
    >>> loss, parts = dkd.dkd_loss(s, t, jnp.array([0]), temperature=1.0, alpha=1.0, beta=8.0)
    >>> print(round(float(loss), 5))   # CE 0.55144 + TCKD 0.01667 + 8 NCKD 0.11094
    1.45567
  """
  for name, value in (("alpha", alpha), ("beta", beta), ("w_ce", w_ce), ("kd_weight", kd_weight)):
    argchecks.check_nonnegative("dkd_loss", name, value)
  tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature=temperature, validate=validate)
  ce = jnp.mean(losses.cross_entropy(student_logits, labels))
  tckd, nckd = jnp.mean(tckd), jnp.mean(nckd)
  kd_weight = jnp.asarray(kd_weight, ce.dtype)
  loss = w_ce * ce + kd_weight * (alpha * tckd + beta * nckd)
  return loss, {"ce": ce, "tckd": tckd, "nckd": nckd, "kd_weight": kd_weight}


class DKD(base.LossMethod):
  """The student trained on ``dkd_loss`` against the frozen teacher's logits (``config.dkd``)."""

  name = "dkd"
  config_group = "dkd"

  @classmethod
  def defaults(cls):
    # mdistiller's CIFAR-100 defaults (mdistiller/engine/cfg.py CFG.DKD); configs/cifar100.py sets beta per pair.
    c = ml_collections.ConfigDict()
    c.alpha = 1.0  # weight of TCKD (binary target vs non-target)
    c.beta = 8.0  # weight of NCKD (among the non-target classes)
    c.temperature = 4.0  # tau of every softmax
    c.warmup_epochs = 20.0  # the KD part ramps in as min(epoch / warmup_epochs, 1), epoch 1-based; 0 = none
    c.w_ce = 1.0  # weight of the label cross-entropy
    return c

  @classmethod
  def validate_config(cls, config) -> None:
    config_checks.positive_number(config, "dkd.temperature")
    for field in ("dkd.alpha", "dkd.beta", "dkd.w_ce"):
      config_checks.nonnegative_number(config, field)
    # A warm-up longer than the run never reaches the full loss: most likely a CIFAR default left on a short run.
    config_checks.require(config, "dkd.warmup_epochs",
                          lambda v: config_checks.is_number(v) and 0 <= v <= config.num_epochs,
                          f"a number in [0, num_epochs={config.num_epochs}] (epochs of KD-weight warm-up)")

  def loss(self, student_logits, teacher_logits, batch, step):
    cfg = self.config.dkd
    w = warmup_weight(step, steps_per_epoch=self.steps_per_epoch, warmup_epochs=cfg.warmup_epochs)
    return dkd_loss(student_logits, teacher_logits, batch["labels"], temperature=cfg.temperature, alpha=cfg.alpha,
                    beta=cfg.beta, w_ce=cfg.w_ce, kd_weight=w)
