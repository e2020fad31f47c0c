"""CE: the student trained on labels only (docs/methods.md §1); also how teachers are trained."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from tgeo_jax import losses
from tgeo_jax.methods import base

__all__ = ["ce_loss", "CE"]


def ce_loss(logits, labels, *, label_smoothing: float = 0.0):
  """Mean cross-entropy over the batch. ``logits [B, K]``, ``labels [B]``."""
  return jnp.mean(losses.cross_entropy(logits, labels, label_smoothing=label_smoothing))


class CE(base.LossMethod):
  name = "ce"
  config_group = "ce"
  loads_teacher_checkpoint = False
  reads_teacher_fields = False

  @classmethod
  def defaults(cls):
    return ml_collections.ConfigDict(dict(label_smoothing=0.0))

  def loss(self, student_logits, teacher_logits, batch, step):
    del teacher_logits, step
    return ce_loss(student_logits, batch["labels"], label_smoothing=self.config.ce.label_smoothing), {}
