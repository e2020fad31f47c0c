"""MobileNetV2 in NNX: the CIFAR variant of the KD benchmarks and torchvision's ImageNet one.

* ``"mobilenetv2"``: RepDistiller / mdistiller ``mobile_half`` (``MobileNetV2(T=6, width_mult=0.5)``), the
  network the CIFAR-100 KD tables call "MobileNetV2". It differs from the paper's network in ways that matter
  for weights and counts: the second stage (24 channels) has stride 1, not 2 (output stride 16, so a 32x32 input
  ends at 2x2), the first block keeps its 1x1 expansion conv although ``t = 1``, channels are truncated with
  ``int`` rather than rounded to multiples of 8, the last conv stays at 1280 channels for widths <= 1, and the
  activations are ReLU.
* ``"mobilenetv2_imagenet"``: torchvision's ``mobilenet_v2`` (ReLU6, channels rounded to multiples of 8, no
  expansion conv when ``t = 1``, output stride 32). Its classifier dropout (p = 0.2) is left out because the zoo's
  call convention carries no RNG; it has no parameters, so the count is torchvision's.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from tgeo_jax.models import register
from tgeo_jax.models.cifar_resnet import batch_norm, conv2d, global_avg_pool, torch_linear

__all__ = ["ConvBNAct", "InvertedResidual", "MobileNetV2", "mobilenetv2", "mobilenetv2_imagenet"]

# (expansion t, channels c, blocks n, first stride s), as in the paper's Table 2.
_PAPER_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                  (6, 320, 1, 1))


def _cifar_setting(t: int):
  """RepDistiller's table: expansion ``t`` for all but the first stage, and stride 1 in the second stage."""
  return ((1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1), (t, 160, 3, 2), (t, 320, 1, 1))


def _make_divisible(value: float, divisor: int = 8) -> int:
  """torchvision's channel rounding: nearest multiple of ``divisor``, never more than 10% below ``value``."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNAct(nnx.Module):
  """``act(bn(conv_kxk(x)))`` with PyTorch padding ``k // 2``: ``[B, H, W, c_in] -> [B, H/s, W/s, c_out]``."""

  def __init__(self, c_in: int, c_out: int, kernel: int, *, stride: int = 1, groups: int = 1,
               act: Callable[[jax.Array], jax.Array], dtype=None, rngs: nnx.Rngs):
    self.conv = conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, dtype=dtype,
                       rngs=rngs)
    self.bn = batch_norm(c_out, dtype=dtype, rngs=rngs)
    self.act = act

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return self.act(self.bn(self.conv(x), use_running_average=not train))


class InvertedResidual(nnx.Module):
  """1x1 expansion to ``c_in * t`` (+BN+act), 3x3 depthwise with ``stride`` (+BN+act), linear 1x1 projection
  (+BN); a residual sum when ``stride == 1`` and ``c_in == c_out``. ``[B, H, W, c_in] -> [B, H/s, W/s, c_out]``.

  ``always_expand`` keeps the expansion conv for ``t = 1`` (the CIFAR reference does, torchvision does not).
  """

  def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int, *, always_expand: bool,
               act: Callable[[jax.Array], jax.Array], dtype=None, rngs: nnx.Rngs):
    hidden = c_in * expand_ratio
    self.expand = (ConvBNAct(c_in, hidden, 1, act=act, dtype=dtype, rngs=rngs)
                   if expand_ratio != 1 or always_expand else None)
    self.depthwise = ConvBNAct(hidden, hidden, 3, stride=stride, groups=hidden, act=act, dtype=dtype, rngs=rngs)
    self.project = conv2d(hidden, c_out, 1, dtype=dtype, rngs=rngs)
    self.project_bn = batch_norm(c_out, dtype=dtype, rngs=rngs)
    self.use_residual = stride == 1 and c_in == c_out

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    h = x if self.expand is None else self.expand(x, train=train)
    h = self.depthwise(h, train=train)
    h = self.project_bn(self.project(h), use_running_average=not train)
    return x + h if self.use_residual else h


class MobileNetV2(nnx.Module):
  """3x3/2 stem conv, inverted-residual stages ``setting``, 1x1 conv to ``last_channels``, GAP, linear.

  ``features`` returns the last 1x1 conv's map ``[B, H / output_stride, W / output_stride, last_channels]``;
  ``feature_maps`` also the last inverted-residual stage's output before it (``"pre_head"``, 160 channels for the
  CIFAR network, 320 for torchvision's: SimKD's student map, see ``tgeo_jax.models``).
  """

  def __init__(self, *, setting, stem_channels: int, last_channels: int, width_mult: float,
               round_channels: Callable[[float], int], always_expand: bool,
               act: Callable[[jax.Array], jax.Array], num_classes: int, input_shape, dtype=None,
               rngs: nnx.Rngs):
    if len(input_shape) != 3:
      raise ValueError(f"MobileNetV2 expects images [H, W, C], got input_shape={tuple(input_shape)}")
    c_in = round_channels(stem_channels * width_mult)
    self.stem = ConvBNAct(input_shape[-1], c_in, 3, stride=2, act=act, dtype=dtype, rngs=rngs)
    stages = []
    for t, c, n, s in setting:
      c_out = round_channels(c * width_mult)
      blocks = []
      for i in range(n):
        blocks.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t, always_expand=always_expand, act=act,
                                       dtype=dtype, rngs=rngs))
        c_in = c_out
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.head_conv = ConvBNAct(c_in, last_channels, 1, act=act, dtype=dtype, rngs=rngs)
    # Both references: classifier weight N(0, 0.01), zero bias.
    self.fc = torch_linear(last_channels, num_classes, kernel_init=nnx.initializers.normal(0.01),
                           bias_init=nnx.initializers.zeros, rngs=rngs)

  def feature_maps(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """``{"pre_head": [B, h, w, C_stage], "last": [B, h, w, last_channels]}`` (the same ``h x w``)."""
    h = self.stem(x, train=train)
    for stage in self.stages:
      for block in stage:
        h = block(h, train=train)
    return {"pre_head": h, "last": self.head_conv(h, train=train)}

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.feature_maps(x, train=train)["last"]

  def classify(self, fmap: jax.Array) -> jax.Array:
    return self.fc(global_avg_pool(fmap))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.classify(self.features(x, train=train))


@register("mobilenetv2")
def mobilenetv2(*, expand_ratio: int = 6, width_mult: float = 0.5, **kw):
  """CIFAR MobileNetV2 (RepDistiller ``mobile_half``): 0.81M parameters (100 classes); fmap ``[B, 2, 2, 1280]``
  at 32x32 (``"pre_head"``: ``[B, 2, 2, 160]``)."""
  last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
  return MobileNetV2(setting=_cifar_setting(expand_ratio), stem_channels=32, last_channels=last_channels,
                     width_mult=width_mult, round_channels=int, always_expand=True, act=nnx.relu, **kw)


@register("mobilenetv2_imagenet")
def mobilenetv2_imagenet(*, width_mult: float = 1.0, **kw):
  """torchvision ``mobilenet_v2``: 3,504,872 parameters (1000 classes); fmap ``[B, 7, 7, 1280]`` at 224x224."""
  last_channels = _make_divisible(1280 * max(1.0, width_mult))
  return MobileNetV2(setting=_PAPER_SETTING, stem_channels=32, last_channels=last_channels,
                     width_mult=width_mult, round_channels=_make_divisible, always_expand=False, act=nnx.relu6,
                     **kw)
