"""The small models and the functional split/merge API."""

import chex
import jax
import jax.numpy as jnp
import pytest

from tgeo_jax import models


@pytest.mark.parametrize("name,fmap_shape", [("mlp", (2, 128)), ("cnn_small", (2, 7, 7, 64)),
                                             ("cnn_teacher", (2, 7, 7, 128)), ("cnn_tiny", (2, 14, 14, 8)),
                                             ("cnn_medium_fc", (2, 7, 7, 128)), ("cnn_deep_fc", (2, 7, 7, 128))])
def test_shapes_and_features(name, fmap_shape):
  fn = models.split(models.create(name, num_classes=10, input_shape=(28, 28, 1)))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
  logits, fmap, _ = models.apply_features(*fn, x, train=False)
  chex.assert_shape(logits, (2, 10))
  chex.assert_shape(fmap, fmap_shape)
  chex.assert_trees_all_close(models.apply_classifier(*fn, fmap), logits, atol=1e-6)
  chex.assert_trees_all_close(models.apply(*fn, x, train=False)[0], logits, atol=1e-6)


def test_dense_head_parameter_count_and_classifier():
  # Counted by hand: convs 1*32*9 + 32*64*9 + 64*128*9, BatchNorm scale+bias 2*(32+64+128), the hidden layer
  # (7*7*128) * 256 + 256, the head 256 * 10 + 10.
  model = models.create("cnn_medium_fc", num_classes=10, input_shape=(28, 28, 1))
  assert models.num_params(models.split(model).params) == 92448 + 448 + 1605888 + 2570
  fmap = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 7, 128))
  expected = jnp.maximum(fmap.reshape(3, -1) @ model.hidden.kernel[...] + model.hidden.bias[...], 0)
  expected = expected @ model.head.kernel[...] + model.head.bias[...]
  chex.assert_trees_all_close(model.classify(fmap), expected, atol=1e-5)


def test_per_stage_conv_counts_place_the_pools_at_stage_ends():
  # cnn_deep_fc: one conv at 28x28, two at 14x14, two at 7x7; by hand: convs 1*32*9 + 32*64*9 + 64*64*9 +
  # 64*128*9 + 128*128*9, BatchNorm 2*(32+64+64+128+128), the dense head as cnn_medium_fc's.
  model = models.create("cnn_deep_fc", num_classes=10, input_shape=(28, 28, 1))
  assert model.pool_after == (True, False, True, False, False)
  assert models.num_params(models.split(model).params) == 288 + 18432 + 36864 + 73728 + 147456 + 832 + 1605888 + 2570
  # One count for every stage keeps the old layout (cnn_teacher: pools after the 2nd and 4th conv).
  assert models.create("cnn_teacher", num_classes=10, input_shape=(28, 28, 1)).pool_after == (
      False, True, False, True, False, False)
  with pytest.raises(ValueError, match="convs_per_stage"):
    models.create("cnn_deep_fc", num_classes=10, input_shape=(28, 28, 1), convs_per_stage=(1, 2))


def test_batchnorm_train_mode_updates_statistics_eval_mode_does_not():
  fn = models.split(models.create("cnn_tiny", num_classes=3, input_shape=(8, 8, 1)))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1)) + 3.0
  _, rest_train = jax.jit(models.apply, static_argnums=0, static_argnames="train")(*fn, x, train=True)
  _, rest_eval = models.apply(*fn, x, train=False)
  chex.assert_trees_all_equal(rest_eval, fn.rest)
  diff = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), rest_train, fn.rest)
  assert max(jax.tree.leaves(diff)) > 0.1


def test_gradient_through_merge_in_train_mode():
  fn = models.split(models.create("cnn_tiny", num_classes=3, input_shape=(8, 8, 1)))
  x = jnp.ones((2, 8, 8, 1))
  grads = jax.grad(lambda p: models.apply(fn.graphdef, p, fn.rest, x, train=True)[0].sum())(fn.params)
  assert jax.tree.structure(grads) == jax.tree.structure(fn.params)


def test_unknown_model():
  with pytest.raises(KeyError, match="unknown model 'resnet1000'"):
    models.create("resnet1000", num_classes=10, input_shape=(28, 28, 1))
