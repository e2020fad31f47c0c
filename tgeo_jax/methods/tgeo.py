"""TGeo-KD (ICLR 2024; docs/methods.md §2): a per-sample fusion ratio learned by a bilevel hypergradient.

    L_train(θ; φ) = mean_i [α_i τ² KL_τ(t_i‖s_i) + (1 − α_i) CE(s_i, y_i)],   α_i = f_φ(Δ_i)

Δ_i are the trilateral relation features of (S, T, G, T̄) (``geometry.relation_features``); f_φ is the fusion
MLP 9K → 32 → 16 → 1 (LeakyReLU, sigmoid). φ minimises the validation CE after one step of the student's own
optimizer (``bilevel.lookahead_hypergrad``: exact, no second-order autodiff), updated by its own optax optimizer.

Orderings (``tgeo.ordering``):
* ``reuse`` (default, cheaper): the lookahead step with α(φ_t) *is* the student's real step; φ is then updated
  from the validation loss at θ′.
* ``lookahead`` (Meta-Weight-Net): lookahead with α(φ_t), update φ, then the real student step with α(φ_{t+1}).
``tgeo.meta_interval`` k: φ is updated every k student steps (the other steps are plain fused steps with α(φ)).
``tgeo.unroll_steps`` n > 1: research option, the hypergradient through n unrolled student steps on the batch
(``bilevel.unrolled_hypergrad``; lookahead ordering).

``MetaReweightKD`` holds the bilevel machinery for any learned per-sample α (RW-KD in ``reweight.py`` reuses it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
from flax import nnx

from tgeo_jax import alpha_report, bilevel, geometry, losses
from tgeo_jax.config_checks import positive_int, positive_number, require
from tgeo_jax.errors import UserError
from tgeo_jax.methods import base


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


def make_meta_optimizer(cfg) -> optax.GradientTransformation:
  """The fusion net's own optimizer: Adam(W) at ``fusion_lr`` (optionally clipped)."""
  parts = [optax.clip_by_global_norm(cfg.fusion_clip_norm)] if cfg.fusion_clip_norm else []
  parts.append(optax.adamw(cfg.fusion_lr, weight_decay=cfg.fusion_weight_decay))
  return optax.chain(*parts)


def meta_defaults():
  """Bilevel settings shared by TGeo-KD and RW-KD (docs/methods.md §2)."""
  m = ml_collections.ConfigDict()
  m.temperature = 4.0
  m.fusion_lr = 1e-3  # the meta-parameters' own Adam(W)
  m.fusion_weight_decay = 0.0
  m.fusion_clip_norm = 0.0
  m.ordering = "reuse"  # reuse: the lookahead step is the real step | lookahead: Meta-Weight-Net order
  m.meta_interval = 1  # update the meta-parameters every k student steps
  m.unroll_steps = 1  # >1: hypergradient through n unrolled steps (research; needs ordering='lookahead')
  m.val_bn_mode = "train"  # BatchNorm mode of the validation forward at the lookahead parameters
  m.analysis_examples = 5000  # α-by-group analytics each epoch over this many training examples (0 = off)
  return m


