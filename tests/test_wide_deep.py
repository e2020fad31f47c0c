"""Wide&Deep and the attack-detection MLPs: shapes, parameter counts by hand, the wide part's linearity, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgeo_jax import losses, models
from tgeo_jax.errors import UserError

VOCABS = (3, 5, 4)


def make_inputs(batch=6, vocabs=VOCABS, num_dense=2, seed=0):
  rng = np.random.default_rng(seed)
  return {"dense": rng.random((batch, num_dense)).astype(np.float32),
          "sparse": np.stack([rng.integers(0, v, size=batch) for v in vocabs], axis=1).astype(np.int32)}


def small_model(**kw):
  from tgeo_jax.models.wide_deep import WideDeep
  from flax import nnx
  return WideDeep(num_classes=2, input_shape=(5,), vocab_sizes=VOCABS, num_dense=2, embed_dim=4, hidden=(8, 6),
                  rngs=nnx.Rngs(0), **kw)


def test_shapes_and_features_classify_contract():
  model = small_model()
  x = make_inputs()
  logits = model(x)
  fmap = model.features(x)
  chex.assert_shape(logits, (6, 2))
  chex.assert_shape(fmap, (6, 6 + 1))  # last hidden layer D = 6, then the wide logit
  chex.assert_trees_all_close(model.classify(fmap), logits)
  np.testing.assert_array_equal(logits[:, 0], 0.0)
  # softmax([0, z])_1 = sigmoid(z): two-class CE is the binary log-loss of z.
  z = logits[:, 1]
  chex.assert_trees_all_close(jax.nn.softmax(logits)[:, 1], jax.nn.sigmoid(z), atol=1e-6)
  labels = jnp.array([0, 1, 1, 0, 1, 0])
  bce = -(labels * jax.nn.log_sigmoid(z) + (1 - labels) * jax.nn.log_sigmoid(-z))
  chex.assert_trees_all_close(losses.cross_entropy(logits, labels), bce, atol=1e-6)


def test_param_count_by_hand():
  fn = models.split(small_model())
  wide = sum(VOCABS) * 1 + (2 * 1 + 1)  # 1-dim embeddings + dense linear with the only bias
  embeddings = sum(VOCABS) * 4
  deep = (3 * 4 + 2) * 8 + 8 + 8 * 6 + 6 + 6 * 1  # DNN, then the output without bias
  assert models.num_params(fn.params) == wide + embeddings + deep == 15 + 48 + 120 + 54 + 6


@pytest.mark.parametrize("name,hidden", [("wide_deep_teacher", (64, 64, 64)), ("wide_deep_student", (64, 64))])
def test_registered_criteo_models_param_count(name, hidden):
  vocabs = tuple(range(2, 28))  # 26 fields
  model = models.create(name, num_classes=2, input_shape=(39,), vocab_sizes=vocabs, num_dense=13)
  v = sum(vocabs)
  dims = [26 * 16 + 13, *hidden]
  dnn = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
  expected = v + 13 + 1 + 16 * v + dnn + hidden[-1]
  assert models.num_params(models.split(model).params) == expected
  x = make_inputs(batch=3, vocabs=vocabs, num_dense=13)
  chex.assert_shape(model(x), (3, 2))
  chex.assert_shape(model.features(x), (3, hidden[-1] + 1))


def test_wide_part_is_linear_in_the_one_hot_and_starts_at_zero():
  model = small_model()
  x = make_inputs()
  wide0 = model.features(x)[:, -1]
  np.testing.assert_array_equal(wide0, 0.0)  # zero-initialised logistic regression
  # Setting the weight of one category of field 1 moves exactly the examples holding it, by that weight.
  category = int(x["sparse"][0, 1])
  table = model.wide_sparse.embedding  # the fields' tables stacked: field 1 starts at row VOCABS[0]
  assert model.offsets == (0, 3, 8)
  table[...] = table[...].at[VOCABS[0] + category, 0].set(0.7)
  wide1 = model.features(x)[:, -1]
  np.testing.assert_allclose(wide1 - wide0, 0.7 * (x["sparse"][:, 1] == category), atol=1e-6)


def test_missing_index_zero_is_a_valid_embedding_and_gradients_flow():
  model = small_model()
  fn = models.split(model)
  x = make_inputs()
  x["sparse"][:, 0] = 0  # field 0 missing everywhere
  labels = jnp.array([0, 1, 1, 0, 1, 1])

  def loss(params):
    logits, _ = models.apply(fn.graphdef, params, fn.rest, x, train=True)
    return jnp.mean(losses.cross_entropy(logits, labels))

  grads = jax.grad(loss)(fn.params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  wide_grad = np.asarray(grads["wide_sparse"]["embedding"][...][:, 0])
  # Field 0 (rows 0..2) only used its missing row 0; the other fields' used rows got gradient too.
  assert wide_grad[0] != 0 and np.all(wide_grad[1:VOCABS[0]] == 0)
  used = {VOCABS[0] + int(i) for i in x["sparse"][:, 1]} | {VOCABS[0] + VOCABS[1] + int(i) for i in x["sparse"][:, 2]}
  np.testing.assert_array_equal(np.flatnonzero(wide_grad[VOCABS[0]:]) + VOCABS[0], sorted(used))


def test_errors():
  from flax import nnx
  from tgeo_jax.models.wide_deep import WideDeep
  with pytest.raises(UserError, match="data.name='criteo'"):
    models.create("wide_deep_student", num_classes=2, input_shape=(10,))
  with pytest.raises(UserError, match="2 classes"):
    WideDeep(num_classes=3, input_shape=(5,), vocab_sizes=VOCABS, num_dense=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name,hidden", [("attack_teacher", (512, 256, 128, 64, 32)), ("attack_student", (64, 32))])
def test_attack_mlps(name, hidden):
  model = models.create(name, num_classes=3, input_shape=(10,))
  dims = [10, *hidden, 3]
  expected = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
  assert models.num_params(models.split(model).params) == expected
  x = jnp.ones((4, 10))
  chex.assert_shape(model(x), (4, 3))
  chex.assert_shape(model.features(x), (4, hidden[-1]))
