"""ImageNet ResNets in torchvision's shapes (ResNet v1.5: the stride sits on the bottleneck's 3x3 conv), in NNX.

These are the ImageNet teachers/students of the KD benchmarks (mdistiller ``models/imagenet/resnet.py``, which
keeps torchvision's layers and parameter names and only moves each block's last ReLU into the next block to
expose pre-activation features; the function computed is the same).

Also RepDistiller's CIFAR-shaped ResNet-50 (``models/resnetv2.py`` ``ResNet50``, the teacher of the CIFAR-100
ResNet-50 -> MobileNetV2 pair): the same bottleneck stages behind a 3x3/1 stem conv without max-pool.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from tgeo_jax.models import register
from tgeo_jax.models.cifar_resnet import BasicBlock, batch_norm, conv2d, global_avg_pool, torch_linear

__all__ = ["Bottleneck", "ImageNetResNet", "resnet18", "resnet34", "resnet50", "resnet50_cifar"]


class Bottleneck(nnx.Module):
  """``relu(bn(conv1x1(relu(bn(conv3x3_s(relu(bn(conv1x1(x)))))))) + shortcut(x))``, 4x channel expansion.

  ``[B, H, W, c_in] -> [B, H / stride, W / stride, 4 * planes]``; the shortcut is a strided 1x1 conv + BatchNorm
  when the shape changes, the identity otherwise.
  """

  expansion = 4

  def __init__(self, c_in: int, planes: int, stride: int, *, dtype=None, rngs: nnx.Rngs):
    c_out = planes * self.expansion
    self.conv1 = conv2d(c_in, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = conv2d(planes, planes, 3, stride=stride, padding=1, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv3 = conv2d(planes, c_out, 1, dtype=dtype, rngs=rngs)
    self.bn3 = batch_norm(c_out, dtype=dtype, rngs=rngs)
    if stride != 1 or c_in != c_out:
      self.shortcut_conv = conv2d(c_in, c_out, 1, stride=stride, dtype=dtype, rngs=rngs)
      self.shortcut_bn = batch_norm(c_out, dtype=dtype, rngs=rngs)
    else:
      self.shortcut_conv = self.shortcut_bn = None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    h = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    h = nnx.relu(self.bn2(self.conv2(h), use_running_average=not train))
    h = self.bn3(self.conv3(h), use_running_average=not train)
    if self.shortcut_conv is not None:
      x = self.shortcut_bn(self.shortcut_conv(x), use_running_average=not train)
    return nnx.relu(h + x)


class ImageNetResNet(nnx.Module):
  """7x7/2 stem conv + BatchNorm + ReLU, 3x3/2 max-pool, four stages (64, 128, 256, 512 planes; strides
  1, 2, 2, 2), GAP, linear.

  ``features``: ``[B, 224, 224, C] -> [B, 7, 7, 512 * expansion]`` (stride 32 in general).
  ``cifar_stem``: RepDistiller's CIFAR variant, a 3x3/1 stem conv (padding 1) and no max-pool (stride 8:
  ``[B, 32, 32, C] -> [B, 4, 4, 512 * expansion]``); the stages are the same.
  """

  def __init__(self, *, bottleneck: bool, layers: Sequence[int], num_classes: int, input_shape,
               cifar_stem: bool = False, dtype=None, rngs: nnx.Rngs):
    if len(input_shape) != 3:
      raise ValueError(f"ImageNetResNet expects images [H, W, C], got input_shape={tuple(input_shape)}")
    expansion = Bottleneck.expansion if bottleneck else 1
    if cifar_stem:
      self.stem_conv = conv2d(input_shape[-1], 64, 3, padding=1, dtype=dtype, rngs=rngs)
    else:
      self.stem_conv = conv2d(input_shape[-1], 64, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
    self.stem_bn = batch_norm(64, dtype=dtype, rngs=rngs)
    self.stem_max_pool = not cifar_stem
    stages, c_in = [], 64
    for planes, num_blocks, stage_stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
      blocks = []
      for i in range(num_blocks):
        stride = stage_stride if i == 0 else 1
        blocks.append(Bottleneck(c_in, planes, stride, dtype=dtype, rngs=rngs) if bottleneck
                      else BasicBlock(c_in, planes, stride, dtype=dtype, rngs=rngs))
        c_in = planes * expansion
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.fc = torch_linear(c_in, num_classes, rngs=rngs)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    h = nnx.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
    if self.stem_max_pool:
      # max_pool pads with -inf, as PyTorch's MaxPool2d(3, 2, padding=1) does.
      h = nnx.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in self.stages:
      for block in stage:
        h = block(h, train=train)
    return h

  def classify(self, fmap: jax.Array) -> jax.Array:
    return self.fc(global_avg_pool(fmap))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.classify(self.features(x, train=train))


@register("resnet18")
def resnet18(**kw):
  """ResNet-18, 11,689,512 parameters (1000 classes); fmap ``[B, 7, 7, 512]`` at 224x224."""
  return ImageNetResNet(bottleneck=False, layers=(2, 2, 2, 2), **kw)


@register("resnet34")
def resnet34(**kw):
  """ResNet-34, 21,797,672 parameters (1000 classes); fmap ``[B, 7, 7, 512]`` at 224x224."""
  return ImageNetResNet(bottleneck=False, layers=(3, 4, 6, 3), **kw)


@register("resnet50")
def resnet50(**kw):
  """ResNet-50, 25,557,032 parameters (1000 classes); fmap ``[B, 7, 7, 2048]`` at 224x224."""
  return ImageNetResNet(bottleneck=True, layers=(3, 4, 6, 3), **kw)


@register("resnet50_cifar")
def resnet50_cifar(**kw):
  """RepDistiller's CIFAR ResNet-50 (``resnetv2.py``: 3x3 stem, no max-pool, bottlenecks [3, 4, 6, 3]),
  23,705,252 parameters (100 classes); fmap ``[B, 4, 4, 2048]`` at 32x32."""
  return ImageNetResNet(bottleneck=True, layers=(3, 4, 6, 3), cifar_stem=True, **kw)
