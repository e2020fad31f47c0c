"""tgeo_jax.models.conv: lax's convolution, value and derivatives of every order, with canonical-layout gradients.

* float64, jitted, several shapes/strides/paddings/dilations: value, grad, jvp, forward-over-reverse and
  reverse-over-reverse Hessian-vector products, forward-over-forward, jax.hessian, vmap over either or both
  operands, all against ``lax.conv_general_dilated``;
* the gradient convolutions are JAX's own (same parameters: the GPU/TPU programs are unchanged, compared as
  lowered StableHLO text for CUDA, ROCm and TPU);
* the point of it: a compiled loop over a gradient has no convolution on XLA:CPU's slow path
  (``outer_dimension_partitions`` in the HLO), where lax's has;
* the models: same parameter trees and numbers as with lax's convolution; grouped convolutions fall back to lax.
"""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from tgeo_jax import models
from tgeo_jax.models import conv

NHWC = ("NHWC", "HWIO", "NHWC")

# (lhs shape NHWC, kernel HW, C_out, strides, padding, lhs_dilation, rhs_dilation, feature groups)
CASES = [
    ((2, 9, 8, 3), (3, 3), 4, (1, 1), "SAME", None, None, 1),
    ((2, 9, 8, 3), (3, 3), 4, (2, 2), ((1, 1), (1, 1)), None, None, 1),
    ((3, 8, 8, 2), (1, 1), 5, (2, 2), ((0, 0), (0, 0)), None, None, 1),
    ((2, 10, 7, 3), (3, 2), 4, (3, 2), ((2, 0), (1, 2)), None, None, 1),
    ((2, 9, 9, 3), (3, 3), 2, (1, 2), "VALID", None, (2, 1), 1),
    ((2, 6, 5, 2), (2, 3), 3, (1, 1), ((1, 1), (0, 2)), (2, 1), None, 1),
    # MobileNetV2's depthwise 3x3 (stride 2) and ShuffleNet's grouped 1x1
    ((2, 9, 8, 4), (3, 3), 4, (2, 2), ((1, 1), (1, 1)), None, None, 4),
    ((2, 6, 6, 4), (1, 1), 6, (1, 1), ((0, 0), (0, 0)), None, None, 2),
]


@contextlib.contextmanager
def canonical(enabled: bool):
  saved = conv.ENABLED
  conv.ENABLED = enabled
  try:
    yield
  finally:
    conv.ENABLED = saved


