"""Small models for the embedded Fashion-MNIST task and for tests: an MLP and a plain CNN."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tgeo_jax.models import at_least_float32, batch_norm_dtype_kwargs, register
from tgeo_jax.models.conv import conv_general_dilated

__all__ = ["MLP", "CNN", "CNNDenseHead", "mlp", "mlp_tiny", "cnn_small", "cnn_teacher", "cnn_medium", "cnn_medium_fc",
           "cnn_deep_fc", "cnn_tiny"]


def _pool2x2(x: jax.Array) -> jax.Array:
  # Reshape-based 2x2 average pool: on CPU XLA, flax's max_pool backward was ~3x slower (measured when this model
  # was written).
  b, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class MLP(nnx.Module):
  """``[B, *input_shape] -> [B, K]``: flatten, hidden Linear + LeakyReLU layers, linear head.

  ``features`` returns the last hidden activation ``[B, hidden[-1]]`` (in the compute ``dtype``); the head runs
  in float32 (see ``tgeo_jax.models``).
  """

  def __init__(self, *, num_classes: int, input_shape, hidden=(256, 128), dtype=None, rngs: nnx.Rngs):
    dims = [math.prod(input_shape), *hidden]
    self.layers = nnx.List([nnx.Linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

  def features(self, x, *, train: bool = False):
    del train  # no BatchNorm / dropout
    h = x.reshape(x.shape[0], -1)
    for layer in self.layers:
      h = nnx.leaky_relu(layer(h))
    return h

  def classify(self, fmap):
    return self.head(at_least_float32(fmap))

  def __call__(self, x, *, train: bool = False):
    return self.classify(self.features(x, train=train))


class CNN(nnx.Module):
  """``[B, H, W, C] -> [B, K]``: stages of (3x3 conv, BatchNorm, ReLU) x ``convs_per_stage`` + 2x2 avg-pool
  (not after the last stage), then global average pooling and a linear head. ``convs_per_stage`` is one count for
  every stage or one per stage (``(1, 2, 2)``: a single conv at full resolution, where a conv is dearest per FLOP
  on CPU XLA, two in each later stage).

  ``features`` returns the last stage's map ``[B, H / 2^(S-1), W / 2^(S-1), widths[-1]]`` (in the compute
  ``dtype``); the head runs in float32 (see ``tgeo_jax.models``).
  """

  def __init__(self, *, num_classes: int, input_shape, widths=(32, 64, 128), convs_per_stage: int = 1,
               dtype=None, rngs: nnx.Rngs):
    if len(input_shape) != 3:
      raise ValueError(f"CNN expects images [H, W, C], got input_shape={tuple(input_shape)}")
    counts = (convs_per_stage,) * len(widths) if isinstance(convs_per_stage, int) else tuple(convs_per_stage)
    if len(counts) != len(widths) or min(counts) < 1:
      raise ValueError(f"CNN convs_per_stage={convs_per_stage!r}: expected a positive int or one positive count "
                       f"per stage ({len(widths)} stages)")
    convs, norms, pool_after = [], [], []
    c_in = input_shape[-1]
    for stage, (width, count) in enumerate(zip(widths, counts)):
      for j in range(count):
        # conv_general_dilated: lax's convolution whose gradients keep XLA:CPU's fast kernels inside loops
        # (tgeo_jax.models.conv); same parameters, the same numbers to float32 rounding.
        convs.append(nnx.Conv(c_in, width, (3, 3), use_bias=False, dtype=dtype,
                              conv_general_dilated=conv_general_dilated, rngs=rngs))
        norms.append(nnx.BatchNorm(width, momentum=0.9, rngs=rngs, **batch_norm_dtype_kwargs(dtype)))
        pool_after.append(j == count - 1 and stage < len(widths) - 1)
        c_in = width
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.pool_after = tuple(pool_after)  # static: which convs end a stage that a 2x2 pool follows
    self.head = nnx.Linear(c_in, num_classes, rngs=rngs)

  def features(self, x, *, train: bool = False):
    h = x
    for conv, norm, pool in zip(self.convs, self.norms, self.pool_after):
      h = nnx.relu(norm(conv(h), use_running_average=not train))
      if pool:
        h = _pool2x2(h)
    return h

  def classify(self, fmap):
    return self.head(jnp.mean(at_least_float32(fmap), axis=(1, 2)))

  def __call__(self, x, *, train: bool = False):
    return self.classify(self.features(x, train=train))


class CNNDenseHead(CNN):
  """``CNN`` whose head is flatten -> Linear(hidden) -> ReLU -> Linear(K) instead of global average pooling:
  the spatial layout of the last map reaches the classifier, for ~7% more time per training step than
  ``cnn_medium`` on a 2-core CPU (the head holds most of the parameters, few of the FLOPs). Its accuracy gain over
  the pooled head has not been measured separately.

  ``features`` is ``CNN``'s (the last stage's map); ``classify(fmap [B, h, w, c]) -> [B, K]``.
  """

  def __init__(self, *, num_classes: int, input_shape, widths=(32, 64, 128), hidden: int = 256, dtype=None,
               rngs: nnx.Rngs, **kw):
    super().__init__(num_classes=num_classes, input_shape=input_shape, widths=widths, dtype=dtype, rngs=rngs, **kw)
    side_h, side_w = input_shape[0], input_shape[1]
    for _ in range(len(widths) - 1):  # the 2x2 pools between stages floor odd sides
      side_h, side_w = side_h // 2, side_w // 2
    self.hidden = nnx.Linear(side_h * side_w * widths[-1], hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def classify(self, fmap):
    h = at_least_float32(fmap).reshape(fmap.shape[0], -1)
    return self.head(nnx.relu(self.hidden(h)))


@register("mlp")
def mlp(**kw):
  """Student MLP (Fashion-MNIST: 784 -> 256 -> 128 -> K, ~0.235M parameters)."""
  return MLP(**kw)


@register("mlp_tiny")
def mlp_tiny(*, hidden=(32,), **kw):
  """Tiny MLP for tests."""
  return MLP(hidden=hidden, **kw)


@register("cnn_small")
def cnn_small(*, widths=(16, 32, 64), **kw):
  """Student CNN (~24k parameters)."""
  return CNN(widths=widths, **kw)


@register("cnn_teacher")
def cnn_teacher(*, widths=(32, 64, 128), convs_per_stage=2, **kw):
  """Teacher CNN (~0.29M parameters, six 3x3 convs with BatchNorm)."""
  return CNN(widths=widths, convs_per_stage=convs_per_stage, **kw)


@register("cnn_medium")
def cnn_medium(*, widths=(32, 64, 128), convs_per_stage=1, **kw):
  """The demo's teacher CNN (~94k parameters, three 3x3 convs with BatchNorm): on a 2-core CPU a training step
  costs ~0.4x of ``cnn_teacher``'s, whose doubled convs at 28x28 dominate."""
  return CNN(widths=widths, convs_per_stage=convs_per_stage, **kw)


