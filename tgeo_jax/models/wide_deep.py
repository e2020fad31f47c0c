"""Tabular models: Wide&Deep for CTR prediction (Criteo) and the attack-detection MLPs (docs/methods.md §6).

Wide&Deep (Cheng et al. 2016, in DeepCTR's ``WDL`` form) on ``{"dense": [B, 13] float32, "sparse": [B, F] int32}``
with per-field vocabularies (index 0 = missing/unknown, see ``data/tabular.py``):

* wide: a linear model over the one-hot categoricals (a 1-dim embedding per field, summed) and the dense
  features (with the model's only bias);
* deep: 16-dim embeddings of every field concatenated with the dense features -> Linear + ReLU layers
  (``hidden``) -> a linear output (no bias).

Both parts add up to one click logit ``z`` (P(click) = sigmoid(z)), returned as the two-class logits ``[0, z]``:
softmax([0, z])_1 = sigmoid(z), so cross-entropy is exactly the binary log-loss, temperature-scaled softmaxes are
sigmoid(z / τ), and every method's two-class machinery (CE, KD, DIST, TGeo-KD with K = 2) applies unchanged. One
logit rather than two free ones keeps the published parameterisation (no redundant class-0 head whose only effect
is a shift that softmax ignores).

``features`` returns ``[B, D + 1]``: the deep part's last hidden layer ``[B, D]`` and, as its last column, the
wide part's logit. ``classify`` is then the joint output layer (deep output + wide logit), so
``classify(features(x)) == __call__(x)`` as for every registered model (SimKD/ATSC rely on it).

With a compute ``dtype`` (mixed precision) only the deep part's embeddings and DNN run in it; the wide part (a
logistic regression whose sum over the fields wants float32) and the output layer stay float32.
"""

from __future__ import annotations

from flax import nnx
import jax.numpy as jnp
import numpy as np

from tgeo_jax.errors import UserError
from tgeo_jax.models import at_least_float32, register
from tgeo_jax.models.small import MLP

__all__ = ["WideDeep", "wide_deep_teacher", "wide_deep_student", "attack_teacher", "attack_student"]


class WideDeep(nnx.Module):
  """``{"dense": [B, num_dense], "sparse": [B, len(vocab_sizes)]} -> [B, 2]`` click logits ``[0, z]``."""

  def __init__(self, *, num_classes: int, input_shape, vocab_sizes=None, num_dense: int = 13,
               embed_dim: int = 16, hidden=(64, 64, 64), dtype=None, rngs: nnx.Rngs):
    del input_shape  # the raw field count; the sizes that matter come from the task's model_kwargs
    if not vocab_sizes:
      raise UserError("model.name: Wide&Deep needs categorical inputs with vocabularies (data.name='criteo')")
    if num_classes != 2:
      raise UserError(f"model.name: Wide&Deep predicts a click probability (2 classes); the task has {num_classes}")
    self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
    self.num_dense = num_dense
    # Every field's table is a row block of one table (field j's index i is row offsets[j] + i): one gather
    # instead of one per field, and one initialiser call (per-field eager inits took seconds on CPU).
    self.offsets = tuple(int(o) for o in np.cumsum((0,) + self.vocab_sizes[:-1]))
    total = sum(self.vocab_sizes)
    # Wide: a zero-initialised logistic regression (its sparse weights are 1-dim embeddings).
    self.wide_sparse = nnx.Embed(total, 1, embedding_init=nnx.initializers.zeros, rngs=rngs)
    self.wide_dense = nnx.Linear(num_dense, 1, kernel_init=nnx.initializers.zeros, rngs=rngs)
    # Deep: small-normal embeddings (as DeepCTR), then the DNN.
    self.embeddings = nnx.Embed(total, embed_dim, embedding_init=nnx.initializers.normal(0.01), dtype=dtype,
                                rngs=rngs)
    dims = [len(self.vocab_sizes) * embed_dim + num_dense, *hidden]
    self.layers = nnx.List([nnx.Linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    self.out = nnx.Linear(dims[-1], 1, use_bias=False, rngs=rngs)

  def features(self, x, *, train: bool = False):
    del train  # no BatchNorm / dropout
    dense = x["dense"].astype(jnp.float32)
    rows = x["sparse"].astype(jnp.int32) + jnp.asarray(self.offsets, jnp.int32)  # [B, F]
    wide = self.wide_dense(dense)[:, 0] + jnp.sum(self.wide_sparse(rows)[..., 0], axis=-1)
    emb = self.embeddings(rows)  # [B, F, E]
    h = jnp.concatenate([emb.reshape(emb.shape[0], -1), dense.astype(emb.dtype)], axis=-1)
    for layer in self.layers:
      h = nnx.relu(layer(h))
    return jnp.concatenate([at_least_float32(h), wide[:, None]], axis=-1)

  def classify(self, fmap):
    fmap = at_least_float32(fmap)
    z = self.out(fmap[:, :-1])[:, 0] + fmap[:, -1]
    return jnp.stack([jnp.zeros_like(z), z], axis=-1)

  def __call__(self, x, *, train: bool = False):
    return self.classify(self.features(x, train=train))


@register("wide_deep_teacher")
def wide_deep_teacher(*, hidden=(64, 64, 64), embed_dim=16, **kw):
  """Criteo teacher: Wide&Deep, embedding dim 16, DNN [64, 64, 64]."""
  return WideDeep(hidden=hidden, embed_dim=embed_dim, **kw)


@register("wide_deep_student")
def wide_deep_student(*, hidden=(64, 64), embed_dim=16, **kw):
  """Criteo student: Wide&Deep, embedding dim 16, DNN [64, 64]."""
  return WideDeep(hidden=hidden, embed_dim=embed_dim, **kw)


@register("attack_teacher")
def attack_teacher(*, hidden=(512, 256, 128, 64, 32), **kw):
  """Attack-detection teacher MLP in -> 512 -> 256 -> 128 -> 64 -> 32 -> K, LeakyReLU."""
  return MLP(hidden=hidden, **kw)


@register("attack_student")
def attack_student(*, hidden=(64, 32), **kw):
  """Attack-detection student MLP in -> 64 -> 32 -> K, LeakyReLU."""
  return MLP(hidden=hidden, **kw)
