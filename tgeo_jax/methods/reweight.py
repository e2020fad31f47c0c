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
import numpy as np

from tgeo_jax import argchecks, losses
from tgeo_jax.config_checks import positive_number
from tgeo_jax.methods import base
from tgeo_jax.methods.meta_reweight import MetaReweightKD, meta_defaults

__all__ = ["anl_alpha", "ada_alpha", "wls_alpha", "RuleReweightKD", "AnnealedKD", "AdaptiveKD", "WeightedSoftLabelKD",
           "RandomWeightKD"]

# Keeps WLS's ratio finite when the teacher's CE is ~0 (a teacher certain and right): then α -> 1.
_WLS_EPS = 1e-8


def anl_alpha(step, total_steps):
  """Scalar ``α = max(0, 1 − step / total_steps)``, float32.

  Args:
    step: a scalar integer array (steps already taken).
    total_steps: an integer ``>= 1`` (static).
  Returns:
    a float32 scalar in ``[0, 1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax.methods import reweight
    >>> print(reweight.anl_alpha(jnp.array(25), 100))
    0.75
  """
  if not (isinstance(total_steps, (int, np.integer)) and total_steps >= 1):
    raise ValueError(f"anl_alpha: total_steps: expected an integer >= 1, got {total_steps!r}")
  return jnp.maximum(0.0, 1.0 - jnp.asarray(step).astype(jnp.float32) / total_steps)


def ada_alpha(teacher_logits, labels):
  """``[...]``: ``α_i = max(0, p_T,y − (1 − p_T,y)/(K − 1))``, ``p_T = softmax(z_t)`` at τ = 1.

  0 when the teacher is no better than uniform on the true class, 1 when it is certain of it.

  Args:
    teacher_logits: ``[..., K]``, ``K >= 2``.
    labels: ``[...]`` integer classes; an out-of-range label gives NaN.
  Returns:
    ``[...]`` in ``promote_types(teacher_logits.dtype, float32)``, in ``[0, 1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax.methods import reweight
    >>> print(reweight.ada_alpha(jnp.log(jnp.array([[0.7, 0.2, 0.1]])), jnp.array([0])).round(5))   # 0.7 − 0.3/2
    [0.55]
  """
  argchecks.check_logits("ada_alpha", "teacher_logits", teacher_logits)
  argchecks.check_labels("ada_alpha", labels, teacher_logits)
  k = teacher_logits.shape[-1]
  # exp(−CE) is the true-class probability, with CE's masking, precision and NaN for a bad label.
  p_true = jnp.exp(-losses.cross_entropy(teacher_logits, labels))
  return jnp.maximum(0.0, p_true - (1.0 - p_true) / (k - 1))


def wls_alpha(student_logits, teacher_logits, labels):
  """``[...]``: ``α_i = 1 − exp(−CE(s_i, y_i) / (CE(t_i, y_i) + 1e-8))``, stop-gradient.

  Args:
    student_logits, teacher_logits: ``[..., K]``, same shape; labels ``[...]``.
  Returns:
    ``[...]`` in ``promote_types(logits dtype, float32)``, in ``[0, 1)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax.methods import reweight
    >>> s = jnp.log(jnp.array([[0.5, 0.5]])); t = jnp.log(jnp.array([[0.25, 0.75]]))
    >>> print(reweight.wls_alpha(s, t, jnp.array([1])).round(4))   # 1 − exp(−log 2 / log(4/3))
    [0.9101]
  """
  argchecks.check_logit_pair("wls_alpha", student_logits, teacher_logits)
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
