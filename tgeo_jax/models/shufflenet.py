"""CIFAR ShuffleNets of the KD benchmarks (RepDistiller / mdistiller ``ShuffleNetv1.py``, ``ShuffleNetv2.py``).

Both keep the reference's CIFAR stem (a 1x1 conv to 24 channels, no max-pool) and its PyTorch default init.
``features``: ``[B, 32, 32, C] -> [B, 4, 4, 960]`` (V1) and ``[B, 4, 4, 1024]`` (V2). V2's ``feature_maps`` also
gives its last stage's output before the final 1x1 conv (``"pre_head"``, ``[B, 4, 4, 464]``: SimKD's student map,
see ``tgeo_jax.models``); V1 has no such conv (both maps are ``features``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tgeo_jax.models import register
from tgeo_jax.models.cifar_resnet import TORCH_DEFAULT, batch_norm, conv2d, global_avg_pool, torch_linear

__all__ = ["channel_shuffle", "ShuffleV1Unit", "ShuffleNetV1", "ShuffleV2Unit", "ShuffleV2DownUnit", "ShuffleNetV2",
           "shufflev1", "shufflev2"]

_STEM_CHANNELS = 24


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """``[..., C] -> [..., C]``: channel ``g * (C / groups) + j`` moves to ``j * groups + g``.

  The same permutation as the reference's NCHW ``view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4)``, so that
  grouped convs after it see the channels a ported PyTorch weight expects.
  """
  *lead, c = x.shape
  return x.reshape(*lead, groups, c // groups).swapaxes(-1, -2).reshape(*lead, c)


def _conv(c_in, c_out, kernel, *, stride=1, groups=1, dtype=None, rngs):
  return conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, kernel_init=TORCH_DEFAULT,
                dtype=dtype, rngs=rngs)


class ShuffleV1Unit(nnx.Module):
  """ShuffleNet unit: grouped 1x1 (+BN+ReLU), channel shuffle, 3x3 depthwise with ``stride`` (+BN), grouped 1x1
  (+BN), then ``relu(h + x)`` or, when ``stride == 2``, ``relu(concat(h, avg_pool3x3/2(x)))``.

  ``[B, H, W, c_in] -> [B, H / stride, W / stride, c_out + (c_in if stride == 2 else 0)]``.
  """

  def __init__(self, c_in: int, c_out: int, stride: int, groups: int, *, dtype=None, rngs: nnx.Rngs):
    mid = c_out // 4
    # The reference leaves the first 1x1 conv ungrouped when it reads the 24-channel stem.
    first_groups = 1 if c_in == _STEM_CHANNELS else groups
    self.conv1 = _conv(c_in, mid, 1, groups=first_groups, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(mid, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(mid, mid, 3, stride=stride, groups=mid, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(mid, dtype=dtype, rngs=rngs)
    self.conv3 = _conv(mid, c_out, 1, groups=groups, dtype=dtype, rngs=rngs)
    self.bn3 = batch_norm(c_out, dtype=dtype, rngs=rngs)
    self.shuffle_groups = first_groups
    self.stride = stride

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    h = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    h = channel_shuffle(h, self.shuffle_groups)
    h = nnx.relu(self.bn2(self.conv2(h), use_running_average=not train))
    h = self.bn3(self.conv3(h), use_running_average=not train)
    if self.stride == 2:
      # PyTorch's AvgPool2d(3, 2, padding=1) counts the zero padding in the mean (count_include_pad=True).
      shortcut = nnx.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)
      return nnx.relu(jnp.concatenate([h, shortcut], axis=-1))
    return nnx.relu(h + x)


class ShuffleNetV1(nnx.Module):
  """1x1 stem (24) + BN + ReLU, three stages of units (the first one strided, concatenating its input), GAP,
  linear. Stage ``i`` ends at ``out_channels[i]`` channels."""

  def __init__(self, *, out_channels=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3, num_classes: int,
               input_shape, dtype=None, rngs: nnx.Rngs):
    if len(input_shape) != 3:
      raise ValueError(f"ShuffleNetV1 expects images [H, W, C], got input_shape={tuple(input_shape)}")
    self.stem_conv = _conv(input_shape[-1], _STEM_CHANNELS, 1, dtype=dtype, rngs=rngs)
    self.stem_bn = batch_norm(_STEM_CHANNELS, dtype=dtype, rngs=rngs)
    stages, c_in = [], _STEM_CHANNELS
    for c_stage, n in zip(out_channels, num_blocks):
      units = []
      for i in range(n):
        # The strided unit concatenates its input, so its own branch only produces the difference.
        units.append(ShuffleV1Unit(c_in, c_stage - c_in if i == 0 else c_stage, 2 if i == 0 else 1, groups,
                                   dtype=dtype, rngs=rngs))
        c_in = c_stage
      stages.append(nnx.List(units))
    self.stages = nnx.List(stages)
    self.fc = torch_linear(c_in, num_classes, rngs=rngs)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    h = nnx.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
    for stage in self.stages:
      for unit in stage:
        h = unit(h, train=train)
    return h

  def classify(self, fmap: jax.Array) -> jax.Array:
    return self.fc(global_avg_pool(fmap))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.classify(self.features(x, train=train))


class ShuffleV2Unit(nnx.Module):
  """ShuffleNetV2 basic unit: split channels in halves ``(x1, x2)``, ``x2 -> 1x1 (+BN+ReLU) -> 3x3 depthwise (+BN)
  -> 1x1 (+BN+ReLU)``, concatenate with ``x1``, shuffle with 2 groups. ``[B, H, W, C] -> [B, H, W, C]``."""

  def __init__(self, channels: int, *, dtype=None, rngs: nnx.Rngs):
    half = channels // 2
    self.conv1 = _conv(half, half, 1, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(half, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(half, half, 3, groups=half, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(half, dtype=dtype, rngs=rngs)
    self.conv3 = _conv(half, half, 1, dtype=dtype, rngs=rngs)
    self.bn3 = batch_norm(half, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    h = nnx.relu(self.bn1(self.conv1(x2), use_running_average=not train))
    h = self.bn2(self.conv2(h), use_running_average=not train)
    h = nnx.relu(self.bn3(self.conv3(h), use_running_average=not train))
    return channel_shuffle(jnp.concatenate([x1, h], axis=-1), 2)


class ShuffleV2DownUnit(nnx.Module):
  """ShuffleNetV2 down-sampling unit: two stride-2 branches on the whole input, each ending at ``c_out / 2``
  channels, concatenated and shuffled with 2 groups. ``[B, H, W, c_in] -> [B, H / 2, W / 2, c_out]``."""

  def __init__(self, c_in: int, c_out: int, *, dtype=None, rngs: nnx.Rngs):
    mid = c_out // 2
    # Left: 3x3 depthwise /2 (+BN), 1x1 (+BN+ReLU).
    self.left_dw = _conv(c_in, c_in, 3, stride=2, groups=c_in, dtype=dtype, rngs=rngs)
    self.left_dw_bn = batch_norm(c_in, dtype=dtype, rngs=rngs)
    self.left_pw = _conv(c_in, mid, 1, dtype=dtype, rngs=rngs)
    self.left_pw_bn = batch_norm(mid, dtype=dtype, rngs=rngs)
    # Right: 1x1 (+BN+ReLU), 3x3 depthwise /2 (+BN), 1x1 (+BN+ReLU).
    self.right_pw1 = _conv(c_in, mid, 1, dtype=dtype, rngs=rngs)
    self.right_pw1_bn = batch_norm(mid, dtype=dtype, rngs=rngs)
    self.right_dw = _conv(mid, mid, 3, stride=2, groups=mid, dtype=dtype, rngs=rngs)
    self.right_dw_bn = batch_norm(mid, dtype=dtype, rngs=rngs)
    self.right_pw2 = _conv(mid, mid, 1, dtype=dtype, rngs=rngs)
    self.right_pw2_bn = batch_norm(mid, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    ura = not train
    left = self.left_dw_bn(self.left_dw(x), use_running_average=ura)
    left = nnx.relu(self.left_pw_bn(self.left_pw(left), use_running_average=ura))
    right = nnx.relu(self.right_pw1_bn(self.right_pw1(x), use_running_average=ura))
    right = self.right_dw_bn(self.right_dw(right), use_running_average=ura)
    right = nnx.relu(self.right_pw2_bn(self.right_pw2(right), use_running_average=ura))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nnx.Module):
  """1x1 stem (24) + BN + ReLU, three stages (a down unit then ``num_blocks[i]`` basic units), 1x1 conv to
  ``out_channels[3]`` + BN + ReLU, GAP, linear."""

  def __init__(self, *, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), num_classes: int, input_shape,
               dtype=None, rngs: nnx.Rngs):
    if len(input_shape) != 3:
      raise ValueError(f"ShuffleNetV2 expects images [H, W, C], got input_shape={tuple(input_shape)}")
    self.stem_conv = _conv(input_shape[-1], _STEM_CHANNELS, 1, dtype=dtype, rngs=rngs)
    self.stem_bn = batch_norm(_STEM_CHANNELS, dtype=dtype, rngs=rngs)
    stages, c_in = [], _STEM_CHANNELS
    for c_stage, n in zip(out_channels[:3], num_blocks):
      units = [ShuffleV2DownUnit(c_in, c_stage, dtype=dtype, rngs=rngs)]
      units += [ShuffleV2Unit(c_stage, dtype=dtype, rngs=rngs) for _ in range(n)]
      stages.append(nnx.List(units))
      c_in = c_stage
    self.stages = nnx.List(stages)
    self.head_conv = _conv(c_in, out_channels[3], 1, dtype=dtype, rngs=rngs)
    self.head_bn = batch_norm(out_channels[3], dtype=dtype, rngs=rngs)
    self.fc = torch_linear(out_channels[3], num_classes, rngs=rngs)

  def feature_maps(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """``{"pre_head": [B, h, w, out_channels[2]], "last": [B, h, w, out_channels[3]]}``."""
    h = nnx.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
    for stage in self.stages:
      for unit in stage:
        h = unit(h, train=train)
    return {"pre_head": h, "last": nnx.relu(self.head_bn(self.head_conv(h), use_running_average=not train))}

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.feature_maps(x, train=train)["last"]

  def classify(self, fmap: jax.Array) -> jax.Array:
    return self.fc(global_avg_pool(fmap))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.classify(self.features(x, train=train))


@register("shufflev1")
def shufflev1(**kw):
  """RepDistiller ``ShuffleV1`` (groups 3): 0.95M parameters (100 classes); fmap ``[B, 4, 4, 960]`` at 32x32."""
  return ShuffleNetV1(**kw)


@register("shufflev2")
def shufflev2(**kw):
  """RepDistiller ``ShuffleV2`` (net size 1): 1.36M parameters (100 classes); fmap ``[B, 4, 4, 1024]`` at 32x32
  (``"pre_head"``: ``[B, 4, 4, 464]``)."""
  return ShuffleNetV2(**kw)
