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

How. The convolution is bound as our own primitive ``canonical_conv_p``, which stands for one of the three
convolutions of a layer (``role``: the forward ``F(x, w)``, the input gradient ``A(ybar, w)``, the filter gradient
``B(x, ybar)``) and carries the forward's parameters:

* abstract evaluation (shapes, dtypes, shardings, shard_map's varying axes) is lax's, on the convolution JAX's
  own rules would write for that role (``jax/_src/lax/convolution.py``, jax 0.10.2);
* derivatives: F, A and B are bilinear and transposes of one another in every argument, so the JVP and the
  transposes of each are again F, A or B: gradients of gradients, Hessian-vector products and forward mode stay on
  this primitive to any order. First-order gradients are exactly JAX's convolutions; at second order, where JAX
  would transpose its filter-gradient convolution into one whose kernel is the large output cotangent (which XLA
  swaps into a window-reversed convolution that no fast kernel takes, unrolled or not), this gives A instead;
* batching (``jax.vmap``): lax's rule, folding the mapped axis into the batch (lhs mapped) or the output-feature
  axis (rhs mapped); both mapped needs a grouped convolution and runs as lax's;
* lowering on CPU: transposes to the canonical layout, the convolution in it, a transpose back -- what
  ``ConvCanonicalization`` does, written into the program so that XLA sees a canonical convolution wherever it
  sits. For the forward convolution of an NHWC/HWIO layer every transpose is the identity and is omitted. On other
  platforms the lowering is lax's own: GPU/TPU programs are unchanged at first order.

Lax's arithmetic: the same convolutions (at second order an equivalent one), with the same padding, strides
and dilations; the explicit transposes move data, they round nothing. The values are equal to float32 rounding,
not always bit for bit: XLA:CPU sums a gradient convolution written in another layout in another order (a
cnn_medium training step on Fashion-MNIST: the first step's parameters are bit-identical, later steps differ in
the last bits; each program is deterministic). Feature groups (MobileNetV2's depthwise and
ShuffleNet's grouped layers) are carried as JAX carries them (batch groups in the filter gradient); a
``batch_group_count`` > 1, an explicit ``precision``, ``preferred_element_type`` or ``out_sharding``, and string
padding with an ``lhs_dilation`` go to ``lax.conv_general_dilated`` unchanged. Under ``jax.vmap`` with both
operands mapped, or a mapped kernel of a grouped layer, the batched convolution is lax's (correct, but its own
derivatives are lax's again).

Set ``ENABLED = False`` (read at trace time) to trace ``lax.conv_general_dilated`` instead, for A/B measurements
(``bench/loop_unroll.py``).
"""

from __future__ import annotations

import numpy as np

import jax
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["ENABLED", "FORWARD", "LHS_GRAD", "RHS_GRAD", "canonical_conv_p", "conv_general_dilated",
           "supported"]

# Read at trace time by ``conv_general_dilated``: False traces plain ``lax.conv_general_dilated``.
ENABLED = True


def _forward_params(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count) -> dict:
  # lax.conv_general_dilated's own normalisation, for the cases routed here (no batch groups, no precision, no
  # preferred_element_type, no out_sharding), plus the spatial shapes of both operands (the transposes' paddings
  # need them, and from the other operands they are ambiguous under strides).
  dnums = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  n = lhs.ndim - 2
  lhs_dilation = (1,) * n if lhs_dilation is None else tuple(int(d) for d in lhs_dilation)
  rhs_dilation = (1,) * n if rhs_dilation is None else tuple(int(d) for d in rhs_dilation)
  lhs_spatial = tuple(int(d) for d in np.take(lhs.shape, dnums.lhs_spec[2:]))
  rhs_spatial = tuple(int(d) for d in np.take(rhs.shape, dnums.rhs_spec[2:]))
  if isinstance(padding, str):
    window = [(k - 1) * r + 1 if k else 0 for k, r in zip(rhs_spatial, rhs_dilation)]
    padding = lax.padtype_to_pads(lhs_spatial, window, window_strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return dict(role=FORWARD, window_strides=tuple(int(s) for s in window_strides), padding=padding,
              lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dnums,
              feature_group_count=int(feature_group_count), lhs_spatial=lhs_spatial, rhs_spatial=rhs_spatial)


def supported(lhs_dilation=None, padding="VALID", feature_group_count: int = 1, batch_group_count: int = 1,
              precision=None, preferred_element_type=None, out_sharding=None) -> bool:
  """Whether ``conv_general_dilated`` binds ``canonical_conv_p`` for these arguments (else lax's convolution).

  Example: ``supported(feature_group_count=4)`` is True, ``supported(batch_group_count=2)`` False.
  """
  string_padding_with_lhs_dilation = (isinstance(padding, str) and lhs_dilation is not None
                                      and any(d != 1 for d in lhs_dilation))
  return (batch_group_count == 1 and precision is None
          and preferred_element_type is None and out_sharding is None and not string_padding_with_lhs_dilation)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, out_sharding=None) -> jax.Array:
  """``jax.lax.conv_general_dilated`` with gradients in XLA:CPU's fast layout (module docstring).

  Math: ``out[n, o, y] = sum_{i, k} lhs_pad[n, i, s * y + r * k] * rhs[o, i, k]`` per spatial dimension (``s``
  stride, ``r`` rhs dilation, ``lhs_pad`` the lhs dilated by ``lhs_dilation`` and zero-padded by ``padding``), in
  the layout ``dimension_numbers`` names; lax's value and derivatives (equal to float32 rounding).

  Shapes: as lax's; for flax's ``nnx.Conv`` ``lhs [N, H, W, C_in]``, ``rhs [KH, KW, C_in, C_out]`` ->
  ``[N, H', W', C_out]`` with ``dimension_numbers = ('NHWC', 'HWIO', 'NHWC')``.

  Example::

      conv = nnx.Conv(3, 16, (3, 3), conv_general_dilated=conv_general_dilated, rngs=nnx.Rngs(0))
      y = conv(jnp.ones((8, 32, 32, 3)))       # [8, 32, 32, 16], equal to the default nnx.Conv's

  Arguments outside ``supported`` (batch groups, precision, preferred_element_type, out_sharding) are passed to
  ``lax.conv_general_dilated`` unchanged.

  Returns:
    the convolution, as ``lax.conv_general_dilated`` returns it.
  """
  if not ENABLED or not supported(lhs_dilation, padding, feature_group_count, batch_group_count, precision,
                                  preferred_element_type, out_sharding):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                    precision=precision, preferred_element_type=preferred_element_type,
                                    out_sharding=out_sharding)
  lhs, rhs = jax.numpy.asarray(lhs), jax.numpy.asarray(rhs)
  return canonical_conv_p.bind(lhs, rhs, **_forward_params(lhs, rhs, window_strides, padding, lhs_dilation,
                                                           rhs_dilation, dimension_numbers, feature_group_count))


# ------------------------------------------------------------------------------------------------- the primitive
# One primitive for the three convolutions of a layer y = F(x, w) (forward parameters P: strides s, padding,
# lhs dilation, rhs dilation, dimension numbers D), told apart by ``role``:
#
#   FORWARD   F(x, w)   -> y
#   LHS_GRAD  A(ybar, w) -> xbar   the input gradient:  <ybar, F(x, w)> = <A(ybar, w), x>
#   RHS_GRAD  B(x, ybar) -> wbar   the filter gradient: <ybar, F(x, w)> = <B(x, ybar), w>
#
# Each is bilinear and the three are transposes of one another in every argument, so every derivative of any
# order is again one of F, A, B with the same P (the transpose rules below). Each lowers to the convolution JAX's
# own rules would write (``_lax_form``: A and B are jax's _conv_general_dilated_transpose_lhs/rhs, jax 0.10.2). Where JAX's second-order rules would transpose A or B again -- the transpose of B in x gives a
# convolution whose kernel is the large output cotangent, which XLA then swaps into a window-reversed convolution
# that no fast kernel takes -- the trilinear identity gives A (or F, B) instead: a small kernel, canonical.

FORWARD, LHS_GRAD, RHS_GRAD = "forward", "lhs_grad", "rhs_grad"
canonical_conv_p = Primitive("canonical_conv")


def _dilate_shape(shape, dilation):
  return tuple((d - 1) * r + 1 if d else 0 for d, r in zip(shape, dilation))


def _swap(spec):
  return (spec[1], spec[0], *spec[2:])


def _lax_form(lhs_shape, rhs_shape, *, role, window_strides, padding, lhs_dilation, rhs_dilation,
              dimension_numbers, feature_group_count, lhs_spatial, rhs_spatial):
  """``(lax params, flip_rhs)``: the ``lax.conv_general_dilated_p`` (after ``rev`` of the rhs' spatial dimensions
  and, with groups, the regrouping ``_regroup_kernel`` when ``flip_rhs``) that computes ``role`` on operands of
  these shapes."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  groups = feature_group_count
  # JAX's rules: the forward's feature groups stay feature groups in the input gradient and become batch groups
  # in the filter gradient.
  common = dict(feature_group_count=groups if role != RHS_GRAD else 1,
                batch_group_count=groups if role == RHS_GRAD else 1, precision=None, preferred_element_type=None,
                out_sharding=None)
  if role == FORWARD:
    return dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers, **common), False
  if role == LHS_GRAD:  # operands (ybar, w); as _conv_general_dilated_transpose_lhs
    out_spatial = np.take(lhs_shape, out_spec[2:])
    lhs_dilated = _dilate_shape(lhs_spatial, lhs_dilation)
    rhs_dilated = _dilate_shape(np.take(rhs_shape, rhs_spec[2:]), rhs_dilation)
    out_dilated = _dilate_shape(out_spatial, window_strides)
    before = np.subtract(rhs_dilated, [lo for lo, _ in padding]) - 1
    after = np.add(lhs_dilated, rhs_dilated) - 1 - np.asarray(out_dilated) - before
    pads = tuple((int(b), int(a)) for b, a in zip(before, after))
    dnums = lax.ConvDimensionNumbers(out_spec, _swap(rhs_spec), lhs_spec)
    return dict(window_strides=lhs_dilation, padding=pads, lhs_dilation=window_strides, rhs_dilation=rhs_dilation,
                dimension_numbers=dnums, **common), True
  assert role == RHS_GRAD  # operands (x, ybar); as _conv_general_dilated_transpose_rhs
  lhs_dilated = _dilate_shape(np.take(lhs_shape, lhs_spec[2:]), lhs_dilation)
  rhs_dilated = _dilate_shape(rhs_spatial, rhs_dilation)
  out_dilated = _dilate_shape(np.take(rhs_shape, out_spec[2:]), window_strides)
  pads = tuple((int(lo), int((o - i) + (r - lo - 1)))
               for (lo, _), o, i, r in zip(padding, out_dilated, lhs_dilated, rhs_dilated))
  dnums = lax.ConvDimensionNumbers(_swap(lhs_spec), _swap(out_spec), _swap(rhs_spec))
  return dict(window_strides=rhs_dilation, padding=pads, lhs_dilation=lhs_dilation, rhs_dilation=window_strides,
              dimension_numbers=dnums, **common), False


def _regroup_kernel(rhs, params):
  # The input gradient of a grouped convolution: the kernel's output features [G, O / G] move into its input
  # features ([I / G] -> [G * I / G]), as in jax's _conv_general_dilated_transpose_lhs.
  groups, rhs_spec = params["feature_group_count"], params["dimension_numbers"].rhs_spec
  if groups == 1:
    return rhs
  return _reshape_axis_into(rhs_spec[0], rhs_spec[1], _reshape_axis_out_of(rhs_spec[0], groups, rhs))


def _lax_operands(lhs, rhs, params):
  lax_params, flip = _lax_form(lhs.shape, rhs.shape, **params)
  if flip:
    rhs = lax.rev(_regroup_kernel(rhs, params), lax_params["dimension_numbers"].rhs_spec[2:])
  return lhs, rhs, lax_params


def _lax_conv(lhs, rhs, **params):
  lhs, rhs, lax_params = _lax_operands(lhs, rhs, params)
  return lax.conv_general_dilated_p.bind(lhs, rhs, **lax_params)


def _abstract_eval(lhs, rhs, **params):
  # lax's abstract evaluation of the equivalent convolution: shapes, dtype checks, shardings and shard_map's
  # varying-axes typing (a flip changes none of them).
  lax_params, flip = _lax_form(lhs.shape, rhs.shape, **params)
  if flip and params["feature_group_count"] > 1:
    groups, (out_dim, in_dim) = params["feature_group_count"], params["dimension_numbers"].rhs_spec[:2]
    shape = list(rhs.shape)
    shape[out_dim], shape[in_dim] = shape[out_dim] // groups, shape[in_dim] * groups
    rhs = rhs.update(shape=tuple(shape))
  return lax.conv_general_dilated_p.abstract_eval(lhs, rhs, **lax_params)


canonical_conv_p.def_impl(_lax_conv)  # eager calls: lax's convolution
canonical_conv_p.def_effectful_abstract_eval(_abstract_eval)


def _transpose(x, perm):
  perm = tuple(int(p) for p in perm)
  return x if perm == tuple(range(x.ndim)) else lax.transpose(x, perm)


def _canonical_layout_conv(lhs, rhs, **params):
  # The convolution in the layout of XLA:CPU's fast kernels: lhs [batch, spatial..., feature], rhs
  # [spatial..., in, out], out [batch, spatial..., feature]; spatial dimensions keep their order (the order of the
  # window strides). out_perm lists, for each canonical output axis, the axis of the requested layout it is.
  lhs, rhs, lax_params = _lax_operands(lhs, rhs, params)
  lhs_spec, rhs_spec, out_spec = lax_params.pop("dimension_numbers")
  n = len(lhs_spec) - 2
  lhs_perm = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
  rhs_perm = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
  out_perm = (out_spec[0], *out_spec[2:], out_spec[1])
  canonical = lax.ConvDimensionNumbers(lhs_spec=(0, n + 1, *range(1, n + 1)), rhs_spec=(n + 1, n, *range(n)),
                                       out_spec=(0, n + 1, *range(1, n + 1)))
  out = lax.conv_general_dilated_p.bind(_transpose(lhs, lhs_perm), _transpose(rhs, rhs_perm),
                                        dimension_numbers=canonical, **lax_params)
  return _transpose(out, np.argsort(out_perm))


mlir.register_lowering(canonical_conv_p, mlir.lower_fun(_lax_conv, multiple_results=False))
mlir.register_lowering(canonical_conv_p, mlir.lower_fun(_canonical_layout_conv, multiple_results=False),
                       platform="cpu")


# ---------------------------------------------------------------------------------------------------- derivatives

def _bind(role, lhs, rhs, params):
  return canonical_conv_p.bind(lhs, rhs, **dict(params, role=role))


def _transpose_lhs(ct, lhs, rhs, **params):
  # F(x, w) in x: A(ct, w).  A(ybar, w) in ybar: F(ct, w).  B(x, ybar) in x: A(ybar, ct).
  role = params["role"]
  if role == FORWARD:
    return _bind(LHS_GRAD, ct, rhs, params)
  if role == LHS_GRAD:
    return _bind(FORWARD, ct, rhs, params)
  return _bind(LHS_GRAD, rhs, ct, params)


def _transpose_rhs(ct, lhs, rhs, **params):
  # F(x, w) in w: B(x, ct).  A(ybar, w) in w: B(ct, ybar).  B(x, ybar) in ybar: F(x, ct).
  role = params["role"]
  if np.size(ct) == 0:  # as JAX: no degenerate convolution with an empty window
    return ad.Zero(rhs.aval)
  if role == FORWARD:
    return _bind(RHS_GRAD, lhs, ct, params)
  if role == LHS_GRAD:
    return _bind(RHS_GRAD, ct, lhs, params)
  return _bind(FORWARD, lhs, ct, params)


# The JVP of a bilinear map: conv(dlhs, rhs) + conv(lhs, drhs), same role.
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
  # lax's rule on the equivalent convolution: a mapped lhs folds into its batch dimension, a mapped rhs into its
  # output features (for A and B these are the forward's N / C_in and C_out axes: the role's meaning holds for
  # the wider operands, since only spatial shapes are parameters).
  lhs, rhs = batched_args
  lhs_bdim, rhs_bdim = batch_dims
  unmapped = [np.delete(x.shape, d) if d is not None else x.shape for x, d in ((lhs, lhs_bdim), (rhs, rhs_bdim))]
  lax_params, _ = _lax_form(*unmapped, **params)
  (lhs_spec, rhs_spec, out_spec), groups = lax_params["dimension_numbers"], params["feature_group_count"]
  if rhs_bdim is None and lax_params["batch_group_count"] == 1:  # fold into the batch
    out = canonical_conv_p.bind(_reshape_axis_into(lhs_bdim, lhs_spec[0], lhs), rhs, **params)
    return _reshape_axis_out_of(out_spec[0], lhs.shape[lhs_bdim], out), out_spec[0]
  if lhs_bdim is None and groups == 1:  # fold into the output features
    out = canonical_conv_p.bind(lhs, _reshape_axis_into(rhs_bdim, rhs_spec[0], rhs), **params)
    return _reshape_axis_out_of(out_spec[1], rhs.shape[rhs_bdim], out), out_spec[1]
  # Both mapped (a grouped convolution, one group per mapped element) or groups in the way of the fold: lax's
  # rule on lax's convolution, whose own derivatives are then lax's.
  return jax.vmap(lambda a, b: _lax_conv(a, b, **params), in_axes=(lhs_bdim, rhs_bdim))(lhs, rhs), 0


batching.primitive_batchers[canonical_conv_p] = _batch_rule
