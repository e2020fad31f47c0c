"""TGeo-KD's trilateral relation features (docs/methods.md §2): the vertices S, T, G, T̄ and what is built from them.

For sample i with student logits z_s, teacher logits z_t and label y (K classes), the vertices are probability
vectors at temperature 1, all stop-gradient (the fusion ratio is a function of where the student stands, not a
path for the student's gradient):

* S = s = softmax(z_s), T = t = softmax(z_t), G = g = onehot(y, K),
* T̄ = t̄_y, the class-mean teacher prediction of the sample's class (``class_mean_teacher``).

``relation_features`` concatenates vertices and element-wise squared edges (or scalar summaries) in one of the
layouts of ``LAYOUTS``; ``feature_dim(layout, K)`` gives the width of the result. Everything here is pure and
jit-able; ``layout`` and ``num_classes`` are static (Python values).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tgeo_jax import argchecks
from tgeo_jax.errors import UserError

__all__ = ["LAYOUTS", "feature_dim", "class_mean_teacher", "relation_features"]

# The one table of layouts: name -> the K-wide blocks it concatenates, in order ("scalar" is K-independent, see
# ``relation_features``). Block names: the vertices s, t, g, tbar; "a_b" the element-wise squared edge (a − b)²;
# "a_b*c_d" the element-wise angle term (a − b)⊙(c − d).
_LAYOUT_BLOCKS = {
    # The paper's concatenation order, kept so features can be compared with the original code.
    "reference": ("s", "t", "g", "tbar", "tbar_s", "g_s", "t_s", "t_g", "tbar_g"),
    "vertices": ("s", "t", "g", "tbar"),
    "edges": ("tbar_s", "g_s", "t_s", "t_g", "tbar_g"),
    # Intra-sample only, no T̄ (the paper's ablation row "+ ST").
    "intra": ("s", "t", "g", "g_s", "t_s", "t_g"),
    # The reference layout without the (t−s)² edge.
    "no_st": ("s", "t", "g", "tbar", "tbar_s", "g_s", "t_g", "tbar_g"),
    # The paper's "SG + TG only" ablation.
    "sg_tg": ("s", "t", "g", "g_s", "t_g"),
    # The reference layout followed by the angle terms.
    "angles": ("s", "t", "g", "tbar", "tbar_s", "g_s", "t_s", "t_g", "tbar_g", "tbar_s*g_s", "t_s*g_s"),
    # Edge lengths, true-class probabilities and confidences (10 columns, for large K).
    "scalar": (),
}
_SCALAR_DIM = 10

LAYOUTS: tuple[str, ...] = tuple(_LAYOUT_BLOCKS)

# Added under the square root of the scalar edge lengths: the vertices are stop-gradient, so this only keeps the
# value finite and well defined at a zero edge (a student that matches its teacher exactly).
_NORM_EPS = 1e-12


def feature_dim(layout: str, num_classes: int) -> int:
  """Width ``D`` of ``relation_features(..., layout)`` for ``num_classes`` classes.

  Args:
    layout: one of ``LAYOUTS``; num_classes: ``K``.
  Returns:
    ``D``, a Python int (``len(blocks) * K``, or 10 for ``scalar``).

  Example:
    >>> from tgeo_jax import geometry
    >>> geometry.feature_dim("reference", 10), geometry.feature_dim("scalar", 1000)
    (90, 10)
  """
  _check_layout(layout)
  return _SCALAR_DIM if layout == "scalar" else len(_LAYOUT_BLOCKS[layout]) * num_classes


def _check_layout(layout: str) -> None:
  if layout not in _LAYOUT_BLOCKS:
    raise UserError(f"unknown relation-feature layout {layout!r}; expected one of {list(LAYOUTS)}")


def class_mean_teacher(teacher_probs: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Class-mean teacher prediction T̄ (one row per class).

  Row c is the mean of the teacher probability vectors of the samples labelled c; a class without any sample
  gets the uniform vector 1/K (no information, and still a probability vector).

  Args:
    teacher_probs: ``[N, K]`` teacher probabilities at temperature 1 (over the student's training split).
    labels: ``[N]`` integer classes in ``[0, K)``.
    num_classes: ``K`` (static).
  Returns:
    ``[K, K]`` in ``promote_types(teacher_probs.dtype, float32)``; row c is t̄_c.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from tgeo_jax import geometry
    >>> probs = jnp.array([[0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.1, 0.9, 0.0]])
    >>> cm = geometry.class_mean_teacher(probs, jnp.array([0, 0, 1]), 3)   # class 2 has no sample: uniform
    >>> print(np.round(np.asarray(cm, np.float64), 3).tolist())
    [[0.7, 0.3, 0.0], [0.1, 0.9, 0.0], [0.333, 0.333, 0.333]]
  """
  teacher_probs = teacher_probs.astype(argchecks.compute_dtype(teacher_probs))
  labels = labels.astype(jnp.int32)
  sums = jax.ops.segment_sum(teacher_probs, labels, num_segments=num_classes)  # [K, K]
  counts = jax.ops.segment_sum(jnp.ones_like(labels, teacher_probs.dtype), labels, num_segments=num_classes)
  uniform = jnp.full_like(sums, 1.0 / num_classes)
  # Divide by max(count, 1) so an empty class does not produce 0/0 before the select picks the uniform row.
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  return jnp.where((counts > 0)[:, None], means, uniform)


