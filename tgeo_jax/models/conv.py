"""Convolutions whose gradients stay on XLA:CPU's fast kernels inside loops.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated`` (same signature, same value, same
derivatives of every order), passed to flax's ``nnx.Conv(..., conv_general_dilated=conv_general_dilated)`` by the
model zoo.

Why. XLA:CPU rewrites a convolution into the layout of its fast (Eigen) kernels -- input ``[N, spatial..., C]``,
kernel ``[spatial..., I, O]``, output ``[N, spatial..., C]`` -- in its ``ConvCanonicalization`` pass, which visits
only the module's entry computation. The convolutions that JAX's autodiff writes for the input and filter
gradients have other dimension numbers (the filter gradient treats the batch as the feature axis); inside a
``while`` body (``lax.scan``, ``fori_loop``, ``while_loop``: the unroll window, the Neumann series, CG) they are
left as they are and run on XLA's generic loop emitter, tens of times slower than their FLOPs. Compiled, such a
convolution carries ``outer_dimension_partitions`` in the HLO text.

How. The convolution is bound as our own primitive ``canonical_conv_p`` whose parameters are exactly
``lax.conv_general_dilated_p``'s:

* abstract evaluation (shapes, dtypes, shardings, shard_map's varying axes) is lax's;
* derivatives: the same bilinear JVP and the same transpose rules as JAX's (ported from
  ``jax/_src/lax/convolution.py``, jax 0.10.2, for ``feature_group_count = batch_group_count = 1``), except that
  the convolutions they emit are ``canonical_conv_p`` again, so gradients of gradients, Hessian-vector products
  and forward mode over any of them stay on this primitive, to any order;
* batching (``jax.vmap``): lax's rule, folding the mapped axis into the batch (lhs mapped) or the output-feature
  axis (rhs mapped); both mapped needs a grouped convolution and falls back to lax's;
* lowering on CPU: transposes to the canonical layout, the convolution in it, a transpose back -- what
  ``ConvCanonicalization`` does, written into the program so that XLA sees a canonical convolution wherever it
  sits. For the forward convolution of an NHWC/HWIO layer every transpose is the identity and is omitted. On other
  platforms the lowering is lax's own, so GPU/TPU programs are unchanged.

Exactly lax's arithmetic: the same convolutions, with the same padding, strides and dilations; the explicit
transposes move data, they round nothing. Grouped convolutions (``feature_group_count`` or ``batch_group_count``
> 1: MobileNetV2's and ShuffleNet's depthwise layers), an explicit ``precision``, ``preferred_element_type`` or
``out_sharding``, and string padding with an ``lhs_dilation`` go to ``lax.conv_general_dilated`` unchanged (their
gradients inside loops keep the slow path).

Set ``ENABLED = False`` (read at trace time) to trace ``lax.conv_general_dilated`` instead, for A/B measurements
(``bench/loop_unroll.py``).
"""

from __future__ import annotations

import numpy as np

import jax
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["ENABLED", "canonical_conv_p", "conv_general_dilated", "supported"]

# Read at trace time by ``conv_general_dilated``: False traces plain ``lax.conv_general_dilated``.
ENABLED = True