@register("cnn_medium_fc")
def cnn_medium_fc(*, widths=(32, 64, 128), hidden=256, **kw):
  """The study's strong Fashion-MNIST teacher: ``cnn_medium``'s three convs with a dense head (flatten 7x7x128 ->
  256 -> K; ~1.70M parameters, ~1.07x ``cnn_medium``'s step time on a 2-core CPU)."""
  return CNNDenseHead(widths=widths, hidden=hidden, **kw)


@register("cnn_deep_fc")
def cnn_deep_fc(*, widths=(32, 64, 128), convs_per_stage=(1, 2, 2), hidden=256, **kw):
  """A deeper dense-head teacher: ``cnn_medium_fc`` with a second conv in the 14x14 and 7x7 stages (five 3x3
  convs, ~1.89M parameters). On a 2-core CPU a training step costs ~2.2x ``cnn_medium_fc``'s; doubling the 28x28
  stage instead (``cnn_teacher``'s layout) costs ~5x, because CPU XLA runs a 32-channel conv at 28x28 far below its
  FLOP rate."""
  return CNNDenseHead(widths=widths, convs_per_stage=convs_per_stage, hidden=hidden, **kw)


@register("cnn_tiny")
def cnn_tiny(*, widths=(4, 8), **kw):
  """Tiny CNN with BatchNorm for tests."""
  return CNN(widths=widths, **kw)
