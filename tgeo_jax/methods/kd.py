"""Vanilla KD (Hinton et al. 2015; docs/methods.md §1): ``w_ce CE + w_kd tau^2 KL_tau(t || s)``."""

from __future__ import annotations

import jax.numpy as jnp

from tgeo_jax import losses
from tgeo_jax.methods import base


def kd_loss(student_logits, teacher_logits, labels, *, temperature: float, w_ce: float, w_kd: float):
  """Mean over the batch of ``w_ce CE(s, y) + w_kd tau^2 KL_tau(t || s)``; the teacher is stop-gradient.

  ``student_logits, teacher_logits [B, K]``, ``labels [B]``. Returns ``(loss, {"kl": ..., "ce": ...})``.
  """
  soft = losses.kd_loss(student_logits, teacher_logits, temperature=temperature)
  hard = losses.cross_entropy(student_logits, labels)
  return jnp.mean(w_ce * hard + w_kd * soft), {"soft": jnp.mean(soft), "ce": jnp.mean(hard)}


class KD(base.Method):
  name = "kd"

  def train_step(self, state, batch, kind=None):
    cfg = self.config.kd
    teacher_logits = self.batch_teacher_logits(state, batch)

    def loss_from_logits(logits):
      loss, metrics = kd_loss(logits, teacher_logits, batch["labels"], temperature=cfg.temperature,
                              w_ce=cfg.w_ce, w_kd=cfg.w_kd)
      return loss, dict(metrics, accuracy=base.batch_accuracy(logits, batch["labels"]))

    return self.gradient_step(state, batch["inputs"], loss_from_logits)
