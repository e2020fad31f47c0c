"""Tests for the KD benchmark model zoo (tgeo_jax/models/{cifar_resnet,wrn,imagenet_resnet,mobilenetv2,
shufflenet,vgg}.py): parameter counts equal to the PyTorch references, feature-map shapes, real forwards of the
small models, and the layer details that differ between XLA and PyTorch defaults."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tgeo_jax import models
from tgeo_jax.models import zoo
from tgeo_jax.models.cifar_resnet import conv2d
from tgeo_jax.models.shufflenet import ShuffleV1Unit, channel_shuffle

# Trainable parameters of the PyTorch reference models: conv weights + BatchNorm weight and bias (running
# statistics are buffers) + Linear weight and bias, counted from the definitions in HobbitLong/RepDistiller
# models/{resnet,resnetv2,wrn,mobilenetv2,ShuffleNetv1,ShuffleNetv2}.py (identical in megvii-research/mdistiller
# mdistiller/models/cifar/) with num_classes=100, and torchvision's resnet18/34/50 and mobilenet_v2 (= mdistiller
# models/imagenet/resnet.py) with 1000 classes; the last four are the numbers torchvision publishes. They agree
# with the rounded figures of the CRD paper's CIFAR-100 tables (e.g. resnet32x4 7.43M, ShuffleV2 1.36M).
REFERENCE_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    # resnetv2.py ResNet50: torchvision's 25,557,032 - 7x7 stem (9,408) + 3x3 stem (1,728) - 1000-class fc
    # (2,049,000) + 100-class fc (204,900); the CRD paper's tables round it to 23.71M.
    "resnet50_cifar": 23_705_252,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "mobilenetv2": 812_836,
    "shufflev1": 949_258,
    "shufflev2": 1_355_528,
    # models/vgg.py vgg*_bn: per conv 9 C_in C_out + C_out (bias) + 2 C_out (BatchNorm), + Linear(512, 100);
    # recomputed from the channel lists in test_vgg_counts_from_the_reference_channels. CRD's tables: vgg8 3.96M,
    # vgg13 9.46M.
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "mobilenetv2_imagenet": 3_504_872,
}

IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "mobilenetv2_imagenet")

# Last-stage feature map (H, W, C) at 32x32 (CIFAR) or 224x224 (ImageNet) inputs.
EXPECTED_FMAP = {
    **{f"resnet{d}": (8, 8, 64) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, 8, 256),
    "resnet32x4": (8, 8, 256),
    "resnet50_cifar": (4, 4, 2048),
    "wrn_16_1": (8, 8, 64),
    "wrn_16_2": (8, 8, 128),
    "wrn_40_1": (8, 8, 64),
    "wrn_40_2": (8, 8, 128),
    "mobilenetv2": (2, 2, 1280),
    "shufflev1": (4, 4, 960),
    "shufflev2": (4, 4, 1024),
    # No pool after block 3 on 32x32 inputs (the reference pools there only when the input is 64 px high).
    **{f"vgg{d}": (4, 4, 512) for d in (8, 11, 13, 16, 19)},
    "resnet18": (7, 7, 512),
    "resnet34": (7, 7, 512),
    "resnet50": (7, 7, 2048),
    "mobilenetv2_imagenet": (7, 7, 1280),
}

# Real (jitted) forwards, kept to small models: on a 2-core CPU the eager init alone costs seconds per model
# (one XLA compile per kernel shape); every model is traced by `_abstract`.
FORWARD_MODELS = ("resnet8", "wrn_16_1", "shufflev1", "vgg8")

BATCH = 2


def _task(name):
  """``(input_shape, num_classes)`` of the setting the reference count is for."""
  return ((224, 224, 3), 1000) if name in IMAGENET_MODELS else ((32, 32, 3), 100)


@functools.cache
def _abstract(name):
  """``(num_params, logits, fmap)`` with shapes only: the model is built and run under ``jax.eval_shape``."""
  input_shape, num_classes = _task(name)

  def build_and_run():
    model = models.create(name, num_classes=num_classes, input_shape=input_shape)
    fmap = model.features(jnp.zeros((BATCH, *input_shape)), train=False)
    return nnx.state(model, nnx.Param), model.classify(fmap), fmap

  params, logits, fmap = jax.eval_shape(build_and_run)
  return models.num_params(params), logits, fmap


def test_every_zoo_model_has_a_reference_count():
  zoo_modules = {m.__name__ for m in (zoo.cifar_resnet, zoo.wrn, zoo.imagenet_resnet, zoo.mobilenetv2,
                                      zoo.shufflenet, zoo.vgg)}
  available = models.available()
  registered = {name for name in available if models._REGISTRY[name].__module__ in zoo_modules}
  assert registered == set(REFERENCE_PARAMS)
  assert set(EXPECTED_FMAP) == set(REFERENCE_PARAMS)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_param_count_matches_pytorch_reference(name):
  num_params, _, _ = _abstract(name)
  assert num_params == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_FMAP))
def test_feature_map_and_logit_shapes(name):
  _, num_classes = _task(name)
  _, logits, fmap = _abstract(name)
  assert fmap.shape == (BATCH, *EXPECTED_FMAP[name])
  assert logits.shape == (BATCH, num_classes)


@functools.cache
def _jitted_apply_features():
  return jax.jit(models.apply_features, static_argnums=0, static_argnames="train")


@pytest.mark.parametrize("name", FORWARD_MODELS)
def test_forward_train_and_eval(name):
  model = models.create(name, num_classes=100, input_shape=(32, 32, 3))
  graphdef, params, rest = models.split(model)
  x = jax.random.normal(jax.random.key(0), (BATCH, 32, 32, 3))
  apply_features = _jitted_apply_features()

  logits, fmap, new_rest = apply_features(graphdef, params, rest, x, train=True)
  chex.assert_shape(logits, (BATCH, 100))
  chex.assert_shape(fmap, (BATCH, *EXPECTED_FMAP[name]))
  chex.assert_tree_all_finite((logits, fmap))
  # Train mode moves the BatchNorm running statistics towards the batch's.
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), rest, new_rest)
  assert any(jax.tree.leaves(changed))

  logits, fmap, same_rest = apply_features(graphdef, params, new_rest, x, train=False)
  chex.assert_shape(logits, (BATCH, 100))
  chex.assert_shape(fmap, (BATCH, *EXPECTED_FMAP[name]))
  chex.assert_tree_all_finite((logits, fmap))
  chex.assert_trees_all_equal(same_rest, new_rest)
  # The functional head applied to the features is the model's own forward.
  chex.assert_trees_all_close(models.apply_classifier(graphdef, params, new_rest, fmap), logits, atol=1e-5)


def test_vgg_counts_from_the_reference_channels():
  # RepDistiller's cfg 'S', 'A', 'B', 'D', 'E' as written there, counted independently of the model code.
  cfg = {"vgg8": [[64], [128], [256], [512], [512]],
         "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
         "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
         "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
         "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4]}
  for name, blocks in cfg.items():
    widths = [3] + [c for block in blocks for c in block]
    convs = sum(9 * a * b + b + 2 * b for a, b in zip(widths[:-1], widths[1:]))
    assert convs + 512 * 100 + 100 == REFERENCE_PARAMS[name], name


def test_vgg_pools_after_block3_only_at_64px():
  fmap = jax.eval_shape(lambda: models.create("vgg8", num_classes=10, input_shape=(64, 64, 3)).features(
      jnp.zeros((1, 64, 64, 3))))
  assert fmap.shape == (1, 4, 4, 512)  # four pools from 64 (8x8 without the fourth), three from 32
  # The 2x2 max-pool is PyTorch's MaxPool2d(2, 2): windows of 2x2, an odd last row/column dropped.
  from tgeo_jax.models.vgg import max_pool2x2
  x = jnp.arange(25.0).reshape(1, 5, 5, 1)
  np.testing.assert_array_equal(max_pool2x2(x)[0, :, :, 0], [[6.0, 8.0], [16.0, 18.0]])


def test_channel_shuffle_matches_pytorch_order():
  # PyTorch: x.view(N, 2, 3, H, W).permute(0, 2, 1, 3, 4) on channels 0..5 gives 0, 3, 1, 4, 2, 5.
  x = jnp.arange(6.0).reshape(1, 1, 1, 6)
  np.testing.assert_array_equal(channel_shuffle(x, 2)[0, 0, 0], [0, 3, 1, 4, 2, 5])
  np.testing.assert_array_equal(channel_shuffle(x, 3)[0, 0, 0], [0, 2, 4, 1, 3, 5])


def test_strided_conv_pads_symmetrically_like_pytorch():
  # nn.Conv2d(1, 1, 3, stride=2, padding=1) with a ones kernel on a 4x4 ones image: the top-left window sees
  # 2x2 real pixels (XLA's "SAME" would pad (0, 1) and see 3x3), the bottom-right one 3x3.
  conv = conv2d(1, 1, 3, stride=2, padding=1, kernel_init=nnx.initializers.ones, rngs=nnx.Rngs(0))
  y = conv(jnp.ones((1, 4, 4, 1)))
  np.testing.assert_array_equal(y[0, :, :, 0], [[4.0, 6.0], [6.0, 9.0]])


def test_shufflev1_strided_shortcut_counts_padding_in_the_mean():
  # The strided unit concatenates relu(AvgPool2d(3, 2, padding=1)(x)) after its own c_out channels; PyTorch
  # counts the zero padding, so a corner window of a ones image averages to 4/9 and an inner one to 1.
  unit = ShuffleV1Unit(6, 12, stride=2, groups=3, rngs=nnx.Rngs(0))
  y = unit(jnp.ones((1, 4, 4, 6)), train=False)
  chex.assert_shape(y, (1, 2, 2, 18))
  np.testing.assert_allclose(y[0, :, :, 12:], np.broadcast_to([[[4 / 9], [6 / 9]], [[6 / 9], [1.0]]], (2, 2, 6)),
                             rtol=1e-6)