def relation_features(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                      class_mean: jax.Array, layout: str = "reference") -> jax.Array:
  """Per-sample relation features Δ_i of the trilateral geometry, all stop-gradient.

  Layouts (``feature_dim`` gives ``D``; blocks of K concatenated, listed in ``_LAYOUT_BLOCKS``): ``reference``
  (9K) [s, t, g, t̄, (t̄−s)², (g−s)², (t−s)², (t−g)², (t̄−g)²], ``vertices`` (4K), ``edges`` (5K), ``intra`` (6K,
  no T̄), ``no_st`` (8K), ``sg_tg`` (5K), ``angles`` (11K: reference, then (t̄−s)⊙(g−s) and (t−s)⊙(g−s)), and
  ``scalar`` (10, independent of K, for large K): the Euclidean edge lengths [‖t̄−s‖, ‖g−s‖, ‖t−s‖, ‖t−g‖,
  ‖t̄−g‖] (same order as ``edges``), the true-class probabilities [s_y, t_y, t̄_y], and the confidences
  [max_k s_k, max_k t_k]. g_y = 1 always, so it is left out.

  Args:
    student_logits: ``[N, K]``.
    teacher_logits: ``[N, K]``.
    labels: ``[N]`` integer classes.
    class_mean: ``[K, K]`` from ``class_mean_teacher``.
    layout: one of ``LAYOUTS`` (static).
  Returns:
    ``[N, D]`` with ``D = feature_dim(layout, K)``, in ``promote_types(student_logits.dtype, float32)``; no
    gradient flows to any input. A masked class (``-inf`` logit) has probability 0 in its vertex.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax import geometry
    >>> s = jnp.zeros((1, 2)); t = jnp.array([[jnp.log(3.0), 0.0]]); y = jnp.array([0])
    >>> tbar = geometry.class_mean_teacher(jnp.array([[0.75, 0.25]]), y, 2)
    >>> print(geometry.relation_features(s, t, y, tbar, layout="vertices").round(4))   # [s, t, g, t̄]
    [[0.5  0.5  0.75 0.25 1.   0.   0.75 0.25]]
  """
  _check_layout(layout)
  dtype = argchecks.compute_dtype(student_logits)
  k = student_logits.shape[-1]
  labels = labels.astype(jnp.int32)
  s = jax.nn.softmax(student_logits.astype(dtype), axis=-1)
  t = jax.nn.softmax(teacher_logits.astype(dtype), axis=-1)
  g = jax.nn.one_hot(labels, k, dtype=dtype)
  tbar = class_mean.astype(dtype)[labels]
  s, t, g, tbar = (jax.lax.stop_gradient(v) for v in (s, t, g, tbar))

  if layout == "scalar":
    def length(d):
      return jnp.sqrt(jnp.sum(d * d, axis=-1) + _NORM_EPS)

    def true_class(p):
      return jnp.take_along_axis(p, labels[..., None], axis=-1)[..., 0]

    cols = [length(tbar - s), length(g - s), length(t - s), length(t - g), length(tbar - g),
            true_class(s), true_class(t), true_class(tbar), jnp.max(s, axis=-1), jnp.max(t, axis=-1)]
    return jnp.stack(cols, axis=-1)

  vertices = {"s": s, "t": t, "g": g, "tbar": tbar}

  def block(name):
    if "*" in name:
      left, right = name.split("*")
      return edge(left) * edge(right)
    if "_" in name:
      return edge(name) ** 2
    return vertices[name]

  def edge(name):  # "a_b" -> a − b
    a, b = name.split("_")
    return vertices[a] - vertices[b]

  blocks = [block(name) for name in _LAYOUT_BLOCKS[layout]]
  return jnp.concatenate(blocks, axis=-1)
