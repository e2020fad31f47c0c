"""Losses against values computed independently with numpy, and gradients against closed forms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from tgeo_jax import losses


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


class LossesTest(chex.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.s = rng.normal(size=(5, 4)).astype(np.float32) * 2
    self.t = rng.normal(size=(5, 4)).astype(np.float32) * 2
    self.y = np.array([0, 3, 1, 2, 3], np.int32)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cross_entropy_matches_numpy(self):
    got = self.variant(losses.cross_entropy)(self.s, self.y)
    want = -np_log_softmax(self.s.astype(np.float64))[np.arange(5), self.y]
    chex.assert_trees_all_close(got, want.astype(np.float32), rtol=1e-6)

  def test_cross_entropy_hand_value(self):
    # logits (0, 0): CE = log 2 for either label; (log 3, 0): p = 3/4 for class 0.
    got = losses.cross_entropy(jnp.array([[0.0, 0.0], [np.log(3.0), 0.0]]), jnp.array([1, 0]))
    chex.assert_trees_all_close(got, jnp.array([np.log(2.0), -np.log(0.75)]), rtol=1e-6)

  def test_label_smoothing(self):
    eps, k = 0.1, 4
    got = losses.cross_entropy(self.s, self.y, label_smoothing=eps)
    logp = np_log_softmax(self.s.astype(np.float64))
    target = np.eye(k)[self.y] * (1 - eps) + eps / k
    chex.assert_trees_all_close(got, (-(target * logp).sum(-1)).astype(np.float32), rtol=1e-6)

  @parameterized.parameters(1.0, 4.0)
  def test_kl_matches_numpy(self, tau):
    got = losses.kl_divergence(self.s, self.t, temperature=tau)
    ls, lt = np_log_softmax(self.s / tau), np_log_softmax(self.t / tau)
    want = (np.exp(lt) * (lt - ls)).sum(-1)
    chex.assert_trees_all_close(got, want.astype(np.float32), rtol=1e-5, atol=1e-7)
    self.assertTrue(np.all(np.asarray(got) >= 0))
    chex.assert_trees_all_close(losses.kl_divergence(self.s, self.s, temperature=tau), jnp.zeros(5), atol=1e-6)

  def test_kd_gradient_closed_form(self):
    # d/dz_s [tau^2 KL_tau(t || s)] = tau (p_s - p_t) at temperature tau (Hinton et al. 2015).
    tau = 4.0
    grad = jax.grad(lambda s: losses.kd_loss(s, self.t, temperature=tau).sum())(self.s)
    want = tau * (jax.nn.softmax(self.s / tau) - jax.nn.softmax(self.t / tau))
    chex.assert_trees_all_close(grad, want, atol=1e-5)
    # The teacher is stop-gradient.
    g_t = jax.grad(lambda t: losses.kd_loss(self.s, t, temperature=tau).sum())(self.t)
    chex.assert_trees_all_close(g_t, jnp.zeros_like(g_t))

  def test_fused_endpoints_and_linearity(self):
    kd = losses.kd_loss(self.s, self.t, temperature=4.0)
    ce = losses.cross_entropy(self.s, self.y)
    fused = lambda a: losses.fused_kd_ce(self.s, self.t, self.y, a, temperature=4.0)  # noqa: E731
    chex.assert_trees_all_close(fused(1.0), kd, rtol=1e-6)
    chex.assert_trees_all_close(fused(0.0), ce, rtol=1e-6)
    alpha = jnp.array([0.1, 0.5, 0.9, 0.0, 1.0])
    chex.assert_trees_all_close(fused(alpha), alpha * kd + (1 - alpha) * ce, rtol=1e-6)

  def test_bfloat16_logits_reduce_in_float32(self):
    got = losses.cross_entropy(self.s.astype(jnp.bfloat16), self.y)
    self.assertEqual(got.dtype, jnp.float32)