def _params(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers):
  # lax.conv_general_dilated's own normalisation, for the cases routed here (no groups, no precision, no
  # preferred_element_type, no out_sharding), so that the bound parameters are the ones lax would bind.
  dnums = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  n = lhs.ndim - 2
  lhs_dilation = (1,) * n if lhs_dilation is None else tuple(int(d) for d in lhs_dilation)
  rhs_dilation = (1,) * n if rhs_dilation is None else tuple(int(d) for d in rhs_dilation)
  if isinstance(padding, str):
    lhs_perm, rhs_perm, _ = dnums
    window = [(k - 1) * r + 1 if k else 0 for k, r in zip(np.take(rhs.shape, rhs_perm)[2:], rhs_dilation)]
    padding = lax.padtype_to_pads(np.take(lhs.shape, lhs_perm)[2:], window, window_strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return dict(window_strides=tuple(int(s) for s in window_strides), padding=padding, lhs_dilation=lhs_dilation,
              rhs_dilation=rhs_dilation, dimension_numbers=dnums, feature_group_count=1, batch_group_count=1,
              precision=None, preferred_element_type=None, out_sharding=None)


def supported(lhs_dilation=None, padding="VALID", feature_group_count: int = 1, batch_group_count: int = 1,
              precision=None, preferred_element_type=None, out_sharding=None) -> bool:
  """Whether ``conv_general_dilated`` binds ``canonical_conv_p`` for these arguments (else lax's convolution)."""
  string_padding_with_lhs_dilation = (isinstance(padding, str) and lhs_dilation is not None
                                      and any(d != 1 for d in lhs_dilation))
  return (feature_group_count == 1 and batch_group_count == 1 and precision is None
          and preferred_element_type is None and out_sharding is None and not string_padding_with_lhs_dilation)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, out_sharding=None) -> jax.Array:
  """``jax.lax.conv_general_dilated`` with gradients in XLA:CPU's fast layout (module docstring).

  Math: ``out[n, o, y] = sum_{i, k} lhs_pad[n, i, s * y + r * k] * rhs[o, i, k]`` per spatial dimension (``s``
  stride, ``r`` rhs dilation, ``lhs_pad`` the lhs dilated by ``lhs_dilation`` and zero-padded by ``padding``), in
  the layout ``dimension_numbers`` names; identical to lax's, value and derivatives.

  Shapes: as lax's; for flax's ``nnx.Conv`` ``lhs [N, H, W, C_in]``, ``rhs [KH, KW, C_in, C_out]`` ->
  ``[N, H', W', C_out]`` with ``dimension_numbers = ('NHWC', 'HWIO', 'NHWC')``.

  Example::

      conv = nnx.Conv(3, 16, (3, 3), conv_general_dilated=conv_general_dilated, rngs=nnx.Rngs(0))
      y = conv(jnp.ones((8, 32, 32, 3)))       # [8, 32, 32, 16], equal to the default nnx.Conv's

  Arguments outside ``supported`` (groups, precision, preferred_element_type, out_sharding) are passed to
  ``lax.conv_general_dilated`` unchanged.
  """
  if not ENABLED or not supported(lhs_dilation, padding, feature_group_count, batch_group_count, precision,
                                  preferred_element_type, out_sharding):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                    precision=precision, preferred_element_type=preferred_element_type,
                                    out_sharding=out_sharding)
  lhs, rhs = jax.numpy.asarray(lhs), jax.numpy.asarray(rhs)
  return canonical_conv_p.bind(lhs, rhs, **_params(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                                   dimension_numbers))


# ------------------------------------------------------------------------------------------------- the primitive

canonical_conv_p = Primitive("canonical_conv")


def _lax_conv(lhs, rhs, **params):
  return lax.conv_general_dilated_p.bind(lhs, rhs, **params)


canonical_conv_p.def_impl(_lax_conv)  # eager calls: one convolution, dispatched as lax's
# lax's abstract evaluation: shape and dtype checks, shardings and shard_map's varying-axes typing.
canonical_conv_p.def_effectful_abstract_eval(
    lambda lhs, rhs, **params: lax.conv_general_dilated_p.abstract_eval(lhs, rhs, **params))


def _transpose(x, perm):
  perm = tuple(int(p) for p in perm)
  return x if perm == tuple(range(x.ndim)) else lax.transpose(x, perm)


def _canonical_layout_conv(lhs, rhs, *, dimension_numbers, **params):
  # The convolution in the layout of XLA:CPU's fast kernels: lhs [batch, spatial..., feature], rhs
  # [spatial..., in, out], out [batch, spatial..., feature]; spatial dimensions keep their order (the order of the
  # window strides). out_perm lists, for each canonical output axis, the axis of the requested layout it is.
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  n = len(lhs_spec) - 2
  lhs_perm = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
  rhs_perm = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
  out_perm = (out_spec[0], *out_spec[2:], out_spec[1])
  canonical = lax.ConvDimensionNumbers(lhs_spec=(0, n + 1, *range(1, n + 1)), rhs_spec=(n + 1, n, *range(n)),
                                       out_spec=(0, n + 1, *range(1, n + 1)))
  out = _lax_conv(_transpose(lhs, lhs_perm), _transpose(rhs, rhs_perm), dimension_numbers=canonical, **params)
  return _transpose(out, np.argsort(out_perm))


