"""The contract every loss keeps (tgeo_jax/losses.py, tgeo_jax/argchecks.py, docs/api.md): masked ``-inf`` classes,
dtypes (float64 kept, low precision computed in float32), float32 precision against the official formulas, argument
and value checks, and the public API. References are independent: numpy in float64, the problem with the masked
classes removed, closed-form gradients, finite differences (``check_grads``) in float64."""

import importlib
import os
import pkgutil
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

import tgeo_jax
from tgeo_jax import argchecks, geometry, losses
from tgeo_jax.methods import dist, dkd, kd, reweight, simkd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INF = np.inf
TAU = 2.0


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  with np.errstate(invalid="ignore"):
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_kl(s, t, tau):
  """``sum_k p_t (log p_t - log p_s)`` with a zero-mass teacher class contributing 0."""
  ls, lt = np_log_softmax(np.asarray(s) / tau), np_log_softmax(np.asarray(t) / tau)
  with np.errstate(invalid="ignore"):
    return np.where(np.isfinite(lt), np.exp(lt) * (lt - ls), 0.0).sum(-1)


def batch(seed=0, n=4, k=5, scale=2.0):
  rng = np.random.default_rng(seed)
  s = (rng.normal(size=(n, k)) * scale).astype(np.float32)
  t = (rng.normal(size=(n, k)) * scale).astype(np.float32)
  y = np.array([0, 1, 2, 4] * n, np.int32)[:n]
  return s, t, y


# Every loss as a scalar function of (student logits, teacher logits, labels): the finiteness, dtype and float64
# gradient checks run over all of them.
SCALAR_LOSSES = {
    "cross_entropy": lambda s, t, y: jnp.sum(losses.cross_entropy(s, y)),
    "cross_entropy_smoothed": lambda s, t, y: jnp.sum(losses.cross_entropy(s, y, label_smoothing=0.1)),
    "kl_divergence": lambda s, t, y: jnp.sum(losses.kl_divergence(s, t, temperature=TAU)),
    "kd_loss": lambda s, t, y: jnp.sum(losses.kd_loss(s, t, temperature=TAU)),
    "fused_kd_ce": lambda s, t, y: jnp.sum(losses.fused_kd_ce(s, t, y, 0.3, temperature=TAU)),
    "hinton_loss": lambda s, t, y: kd.hinton_loss(s, t, y, temperature=TAU, w_ce=0.1, w_kd=0.9)[0],
    "dkd_loss": lambda s, t, y: dkd.dkd_loss(s, t, y, temperature=TAU, alpha=1.0, beta=8.0)[0],
    "dist_loss": lambda s, t, y: dist.dist_loss(s, t, y, temperature=TAU)[0],
    "feature_mse": lambda s, t, y: simkd.feature_mse(s, t),
    "wls_alpha": lambda s, t, y: jnp.sum(reweight.wls_alpha(s, t, y)),
    "ada_alpha": lambda s, t, y: jnp.sum(reweight.ada_alpha(t, y)),
    "relation_features": lambda s, t, y: jnp.sum(geometry.relation_features(
        s, t, y, geometry.class_mean_teacher(jax.nn.softmax(t.astype(argchecks.compute_dtype(t))), y, s.shape[-1]))),
}
# Losses whose value reads the teacher's distribution (a masked teacher class is meaningful); feature_mse is not a
# distribution loss and is left out of the masking checks.
DISTRIBUTION_LOSSES = [name for name in SCALAR_LOSSES if name != "feature_mse"]


# ------------------------------------------------------------------------------------------------ masked classes
@pytest.mark.parametrize("name", DISTRIBUTION_LOSSES)
def test_masked_teacher_class_gives_finite_value_and_gradient(name):
  s, t, y = batch()
  t[:, 3] = -INF  # no label is 3: a masked non-target class
  t[1, 0] = -INF
  fn = jax.jit(jax.value_and_grad(SCALAR_LOSSES[name]))
  value, grad = fn(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y))
  assert np.isfinite(float(value)), name
  assert np.all(np.isfinite(np.asarray(grad))), name


def test_masked_teacher_kl_and_kd_gradient_are_exact():
  s, t, _ = batch()
  t[:, 3] = -INF
  got = losses.kl_divergence(jnp.asarray(s), jnp.asarray(t), temperature=TAU)
  chex.assert_trees_all_close(got, np_kl(s, t, TAU).astype(np.float32), rtol=1e-5)
  # d/dz_s tau^2 KL = tau (p_s - p_t), p_t = 0 on the masked class (Hinton et al. 2015).
  grad = jax.grad(lambda z: jnp.sum(losses.kd_loss(z, jnp.asarray(t), temperature=TAU)))(jnp.asarray(s))
  want = TAU * (np.exp(np_log_softmax(s / TAU)) - np.exp(np_log_softmax(t / TAU)))
  chex.assert_trees_all_close(grad, want.astype(np.float32), atol=1e-6)