def _operands(case, seed=0):
  shape, kernel, c_out, *_, groups = case
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape))
  w = jnp.asarray(rng.normal(size=(*kernel, shape[-1] // groups, c_out)) / np.sqrt(np.prod(kernel) * shape[-1]))
  return x, w


def _loss(fn, case):
  _, _, _, strides, padding, lhs_dilation, rhs_dilation, groups = case

  def loss(x, w):
    y = fn(x, w, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=NHWC,
           feature_group_count=groups)
    # Non-polynomial, so that every derivative order is non-trivial.
    return jnp.sum(jnp.sin(y) * y)

  return loss


def _derivatives(loss, x, w):
  """Every derivative the bilevel code takes, as one pytree of arrays."""
  grad = jax.grad(loss, (0, 1))
  dx, dw = x[::-1] * 0.5, w[..., ::-1] * 0.5
  out = {
      "value": loss(x, w),
      "grad": grad(x, w),
      "jvp": jax.jvp(loss, (x, w), (dx, dw))[1],
      # forward over reverse: the HVPs of bilevel.implicit (jax.linearize of a gradient)
      "hvp_fwd_rev": jax.jvp(grad, (x, w), (dx, dw))[1],
      # reverse over reverse: grad of a function of a gradient (bilevel.one_step_autodiff, unroll's reverse sweep)
      "grad_of_grad": jax.grad(lambda x, w: sum(jnp.sum(g ** 2) for g in grad(x, w)), (0, 1))(x, w),
      # forward over forward
      "jvp_of_jvp": jax.jvp(lambda x, w: jax.jvp(loss, (x, w), (dx, dw))[1], (x, w), (dw.sum() * x, w))[1],
      "hessian_w": jax.hessian(loss, 1)(x, w),
      # per-example gradients: vmap over the lhs; an ensemble of kernels: over the rhs; both
      "vmap_lhs": jax.vmap(grad, (0, None))(jnp.stack([x, 2 * x]), w),
      "vmap_rhs": jax.vmap(grad, (None, 0))(x, jnp.stack([w, -w])),
      "vmap_both": jax.vmap(grad, (0, 0))(jnp.stack([x, 2 * x]), jnp.stack([w, -w])),
  }
  return out


@pytest.mark.parametrize("case", CASES, ids=[f"s{c[3]}-p{c[4]}-ld{c[5]}-rd{c[6]}-g{c[7]}" for c in CASES])
def test_value_and_derivatives_equal_lax_in_float64(case):
  with jax.enable_x64(True):
    x, w = _operands(case)
    ours = jax.jit(lambda x, w: _derivatives(_loss(conv.conv_general_dilated, case), x, w))(x, w)
    ref = jax.jit(lambda x, w: _derivatives(_loss(lax.conv_general_dilated, case), x, w))(x, w)
    for name in ref:
      for a, b in zip(jax.tree.leaves(ours[name]), jax.tree.leaves(ref[name])):
        assert a.dtype == b.dtype == jnp.float64 and a.shape == b.shape, name
        scale = max(float(jnp.max(jnp.abs(b))), 1e-300)
        # Same convolutions, transposes move data: equal to float64 rounding of the summation order.
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-12 * scale, (name, float(jnp.max(jnp.abs(a - b))), scale)


@pytest.mark.parametrize("case", [CASES[3], CASES[6]], ids=["strided", "depthwise"])
def test_first_order_gradient_convolutions_are_jax_own(case):
  # The forward, input-gradient and filter-gradient convolutions lower to exactly the convolutions JAX's rules
  # give lax's: on GPU/TPU (lowered as lax's) a first-order program is the same; only the CPU lowering adds the
  # layout transposes.
  x, w = _operands(case)

  def conv_eqns(fn):
    jaxpr = jax.make_jaxpr(jax.grad(_loss(fn, case), (0, 1)))(x, w)
    return [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("canonical_conv", "conv_general_dilated")]

  ours, ref = conv_eqns(conv.conv_general_dilated), conv_eqns(lax.conv_general_dilated)
  assert [e.primitive for e in ours] == [conv.canonical_conv_p] * 3
  assert sorted(e.params["role"] for e in ours) == sorted([conv.FORWARD, conv.LHS_GRAD, conv.RHS_GRAD])
  lax_forms = [conv._lax_form(e.invars[0].aval.shape, e.invars[1].aval.shape, **e.params)[0] for e in ours]
  assert lax_forms == [e.params for e in ref]


def _model_and_loss(name):
  """A zoo model's parameters and its training-mode cross-entropy on 4 fixed random inputs, ``params -> scalar``."""
  shape = (28, 28, 1) if name.startswith("cnn") else (32, 32, 3)
  x = jax.random.normal(jax.random.PRNGKey(3), (4, *shape))
  labels = jnp.arange(4) % 10
  graphdef, params, rest = models.split(models.create(name, num_classes=10, input_shape=shape))

  def loss(p):
    logits, _ = models.apply(graphdef, p, rest, x, train=True)
    return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

  return params, loss


@pytest.mark.parametrize("name", ["cnn_small", "resnet8"])
def test_gpu_and_tpu_training_programs_are_lax_own(name):
  # The whole model's first-order training gradient, lowered for CUDA, ROCm and TPU (no such device needed):
  # the same StableHLO text as with lax's convolution, so GPU/TPU runs are not slowed (nor changed) by the CPU
  # lowering. For CPU the texts differ (the layout transposes): the comparison can fail.
  texts = {}
  for enabled in (True, False):
    with canonical(enabled):
      params, loss = _model_and_loss(name)
      traced = jax.jit(jax.value_and_grad(loss)).trace(params)  # a fresh jit: ENABLED acts at trace time
      texts[enabled] = {platforms: traced.lower(lowering_platforms=platforms).as_text(debug_info=False)
                        for platforms in (("cuda", "rocm", "tpu"), ("cpu",))}
  assert texts[True][("cuda", "rocm", "tpu")] == texts[False][("cuda", "rocm", "tpu")]
  assert texts[True][("cpu",)] != texts[False][("cpu",)]


def _optimized_hlo(fn, *args):
  # A fresh function object each time: jax.jit caches traces by function, and conv.ENABLED acts at trace time.
  return jax.jit(lambda *a: fn(*a)).lower(*args).compile().as_text()


def _slow_convolutions(hlo: str) -> int:
  # outer_dimension_partitions is XLA:CPU's parallel-loop annotation: other ops (fusions) carry it too.
  return sum("convolution(" in line and "outer_dimension_partitions" in line for line in hlo.splitlines())


def test_a_loop_of_gradients_keeps_every_convolution_on_the_fast_path():
  # A scan whose body takes a gradient and a forward-over-reverse HVP of a three-layer CNN (a strided and a
  # depthwise layer), in float32 (the fast kernels' type). XLA:CPU marks a convolution left on its generic emitter with outer_dimension_partitions;
  # lax's gradients inside the loop have it (this is the bug), ours never.
  x = jnp.ones((4, 12, 12, 3), jnp.float32)
  w1 = jnp.full((3, 3, 3, 8), 0.1, jnp.float32)
  w2 = jnp.full((3, 3, 8, 8), 0.1, jnp.float32)
  w3 = jnp.full((3, 3, 1, 8), 0.1, jnp.float32)

  def loss(ws):
    h = jnp.tanh(conv.conv_general_dilated(x, ws[0], (1, 1), "SAME", dimension_numbers=NHWC))
    h = jnp.tanh(conv.conv_general_dilated(h, ws[1], (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC))
    h = conv.conv_general_dilated(h, ws[2], (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=8)
    return jnp.sum(jnp.tanh(h))

  def loop(ws):
    def body(ws, _):
      g = jax.grad(loss)(ws)
      hv = jax.jvp(jax.grad(loss), (ws,), (g,))[1]
      return jax.tree.map(lambda a, b, c: a - 0.01 * b - 0.001 * c, ws, g, hv), None

    return jax.lax.scan(body, ws, None, length=3)[0]

  with canonical(False):
    slow = _slow_convolutions(_optimized_hlo(loop, (w1, w2, w3)))
  with canonical(True):
    hlo = _optimized_hlo(loop, (w1, w2, w3))
  assert slow > 0, "lax's gradients inside a loop no longer leave XLA:CPU's fast path: is conv.py still needed?"
  assert " while(" in hlo and hlo.count("convolution(") >= 12
  assert _slow_convolutions(hlo) == 0


def test_batch_groups_and_precision_fall_back_to_lax():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6, 2))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 4))
  for kw in (dict(batch_group_count=2), dict(precision=lax.Precision.HIGHEST)):
    kw = dict(kw, dimension_numbers=NHWC)
    jaxpr = jax.make_jaxpr(lambda x, w, kw=kw: conv.conv_general_dilated(x, w, (1, 1), "SAME", **kw))(x, w)
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns] == ["conv_general_dilated"]
    chex.assert_trees_all_equal(conv.conv_general_dilated(x, w, (1, 1), "SAME", **kw),
                                lax.conv_general_dilated(x, w, (1, 1), "SAME", **kw))
  assert conv.supported(feature_group_count=4) and not conv.supported(batch_group_count=2)


