"""TriKD — "Triplet Knowledge Distillation" (Wang et al., arXiv 2305.15975; docs/methods.md §5). A reconstruction.

No public code exists and the paper's exact loss weights are not public: this module implements the reading
written down in docs/methods.md §5, with every weight a config field (``config.trikd``). Three roles:

* **Anchor** A: frozen (BatchNorm in inference mode), the *student's* architecture, trained by CE first
  (``trikd.anchor_checkpoint``: the work directory of a finished run of ``model.name``). It delimits the subspace
  of solutions the student can mimic.
* **Teacher** T (architecture ``teacher.model``), trained *online*, kept inside that subspace by the anchor:
  ``L_T = CE(z_T, y) + lambda_A tau^2 KL_tau(p_A || p_T) + lambda_ST tau^2 KL_tau(p_S || p_T)``.
  It starts from ``teacher.checkpoint`` when one is given (a finished run of ``teacher.model``), otherwise from
  scratch (seed ``seed + 1``): the paper trains the teacher online, and a from-scratch teacher is the reading that
  needs no extra run; a pretrained one is offered as an option.
* **Student** S: ``L_S = CE(z_S, y) + lambda_S tau^2 KL_tau(p_T || p_S)``.

Targets are stop-gradient in every KL term. T and S update in the same step from the same forward passes, each
with its own optimizer state (the same optax recipe): one backward pass of ``L_T + L_S`` gives both gradients,
since stop-gradient makes ``dL_T/dS = dL_S/dT = 0``.

**Generations** (curriculum): ``tgeo_jax.generations.run(config, workdir)`` (what ``train.py`` calls for
G > 1) trains ``trikd.generations`` = G runs in ``workdir/gen_1 .. gen_G``; generation g's anchor is generation
g-1's student (generation 1's is ``trikd.anchor_checkpoint``). Finished generations are skipped, so re-running
resumes. One training run (``tgeo_jax.trainer``) trains one generation; it refuses G > 1 rather than silently
training one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tgeo_jax import config_checks, default_config, losses, models
from tgeo_jax import teacher as teacher_lib
from tgeo_jax.errors import UserError
from tgeo_jax.methods import base

__all__ = ["trikd_losses", "TriKD", "check_generations"]


def trikd_losses(student_logits, teacher_logits, anchor_logits, labels, *, temperature: float,
                 lambda_anchor: float, lambda_student_to_teacher: float, lambda_teacher_to_student: float):
  """The teacher's and the student's batch-mean losses; every distillation target is stop-gradient.

  Args:
    student_logits, teacher_logits, anchor_logits: ``[N, K]``.
    labels: ``[N]``.
    temperature: ``tau`` of every KL term (each multiplied by ``tau^2``).
    lambda_anchor, lambda_student_to_teacher, lambda_teacher_to_student: ``lambda_A``, ``lambda_ST``, ``lambda_S``.
  Returns:
    ``(loss_teacher, loss_student, metrics)``: float32 scalars; ``loss_teacher`` depends only on
    ``teacher_logits`` and ``loss_student`` only on ``student_logits`` as far as gradients go.
  """
  soft = lambda s, t: jnp.mean(losses.kd_loss(s, t, temperature=temperature))  # noqa: E731 - tau^2 KL_tau(t||s)
  ce_t = jnp.mean(losses.cross_entropy(teacher_logits, labels))
  ce_s = jnp.mean(losses.cross_entropy(student_logits, labels))
  kl_anchor = soft(teacher_logits, anchor_logits)  # tau^2 KL(p_A || p_T)
  kl_student_to_teacher = soft(teacher_logits, student_logits)  # tau^2 KL(p_S || p_T)
  kl_teacher_to_student = soft(student_logits, teacher_logits)  # tau^2 KL(p_T || p_S)
  loss_teacher = ce_t + lambda_anchor * kl_anchor + lambda_student_to_teacher * kl_student_to_teacher
  loss_student = ce_s + lambda_teacher_to_student * kl_teacher_to_student
  return loss_teacher, loss_student, {
      "teacher_loss": loss_teacher, "student_loss": loss_student, "teacher_ce": ce_t, "ce": ce_s,
      "kl_anchor": kl_anchor, "kl_student_to_teacher": kl_student_to_teacher,
      "kl_teacher_to_student": kl_teacher_to_student}


def check_generations(config) -> None:
  config_checks.require(config, "trikd.generations", lambda v: config_checks.is_int(v) and v >= 1,
                        "an integer >= 1")


class TriKD(base.Method):
  """Online teacher and student with a frozen anchor; ``predict`` is the student, ``teacher_logits`` the teacher."""

  name = "trikd"
  config_group = "trikd"

  @classmethod
  def defaults(cls):
    # A reconstruction (docs/methods.md §5): the paper's weights are not public. The online teacher is
    # teacher.model, initialised from teacher.checkpoint when given, else from scratch.
    c = ml_collections.ConfigDict()
    c.temperature = 4.0  # tau of every KL term
    c.lambda_anchor = 1.0  # teacher loss: weight of tau^2 KL(p_anchor || p_teacher)
    c.lambda_student_to_teacher = 1.0  # teacher loss: weight of tau^2 KL(p_student || p_teacher)
    c.lambda_teacher_to_student = 1.0  # student loss: weight of tau^2 KL(p_teacher || p_student)
    c.anchor_checkpoint = ""  # work directory of a finished CE run of model.name (the generation-1 anchor)
    # Generations G >= 1, run by tgeo_jax.generations (train.py does, for G > 1) in WORKDIR/gen_1..gen_G; each
    # student becomes the next anchor. One training run (trainer.train_and_evaluate) trains one generation.
    c.generations = 1
    return c

  # Curriculum generations (driven above the trainer by ``tgeo_jax.generations``): the field holding their count,
  # and the field that takes the previous generation's work directory.
  generations = {"count": "trikd.generations", "previous": "trikd.anchor_checkpoint", "name": "anchor"}
  # The trainer's frozen-teacher loader is not used: the teacher trains here, and its checkpoint is optional.
  loads_teacher_checkpoint = False

  @classmethod
  def validate_config(cls, config) -> None:
    config_checks.positive_number(config, "trikd.temperature")
    for field in ("trikd.lambda_anchor", "trikd.lambda_student_to_teacher", "trikd.lambda_teacher_to_student"):
      config_checks.nonnegative_number(config, field)
    check_generations(config)
    if config.trikd.generations > 1:
      raise UserError(f"trikd.generations: {config.trikd.generations} generations are trained by "
                      "tgeo_jax.generations.run (train.py does; one work directory per generation); a single "
                      "training run takes trikd.generations=1")
    if not config.trikd.anchor_checkpoint:
      raise UserError("trikd.anchor_checkpoint: TriKD needs a CE-trained anchor of the student's architecture; "
                      f"train one with '{default_config.train_command(config, config.model.name)}' and pass "
                      "--config.trikd.anchor_checkpoint=DIR")

  def __init__(self, config, spec, **kwargs):
    super().__init__(config, spec, **kwargs)
    self.anchor = teacher_lib.load_teacher_from(config.model.name, config.trikd.anchor_checkpoint, spec,
                                                field="trikd.anchor_checkpoint", model_field="model.name",
                                                dtype=models.compute_dtype(config))
    if config.teacher.checkpoint:
      online = teacher_lib.load_teacher(config, spec)
      self.online_teacher = models.Functional(online.graphdef, online.variables["params"],
                                              online.variables["rest"])
    else:
      try:
        model = models.create(config.teacher.model, num_classes=spec.num_classes, input_shape=spec.input_shape,
                              seed=config.seed + 1, dtype=models.compute_dtype(config), **spec.model_kwargs)
      except KeyError as e:
        raise UserError(f"teacher.model: {e.args[0]}") from None
      self.online_teacher = models.split(model)

  def init(self, rng):
    state, frozen = super().init(rng)
    t = self.online_teacher
    state["teacher"] = {"params": t.params, "rest": t.rest, "opt_state": self.tx.init(t.params)}
    frozen["anchor"] = self.anchor.variables
    return state, frozen

  def train_step(self, state, frozen, batch, kind=None):
    del kind  # a single compiled variant
    cfg = self.config.trikd
    inputs, labels = batch["inputs"], batch["labels"]
    a = frozen["anchor"]
    anchor_logits, _ = models.apply(self.anchor.graphdef, a["params"], a["rest"], inputs, train=False)
    teacher = state["teacher"]

    def objective(params):
      student_logits, student_rest = self.student_forward(params["student"], state["rest"], inputs)
      teacher_logits, teacher_rest = models.apply(self.online_teacher.graphdef, params["teacher"], teacher["rest"],
                                                  inputs, train=True)
      loss_t, loss_s, metrics = trikd_losses(
          student_logits, teacher_logits, jax.lax.stop_gradient(anchor_logits), labels,
          temperature=cfg.temperature, lambda_anchor=cfg.lambda_anchor,
          lambda_student_to_teacher=cfg.lambda_student_to_teacher,
          lambda_teacher_to_student=cfg.lambda_teacher_to_student)
      metrics = dict(metrics, accuracy=base.batch_accuracy(student_logits, labels),
                     teacher_accuracy=base.batch_accuracy(teacher_logits, labels))
      return loss_t + loss_s, (student_rest, teacher_rest, metrics)

    params = {"student": state["params"], "teacher": teacher["params"]}
    (_, (student_rest, teacher_rest, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    s_updates, s_opt = self.tx.update(grads["student"], state["opt_state"], state["params"])
    t_updates, t_opt = self.tx.update(grads["teacher"], teacher["opt_state"], teacher["params"])
    new_state = dict(
        state, params=optax.apply_updates(state["params"], s_updates), rest=student_rest, opt_state=s_opt,
        teacher={"params": optax.apply_updates(teacher["params"], t_updates), "rest": teacher_rest,
                 "opt_state": t_opt},
        step=state["step"] + 1)
    return new_state, dict(metrics, loss=metrics["student_loss"], grad_norm=optax.tree.norm(grads["student"]),
                           teacher_grad_norm=optax.tree.norm(grads["teacher"]))

  def teacher_logits(self, state, frozen, inputs):
    del frozen
    t = state["teacher"]
    logits, _ = models.apply(self.online_teacher.graphdef, t["params"], t["rest"], inputs, train=False)
    return jax.lax.stop_gradient(logits)
