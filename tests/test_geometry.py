"""Tests for tgeo_jax.geometry: hand-computed K = 3 features for every layout, T̄, stop-gradient, jit."""

from __future__ import annotations

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from tgeo_jax import geometry
from tgeo_jax.errors import UserError

# Two samples, K = 3. Logits are log-probabilities, so the softmax vertices are the literal vectors below.
S = np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
T = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
LABELS = np.array([0, 2])
# Row 1 (no sample of class 1 in the batch) is never looked up by these two samples.
CLASS_MEAN = np.array([[0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.2, 0.2, 0.6]])

# Blocks worked out by hand from S, T, G = onehot([0, 2]) and T̄ = CLASS_MEAN[[0, 2]].
G = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
TBAR = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]
E_TBAR_S = [[0.01, 0.0, 0.01], [0.0, 0.0, 0.0]]  # (t̄ − s)²
E_G_S = [[0.25, 0.09, 0.04], [0.04, 0.04, 0.16]]  # (g − s)²
E_T_S = [[0.04, 0.01, 0.01], [0.01, 0.01, 0.0]]  # (t − s)²
E_T_G = [[0.09, 0.04, 0.01], [0.01, 0.09, 0.16]]  # (t − g)²
E_TBAR_G = [[0.16, 0.09, 0.01], [0.04, 0.04, 0.16]]  # (t̄ − g)²
A_TBAR = [[0.05, 0.0, 0.02], [0.0, 0.0, 0.0]]  # (t̄ − s) ⊙ (g − s)
A_T = [[0.1, 0.03, 0.02], [0.02, -0.02, 0.0]]  # (t − s) ⊙ (g − s)

EXPECTED = {
    "reference": [S, T, G, TBAR, E_TBAR_S, E_G_S, E_T_S, E_T_G, E_TBAR_G],
    "vertices": [S, T, G, TBAR],
    "edges": [E_TBAR_S, E_G_S, E_T_S, E_T_G, E_TBAR_G],
    "intra": [S, T, G, E_G_S, E_T_S, E_T_G],
    "no_st": [S, T, G, TBAR, E_TBAR_S, E_G_S, E_T_G, E_TBAR_G],
    "sg_tg": [S, T, G, E_G_S, E_T_G],
    "angles": [S, T, G, TBAR, E_TBAR_S, E_G_S, E_T_S, E_T_G, E_TBAR_G, A_TBAR, A_T],
}
# Scalar layout: [‖t̄−s‖, ‖g−s‖, ‖t−s‖, ‖t−g‖, ‖t̄−g‖, s_y, t_y, t̄_y, max s, max t]; squared lengths are the
# row sums of the edge blocks above. Sample 2 has t̄ = s: a zero edge, kept finite by the 1e-12 under the root.
EXPECTED_SCALAR = [
    [np.sqrt(0.02), np.sqrt(0.38), np.sqrt(0.06), np.sqrt(0.14), np.sqrt(0.26), 0.5, 0.7, 0.6, 0.5, 0.7],
    [1e-6, np.sqrt(0.24), np.sqrt(0.02), np.sqrt(0.26), np.sqrt(0.24), 0.6, 0.6, 0.6, 0.6, 0.6],
]


def _inputs():
  return (jnp.log(jnp.asarray(S, jnp.float32)), jnp.log(jnp.asarray(T, jnp.float32)),
          jnp.asarray(LABELS, jnp.int32), jnp.asarray(CLASS_MEAN, jnp.float32))


class ClassMeanTeacherTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_means_and_uniform_row_for_empty_class(self):
    probs = jnp.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6]])
    labels = jnp.array([0, 0, 2])
    fn = self.variant(functools.partial(geometry.class_mean_teacher, num_classes=3))
    expected = np.array([[0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.3, 0.6]])
    chex.assert_trees_all_close(fn(probs, labels), expected, atol=1e-6)

  def test_rows_are_distributions(self):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=20).astype(np.float32)
    labels = rng.integers(0, 4, size=20)  # class 4 is empty
    tbar = geometry.class_mean_teacher(probs, labels, 5)
    chex.assert_shape(tbar, (5, 5))
    chex.assert_trees_all_close(tbar.sum(-1), jnp.ones(5), atol=1e-6)
    chex.assert_trees_all_close(tbar[4], jnp.full(5, 0.2))


class RelationFeaturesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*EXPECTED)
  def test_hand_computed_blocks(self, layout):
    fn = self.variant(functools.partial(geometry.relation_features, layout=layout))
    out = fn(*_inputs())
    expected = np.concatenate(EXPECTED[layout], axis=-1)
    chex.assert_shape(out, (2, geometry.feature_dim(layout, 3)))
    chex.assert_trees_all_close(out, expected, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_computed_scalar(self):
    fn = self.variant(functools.partial(geometry.relation_features, layout="scalar"))
    out = fn(*_inputs())
    chex.assert_shape(out, (2, 10))
    chex.assert_trees_all_close(out, np.array(EXPECTED_SCALAR), atol=1e-6)

  def test_feature_dims(self):
    self.assertEqual(geometry.LAYOUTS, ("reference", "vertices", "edges", "intra", "no_st", "sg_tg", "angles",
                                        "scalar"))
    expected = {"reference": 63, "vertices": 28, "edges": 35, "intra": 42, "no_st": 56, "sg_tg": 35,
                "angles": 77, "scalar": 10}
    logits = jax.ShapeDtypeStruct((4, 7), jnp.float32)
    labels = jax.ShapeDtypeStruct((4,), jnp.int32)
    tbar = jax.ShapeDtypeStruct((7, 7), jnp.float32)
    for layout in geometry.LAYOUTS:
      self.assertEqual(geometry.feature_dim(layout, 7), expected[layout])
      # Shapes only: tracing is enough, and it keeps this test free of per-shape compilations.
      out = jax.eval_shape(functools.partial(geometry.relation_features, layout=layout), logits, logits, labels,
                           tbar)
      self.assertEqual(out.shape, (4, expected[layout]))

  @parameterized.parameters(*geometry.LAYOUTS)
  def test_no_gradient_reaches_any_input(self, layout):
    zs, zt, labels, tbar = _inputs()

    def total(zs, zt, tbar):
      return jnp.sum(geometry.relation_features(zs, zt, labels, tbar, layout))

    grads = jax.grad(total, argnums=(0, 1, 2))(zs, zt, tbar)
    for g in grads:
      np.testing.assert_array_equal(g, np.zeros_like(g))

  def test_unknown_layout(self):
    with self.assertRaisesRegex(UserError, "layout"):
      geometry.feature_dim("triangles", 3)
    with self.assertRaisesRegex(UserError, "layout"):
      geometry.relation_features(*_inputs(), layout="triangles")


if __name__ == "__main__":
  absltest.main()
