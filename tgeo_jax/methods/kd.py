"""Vanilla KD (Hinton et al. 2015; docs/methods.md §1): ``w_ce CE + w_kd tau^2 KL_tau(t || s)``."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from tgeo_jax import argchecks, losses
from tgeo_jax.config_checks import nonnegative_number, positive_number
from tgeo_jax.methods import base

__all__ = ["hinton_loss", "KD"]


def hinton_loss(student_logits, teacher_logits, labels, *, temperature: float, w_ce: float, w_kd: float):
  r"""Mean over the batch of ``w_ce CE(s, y) + w_kd tau^2 KL_tau(t || s)``; the teacher is stop-gradient.

  Args:
    student_logits, teacher_logits: ``[B, K]``, same shape, ``K >= 2``.
    labels: ``[B]`` integer classes.
    temperature: ``tau > 0``; w_ce, w_kd: weights ``>= 0``.
  Returns:
    ``(loss, {"soft": mean tau^2 KL, "ce": mean CE})``, scalars in ``promote_types(logits dtype, float32)``
    (``losses.kd_loss`` is the per-sample soft term).

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax.methods import kd
    >>> s = jnp.array([[0.0, 0.0]]); t = jnp.array([[jnp.log(3.0), 0.0]])
    >>> loss, parts = kd.hinton_loss(s, t, jnp.array([0]), temperature=1.0, w_ce=0.5, w_kd=0.5)
    >>> print(round(float(loss), 6))   # (log 2 + 0.130810) / 2
    0.41198
  """
  argchecks.check_nonnegative("hinton_loss", "w_ce", w_ce)
  argchecks.check_nonnegative("hinton_loss", "w_kd", w_kd)
  soft = losses.kd_loss(student_logits, teacher_logits, temperature=temperature)
  hard = losses.cross_entropy(student_logits, labels)
  return jnp.mean(w_ce * hard + w_kd * soft), {"soft": jnp.mean(soft), "ce": jnp.mean(hard)}


class KD(base.LossMethod):
  name = "kd"
  config_group = "kd"

  @classmethod
  def defaults(cls):
    # The CIFAR-100 protocol of RepDistiller: tau = 4, 0.1 CE + 0.9 tau^2 KL.
    return ml_collections.ConfigDict(dict(temperature=4.0, w_ce=0.1, w_kd=0.9))

  @classmethod
  def validate_config(cls, config):
    positive_number(config, "kd.temperature")
    nonnegative_number(config, "kd.w_ce")
    nonnegative_number(config, "kd.w_kd")

  def loss(self, student_logits, teacher_logits, batch, step):
    del step
    cfg = self.config.kd
    if "study_teacher_wrong" in batch and self.config.study_wrong_teacher.oracle:
      # The study's oracle (tgeo_jax/study_teacher.py): α = 0 where the teacher was made wrong, the configured
      # weights elsewhere; the total weight w_ce + w_kd is kept per sample.
      wrong = batch["study_teacher_wrong"]
      soft = losses.kd_loss(student_logits, teacher_logits, temperature=cfg.temperature)
      hard = losses.cross_entropy(student_logits, batch["labels"])
      w_kd = jnp.where(wrong, 0.0, cfg.w_kd)
      w_ce = jnp.where(wrong, cfg.w_ce + cfg.w_kd, cfg.w_ce)
      return jnp.mean(w_ce * hard + w_kd * soft), {"soft": jnp.mean(soft), "ce": jnp.mean(hard),
                                                   "alpha_mean": jnp.mean(w_kd) / max(cfg.w_ce + cfg.w_kd, 1e-12)}
    return hinton_loss(student_logits, teacher_logits, batch["labels"], temperature=cfg.temperature,
                       w_ce=cfg.w_ce, w_kd=cfg.w_kd)
