"""The filter gradient of an NHWC/HWIO convolution as ``kh * kw`` matrix products (no window convolution).

Why. JAX writes the filter gradient of ``y = conv(x, w)`` as a convolution whose "batch" is the input channel and
whose "kernel" is the output cotangent: for a 32x32 CIFAR feature map a 32x32-window convolution. XLA:CPU runs it
on the input transposed to ``[C, H, W, N]`` (batch and features swapped), and fuses the forward recomputation of
that input into the transpose: in the resnet8x4 KD step these window convolutions and transposes took about half
of the step (``bench/torch_peer.py``'s profile, docs/benchmarks.md). The filter gradient is a sum of ``kh * kw``
products ``x_tap^T @ dy`` over ``N * Ho * Wo`` rows, one per kernel tap; with the layout below every tap is a
contiguous row range of one ``[rows, C]`` matrix, so it is a plain matrix product (``dot_general``), with
no transpose of the large operands.

How (one spatial dimension; the other alike). Pad ``x`` as the convolution does, split it into its ``s`` stride
phases (``x_pad[s * q + r] -> phase r, row q``), so that tap ``k`` of output position ``h`` reads phase ``k % s``
at row ``h + k // s``. Put ``dy`` on the same ``[N, Hq, Wq]`` grid (zeros outside ``Ho x Wo``) and flatten both to
rows ``(n, h, w)``: tap ``(i, j)`` is then the row shift ``d = (i // s) * Wq + j // s`` of its phase matrix, and

    dW[i, j] = phase_{i % s, j % s}[d : d + R]^T @ dy_grid[0 : R]       (R = N * Hq * Wq)

The zeros of ``dy_grid`` kill the rows whose shifted window wraps into the next image row or image. Cost: the
products run over ``Hq * Wq >= Ho * Wo`` rows (``(Ho + (kh - 1) // s)(Wo + (kw - 1) // s)`` at most; 1.13x for a
stride-1 3x3 at 32x32, 1.56x at 8x8).

Measured (``bench/conv_filter_grad.py``, batch 64, resnet8x4's layers, 2-core CPU, docs/benchmarks.md): a win only
for the 1x1 stride-2 shortcut (0.29x XLA's time, 0.70x torch's); 1.1-3.1x *slower* than XLA's window convolution
for the 3x3 layers, because XLA:CPU's dot with a long contraction (``N * Hq * Wq`` rows) and small ``C x O`` output
runs far below its peak. So it is a prototype for a convolution primitive's filter-gradient lowering, kept with its
float64 tests, and no model uses it.

Built from pad, reshape, transpose (of the small phase axes only), slice and ``dot_general``: differentiable to any
order and batchable by JAX's own rules. ``filter_grad`` is the function a convolution primitive's filter-gradient
lowering can call (``tgeo_jax/models/conv.py``'s ``RHS_GRAD`` role); ``conv_general_dilated`` is a first-order
drop-in for ``nnx.Conv(..., conv_general_dilated=...)`` through ``jax.custom_vjp`` (so it has no forward mode:
not for the meta-gradient methods, which take JVPs through the student).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["filter_grad", "input_grad", "conv_general_dilated", "supported"]

_DN = ("NHWC", "HWIO", "NHWC")


def _explicit_padding(padding, spatial, kernel, strides):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(spatial, kernel, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def filter_grad(x: jax.Array, dy: jax.Array, kernel_hw, strides=(1, 1), padding=((0, 0), (0, 0))) -> jax.Array:
  r"""``dW = d<dy, conv(x, W)> / dW`` for ``conv = lax.conv_general_dilated(x, W, strides, padding, NHWC/HWIO)``.

  Math: ``dW[i, j, c, o] = sum_{n, h, w} x_pad[n, s_h h + i, s_w w + j, c] dy[n, h, w, o]``.

  Args:
    x: ``[N, H, W, C]``; dy: ``[N, Ho, Wo, O]``, the output cotangent.
    kernel_hw: ``(kh, kw)``; strides: ``(s_h, s_w)``; padding: ``((lo, hi), (lo, hi))`` or ``'SAME'``/``'VALID'``.
  Returns:
    ``[kh, kw, C, O]``, in ``dy``'s dtype promoted with ``x``'s.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x, w = jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
    >>> dy = jnp.ones((2, 5, 5, 4))
    >>> ref = jax.vjp(lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
    ...               dimension_numbers=('NHWC', 'HWIO', 'NHWC')), w)[1](dy)[0]
    >>> bool(jnp.allclose(filter_grad(x, dy, (3, 3), (1, 1), ((1, 1), (1, 1))), ref))
    True
  """
  kh, kw = (int(k) for k in kernel_hw)
  sh, sw = (int(s) for s in strides)
  n, h, w, c = x.shape
  _, ho, wo, o = dy.shape
  (plo_h, phi_h), (plo_w, phi_w) = _explicit_padding(padding, (h, w), (kh, kw), (sh, sw))
  # The grid of stride phases: Hq rows of each phase cover every row a tap reads (s * Hq >= padded height).
  hq = max(-(-(h + plo_h + phi_h) // sh), ho + (kh - 1) // sh)
  wq = max(-(-(w + plo_w + phi_w) // sw), wo + (kw - 1) // sw)
  # Negative padding (a crop) is lax.pad's too; the grid's extra rows and columns are zeros no tap reaches.
  x_pad = lax.pad(x, jnp.zeros((), x.dtype),
                  ((0, 0, 0), (plo_h, sh * hq - h - plo_h, 0), (plo_w, sw * wq - w - plo_w, 0), (0, 0, 0)))
  rows = n * hq * wq
  shift_max = ((kh - 1) // sh) * wq + (kw - 1) // sw
  if sh == 1 and sw == 1:
    phases = x_pad.reshape(1, 1, rows, c)
  else:
    phases = x_pad.reshape(n, hq, sh, wq, sw, c).transpose(2, 4, 0, 1, 3, 5).reshape(sh, sw, rows, c)
  # Rows past the end, for the last image's shifted windows (they meet zeros of dy_grid).
  phases = jnp.pad(phases, ((0, 0), (0, 0), (0, shift_max), (0, 0)))
  dy_grid = jnp.pad(dy, ((0, 0), (0, hq - ho), (0, wq - wo), (0, 0))).reshape(rows, o)
  taps = []
  for i in range(kh):
    for j in range(kw):
      d = (i // sh) * wq + j // sw
      x_tap = lax.slice_in_dim(phases[i % sh, j % sw], d, d + rows, axis=0)
      taps.append(lax.dot_general(x_tap, dy_grid, (((0,), (0,)), ((), ()))))
  return jnp.stack(taps).reshape(kh, kw, c, o)


def input_grad(dy: jax.Array, w: jax.Array, x_shape, strides=(1, 1), padding=((0, 0), (0, 0))) -> jax.Array:
  """``dx = d<dy, conv(x, w)> / dx``: JAX's own transpose rule (a canonical NHWC/HWIO convolution of ``dy`` with
  the flipped kernel, lhs-dilated by the stride), ``[N, Ho, Wo, O] -> x_shape``."""
  def fwd(x):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)
  return jax.linear_transpose(fwd, jax.ShapeDtypeStruct(tuple(x_shape), dy.dtype))(dy)[0]


def supported(lhs, rhs, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
              batch_group_count=1, precision=None, preferred_element_type=None) -> bool:
  """Whether ``conv_general_dilated`` takes its own gradient path: a 2-D NHWC/HWIO convolution without dilations,
  groups or precision arguments (everything else goes to ``lax.conv_general_dilated`` unchanged)."""
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  canonical = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN)
  trivial = lambda d: d is None or all(int(v) == 1 for v in d)  # noqa: E731
  return (lhs.ndim == 4 and dn == canonical and trivial(lhs_dilation) and trivial(rhs_dilation)
          and feature_group_count == 1 and batch_group_count == 1 and precision is None
          and preferred_element_type is None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)


def _conv_fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, res, dy):
  x, w = res
  return (input_grad(dy, w, x.shape, strides, padding).astype(x.dtype),
          filter_grad(x, dy, w.shape[:2], strides, padding).astype(w.dtype))


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, **kw) -> jax.Array:
  """``lax.conv_general_dilated`` whose reverse-mode filter gradient is ``filter_grad`` (first order only).

  Shapes as lax's; for ``nnx.Conv``: ``[N, H, W, C_in] x [KH, KW, C_in, C_out] -> [N, H', W', C_out]``.

  Example::

      conv = nnx.Conv(3, 16, (3, 3), conv_general_dilated=conv_general_dilated, rngs=nnx.Rngs(0))
  """
  if kw or not supported(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                         batch_group_count, precision, preferred_element_type):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                    precision=precision, preferred_element_type=preferred_element_type, **kw)
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)
  return _conv(lhs, rhs, strides, pads)
