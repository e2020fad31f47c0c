"""CIFAR VGGs of the KD benchmarks (RepDistiller / mdistiller ``models/vgg.py``, the ``vgg*_bn`` variants), in NNX.

Five blocks of 3x3 conv (padding 1, *with* bias) + BatchNorm + ReLU, a 2x2 max-pool after blocks 0, 1 and 2 (and
after block 3 only on 64x64 inputs: the reference's ``if h == 64: x = self.pool3(x)``, so on 32x32 CIFAR images
blocks 3 and 4 both run at 4x4), global average pooling (``AdaptiveAvgPool2d((1, 1))``) and one
``Linear(512, num_classes)``: no fully connected stack. Initialisation as the reference's ``_initialize_weights``:
conv kernels N(0, 2 / (9 C_out)) with zero bias, BatchNorm (1, 0), classifier N(0, 0.01) with zero bias.

``features``: ``[B, 32, 32, C] -> [B, 4, 4, 512]``, the last block's map after its ReLU (the reference's ``f4``,
``feat[-2]``, what SimKD projects); ``classify``: pool + linear.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from tgeo_jax.models import register
from tgeo_jax.models.cifar_resnet import batch_norm, conv2d, global_avg_pool, torch_linear

__all__ = ["VGG_BLOCKS", "max_pool2x2", "ConvBNReLU", "VGG", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]

# Channels of each conv, block by block (RepDistiller's ``cfg``: 'S', 'A', 'B', 'D', 'E').
VGG_BLOCKS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def max_pool2x2(x: jax.Array) -> jax.Array:
  """``nn.MaxPool2d(2, 2)``: ``[B, H, W, C] -> [B, H // 2, W // 2, C]`` (an odd last row/column is dropped).

  A reshape and a max rather than ``nnx.max_pool``, whose backward ran ~3x slower on XLA:CPU (DESIGN notes). Ties
  share the gradient here where PyTorch routes it to one of them; after a ReLU ties are zeros, whose gradient the
  ReLU stops anyway.
  """
  b, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ConvBNReLU(nnx.Module):
  """``relu(bn(conv3x3(x) + bias))``: ``[B, H, W, c_in] -> [B, H, W, c_out]``."""

  def __init__(self, c_in: int, c_out: int, *, dtype=None, rngs: nnx.Rngs):
    self.conv = conv2d(c_in, c_out, 3, padding=1, use_bias=True, dtype=dtype, rngs=rngs)
    self.bn = batch_norm(c_out, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return nnx.relu(self.bn(self.conv(x), use_running_average=not train))


class VGG(nnx.Module):
  """A CIFAR VGG with BatchNorm; ``blocks`` gives each block's conv widths (``VGG_BLOCKS``)."""

  def __init__(self, *, blocks: Sequence[Sequence[int]], num_classes: int, input_shape, dtype=None,
               rngs: nnx.Rngs):
    if len(input_shape) != 3:
      raise ValueError(f"VGG expects images [H, W, C], got input_shape={tuple(input_shape)}")
    layers, c_in = [], input_shape[-1]
    for widths in blocks:
      block = []
      for c_out in widths:
        block.append(ConvBNReLU(c_in, c_out, dtype=dtype, rngs=rngs))
        c_in = c_out
      layers.append(nnx.List(block))
    self.blocks = nnx.List(layers)
    self.fc = torch_linear(c_in, num_classes, kernel_init=nnx.initializers.normal(0.01),
                           bias_init=nnx.initializers.zeros, rngs=rngs)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    # The reference pools after block 3 only for 64x64 inputs (Tiny-ImageNet); the input height is static.
    pool_after = (0, 1, 2, 3) if x.shape[1] == 64 else (0, 1, 2)
    h = x
    for i, block in enumerate(self.blocks):
      for layer in block:
        h = layer(h, train=train)
      if i in pool_after:
        h = max_pool2x2(h)
    return h

  def classify(self, fmap: jax.Array) -> jax.Array:
    return self.fc(global_avg_pool(fmap))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.classify(self.features(x, train=train))


def _register(name: str, doc: str):
  def ctor(**kw):
    return VGG(blocks=VGG_BLOCKS[name], **kw)

  ctor.__name__, ctor.__doc__ = name, doc
  return register(name)(ctor)


# Parameter counts for 100 classes (tests/test_zoo.py).
vgg8 = _register("vgg8", "RepDistiller's vgg8_bn (cfg 'S'), 3,965,028 parameters; fmap ``[B, 4, 4, 512]``.")
vgg11 = _register("vgg11", "RepDistiller's vgg11_bn (cfg 'A'), 9,277,284 parameters; fmap ``[B, 4, 4, 512]``.")
vgg13 = _register("vgg13", "RepDistiller's vgg13_bn (cfg 'B'), 9,462,180 parameters; fmap ``[B, 4, 4, 512]``.")
vgg16 = _register("vgg16", "RepDistiller's vgg16_bn (cfg 'D'), 14,774,436 parameters; fmap ``[B, 4, 4, 512]``.")
vgg19 = _register("vgg19", "RepDistiller's vgg19_bn (cfg 'E'), 20,086,692 parameters; fmap ``[B, 4, 4, 512]``.")