def test_nnx_conv_accepts_it_with_the_same_parameters_and_numbers():
  layer = nnx.Conv(3, 5, (3, 3), strides=2, conv_general_dilated=conv.conv_general_dilated, rngs=nnx.Rngs(0))
  plain = nnx.Conv(3, 5, (3, 3), strides=2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 9, 3))
  chex.assert_trees_all_equal(nnx.state(layer, nnx.Param), nnx.state(plain, nnx.Param))
  chex.assert_trees_all_equal(jax.jit(lambda x: layer(x))(x), jax.jit(lambda x: plain(x))(x))


# Grouped and depthwise layers are checked on single convolutions above (CASES); a whole ShuffleNet here would add
# half a minute of compiling to the suite.
@pytest.mark.parametrize("name,hvp", [("cnn_small", True), ("resnet8", True)])
def test_models_same_parameters_and_numbers_as_with_lax(name, hvp):
  out = {}
  for enabled in (True, False):
    with canonical(enabled):
      params, loss = _model_and_loss(name)
      grads = jax.jit(jax.grad(loss))(params)
      hv = jax.jit(lambda p, t, loss=loss: jax.jvp(jax.grad(loss), (p,), (t,))[1])(params, grads) if hvp else None
      out[enabled] = (params, loss(params), grads, hv)
  chex.assert_trees_all_equal_structs(out[True][0], out[False][0])
  chex.assert_trees_all_equal(out[True][0], out[False][0])  # same initialisation: checkpoints are unchanged
  chex.assert_trees_all_close(out[True][1:], out[False][1:], rtol=1e-5, atol=1e-6)