def reduced(a, keep):
  return np.ascontiguousarray(a[:, keep])


@pytest.mark.parametrize("name,fn", [
    ("kl_divergence", lambda s, t, y: losses.kl_divergence(s, t, temperature=TAU)),
    ("cross_entropy", lambda s, t, y: losses.cross_entropy(s, y)),
    ("cross_entropy_smoothed", lambda s, t, y: losses.cross_entropy(s, y, label_smoothing=0.2)),
    ("dkd_tckd", lambda s, t, y: dkd.dkd_terms(s, t, y, temperature=TAU)[0]),
    ("dkd_nckd", lambda s, t, y: dkd.dkd_terms(s, t, y, temperature=TAU)[1]),
])
def test_a_class_masked_on_both_sides_is_the_problem_without_it(name, fn):
  # Masking class 3 in student and teacher is removing it: value and gradient equal the K - 1 class problem's.
  s, t, y = batch(seed=1)
  keep = [0, 1, 2, 4]
  s_masked, t_masked = s.copy(), t.copy()
  s_masked[:, 3] = t_masked[:, 3] = -INF
  y_reduced = np.searchsorted(keep, y).astype(np.int32)
  value, grad = jax.value_and_grad(lambda z: jnp.sum(fn(z, jnp.asarray(t_masked), jnp.asarray(y))))(
      jnp.asarray(s_masked))
  want, want_grad = jax.value_and_grad(lambda z: jnp.sum(fn(z, jnp.asarray(reduced(t, keep)), jnp.asarray(
      y_reduced))))(jnp.asarray(reduced(s, keep)))
  chex.assert_trees_all_close(value, want, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(np.asarray(grad)[:, keep], want_grad, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(grad)[:, 3], 0.0)


def test_student_minus_inf_where_teacher_has_mass_is_an_infinite_kl():
  s, t, _ = batch()
  s[0, 2] = -INF
  got = np.asarray(losses.kl_divergence(jnp.asarray(s), jnp.asarray(t), temperature=1.0))
  assert got[0] == np.inf and np.all(np.isfinite(got[1:]))


# ------------------------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("name", sorted(SCALAR_LOSSES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_inputs_compute_and_return_float32(name, dtype):
  s, t, y = batch()
  out = SCALAR_LOSSES[name](jnp.asarray(s, dtype), jnp.asarray(t, dtype), jnp.asarray(y))
  assert out.dtype == jnp.float32, (name, dtype, out.dtype)
  # Within the input's rounding of the float32 result (bf16 keeps 8 bits: relative 2^-8 on each logit).
  ref = SCALAR_LOSSES[name](jnp.asarray(s), jnp.asarray(t), jnp.asarray(y))
  tol = {jnp.bfloat16: 0.1, jnp.float16: 0.01, jnp.float32: 0.0}[dtype]
  np.testing.assert_allclose(float(out), float(ref), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(SCALAR_LOSSES))
def test_float64_stays_float64_and_gradients_match_finite_differences(name):
  # wls_alpha / ada_alpha / relation_features are stop-gradient in the student or have kinks (max(0, .)): their
  # value is checked; the rest are differentiated in float64.
  s, t, y = batch(seed=2)
  with jax.enable_x64(True):
    s64, t64, y64 = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64), jnp.asarray(y)
    fn = SCALAR_LOSSES[name]
    assert fn(s64, t64, y64).dtype == jnp.float64, name
    if name not in ("wls_alpha", "ada_alpha", "relation_features"):
      check_grads(lambda z: fn(z, t64, y64), (s64,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_feature_functions_keep_float64():
  s, t, y = batch()
  with jax.enable_x64(True):
    s64, t64 = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
    cm = geometry.class_mean_teacher(jax.nn.softmax(t64), jnp.asarray(y), 5)
    assert cm.dtype == jnp.float64
    assert geometry.relation_features(s64, t64, jnp.asarray(y), cm, layout="scalar").dtype == jnp.float64
    assert dist.pearson(s64, t64).dtype == jnp.float64


# --------------------------------------------------------------------------------- float32 precision vs official
def test_float32_precision_is_at_the_official_codes_level():
  pytest.importorskip("torch")
  spec = importlib.util.spec_from_file_location("loss_precision", os.path.join(ROOT, "bench", "loss_precision.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  # offset 0: the usual regime; offset 50: large logits, where forming z - logsumexp(z) without the row maximum
  # lost bits (DKD's gradient was 6.7x the official error there before the fix).
  for offset in (0.0, 50.0):
    for row in module.measure(batches=6, offset=offset):
      for side in ("value", "grad"):
        ours, official = row[f"ours_{side}"], row[f"official_{side}"]
        if np.isfinite(ours):
          assert ours <= 1.6 * official + 1e-8, (offset, row)


# ------------------------------------------------------------------------------------------------------ checks
BAD_CALLS = [
    (lambda s, t, y: losses.kd_loss(s, t, temperature=0.0), "kd_loss: temperature: expected a finite number > 0, got 0.0"),
    (lambda s, t, y: losses.kl_divergence(s, t, temperature=-1), "kl_divergence: temperature: expected a finite number > 0"),
    (lambda s, t, y: losses.cross_entropy(s, y, label_smoothing=2.0), "cross_entropy: label_smoothing: expected values in [0, 1], got 2.0"),
    (lambda s, t, y: losses.fused_kd_ce(s, t, y, 2.0, temperature=1.0), "fused_kd_ce: alpha: expected values in [0, 1], got 2.0"),
    (lambda s, t, y: losses.convex_mix(-0.5, s, t), "convex_mix: alpha: expected values in [0, 1]"),
    (lambda s, t, y: losses.kd_loss(s, t[:, :3], temperature=1.0), "kd_loss: teacher_logits: expected the shape of student_logits (4, 5), got (4, 3)"),
    (lambda s, t, y: losses.cross_entropy(s, y[:3]), "cross_entropy: labels: expected shape (4,)"),
    (lambda s, t, y: losses.cross_entropy(s, y.astype(jnp.float32)), "cross_entropy: labels: expected integer class indices, got dtype float32"),
    (lambda s, t, y: losses.cross_entropy(s[:, :1], y), "cross_entropy: logits: expected logits of shape [..., K] with K >= 2 classes, got shape (4, 1)"),
    (lambda s, t, y: dkd.dkd_terms(s[:, :1], t[:, :1], y, temperature=1.0), "dkd_terms: student_logits: expected logits of shape [..., K] with K >= 2"),
    (lambda s, t, y: dkd.dkd_loss(s, t, y, temperature=1.0, alpha=-1.0, beta=8.0), "dkd_loss: alpha: expected a finite number >= 0"),
    (lambda s, t, y: dkd.warmup_weight(3, steps_per_epoch=0, warmup_epochs=2.0), "warmup_weight: steps_per_epoch: expected an integer >= 1, got 0"),
    (lambda s, t, y: dkd.warmup_weight(3, steps_per_epoch=5, warmup_epochs=-1.0), "warmup_weight: warmup_epochs: expected a finite number >= 0"),
    (lambda s, t, y: dist.dist_loss(s, t, y, temperature=float("nan")), "dist_loss: temperature: expected a finite number > 0, got nan"),
    (lambda s, t, y: simkd.feature_mse(s, t[:2]), "feature_mse: target: expected the shape of projected (4, 5), got (2, 5)"),
    (lambda s, t, y: reweight.anl_alpha(jnp.array(3), 0), "anl_alpha: total_steps: expected an integer >= 1, got 0"),
]


@pytest.mark.parametrize("call,message", BAD_CALLS, ids=[m.split(":")[0] + ":" + m.split(":")[1] for _, m in BAD_CALLS])
def test_bad_static_arguments_are_one_line_value_errors(call, message):
  s, t, y = (jnp.asarray(a) for a in batch())
  with pytest.raises(ValueError) as info:
    jax.jit(call)(s, t, y) if "warmup" not in message and "anl" not in message else call(s, t, y)
  assert str(info.value).startswith(message), str(info.value)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad_label", [-1, 5])
def test_out_of_range_labels_give_nan_never_a_finite_number(bad_label):
  s, t, y = batch()
  y[1] = bad_label
  s, t, y = jnp.asarray(s), jnp.asarray(t), jnp.asarray(y)
  for values in (losses.cross_entropy(s, y), losses.cross_entropy(s, y, label_smoothing=0.1),
                 *dkd.dkd_terms(s, t, y, temperature=TAU), reweight.ada_alpha(t, y),
                 losses.fused_kd_ce(s, t, y, 0.5, temperature=TAU)):
    values = np.asarray(values)
    assert np.isnan(values[1]) and np.all(np.isfinite(np.delete(values, 1)))


def test_validate_checks_values_eagerly_and_under_checkify():
  s, t, y = (jnp.asarray(a) for a in batch())
  bad = y.at[2].set(5)
  assert np.all(np.isfinite(np.asarray(losses.cross_entropy(s, y, validate=True))))
  with pytest.raises(checkify.JaxRuntimeError, match=r"cross_entropy: labels: expected class indices in \[0, 5\), "
                     r"got values in \[0, 5\]"):
    losses.cross_entropy(s, bad, validate=True)
  checked = checkify.checkify(jax.jit(
      lambda s, t, y, a: losses.fused_kd_ce(s, t, y, a, temperature=TAU, validate=True)))
  err, _ = checked(s, t, y, jnp.full((4,), 0.5))
  err.throw()  # nothing wrong
  err, _ = checked(s, t, y, jnp.array([0.5, 1.5, 0.0, 1.0]))
  assert "fused_kd_ce: alpha: expected values in [0, 1], got values in [0.0, 1.5]" in err.get()
  err, _ = checkify.checkify(jax.jit(lambda s, t, y: dkd.dkd_terms(s, t, y, temperature=TAU, validate=True)))(
      s, t, bad)
  assert "dkd_terms: labels: expected class indices in [0, 5)" in err.get()
  # validate=False (the default) compiles no check: the jaxpr has no check primitive.
  assert "check" not in str(jax.make_jaxpr(lambda s, y: losses.cross_entropy(s, y))(s, y))


def test_dist_warns_once_for_a_batch_of_one():
  s, t, y = batch(n=1)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _, parts = dist.dist_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), temperature=TAU)
  assert [str(w.message) for w in caught] == [
      "dist_loss: a batch of 1 sample: the intra-class relation is constant (intra = 1, no gradient)"]
  assert float(parts["intra"]) == 1.0


def test_vmap_over_rows_equals_the_batched_call():
  s, t, y = (jnp.asarray(a) for a in batch())
  chex.assert_trees_all_close(jax.vmap(losses.cross_entropy)(s, y), losses.cross_entropy(s, y))
  chex.assert_trees_all_close(jax.vmap(lambda a, b: losses.kd_loss(a, b, temperature=TAU))(s, t),
                              losses.kd_loss(s, t, temperature=TAU))
  chex.assert_trees_all_close(jax.vmap(lambda a, b, c: dkd.dkd_terms(a, b, c, temperature=TAU))(s, t, y),
                              dkd.dkd_terms(s, t, y, temperature=TAU))


# ------------------------------------------------------------------------------------------------- public API
def public_modules():
  names = ["tgeo_jax"] + [m.name for m in pkgutil.walk_packages(tgeo_jax.__path__, "tgeo_jax.")
                          if not m.name.rsplit(".", 1)[-1].startswith("_")]
  return sorted(names)


@pytest.mark.parametrize("module_name", public_modules())
def test_every_public_module_declares_its_api(module_name):
  module = importlib.import_module(module_name)
  assert hasattr(module, "__all__"), f"{module_name} has no __all__"
  for name in module.__all__:
    assert hasattr(module, name), f"{module_name}.__all__ names {name!r}, which it does not define"


def test_import_tgeo_jax_exposes_the_loss_modules():
  import subprocess
  import sys
  code = ("import tgeo_jax; print(tgeo_jax.losses.kd_loss.__name__, tgeo_jax.geometry.relation_features.__name__, "
          "tgeo_jax.argchecks.compute_dtype.__name__, tgeo_jax.methods.dkd.dkd_loss.__name__)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.split() == ["kd_loss", "relation_features", "compute_dtype", "dkd_loss"]


def test_edges_found_in_review():
  """Masking every class but the true one (DKD's non-target set empty), a masked label under label smoothing,
  numpy float64 hyperparameters under x64, a huge int64 label, a bool temperature, an empty batch with validate."""
  z = jnp.array([[1.0, -INF, -INF]])
  value, grad = jax.value_and_grad(lambda a: dkd.dkd_loss(a, jnp.array([[2.0, -INF, -INF]]), jnp.array([0]),
                                                          temperature=4.0, alpha=1.0, beta=8.0)[0])(z)
  assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)
  assert float(losses.cross_entropy(jnp.array([[1.0, 0.5, -INF]]), jnp.array([2]), label_smoothing=0.1)[0]) == np.inf
  with pytest.raises(ValueError, match="^kd_loss: temperature: expected a finite number > 0, got False$"):
    losses.kd_loss(z, z, temperature=False)
  assert losses.cross_entropy(jnp.zeros((0, 3)), jnp.zeros((0,), jnp.int32), validate=True).shape == (0,)
  with jax.enable_x64(True):
    s = jnp.ones((2, 3), jnp.float32)
    assert losses.kd_loss(s, 2 * s, temperature=np.float64(4.0)).dtype == jnp.float32
    assert losses.cross_entropy(s, jnp.array([0, 1]), label_smoothing=np.float64(0.1)).dtype == jnp.float32
    assert losses.fused_kd_ce(s, s, jnp.array([0, 1]), np.array([0.5, 0.5]), temperature=2.0).dtype == jnp.float32
    assert np.isnan(float(losses.cross_entropy(jnp.zeros((1, 3)), jnp.array([2**32 + 1], jnp.int64))[0]))