mlir.register_lowering(canonical_conv_p, mlir.lower_fun(_lax_conv, multiple_results=False))
mlir.register_lowering(canonical_conv_p, mlir.lower_fun(_canonical_layout_conv, multiple_results=False),
                       platform="cpu")


# ---------------------------------------------------------------------------------------------------- derivatives
# JAX's transpose rules of conv_general_dilated_p (jax/_src/lax/convolution.py, jax 0.10.2) for
# feature_group_count = batch_group_count = 1, emitting canonical_conv_p: the gradient convolutions are the same
# as JAX's, and their own derivatives come back here.

def _dilate_shape(shape, dilation):
  return tuple((d - 1) * r + 1 if d else 0 for d, r in zip(shape, dilation))


def _vjp_lhs_padding(in_shape, window_dimensions, window_strides, out_shape, padding, lhs_dilation, rhs_dilation):
  lhs_dilated = _dilate_shape(in_shape, lhs_dilation)
  rhs_dilated = _dilate_shape(window_dimensions, rhs_dilation)
  out_dilated = _dilate_shape(out_shape, window_strides)
  before = np.subtract(rhs_dilated, [lo for lo, _ in padding]) - 1
  after = np.add(lhs_dilated, rhs_dilated) - 1 - np.asarray(out_dilated) - before
  return tuple((int(b), int(a)) for b, a in zip(before, after))


def _vjp_rhs_padding(in_shape, window_dimensions, window_strides, out_shape, padding, lhs_dilation, rhs_dilation):
  if len(in_shape) == 0:
    return ()
  lhs_dilated = _dilate_shape(in_shape, lhs_dilation)
  rhs_dilated = _dilate_shape(window_dimensions, rhs_dilation)
  out_dilated = _dilate_shape(out_shape, window_strides)
  lows = [lo for lo, _ in padding]
  highs = [(o - l) + (r - lo - 1) for o, l, r, lo in zip(out_dilated, lhs_dilated, rhs_dilated, lows)]
  return tuple((int(lo), int(hi)) for lo, hi in zip(lows, highs))


def _transpose_lhs(g, lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                   feature_group_count, batch_group_count, precision, preferred_element_type, out_sharding):
  # d lhs = conv(g, flip(rhs) with in/out swapped), strides and lhs dilation exchanged.
  assert feature_group_count == 1 and batch_group_count == 1
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  trans_dnums = lax.ConvDimensionNumbers(out_spec, (rhs_spec[1], rhs_spec[0], *rhs_spec[2:]), lhs_spec)
  lhs_aval = lhs.aval
  padding = _vjp_lhs_padding(np.take(lhs_aval.shape, lhs_spec[2:]), np.take(rhs.shape, rhs_spec[2:]),
                             window_strides, np.take(g.shape, out_spec[2:]), padding, lhs_dilation, rhs_dilation)
  flipped = lax.rev(rhs, rhs_spec[2:])
  if g.dtype != flipped.dtype:
    flipped = lax.convert_element_type(flipped, g.dtype)
  out = canonical_conv_p.bind(g, flipped, window_strides=tuple(lhs_dilation), padding=padding,
                              lhs_dilation=tuple(window_strides), rhs_dilation=tuple(rhs_dilation),
                              dimension_numbers=trans_dnums, feature_group_count=1, batch_group_count=1,
                              precision=precision, preferred_element_type=preferred_element_type,
                              out_sharding=None)
  return out if out.dtype == lhs_aval.dtype else lax.convert_element_type(out, lhs_aval.dtype)


