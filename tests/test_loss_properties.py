"""Property tests across all losses (hypothesis draws shapes, scales, seeds, shifts, permutations and masks).

Bounded: a few shapes (N = 1 and K = 2 / 1000 among them) so each jitted function compiles a handful of times,
and ``max_examples`` per property; the whole file runs in seconds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tgeo_jax import argchecks, geometry, losses
from tgeo_jax.methods import dist, dkd, kd, reweight

SHAPES = [(1, 2), (4, 2), (3, 7), (2, 1000)]
# A power of two, and logits on a 2^-10 grid: adding an integer to a row and dividing by tau are then exact in
# float32, so the invariance tests see only the losses' own arithmetic.
TAU = 4.0

# Per-sample functions of (student logits, teacher logits, labels) -> [N] (a tuple of them for DKD).
PER_SAMPLE = {
    "cross_entropy": lambda s, t, y: losses.cross_entropy(s, y),
    "cross_entropy_smoothed": lambda s, t, y: losses.cross_entropy(s, y, label_smoothing=0.1),
    "kl_divergence": lambda s, t, y: losses.kl_divergence(s, t, temperature=TAU),
    "kd_loss": lambda s, t, y: losses.kd_loss(s, t, temperature=TAU),
    "fused_kd_ce": lambda s, t, y: losses.fused_kd_ce(s, t, y, 0.7, temperature=TAU),
    "dkd_terms": lambda s, t, y: jnp.stack(dkd.dkd_terms(s, t, y, temperature=TAU), axis=-1),
    "ada_alpha": lambda s, t, y: reweight.ada_alpha(t, y),
    "wls_alpha": lambda s, t, y: reweight.wls_alpha(s, t, y),
    "scalar_features": lambda s, t, y: geometry.relation_features(
        s, t, y, geometry.class_mean_teacher(jax.nn.softmax(t.astype(argchecks.compute_dtype(t))), y, s.shape[-1]), layout="scalar"),
}
# Batch functions (a mean, or correlations over the batch).
BATCH = {
    "hinton_loss": lambda s, t, y: kd.hinton_loss(s, t, y, temperature=TAU, w_ce=0.1, w_kd=0.9)[0],
    "dkd_loss": lambda s, t, y: dkd.dkd_loss(s, t, y, temperature=TAU, alpha=1.0, beta=8.0)[0],
    "dist_loss": lambda s, t, y: dist.dist_loss(s, t, y, temperature=TAU)[0],
}
ALL = {**PER_SAMPLE, **BATCH}


@functools.cache
def jitted(name):
  return jax.jit(ALL[name])


def draw_batch(seed, shape, scale):
  rng = np.random.default_rng(seed)
  n, k = shape
  s = (np.round(rng.normal(size=shape) * scale * 1024) / 1024).astype(np.float32)
  t = (np.round(rng.normal(size=shape) * scale * 1024) / 1024).astype(np.float32)
  y = rng.integers(0, k, size=n).astype(np.int32)
  return s, t, y


@functools.cache
def value_and_grad(name):
  return jax.jit(jax.value_and_grad(lambda s, t, y: jnp.sum(ALL[name](s, t, y))))


batches = st.tuples(st.integers(0, 2**16), st.sampled_from(SHAPES), st.sampled_from([0.1, 1.0, 4.0]))
PROPERTY = settings(max_examples=10, deadline=None, derandomize=True)


def close(a, b, rtol=2e-5, atol=2e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


@PROPERTY
@given(batches, st.integers(-100, 100), st.sampled_from(sorted(ALL)))
def test_adding_a_constant_to_each_row_changes_nothing(batch, shift, name):
  s, t, y = draw_batch(*batch)
  rng = np.random.default_rng(batch[0] + 1)
  row_shift = (shift + rng.integers(-3, 4, size=(s.shape[0], 1))).astype(np.float32)
  close(jitted(name)(s + row_shift, t - row_shift, y), jitted(name)(s, t, y), rtol=1e-5, atol=1e-6)


@PROPERTY
@given(batches, st.sampled_from(sorted(ALL)))
def test_permuting_classes_consistently_changes_nothing(batch, name):
  s, t, y = draw_batch(*batch)
  perm = np.random.default_rng(batch[0] + 2).permutation(s.shape[1])
  inverse = np.argsort(perm)
  got = jitted(name)(s[:, perm], t[:, perm], inverse[y].astype(np.int32))
  close(got, jitted(name)(s, t, y))


@PROPERTY
@given(batches)
def test_kl_is_nonnegative_and_zero_only_for_equal_distributions(batch):
  s, t, _ = draw_batch(*batch)
  kl = np.asarray(losses.kl_divergence(s, t, temperature=1.0))
  assert np.all(kl >= -1e-6)
  close(losses.kl_divergence(s, s + 3.0, temperature=1.0), np.zeros(s.shape[0]), atol=1e-6)
  p_s, p_t = jax.nn.softmax(s), jax.nn.softmax(t)
  differ = np.asarray(jnp.max(jnp.abs(p_s - p_t), axis=-1)) > 1e-2
  assert np.all(kl[differ] > 0)


@PROPERTY
@given(batches, st.sampled_from(sorted(set(PER_SAMPLE) - {"scalar_features"})))  # T̄ is a batch statistic here
def test_per_sample_values_do_not_depend_on_the_rest_of_the_batch(batch, name):
  s, t, y = draw_batch(*batch)
  whole = np.asarray(jitted(name)(s, t, y))
  rows = np.stack([np.asarray(ALL[name](s[i:i + 1], t[i:i + 1], y[i:i + 1]))[0] for i in range(s.shape[0])])
  close(whole, rows)


@PROPERTY
@given(batches)
def test_batch_losses_are_means_of_their_per_sample_terms(batch):
  s, t, y = draw_batch(*batch)
  ce, soft = losses.cross_entropy(s, y), losses.kd_loss(s, t, temperature=TAU)
  close(BATCH["hinton_loss"](s, t, y), jnp.mean(0.1 * ce + 0.9 * soft))
  tckd, nckd = dkd.dkd_terms(s, t, y, temperature=TAU)
  close(BATCH["dkd_loss"](s, t, y), jnp.mean(ce) + jnp.mean(tckd) + 8.0 * jnp.mean(nckd))


@PROPERTY
@given(batches, st.sampled_from(sorted(ALL)), st.sampled_from([jnp.bfloat16, jnp.float16]))
def test_low_precision_inputs_are_within_their_rounding_of_float32(batch, name, dtype):
  s, t, y = draw_batch(*batch)
  # Compare against float32 on the *rounded* inputs: what remains is the computation's own error (float32).
  s_low, t_low = jnp.asarray(s, dtype), jnp.asarray(t, dtype)
  got = ALL[name](s_low, t_low, y)
  assert got.dtype == jnp.float32
  close(got, ALL[name](s_low.astype(jnp.float32), t_low.astype(jnp.float32), y), rtol=1e-5, atol=1e-5)


@PROPERTY
@given(batches, st.sampled_from(sorted(ALL)))
def test_masked_teacher_classes_keep_every_loss_finite(batch, name):
  s, t, y = draw_batch(*batch)
  n, k = s.shape
  if k < 3:
    t[np.arange(n), (y + 1) % k] = -np.inf  # K = 2: mask the other class
  else:
    t[:, np.random.default_rng(batch[0]).choice(k, size=k // 3 or 1, replace=False)] = -np.inf
    t[np.arange(n), y] = 1.0  # keep the true class unmasked
  value, grad = value_and_grad(name)(jnp.asarray(s), t, y)
  assert np.all(np.isfinite(np.asarray(value))) and np.all(np.isfinite(np.asarray(grad))), name
