"""CIFAR ResNets of the KD benchmarks (RepDistiller / mdistiller ``models/resnet.py``), in NNX.

Also home of the PyTorch-equivalent layer constructors the whole zoo shares (``conv2d``, ``batch_norm``,
``torch_linear``): the zoo's parameter counts, paddings and initial distributions follow the PyTorch
reference code, so that published KD recipes (learning rates, weight decay) transfer unchanged.

Layout is NHWC throughout; convolution kernels are HWIO. Every constructor takes ``dtype``, the compute dtype
(``None`` or ``jnp.bfloat16``; see ``tgeo_jax.models``): parameters stay float32 whatever it is.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tgeo_jax.models import at_least_float32, batch_norm_dtype_kwargs, register
from tgeo_jax.models.conv import conv_general_dilated

__all__ = ["KAIMING_FAN_OUT", "TORCH_DEFAULT", "conv2d", "batch_norm", "torch_linear", "global_avg_pool",
           "BasicBlock", "CifarResNet", "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
           "resnet110", "resnet8x4", "resnet32x4"]

# PyTorch ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``: N(0, 2 / (k * k * C_out)), untruncated.
# RepDistiller's ``normal_(0, sqrt(2 / n))`` with ``n = k * k * C_out`` (WRN, MobileNetV2) is the same law.
KAIMING_FAN_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's default ``Conv2d`` / ``Linear`` weight init, ``kaiming_uniform_(a=sqrt(5))``: U(+-1/sqrt(fan_in)).
TORCH_DEFAULT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv2d(c_in: int, c_out: int, kernel: int, *, stride: int = 1, padding: int = 0, groups: int = 1,
           kernel_init=KAIMING_FAN_OUT, use_bias: bool = False, dtype=None, rngs: nnx.Rngs) -> nnx.Conv:
  """PyTorch's ``nn.Conv2d(..., bias=False)``: ``[B, H, W, c_in] -> [B, H', W', c_out]``.

  ``use_bias=True`` adds a bias initialised at zero (the VGGs: ``nn.Conv2d``'s default bias, zeroed by their init).

  The padding is explicit and symmetric, as in PyTorch: XLA's ``"SAME"`` pads a stride-2 3x3 conv on an even
  input as (0, 1) instead of (1, 1), which shifts every window and would break weights ported from PyTorch.

  The convolution is ``tgeo_jax.models.conv.conv_general_dilated``: lax's, with gradients that keep XLA:CPU's fast
  kernels inside loops (unroll windows, Neumann/CG solves), grouped ones (``groups > 1``) included. Parameters are
  those of a default ``nnx.Conv``, values and gradients equal to float32 rounding.
  """
  return nnx.Conv(c_in, c_out, (kernel, kernel), strides=stride, padding=((padding, padding), (padding, padding)),
                  feature_group_count=groups, use_bias=use_bias, kernel_init=kernel_init,
                  bias_init=nnx.initializers.zeros, dtype=dtype, conv_general_dilated=conv_general_dilated,
                  rngs=rngs)


def batch_norm(num_features: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """``nn.BatchNorm2d``: scale 1, bias 0, PyTorch momentum 0.1 (Flax's 0.9) and epsilon 1e-5.

  With a compute ``dtype`` the output is in ``dtype``; statistics and normalisation stay float32.
  """
  return nnx.BatchNorm(num_features, momentum=0.9, epsilon=1e-5, rngs=rngs, **batch_norm_dtype_kwargs(dtype))


def torch_linear(d_in: int, d_out: int, *, kernel_init=None, bias_init=None, rngs: nnx.Rngs) -> nnx.Linear:
  """``nn.Linear(d_in, d_out)``, by default with PyTorch's init: weight and bias both U(+-1/sqrt(d_in))."""
  bound = 1.0 / math.sqrt(d_in)

  def uniform_bias(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nnx.Linear(d_in, d_out, kernel_init=kernel_init or TORCH_DEFAULT, bias_init=bias_init or uniform_bias,
                    rngs=rngs)


def global_avg_pool(fmap: jax.Array) -> jax.Array:
  """``[B, H, W, C] -> [B, C]``; the references' ``AvgPool2d(H)`` on their last map is exactly this.

  In at least float32: the head after it then runs in float32 and the logits come out float32 (mixed precision).
  """
  return jnp.mean(at_least_float32(fmap), axis=(1, 2))


class BasicBlock(nnx.Module):
  """Post-activation residual block: ``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``.

  ``[B, H, W, c_in] -> [B, H / stride, W / stride, c_out]``; the shortcut is a 1x1 conv + BatchNorm when the
  shape changes (RepDistiller's ``downsample``), the identity otherwise.
  """

  def __init__(self, c_in: int, c_out: int, stride: int, *, dtype=None, rngs: nnx.Rngs):
    self.conv1 = conv2d(c_in, c_out, 3, stride=stride, padding=1, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(c_out, dtype=dtype, rngs=rngs)
    self.conv2 = conv2d(c_out, c_out, 3, padding=1, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(c_out, dtype=dtype, rngs=rngs)
    if stride != 1 or c_in != c_out:
      self.shortcut_conv = conv2d(c_in, c_out, 1, stride=stride, dtype=dtype, rngs=rngs)
      self.shortcut_bn = batch_norm(c_out, dtype=dtype, rngs=rngs)
    else:
      self.shortcut_conv = self.shortcut_bn = None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    h = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    h = self.bn2(self.conv2(h), use_running_average=not train)
    if self.shortcut_conv is not None:
      x = self.shortcut_bn(self.shortcut_conv(x), use_running_average=not train)
    return nnx.relu(h + x)


class CifarResNet(nnx.Module):
  """ResNet-(6n+2) for 32x32 inputs: 3x3 stem, three stages of ``n`` basic blocks (strides 1, 2, 2), GAP, linear.

  ``widths = (stem, stage1, stage2, stage3)``. ``features``: ``[B, 32, 32, C] -> [B, 8, 8, widths[3]]``.
  """

  def __init__(self, *, depth: int, widths: Sequence[int], num_classes: int, input_shape, dtype=None,
               rngs: nnx.Rngs):
    if (depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    if len(input_shape) != 3:
      raise ValueError(f"CifarResNet expects images [H, W, C], got input_shape={tuple(input_shape)}")
    n = (depth - 2) // 6
    self.stem_conv = conv2d(input_shape[-1], widths[0], 3, padding=1, dtype=dtype, rngs=rngs)
    self.stem_bn = batch_norm(widths[0], dtype=dtype, rngs=rngs)
    stages, c_in = [], widths[0]
    for stage_stride, c_out in zip((1, 2, 2), widths[1:]):
      blocks = []
      for i in range(n):
        blocks.append(BasicBlock(c_in, c_out, stage_stride if i == 0 else 1, dtype=dtype, rngs=rngs))
        c_in = c_out
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.fc = torch_linear(c_in, num_classes, rngs=rngs)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    h = nnx.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
    for stage in self.stages:
      for block in stage:
        h = block(h, train=train)
    return h

  def classify(self, fmap: jax.Array) -> jax.Array:
    return self.fc(global_avg_pool(fmap))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.classify(self.features(x, train=train))


_THIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


@register("resnet8")
def resnet8(**kw):
  """ResNet-8, 0.08M parameters (100 classes); fmap ``[B, 8, 8, 64]``."""
  return CifarResNet(depth=8, widths=_THIN, **kw)


@register("resnet14")
def resnet14(**kw):
  """ResNet-14, 0.18M parameters; fmap ``[B, 8, 8, 64]``."""
  return CifarResNet(depth=14, widths=_THIN, **kw)


@register("resnet20")
def resnet20(**kw):
  """ResNet-20, 0.28M parameters; fmap ``[B, 8, 8, 64]``."""
  return CifarResNet(depth=20, widths=_THIN, **kw)


@register("resnet32")
def resnet32(**kw):
  """ResNet-32, 0.47M parameters; fmap ``[B, 8, 8, 64]``."""
  return CifarResNet(depth=32, widths=_THIN, **kw)


@register("resnet44")
def resnet44(**kw):
  """ResNet-44, 0.67M parameters; fmap ``[B, 8, 8, 64]``."""
  return CifarResNet(depth=44, widths=_THIN, **kw)


@register("resnet56")
def resnet56(**kw):
  """ResNet-56, 0.86M parameters; fmap ``[B, 8, 8, 64]``."""
  return CifarResNet(depth=56, widths=_THIN, **kw)


@register("resnet110")
def resnet110(**kw):
  """ResNet-110, 1.74M parameters; fmap ``[B, 8, 8, 64]``."""
  return CifarResNet(depth=110, widths=_THIN, **kw)


@register("resnet8x4")
def resnet8x4(**kw):
  """ResNet-8 with 4x wider stages, 1.23M parameters; fmap ``[B, 8, 8, 256]``."""
  return CifarResNet(depth=8, widths=_X4, **kw)


@register("resnet32x4")
def resnet32x4(**kw):
  """ResNet-32 with 4x wider stages, 7.43M parameters; fmap ``[B, 8, 8, 256]``."""
  return CifarResNet(depth=32, widths=_X4, **kw)
