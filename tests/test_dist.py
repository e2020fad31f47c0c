"""DIST (docs/methods.md §3): the loss against an independent numpy reference and hand values, its invariances and
gradients, the global-batch ``intra`` under 4 devices, and one run through the CLI."""

import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from conftest import ROOT, TINY, device_flags, run_cli
from configs import fashion_mnist
from tgeo_jax import methods, report
from tgeo_jax.errors import UserError
from tgeo_jax.methods import dist


def np_softmax(z, tau):
  z = np.asarray(z, np.float64) / tau
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_pearson(u, v):
  """One correlation, written out term by term (float64)."""
  du, dv = u - u.mean(), v - v.mean()
  return float((du * dv).sum() / (np.sqrt((du**2).sum()) * np.sqrt((dv**2).sum()) + 1e-8))


def np_dist(s, t, y, tau, w_ce, w_inter, w_intra):
  ys, yt = np_softmax(s, tau), np_softmax(t, tau)
  n, k = ys.shape
  inter = 1 - np.mean([np_pearson(ys[i], yt[i]) for i in range(n)])
  intra = 1 - np.mean([np_pearson(ys[:, c], yt[:, c]) for c in range(k)])
  logp = np.log(np_softmax(s, 1.0))
  ce = -np.mean(logp[np.arange(n), y])
  return w_ce * ce + tau**2 * (w_inter * inter + w_intra * intra), ce, inter, intra


