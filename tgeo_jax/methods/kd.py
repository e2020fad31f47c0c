"""Vanilla KD (Hinton et al. 2015; docs/methods.md §1): ``w_ce CE + w_kd tau^2 KL_tau(t || s)``."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from tgeo_jax import losses
from tgeo_jax.config_checks import nonnegative_number, positive_number
from tgeo_jax.methods import base


def hinton_loss(student_logits, teacher_logits, labels, *, temperature: float, w_ce: float, w_kd: float):
  """Mean over the batch of ``w_ce CE(s, y) + w_kd tau^2 KL_tau(t || s)``; the teacher is stop-gradient.

  ``student_logits, teacher_logits [B, K]``, ``labels [B]``. Returns ``(loss, {"soft": mean tau^2 KL,
  "ce": mean CE})`` (``losses.kd_loss`` is the per-sample soft term).
  """
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
    return hinton_loss(student_logits, teacher_logits, batch["labels"], temperature=cfg.temperature,
                       w_ce=cfg.w_ce, w_kd=cfg.w_kd)
