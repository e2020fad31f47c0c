"""The re-weighting baselines of the TGeo-KD paper (docs/methods.md §2): each is a rule for the per-sample α in

    L = mean_i [α_i τ² KL_τ(t_i‖s_i) + (1 − α_i) CE(s_i, y_i)]

* ANL-KD (teacher annealing): α decays linearly from 1 to 0 over training.
* ADA-KD: α_i = max(0, p_T,y − (1 − p_T,y) / (K − 1)), from the teacher's true-class probability.
* WLS-KD (Zhou et al., ICLR 2021): α_i = 1 − exp(−CE_s,i / CE_t,i), recomputed each step, stop-gradient.
* RW-KD: a free per-sample α_i = sigmoid(w_i), one parameter per training example and no features, learned on the
  validation split with the same lookahead as TGeo-KD; it isolates what the geometry features add.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from tgeo_jax import losses
from tgeo_jax.config_checks import positive_number
from tgeo_jax.methods import base
from tgeo_jax.methods.tgeo import MetaReweightKD, meta_defaults

# Keeps WLS's ratio finite when the teacher's CE is ~0 (a teacher certain and right): then α -> 1.
_WLS_EPS = 1e-8


def anl_alpha(step, total_steps):
  """Scalar α = max(0, 1 − step / total_steps)."""
  return jnp.maximum(0.0, 1.0 - step.astype(jnp.float32) / total_steps)


def ada_alpha(teacher_logits, labels):
  """``[N]``: α_i = max(0, p_T,y − (1 − p_T,y)/(K − 1)), p_T at τ = 1."""
  k = teacher_logits.shape[-1]
  p_true = jnp.take_along_axis(jax.nn.softmax(teacher_logits.astype(jnp.float32)), labels[:, None], axis=-1)[:, 0]
  return jnp.maximum(0.0, p_true - (1.0 - p_true) / (k - 1))


def wls_alpha(student_logits, teacher_logits, labels):
  """``[N]``: α_i = 1 − exp(−CE(s_i, y_i) / CE(t_i, y_i)), stop-gradient."""
  ce_s = losses.cross_entropy(jax.lax.stop_gradient(student_logits), labels)
  ce_t = losses.cross_entropy(teacher_logits, labels)
  return jax.lax.stop_gradient(1.0 - jnp.exp(-ce_s / (ce_t + _WLS_EPS)))


class RuleReweightKD(base.LossMethod):
  """Fused KD/CE with α from a fixed rule (no learning)."""

  config_group = "reweight"

  @classmethod
  def defaults(cls):
    return ml_collections.ConfigDict(dict(temperature=4.0))

  @classmethod
  def validate_config(cls, config):
    positive_number(config, "reweight.temperature")

  def rule_alpha(self, step, logits, teacher_logits, labels):
    raise NotImplementedError

  def loss(self, student_logits, teacher_logits, batch, step):
    labels = batch["labels"]
    alpha = jax.lax.stop_gradient(self.rule_alpha(step, student_logits, teacher_logits, labels))
    per_sample = losses.fused_kd_ce(student_logits, teacher_logits, labels, alpha,
                                    temperature=self.config.reweight.temperature)
    return jnp.mean(per_sample), {"alpha_mean": jnp.mean(alpha) * jnp.ones(())}


class AnnealedKD(RuleReweightKD):
  name = "anl_kd"

  def rule_alpha(self, step, logits, teacher_logits, labels):
    total = self.config.num_epochs * (self.spec.train_size // self.config.batch_size)
    return anl_alpha(step, max(1, total))


class AdaptiveKD(RuleReweightKD):
  name = "ada_kd"

  def rule_alpha(self, step, logits, teacher_logits, labels):
    return ada_alpha(teacher_logits, labels)


class WeightedSoftLabelKD(RuleReweightKD):
  name = "wls_kd"

  def rule_alpha(self, step, logits, teacher_logits, labels):
    return wls_alpha(logits, teacher_logits, labels)


class RandomWeightKD(MetaReweightKD):
  """RW-KD: α_i = sigmoid(w_i) with a free logit per training example (starts at 0: α = 0.5)."""

  name = "rw_kd"
  config_group = "rwkd"

  @classmethod
  def defaults(cls):
    # The lookahead's settings; the fusion_* fields apply to the α table.
    return meta_defaults()

  def init_meta(self):
    return {"alpha_logits": jnp.zeros((self.spec.train_size,), jnp.float32)}

  def weight_fn(self, meta_params, context):
    return jax.nn.sigmoid(meta_params["alpha_logits"][context["index"]])
