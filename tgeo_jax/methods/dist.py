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

import warnings

import jax
import jax.numpy as jnp
import ml_collections

from tgeo_jax import argchecks, config_checks, losses
from tgeo_jax.methods import base

__all__ = ["PEARSON_EPS", "pearson", "inter_class_relation", "intra_class_relation", "dist_loss", "DIST"]

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
    the correlations in ``promote_types(dtype, float32)``, with ``axis`` removed (``[N]`` or ``[K]``). A
    constant vector correlates 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax.methods import dist
    >>> print(dist.pearson(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[3.0, 2.0, 1.0]])).round(5))
    [-1.]
  """
  argchecks.check_same_shape("pearson", "v", v, "u", u)
  dtype = argchecks.compute_dtype(u, v)
  u = u.astype(dtype)
  v = v.astype(dtype)
  u = u - jnp.mean(u, axis=axis, keepdims=True)
  v = v - jnp.mean(v, axis=axis, keepdims=True)
  return jnp.sum(u * v, axis=axis) / (_safe_norm(u, axis) * _safe_norm(v, axis) + PEARSON_EPS)


def inter_class_relation(y_s: jax.Array, y_t: jax.Array) -> jax.Array:
  """``1 - mean_i rho(y_s[i, :], y_t[i, :])``: how far each sample's ranking of the classes is from the teacher's.

  Args:
    y_s, y_t: probabilities ``[N, K]``.
  Returns:
    a scalar in [0, 2], in ``promote_types(dtype, float32)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax.methods import dist
    >>> y = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    >>> print(round(float(dist.inter_class_relation(y, y[:, ::-1])), 4))   # rows reversed: rho = -0.7419, -0.9737
    1.8578
  """
  return 1.0 - jnp.mean(pearson(y_s, y_t, axis=1))


def intra_class_relation(y_s: jax.Array, y_t: jax.Array) -> jax.Array:
  """``1 - mean_k rho(y_s[:, k], y_t[:, k])`` for probabilities ``[N, K]``: correlates over the (global) batch.

  Args:
    y_s, y_t: probabilities ``[N, K]``.
  Returns:
    a scalar in [0, 2], in ``promote_types(dtype, float32)``; a column constant over the batch correlates 0 (so
    a batch of 1 gives exactly 1).

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax.methods import dist
    >>> y = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    >>> print(round(float(dist.intra_class_relation(y, y)), 4))   # identical: every column correlates 1
    0.0
  """
  return 1.0 - jnp.mean(pearson(y_s, y_t, axis=0))


def dist_loss(student_logits, teacher_logits, labels, *, temperature: float, w_ce: float = 1.0,
              w_inter: float = 2.0, w_intra: float = 2.0):
  """``w_ce CE(s, y) + tau^2 (w_inter inter + w_intra intra)``; the teacher is stop-gradient.

  A batch of one sample has no intra-class relation to learn (each column is one value, whose correlation is 0,
  so ``intra = 1`` with zero gradient); the function warns once when traced with ``N = 1``.

  Args:
    student_logits, teacher_logits: ``[N, K]``, same shape, ``K >= 2`` (computed in
      ``promote_types(dtype, float32)``). Masked (``-inf``) classes have probability 0.
    labels: ``[N]`` integer classes.
    temperature: ``tau > 0`` of both softmaxes.
    w_ce, w_inter, w_intra: the loss weights ``>= 0`` (defaults: the paper's CIFAR-100 setting 1, 2, 2).
  Returns:
    ``(loss, {"ce", "inter", "intra"})``: scalars in the compute dtype; ``inter``/``intra`` are before the
    ``tau^2`` factor.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax.methods import dist
    >>> z = jnp.array([[2.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 1.0, 3.0]])
    >>> loss, parts = dist.dist_loss(z, z, jnp.array([0, 1, 2]), temperature=1.0)
    >>> print(round(float(parts["inter"]), 5), round(float(parts["intra"]), 5))   # identical logits: both 0
    0.0 0.0
  """
  fn = "dist_loss"
  argchecks.check_logit_pair(fn, student_logits, teacher_logits)
  if student_logits.ndim != 2:
    raise ValueError(f"{fn}: student_logits: expected shape [N, K] (intra correlates over the batch), got "
                     f"{tuple(student_logits.shape)}")
  argchecks.check_positive(fn, "temperature", temperature)
  for name, value in (("w_ce", w_ce), ("w_inter", w_inter), ("w_intra", w_intra)):
    argchecks.check_nonnegative(fn, name, value)
  if student_logits.shape[0] == 1:
    warnings.warn("dist_loss: a batch of 1 sample: the intra-class relation is constant (intra = 1, no gradient)",
                  stacklevel=2)
  dtype = argchecks.compute_dtype(student_logits, teacher_logits)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  y_s = jax.nn.softmax(student_logits.astype(dtype) / temperature, axis=-1)
  y_t = jax.nn.softmax(teacher_logits.astype(dtype) / temperature, axis=-1)
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