def _transpose_rhs(g, lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                   feature_group_count, batch_group_count, precision, preferred_element_type, out_sharding):
  # d rhs = conv(lhs, g) with lhs's batch as the feature axis: strides and rhs dilation exchanged.
  assert feature_group_count == 1 and batch_group_count == 1
  rhs_aval = rhs.aval
  if np.size(g) == 0:  # as JAX: no degenerate convolution with an empty window
    return ad.Zero(rhs_aval)
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  swap = lambda spec: (spec[1], spec[0], *spec[2:])  # noqa: E731
  trans_dnums = lax.ConvDimensionNumbers(swap(lhs_spec), swap(out_spec), swap(rhs_spec))
  padding = _vjp_rhs_padding(np.take(lhs.shape, lhs_spec[2:]), np.take(rhs_aval.shape, rhs_spec[2:]),
                             window_strides, np.take(g.shape, out_spec[2:]), padding, lhs_dilation, rhs_dilation)
  if g.dtype != lhs.dtype:
    lhs = lax.convert_element_type(lhs, g.dtype)
  out = canonical_conv_p.bind(lhs, g, window_strides=tuple(rhs_dilation), padding=padding,
                              lhs_dilation=tuple(lhs_dilation), rhs_dilation=tuple(window_strides),
                              dimension_numbers=trans_dnums, feature_group_count=1, batch_group_count=1,
                              precision=precision, preferred_element_type=preferred_element_type,
                              out_sharding=None)
  return out if out.dtype == rhs_aval.dtype else lax.convert_element_type(out, rhs_aval.dtype)


# The JVP of a bilinear map: canonical_conv_p(dlhs, rhs) + canonical_conv_p(lhs, drhs).
ad.defbilinear(canonical_conv_p, _transpose_lhs, _transpose_rhs)


# ------------------------------------------------------------------------------------------------------- batching

def _reshape_axis_into(src, dst, x):
  # `dst` counts dimensions after `src` is removed (lax's helper of the same name).
  perm = [i for i in range(x.ndim) if i != src]
  perm.insert(dst, src)
  shape = list(np.delete(x.shape, src))
  shape[dst] *= x.shape[src]
  return lax.reshape(x, shape, perm)


def _reshape_axis_out_of(src, size1, x):
  shape = list(x.shape)
  size2, ragged = divmod(shape[src], size1)
  assert not ragged
  shape[src:src + 1] = [size1, size2]
  return lax.reshape(x, shape)


def _batch_rule(batched_args, batch_dims, **params):
  lhs, rhs = batched_args
  lhs_bdim, rhs_bdim = batch_dims
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  if lhs_bdim is not None and rhs_bdim is not None:
    # Both mapped: a grouped convolution (one group per mapped element), which this primitive does not carry.
    size = lhs.shape[lhs_bdim]
    out = lax.conv_general_dilated(
        _reshape_axis_into(lhs_bdim, lhs_spec[1], lhs), _reshape_axis_into(rhs_bdim, rhs_spec[0], rhs),
        params["window_strides"], params["padding"], params["lhs_dilation"], params["rhs_dilation"],
        params["dimension_numbers"], feature_group_count=size, precision=params["precision"],
        preferred_element_type=params["preferred_element_type"])
    return _reshape_axis_out_of(out_spec[1], size, out), out_spec[1]
  if lhs_bdim is not None:  # fold the mapped axis into the batch
    out = canonical_conv_p.bind(_reshape_axis_into(lhs_bdim, lhs_spec[0], lhs), rhs, **params)
    return _reshape_axis_out_of(out_spec[0], lhs.shape[lhs_bdim], out), out_spec[0]
  # rhs mapped: fold it into the output features
  out = canonical_conv_p.bind(lhs, _reshape_axis_into(rhs_bdim, rhs_spec[0], rhs), **params)
  return _reshape_axis_out_of(out_spec[1], rhs.shape[rhs_bdim], out), out_spec[1]


batching.primitive_batchers[canonical_conv_p] = _batch_rule
