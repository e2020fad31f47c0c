"""CE: the student trained on labels only (docs/methods.md §1); also how teachers are trained."""

from __future__ import annotations

import jax.numpy as jnp

from tgeo_jax import losses
from tgeo_jax.methods import base


def ce_loss(logits, labels, *, label_smoothing: float = 0.0):
  """Mean cross-entropy over the batch. ``logits [B, K]``, ``labels [B]``."""
  return jnp.mean(losses.cross_entropy(logits, labels, label_smoothing=label_smoothing))


class CE(base.Method):
  name = "ce"
  uses_teacher = False

  def train_step(self, state, batch, kind=None):
    smoothing = self.config.ce.label_smoothing

    def loss_from_logits(logits):
      return ce_loss(logits, batch["labels"], label_smoothing=smoothing), {
          "accuracy": base.batch_accuracy(logits, batch["labels"])}

    return self.gradient_step(state, batch["inputs"], loss_from_logits)