class DistLossTest(chex.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.s = (rng.normal(size=(6, 5)) * 2).astype(np.float32)
    self.t = (rng.normal(size=(6, 5)) * 2).astype(np.float32)
    self.y = np.array([0, 1, 2, 3, 4, 0], np.int32)

  def test_pearson_hand_values(self):
    u = jnp.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 0.0, 1.0]])
    v = jnp.array([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0], [0.0, 1.0, 1.0]])
    # Proportional: 1; reversed: -1; centred (1, -2, 1)/3 . (-2, 1, 1)/3 = -1/3 over norms sqrt(6)/3 each: -1/2.
    chex.assert_trees_all_close(dist.pearson(u, v, axis=1), jnp.array([1.0, -1.0, -0.5]), atol=1e-6)
    # Along axis 0 the columns are correlated: column 0 of u (1, 1, 1) is constant -> 0.
    chex.assert_trees_all_close(dist.pearson(u, v, axis=0)[0], 0.0, atol=1e-6)

  def test_identical_predictions_leave_only_ce(self):
    loss, m = dist.dist_loss(self.s, self.s, self.y, temperature=4.0)
    chex.assert_trees_all_close(m["inter"], 0.0, atol=1e-6)
    chex.assert_trees_all_close(m["intra"], 0.0, atol=1e-6)
    chex.assert_trees_all_close(loss, m["ce"], atol=1e-4)

  @parameterized.parameters((1.0, 1.0, 1.0, 1.0), (4.0, 1.0, 2.0, 2.0), (2.0, 0.5, 3.0, 0.0))
  def test_matches_numpy(self, tau, w_ce, w_inter, w_intra):
    loss, m = dist.dist_loss(self.s, self.t, self.y, temperature=tau, w_ce=w_ce, w_inter=w_inter, w_intra=w_intra)
    want, ce, inter, intra = np_dist(self.s, self.t, self.y, tau, w_ce, w_inter, w_intra)
    chex.assert_trees_all_close((loss, m["ce"], m["inter"], m["intra"]),
                                tuple(np.float32(x) for x in (want, ce, inter, intra)), rtol=1e-5, atol=1e-6)

  def test_defaults_are_the_papers(self):
    # docs/methods.md: L = CE + 2 tau^2 (inter + intra).
    loss, m = dist.dist_loss(self.s, self.t, self.y, temperature=4.0)
    chex.assert_trees_all_close(loss, m["ce"] + 2 * 16 * (m["inter"] + m["intra"]), rtol=1e-6)
    c = fashion_mnist.base_config().dist
    assert (c.temperature, c.w_ce, c.w_inter, c.w_intra) == (4.0, 1.0, 2.0, 2.0)

  def test_positive_affine_invariance(self):
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    base = 1 - dist.pearson(u, v)
    for a, b in ((3.0, 0.0), (0.2, -5.0), (7.0, 11.0)):
      chex.assert_trees_all_close(1 - dist.pearson(a * u + b, v), base, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_close(1 - dist.pearson(u, a * v + b), base, rtol=1e-5, atol=1e-6)
    # A negative scale flips the sign of rho: 1 - rho becomes 1 + rho.
    chex.assert_trees_all_close(1 - dist.pearson(-2.0 * u, v), 1 + dist.pearson(u, v), rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_finite_gradients_with_constant_columns(self):
    grad = self.variant(jax.grad(lambda s, t: dist.dist_loss(s, t, self.y, temperature=4.0)[0]))
    # Every teacher row the same: every column of Y_t is constant (rho = 0 for each class).
    t_const = np.tile(self.t[:1], (6, 1))
    g = grad(self.s, t_const)
    assert np.all(np.isfinite(g)) and np.any(g != 0)
    _, m = dist.dist_loss(self.s, t_const, self.y, temperature=4.0)
    chex.assert_trees_all_close(m["intra"], 1.0, atol=1e-6)
    # Every student row the same: the student's columns are constant, where a plain norm's gradient is NaN.
    s_const = np.tile(self.s[:1], (6, 1))
    assert np.all(np.isfinite(grad(s_const, self.t)))
    # A single constant column of the student's probabilities among varying ones.
    y_s, y_t = np_softmax(self.s, 4.0), np_softmax(self.t, 4.0)
    y_s[:, 2] = 0.1
    g = jax.grad(dist.intra_class_relation)(jnp.asarray(y_s, jnp.float32), jnp.asarray(y_t, jnp.float32))
    assert np.all(np.isfinite(g))

  def test_teacher_is_stop_gradient_and_float32(self):
    g_t = jax.grad(lambda t: dist.dist_loss(self.s, t, self.y, temperature=4.0)[0])(self.t)
    chex.assert_trees_all_close(g_t, jnp.zeros_like(g_t))
    loss, m = dist.dist_loss(jnp.asarray(self.s, jnp.bfloat16), jnp.asarray(self.t, jnp.bfloat16), self.y,
                             temperature=4.0)
    assert loss.dtype == jnp.float32 and m["intra"].dtype == jnp.float32

  def test_bad_config_names_the_field(self):
    c = fashion_mnist.get_config("dist")
    c.dist.temperature = 0.0
    with pytest.raises(UserError, match=r"^dist.temperature: expected a positive number"):
      methods.validate_config(c)
    c.dist.temperature, c.dist.w_intra = 4.0, -1.0
    with pytest.raises(UserError, match=r"^dist.w_intra: expected a number >= 0"):
      methods.validate_config(c)


def test_intra_is_over_the_global_batch_on_four_devices():
  """On a batch sharded over 4 devices, the jitted loss equals numpy's over the whole (global) batch."""
  code = textwrap.dedent("""
      import json, jax, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from tgeo_jax import parallel
      from tgeo_jax.methods import dist
      rng = np.random.default_rng(0)
      s, t = rng.normal(size=(8, 5)).astype(np.float32) * 2, rng.normal(size=(8, 5)).astype(np.float32) * 2
      y = np.arange(8, dtype=np.int32) % 5
      mesh = parallel.make_mesh()
      put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
      loss, m = jax.jit(lambda s, t, y: dist.dist_loss(s, t, y, temperature=4.0))(put(s), put(t), put(y))
      print(json.dumps({"devices": jax.device_count(), "loss": float(loss), "intra": float(m["intra"])}))
  """)
  env = dict(os.environ, XLA_FLAGS=device_flags(4), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       check=True, timeout=120)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(8, 5)).astype(np.float32) * 2, rng.normal(size=(8, 5)).astype(np.float32) * 2
  want, _, _, intra = np_dist(s, t, np.arange(8) % 5, 4.0, 1.0, 2.0, 2.0)
  assert got["devices"] == 4
  np.testing.assert_allclose([got["loss"], got["intra"]], [want, intra], rtol=1e-5)


def test_cli_run(tiny_teacher, tmp_path):
  workdir = str(tmp_path / "dist")
  proc = run_cli(["--config=configs/fashion_mnist.py:dist", f"--workdir={workdir}", *TINY,
                  f"--config.teacher.checkpoint={tiny_teacher}"])
  assert "done: dist test accuracy" in proc.stdout
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["method"] == "dist" and 0 <= summary["accuracy"] <= 1 and "teacher_accuracy" in summary
  record = report.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]
  for key in ("train_loss", "train_ce", "train_inter", "train_intra"):
    assert np.isfinite(record[key]), key
