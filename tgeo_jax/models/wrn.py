"""Wide ResNets WRN-d-k of the KD benchmarks (RepDistiller / mdistiller ``models/wrn.py``), in NNX."""

from __future__ import annotations

import jax
from flax import nnx

from tgeo_jax.models import register
from tgeo_jax.models.cifar_resnet import batch_norm, conv2d, global_avg_pool, torch_linear

__all__ = ["WideBlock", "WideResNet", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


class WideBlock(nnx.Module):
  """Pre-activation block: ``conv3x3(relu(bn(conv3x3(a)))) + shortcut`` with ``a = relu(bn(x))``.

  ``[B, H, W, c_in] -> [B, H / stride, W / stride, c_out]``. When the width changes the shortcut is a 1x1 conv of
  ``a`` (not of ``x``), as in the reference; otherwise it is ``x`` itself.
  """

  def __init__(self, c_in: int, c_out: int, stride: int, *, dtype=None, rngs: nnx.Rngs):
    self.bn1 = batch_norm(c_in, dtype=dtype, rngs=rngs)
    self.conv1 = conv2d(c_in, c_out, 3, stride=stride, padding=1, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(c_out, dtype=dtype, rngs=rngs)
    self.conv2 = conv2d(c_out, c_out, 3, padding=1, dtype=dtype, rngs=rngs)
    self.shortcut_conv = (conv2d(c_in, c_out, 1, stride=stride, dtype=dtype, rngs=rngs) if c_in != c_out
                          else None)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    a = nnx.relu(self.bn1(x, use_running_average=not train))
    h = nnx.relu(self.bn2(self.conv1(a), use_running_average=not train))
    h = self.conv2(h)
    return h + (x if self.shortcut_conv is None else self.shortcut_conv(a))


class WideResNet(nnx.Module):
  """WRN-``depth``-``widen``: 3x3 stem (16), three stages of ``(depth - 4) / 6`` wide blocks with widths
  ``(16, 32, 64) * widen`` and strides (1, 2, 2), a final BatchNorm + ReLU, GAP, linear.

  ``features``: ``[B, 32, 32, C] -> [B, 8, 8, 64 * widen]`` (after the final BatchNorm + ReLU, the map the
  reference average-pools). Dropout is left out: every registered WRN uses ``dropRate=0``.
  """

  def __init__(self, *, depth: int, widen: int, num_classes: int, input_shape, dtype=None, rngs: nnx.Rngs):
    if (depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    if len(input_shape) != 3:
      raise ValueError(f"WideResNet expects images [H, W, C], got input_shape={tuple(input_shape)}")
    n = (depth - 4) // 6
    widths = (16, 16 * widen, 32 * widen, 64 * widen)
    self.stem_conv = conv2d(input_shape[-1], widths[0], 3, padding=1, dtype=dtype, rngs=rngs)
    stages, c_in = [], widths[0]
    for stage_stride, c_out in zip((1, 2, 2), widths[1:]):
      blocks = []
      for i in range(n):
        blocks.append(WideBlock(c_in, c_out, stage_stride if i == 0 else 1, dtype=dtype, rngs=rngs))
        c_in = c_out
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.final_bn = batch_norm(c_in, dtype=dtype, rngs=rngs)
    # Reference init: default PyTorch weight, zero bias.
    self.fc = torch_linear(c_in, num_classes, bias_init=nnx.initializers.zeros, rngs=rngs)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    h = self.stem_conv(x)
    for stage in self.stages:
      for block in stage:
        h = block(h, train=train)
    return nnx.relu(self.final_bn(h, use_running_average=not train))

  def classify(self, fmap: jax.Array) -> jax.Array:
    return self.fc(global_avg_pool(fmap))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.classify(self.features(x, train=train))


@register("wrn_16_1")
def wrn_16_1(**kw):
  """WRN-16-1, 0.18M parameters (100 classes); fmap ``[B, 8, 8, 64]``."""
  return WideResNet(depth=16, widen=1, **kw)


@register("wrn_16_2")
def wrn_16_2(**kw):
  """WRN-16-2, 0.70M parameters; fmap ``[B, 8, 8, 128]``."""
  return WideResNet(depth=16, widen=2, **kw)


@register("wrn_40_1")
def wrn_40_1(**kw):
  """WRN-40-1, 0.57M parameters; fmap ``[B, 8, 8, 64]``."""
  return WideResNet(depth=40, widen=1, **kw)


@register("wrn_40_2")
def wrn_40_2(**kw):
  """WRN-40-2, 2.26M parameters; fmap ``[B, 8, 8, 128]``."""
  return WideResNet(depth=40, widen=2, **kw)
