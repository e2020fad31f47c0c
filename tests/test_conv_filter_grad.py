"""bench/filter_grad_matmuls.py (a measured prototype, not used by the models: docs/benchmarks.md) against JAX's own
convolution gradients, in float64."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import filter_grad_matmuls as conv_filter_grad

DN = ("NHWC", "HWIO", "NHWC")
# (N, H, W, C, O, kh, kw, strides, padding): the zoo's layers (3x3 stride 1/2 padding 1, 1x1 stride 1/2) and odd
# ones (odd sizes under stride 2, asymmetric and string padding, a crop, a non-square kernel).
CASES = [
    (2, 8, 8, 3, 4, 3, 3, (1, 1), ((1, 1), (1, 1))),
    (2, 8, 8, 3, 5, 3, 3, (2, 2), ((1, 1), (1, 1))),
    (2, 7, 9, 3, 4, 3, 3, (2, 2), ((1, 1), (1, 1))),
    (2, 8, 8, 4, 6, 1, 1, (2, 2), ((0, 0), (0, 0))),
    (2, 6, 6, 4, 3, 1, 1, (1, 1), ((0, 0), (0, 0))),
    (1, 9, 7, 2, 3, 5, 3, (2, 1), "SAME"),
    (1, 9, 7, 2, 3, 3, 2, (1, 2), "VALID"),
    (2, 8, 8, 2, 3, 3, 3, (1, 1), ((2, 0), (0, 1))),
    (2, 8, 8, 2, 3, 3, 3, (2, 2), ((-1, 1), (1, -1))),
]


def _conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def _operands(case, seed=0):
  n, h, w, c, o, kh, kw, strides, padding = case
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, h, w, c)))
  wt = jnp.asarray(rng.standard_normal((kh, kw, c, o)))
  y = jax.eval_shape(lambda: _conv(x, wt, strides, padding))
  dy = jnp.asarray(rng.standard_normal(y.shape))
  return x, wt, dy, strides, padding


@pytest.mark.parametrize("case", CASES)
def test_filter_grad_equals_jax(case):
  with jax.enable_x64(True):
    x, w, dy, strides, padding = _operands(case)
    ref = jax.vjp(lambda w: _conv(x, w, strides, padding), w)[1](dy)[0]
    got = conv_filter_grad.filter_grad(x, dy, w.shape[:2], strides, padding)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES[:5])
def test_drop_in_value_and_gradients(case):
  with jax.enable_x64(True):
    x, w, dy, strides, padding = _operands(case, seed=1)

    def loss(conv):
      return lambda x, w: jnp.sum(dy * conv(x, w, strides, padding, dimension_numbers=DN))

    ref_val, ref = jax.value_and_grad(loss(lax.conv_general_dilated), argnums=(0, 1))(x, w)
    val, got = jax.jit(jax.value_and_grad(loss(conv_filter_grad.conv_general_dilated), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(val, ref_val, rtol=1e-12)
    for a, b in zip(got, ref):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [CASES[1], CASES[5]])
def test_filter_grad_second_order(case):
  # filter_grad is plain JAX ops: its own derivatives (what a primitive's lowering would inherit) equal those of
  # JAX's filter-gradient convolution, in x and in dy.
  with jax.enable_x64(True):
    x, w, dy, strides, padding = _operands(case, seed=2)
    v = jnp.asarray(np.random.default_rng(3).standard_normal(w.shape))

    def ref(x, dy):
      return jnp.sum(v * jax.vjp(lambda w: _conv(x, w, strides, padding), w)[1](dy)[0])

    def ours(x, dy):
      return jnp.sum(v * conv_filter_grad.filter_grad(x, dy, w.shape[:2], strides, padding))

    for a, b in zip(jax.grad(ours, argnums=(0, 1))(x, dy), jax.grad(ref, argnums=(0, 1))(x, dy)):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_unsupported_arguments_fall_back_to_lax():
  x, w = jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 2, 4))
  assert not conv_filter_grad.supported(x, w, dimension_numbers=DN, feature_group_count=2)
  y = conv_filter_grad.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2)
  np.testing.assert_allclose(y, lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                                         feature_group_count=2))


def test_nnx_conv_uses_it():
  conv = nnx.Conv(3, 4, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False,
                  conv_general_dilated=conv_filter_grad.conv_general_dilated, rngs=nnx.Rngs(0))
  ref = nnx.Conv(3, 4, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 8, 8, 3)), jnp.float32)

  def grads(module):
    return nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(module)

  np.testing.assert_allclose(grads(conv)["kernel"].get_value(), grads(ref)["kernel"].get_value(), rtol=1e-5, atol=1e-5)