class MetaReweightKD(base.Method):
  """Fused KD/CE with α from meta-parameters φ learned on the validation split by a one-step lookahead.

  Subclasses define ``init_meta()`` -> φ and ``alpha(meta_params, frozen, batch, student_logits, teacher_logits)``.
  """

  uses_validation_batch = True
  config_group = "tgeo"

  @classmethod
  def validate_config(cls, config):
    g = cls.config_group
    positive_number(config, f"{g}.temperature")
    positive_number(config, f"{g}.fusion_lr")
    positive_int(config, f"{g}.meta_interval")
    positive_int(config, f"{g}.unroll_steps")
    require(config, f"{g}.ordering", lambda v: v in ("reuse", "lookahead"), "'reuse' or 'lookahead'")
    require(config, f"{g}.val_bn_mode", lambda v: v in ("train", "eval"), "'train' or 'eval'")
    if config[g].unroll_steps > 1 and config[g].ordering != "lookahead":
      raise UserError(f"{g}.unroll_steps: {config[g].unroll_steps} unrolled steps need {g}.ordering='lookahead'")

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    # The one-step hypergradient (an injection point: e.g. bilevel.lookahead_hypergrad_autodiff, the nested
    # jax.grad reference, in bench/step_cost.py).
    self.hypergrad = bilevel.lookahead_hypergrad
    self.cfg = self.config[self.config_group]
    self.meta_tx = make_meta_optimizer(self.cfg)

  # ---- to define
  def init_meta(self):
    raise NotImplementedError

  def alpha(self, meta_params, frozen, batch, student_logits, teacher_logits):
    raise NotImplementedError

  # ---- interface
  def init(self, rng):
    state, frozen = super().init(rng)
    meta = self.init_meta()
    state["meta_params"] = meta
    state["meta_opt_state"] = self.meta_tx.init(meta)
    return state, frozen

  def _per_sample_fn(self, inputs, labels, teacher_logits):
    tau = self.cfg.temperature

    def per_sample(params, rest):
      logits, new_rest = self.student_forward(params, rest, inputs)
      soft = losses.kd_loss(logits, teacher_logits, temperature=tau)
      hard = losses.cross_entropy(logits, labels)
      return (soft, hard), (new_rest, logits)

    return per_sample

  def _val_loss_fn(self, val_batch):
    train_mode = self.cfg.val_bn_mode == "train"

    def val_loss(params, rest):
      logits, _ = self.student_forward(params, rest, val_batch["inputs"], train=train_mode)
      return jnp.mean(losses.cross_entropy(logits, val_batch["labels"]))

    return val_loss

  def step_kind(self, step: int) -> str:
    return "meta" if step % self.cfg.meta_interval == 0 else "plain"

  def train_step(self, state, frozen, batch, kind="meta"):
    teacher_logits = self.batch_teacher_logits(state, frozen, batch)
    per_sample = self._per_sample_fn(batch["inputs"], batch["labels"], teacher_logits)
    weight_fn = lambda meta, logits: self.alpha(meta, frozen, batch, logits, teacher_logits)  # noqa: E731
    if kind == "meta":
      return self._meta_step(state, batch, per_sample, weight_fn)
    return self._plain_step(state, batch["labels"], per_sample, weight_fn)

  def _plain_step(self, state, labels, per_sample, weight_fn, meta_metrics=None):
    """A student step on the fused loss with α(φ) held fixed (stop-gradient)."""

    def objective(params):
      (soft, hard), (new_rest, logits) = per_sample(params, state["rest"])
      alpha = jax.lax.stop_gradient(weight_fn(state["meta_params"], jax.lax.stop_gradient(logits)))
      return bilevel.train_loss(alpha, soft, hard), (new_rest, logits, alpha)

    (loss, (new_rest, logits, alpha)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    params, opt_state = bilevel.optimizer_step(self.tx, grads, state["opt_state"], state["params"])
    new_state = dict(state, params=params, rest=new_rest, opt_state=opt_state, step=state["step"] + 1)
    return new_state, self._metrics(loss, logits, labels, alpha, meta_metrics)

  def _meta_step(self, state, batch, per_sample, weight_fn):
    val_loss_fn = self._val_loss_fn(batch["val"])
    if self.cfg.unroll_steps > 1:
      meta_grad, val_loss = bilevel.unrolled_hypergrad(
          weight_fn, state["meta_params"], [per_sample] * self.cfg.unroll_steps, val_loss_fn, state["params"],
          state["rest"], state["opt_state"], self.tx)
      result = None
    else:
      result = self.hypergrad(weight_fn, state["meta_params"], per_sample, val_loss_fn,
                              state["params"], state["rest"], state["opt_state"], self.tx)
      meta_grad, val_loss = result.meta_grad, result.val_loss
    updates, meta_opt_state = self.meta_tx.update(meta_grad, state["meta_opt_state"], state["meta_params"])
    meta_params = optax.apply_updates(state["meta_params"], updates)
    meta_metrics = {"val_loss": val_loss, "meta_grad_norm": optax.tree.norm(meta_grad)}
    state = dict(state, meta_params=meta_params, meta_opt_state=meta_opt_state)
    if result is not None and self.cfg.ordering == "reuse":
      new_state = dict(state, params=result.params, rest=result.rest, opt_state=result.opt_state,
                       step=state["step"] + 1)
      return new_state, self._metrics(result.train_loss, result.student_logits, batch["labels"], result.alpha,
                                      meta_metrics)
    return self._plain_step(state, batch["labels"], per_sample, weight_fn, meta_metrics)

  def epoch_report(self, state, frozen, workdir, epoch):
    """α by group over (up to ``analysis_examples`` of) the training examples; see ``alpha_report``."""
    if not self.cfg.analysis_examples:
      return {}
    source = self.task.train
    n = min(len(source), self.cfg.analysis_examples)
    # A fixed, seed-independent sample so epochs (and runs) are compared on the same examples; outliers kept.
    indices = np.sort(np.random.default_rng(0).permutation(len(source))[:n])
    outliers = self.task.outlier_mask
    if outliers is not None:
      indices = np.union1d(indices, np.flatnonzero(outliers))
    if not hasattr(self, "_alpha_fn"):
      def alpha_fn(state, frozen, inputs, labels, index):
        logits = self.predict(state, frozen, inputs)
        batch = {"inputs": inputs, "labels": labels, "index": index}
        # From the cached table when there is one (the indices are training-split positions): the analytics
        # then cost no teacher forward.
        teacher_logits = self.batch_teacher_logits(state, frozen, batch)
        alpha = self.alpha(state["meta_params"], frozen, batch, logits, teacher_logits)
        s, t = jax.nn.softmax(logits), jax.nn.softmax(teacher_logits)
        return alpha, jnp.argmax(teacher_logits, -1) == labels, jnp.sum((t - s) ** 2, -1)
      self._alpha_fn = jax.jit(alpha_fn)
    parts = []
    for start in range(0, len(indices), 1000):
      idx = indices[start:start + 1000]
      parts.append(jax.device_get(self._alpha_fn(state, frozen, source.gather(idx), source.labels[idx],
                                                 idx.astype(np.int32))))
    alpha, teacher_correct, gap = (np.concatenate(x) for x in zip(*parts))
    summary = alpha_report.write(workdir, epoch, int(state["step"]), alpha, teacher_correct, gap,
                                 None if outliers is None else outliers[indices])
    return {k: v for k, v in summary.items() if k.startswith("alpha_")}

  def _metrics(self, loss, logits, labels, alpha, meta_metrics):
    # Meta and plain steps return the same metrics so the trainer can average them; a plain step reports zeros
    # for the meta quantities (with meta_interval k their logged averages are scaled by 1/k).
    zero = jnp.zeros((), jnp.float32)
    meta_metrics = meta_metrics or {"val_loss": zero, "meta_grad_norm": zero}
    return {"loss": loss, "accuracy": base.batch_accuracy(logits, labels), "alpha_mean": jnp.mean(alpha),
            "alpha_std": jnp.std(alpha), **meta_metrics}


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

  def alpha(self, meta_params, frozen, batch, student_logits, teacher_logits):
    feats = self.features(frozen, batch["labels"], student_logits, teacher_logits)
    z = nnx.merge(self.fusion_graphdef, meta_params).logits(feats)
    if self.cfg.get("alpha_normalization", "none") == "center":
      # Over the global batch (under data parallelism XLA all-reduces the mean).
      init = self.cfg.alpha_init
      z = z - jnp.mean(z) + jnp.log(init / (1.0 - init))
    return jax.nn.sigmoid(z)
