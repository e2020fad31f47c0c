"""TGeo-KD (ICLR 2024; docs/methods.md §2): a per-sample fusion ratio learned by a bilevel hypergradient.

    L_train(θ; φ) = mean_i [α_i τ² KL_τ(t_i‖s_i) + (1 − α_i) CE(s_i, y_i)],   α_i = f_φ(Δ_i)

Δ_i are the trilateral relation features of (S, T, G, T̄) (``geometry.relation_features``); f_φ is the fusion
MLP 9K → 32 → 16 → 1 (LeakyReLU, sigmoid). φ minimises the validation CE after the student's own optimizer steps,
updated by its own optax optimizer. The bilevel machinery (hypergradients ``tgeo.hypergrad``, orderings, ``meta_interval``) is
``MetaReweightKD`` in ``meta_reweight.py``, shared with RW-KD; this module adds the fusion net and the relation
features.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tgeo_jax import geometry
from tgeo_jax.config_checks import require
from tgeo_jax.methods.meta_reweight import HYPERGRADS, MetaReweightKD, make_meta_optimizer, meta_defaults  # noqa: F401

__all__ = ["FusionNet", "TGeoKD"]


class FusionNet(nnx.Module):
  """``Δ [N, D] -> α [N]``: MLP D → hidden... → 1 with LeakyReLU and a sigmoid output.

  The output layer starts at zero, so α = 0.5 for every sample before the first meta step (an even split between
  the two supervisions, as the paper's α "starts near 0.5").
  """

  def __init__(self, in_dim: int, hidden=(32, 16), *, alpha_init: float = 0.5, rngs: nnx.Rngs):
    dims = [in_dim, *hidden]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    bias = float(np.log(alpha_init / (1.0 - alpha_init)))
    self.out = nnx.Linear(dims[-1], 1, kernel_init=nnx.initializers.zeros,
                          bias_init=nnx.initializers.constant(bias), rngs=rngs)

  def logits(self, features):
    """``[N, D] -> [N]``: the pre-sigmoid output z (α = sigmoid(z))."""
    h = features
    for layer in self.layers:
      h = nnx.leaky_relu(layer(h))
    return self.out(h)[:, 0]

  def __call__(self, features):
    return jax.nn.sigmoid(self.logits(features))


class TGeoKD(MetaReweightKD):
  name = "tgeo"
  config_group = "tgeo"

  @classmethod
  def defaults(cls):
    c = meta_defaults()
    c.layout = "reference"  # relation features: reference (9K) | vertices | edges | intra | no_st | sg_tg | angles | scalar
    c.fusion_hidden = (32, 16)  # fusion MLP 9K -> 32 -> 16 -> 1 (LeakyReLU, sigmoid)
    c.alpha_init = 0.5  # α of every sample before the first meta step (the output layer's bias)
    # 'none' | 'center': α_i = sigmoid(z_i - mean_batch(z) + logit(alpha_init)); the batch's α level stays near
    # alpha_init and the meta-gradient can only move weight between samples (cf. Meta-Weight-Net's normalisation).
    c.alpha_normalization = "none"
    return c

  @classmethod
  def validate_config(cls, config):
    super().validate_config(config)
    require(config, "tgeo.layout", lambda v: v in geometry.LAYOUTS, f"one of {list(geometry.LAYOUTS)}")
    require(config, "tgeo.fusion_hidden",
            lambda v: isinstance(v, (tuple, list)) and all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                                                           for w in v),
            "a tuple of positive layer widths, e.g. (32, 16)")
    require(config, "tgeo.alpha_init", lambda v: 0 < v < 1, "a number in (0, 1)")
    require(config, "tgeo.alpha_normalization", lambda v: v in ("none", "center"), "'none' or 'center'")

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    # The fusion net's structure is static (built once, here); its parameters start the meta state in init_meta.
    dim = geometry.feature_dim(self.cfg.layout, self.spec.num_classes)
    net = FusionNet(dim, tuple(self.cfg.fusion_hidden), alpha_init=self.cfg.alpha_init,
                    rngs=nnx.Rngs(self.config.seed + 1))
    self.fusion_graphdef, self._fusion_params = nnx.split(net, nnx.Param)

  def init_meta(self):
    # A copy: the trainer donates the state to its jitted step, and init may be called again.
    return jax.tree.map(jnp.copy, self._fusion_params)

  def init(self, rng):
    state, frozen = super().init(rng)
    frozen["class_mean"] = self._class_mean_teacher(frozen)
    return state, frozen

  def _class_mean_teacher(self, frozen):
    """T̄ [K, K] over the student's training split with the frozen teacher (computed once; the teacher is fixed)."""
    logits = frozen.get("teacher_logits_table")
    if logits is None:
      logits = self.teacher_logits_over_train(frozen)
    return geometry.class_mean_teacher(jax.nn.softmax(logits), jnp.asarray(self.task.train.labels),
                                       self.spec.num_classes)

  def features(self, frozen, labels, student_logits, teacher_logits):
    return geometry.relation_features(student_logits, teacher_logits, labels, frozen["class_mean"],
                                      self.cfg.layout)

  def context(self, frozen, batch, student_logits):
    context = super().context(frozen, batch, student_logits)
    context["features"] = self.features(frozen, batch["labels"], student_logits, batch["teacher_logits"])
    return context

  def weight_fn(self, meta_params, context):
    z = nnx.merge(self.fusion_graphdef, meta_params).logits(context["features"])
    if self.cfg.get("alpha_normalization", "none") == "center":
      # Over the global batch (under data parallelism XLA all-reduces the mean).
      init = self.cfg.alpha_init
      z = z - jnp.mean(z) + jnp.log(init / (1.0 - init))
    return jax.nn.sigmoid(z)
