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

from tgeo_jax import config_checks, data, losses
from tgeo_jax.methods import base


def _kl_terms(log_q_t: jax.Array, log_q_s: jax.Array) -> jax.Array:
  """Elementwise ``q_t (log q_t - log q_s)`` for finite log-probabilities (the teacher side is stop-gradient)."""
  return jnp.exp(log_q_t) * (log_q_t - log_q_s)


def _binary_log_probs(scaled: jax.Array, target: jax.Array) -> jax.Array:
  """``[N, 2]``: ``(log p_y, log(1 - p_y))`` of ``softmax(scaled)``; ``scaled [N, K]``, ``target [N, K]`` bool.

  ``log(1 - p_y)`` as a difference of two logsumexps, not ``log1p(-p_y)``: finite however close ``p_y`` is to 1.
  """
  lse_all = jax.nn.logsumexp(scaled, axis=-1)
  lse_target = jnp.sum(jnp.where(target, scaled, 0.0), axis=-1)  # exactly one target per row
  lse_other = jax.nn.logsumexp(jnp.where(target, -jnp.inf, scaled), axis=-1)
  return jnp.stack([lse_target - lse_all, lse_other - lse_all], axis=-1)


def _non_target_log_probs(scaled: jax.Array, target: jax.Array) -> jax.Array:
  """``[N, K]``: log-softmax of ``scaled`` over the classes ``k != y``; the target entry is set to 0.

  The target entry would be ``-inf``; it is replaced by 0 *before* any product so that neither the value nor the
  gradient ever meets ``0 * inf`` (the caller drops that entry).
  """
  lse_other = jax.nn.logsumexp(jnp.where(target, -jnp.inf, scaled), axis=-1, keepdims=True)
  return jnp.where(target, 0.0, scaled - lse_other)


def dkd_terms(student_logits, teacher_logits, labels, *, temperature: float) -> tuple[jax.Array, jax.Array]:
  """Per-sample ``(TCKD [N], NCKD [N])``, each already multiplied by ``tau^2``; the teacher is stop-gradient.

  Args:
    student_logits, teacher_logits: ``[N, K]`` (any float dtype; computed in float32), K >= 2.
    labels: ``[N]`` integer classes in ``[0, K)``.
    temperature: ``tau`` of every softmax.
  Returns:
    ``tckd = tau^2 KL(b_t || b_s)`` and ``nckd = tau^2 KL(p^_t || p^_s)``, float32, >= 0 up to rounding.
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  s = student_logits.astype(jnp.float32) / temperature
  t = teacher_logits.astype(jnp.float32) / temperature
  target = jax.nn.one_hot(labels, s.shape[-1], dtype=jnp.bool_)
  tckd = jnp.sum(_kl_terms(_binary_log_probs(t, target), _binary_log_probs(s, target)), axis=-1)
  nckd_terms = _kl_terms(_non_target_log_probs(t, target), _non_target_log_probs(s, target))
  nckd = jnp.sum(jnp.where(target, 0.0, nckd_terms), axis=-1)
  return temperature**2 * tckd, temperature**2 * nckd


def warmup_weight(step, *, steps_per_epoch: int, warmup_epochs: float) -> jax.Array:
  """``w = min(epoch / warmup_epochs, 1)`` with mdistiller's 1-based integer epoch ``step // steps_per_epoch + 1``.

  ``step`` is the number of steps already taken (0 for the first step of the run), so steps 0 .. spe-1 are epoch
  1 (``w = 1 / warmup_epochs``), and from epoch ``ceil(warmup_epochs)`` on ``w = 1``. ``warmup_epochs = 0``:
  no warm-up. A float32 scalar.
  """
  if warmup_epochs == 0:
    return jnp.ones((), jnp.float32)
  epoch = jnp.asarray(step) // max(1, steps_per_epoch) + 1
  return jnp.minimum(epoch.astype(jnp.float32) / warmup_epochs, 1.0)


def dkd_loss(student_logits, teacher_logits, labels, *, temperature: float, alpha: float, beta: float,
             w_ce: float = 1.0, kd_weight=1.0):
  """``w_ce CE + kd_weight (alpha TCKD + beta NCKD)``, each a mean over the batch.

  Args:
    student_logits, teacher_logits: ``[N, K]``; labels ``[N]``.
    temperature, alpha, beta, w_ce: as in the module docstring.
    kd_weight: the warm-up factor ``w`` (a scalar, e.g. ``warmup_weight(step, ...)``).
  Returns:
    ``(loss, {"ce", "tckd", "nckd", "kd_weight"})``, float32 scalars; ``tckd``/``nckd`` include ``tau^2`` and
    exclude ``alpha``, ``beta`` and ``w``.
  """
  tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature=temperature)
  ce = jnp.mean(losses.cross_entropy(student_logits, labels))
  tckd, nckd = jnp.mean(tckd), jnp.mean(nckd)
  kd_weight = jnp.asarray(kd_weight, jnp.float32)
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

  def __init__(self, config, spec, **kwargs):
    super().__init__(config, spec, **kwargs)
    # The trainer's epoch length (it refuses a batch larger than the training part before building a method).
    self.steps_per_epoch = max(1, data.steps_per_epoch(spec.train_size, config.batch_size))

  def loss(self, student_logits, teacher_logits, batch, step):
    cfg = self.config.dkd
    w = warmup_weight(step, steps_per_epoch=self.steps_per_epoch, warmup_epochs=cfg.warmup_epochs)
    return dkd_loss(student_logits, teacher_logits, batch["labels"], temperature=cfg.temperature, alpha=cfg.alpha,
                    beta=cfg.beta, w_ce=cfg.w_ce, kd_weight=w)
