"""DIST — "Knowledge Distillation from A Stronger Teacher" (Huang et al., NeurIPS 2022; docs/methods.md §3).

The student matches the teacher's *relations* instead of its probabilities: with ``Y = softmax(Z / tau)``,

    inter = 1 - mean_i rho(Y_s[i, :], Y_t[i, :])     (each sample's ranking of the classes)
    intra = 1 - mean_k rho(Y_s[:, k], Y_t[:, k])     (each class's ranking of the samples in the batch)
    L     = w_ce CE + w_inter tau^2 inter + w_intra tau^2 intra

with the Pearson correlation ``rho(u, v) = <u - u_bar, v - v_bar> / (||u - u_bar|| ||v - v_bar|| + 1e-8)`` (the
1e-8 is added to the product of the norms, as in the official code).

**Global batch.** The official code computes ``intra`` on each GPU's local batch. Here the step is one jitted
function over the global batch (sharded over the ``'data'`` mesh axis), so ``intra`` correlates over the *global*
batch: XLA inserts the cross-device reductions, and the result does not depend on the number of devices. With
``n`` GPUs of local batch ``b`` the official code instead averages ``n`` correlations over ``b`` samples each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from tgeo_jax import config_checks, losses
from tgeo_jax.methods import base

PEARSON_EPS = 1e-8


def _safe_norm(x: jax.Array, axis: int) -> jax.Array:
  """``||x||`` along ``axis`` whose gradient at ``x = 0`` is 0 instead of NaN.

  ``jnp.linalg.norm`` differentiates ``sqrt`` at 0 (infinite slope times a zero cotangent = NaN); a constant
  column (all samples give class k the same probability) hits exactly that. The double ``where`` keeps the value
  and routes no gradient through the singular branch, as PyTorch's ``norm`` backward does. The correlation's
  gradient is then its exact derivative, ``(v - v_bar) / 1e-8`` for a constant ``u``: finite, though large
  (global-norm clipping, ``optimizer.clip_norm``, bounds the step).
  """
  sq = jnp.sum(x * x, axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def pearson(u: jax.Array, v: jax.Array, *, axis: int = -1) -> jax.Array:
  """Pearson correlation along ``axis``: ``<u - u_bar, v - v_bar> / (||u - u_bar|| ||v - v_bar|| + 1e-8)``.

  Args:
    u, v: arrays of the same shape, e.g. ``[N, K]``.
    axis: the axis the correlation runs over (``-1``: per row; ``0``: per column).
  Returns:
    the correlations, float32, with ``axis`` removed (``[N]`` or ``[K]``). A constant vector correlates 0.
  """
  u = u.astype(jnp.float32)
  v = v.astype(jnp.float32)
  u = u - jnp.mean(u, axis=axis, keepdims=True)
  v = v - jnp.mean(v, axis=axis, keepdims=True)
  return jnp.sum(u * v, axis=axis) / (_safe_norm(u, axis) * _safe_norm(v, axis) + PEARSON_EPS)


def inter_class_relation(y_s: jax.Array, y_t: jax.Array) -> jax.Array:
  """``1 - mean_i rho(y_s[i, :], y_t[i, :])`` for probabilities ``[N, K]``; a float32 scalar in [0, 2]."""
  return 1.0 - jnp.mean(pearson(y_s, y_t, axis=1))


def intra_class_relation(y_s: jax.Array, y_t: jax.Array) -> jax.Array:
  """``1 - mean_k rho(y_s[:, k], y_t[:, k])`` for probabilities ``[N, K]``: correlates over the (global) batch."""
  return 1.0 - jnp.mean(pearson(y_s, y_t, axis=0))


def dist_loss(student_logits, teacher_logits, labels, *, temperature: float, w_ce: float = 1.0,
              w_inter: float = 2.0, w_intra: float = 2.0):
  """``w_ce CE(s, y) + tau^2 (w_inter inter + w_intra intra)``; the teacher is stop-gradient.

  Args:
    student_logits, teacher_logits: ``[N, K]`` (any float dtype; everything is computed in float32).
    labels: ``[N]`` integer classes.
    temperature: ``tau`` of both softmaxes.
    w_ce, w_inter, w_intra: the loss weights (defaults: the paper's CIFAR-100 setting 1, 2, 2).
  Returns:
    ``(loss, {"ce", "inter", "intra"})``: float32 scalars; ``inter``/``intra`` are before the ``tau^2`` factor.
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  y_s = jax.nn.softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  y_t = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  inter = inter_class_relation(y_s, y_t)
  intra = intra_class_relation(y_s, y_t)
  ce = jnp.mean(losses.cross_entropy(student_logits, labels))
  loss = w_ce * ce + temperature**2 * (w_inter * inter + w_intra * intra)
  return loss, {"ce": ce, "inter": inter, "intra": intra}


class DIST(base.LossMethod):
  """The student trained on ``dist_loss`` against the frozen teacher's logits (``config.dist``)."""

  name = "dist"
  config_group = "dist"

  @classmethod
  def defaults(cls):
    # L = w_ce CE + tau^2 (w_inter inter + w_intra intra): the paper's CIFAR-100 setting.
    c = ml_collections.ConfigDict()
    c.temperature = 4.0  # tau of both softmaxes (4 on CIFAR-100, 1 on ImageNet)
    c.w_ce = 1.0  # weight of the label cross-entropy
    c.w_inter = 2.0  # weight of tau^2 * inter-class relation loss (per sample, across classes)
    c.w_intra = 2.0  # weight of tau^2 * intra-class relation loss (per class, across the global batch)
    return c

  @classmethod
  def validate_config(cls, config) -> None:
    config_checks.positive_number(config, "dist.temperature")
    for field in ("dist.w_ce", "dist.w_inter", "dist.w_intra"):
      config_checks.nonnegative_number(config, field)

  def loss(self, student_logits, teacher_logits, batch, step):
    del step
    cfg = self.config.dist
    return dist_loss(student_logits, teacher_logits, batch["labels"], temperature=cfg.temperature,
                     w_ce=cfg.w_ce, w_inter=cfg.w_inter, w_intra=cfg.w_intra)
