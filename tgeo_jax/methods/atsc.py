"""ATSC — adaptive teaching with a shared classifier (Jang et al., arXiv 2406.08528; docs/methods.md §4).

SimKD whose pretrained teacher adapts to the student. Each step has two updates:

1. **Joint step** (the trainer's optimizer, over student, projector and the whole teacher together):
   ``L = MSE(P(F_s), F_t) + w * Omega(theta_T)``, ``Omega = sum ||theta_T - theta_T0||^2`` (a raw sum) over the
   teacher's convolution kernels and its classifier's weight matrix, i.e. every parameter with two or more axes
   (BatchNorm scale/shift and biases are free, as in the public code's ``param.ndim > 1`` rule). The MSE's
   gradient reaches the teacher through its feature map: the teacher moves towards what the student can express.
   ``theta_T0``, the pretrained copy, lives in ``frozen`` (stop-gradient, never checkpointed).
2. **Classifier step** (its own optimizer: the same optax recipe, its own state): CE of the teacher's own logits,
   recomputed with the updated teacher, on the batch's labels, updating the classifier's bias
   (``atsc.classifier_update = "bias"``, the public code) or its bias and weight matrix (``"all"``; the matrix
   then also stays under Omega's pull in step 1).

**The classifier bias is in both optimizers**, as in the public code: its first SGD holds every teacher parameter,
the bias included, and the bias's gradient there is a zero tensor, not ``None`` (the loss carries
``0.0 * KL(student logits, teacher logits)``, which reaches the teacher's logits), so PyTorch's SGD applies the
weight decay ``lambda * b`` to it through step 1's momentum buffer; its second SGD then takes the CE step with
weight decay again through a buffer of its own. Here the same: step 1's zero gradient goes through the trainer's
optax chain (clipping is unaffected, ``add_decayed_weights`` adds ``lambda * b``, momentum its own trace) and step 2
through ``optax.masked(tx, classifier)`` with its own state, so per step the bias is decayed twice, with two
momentum buffers. With ``optimizer.weight_decay = 0`` step 1 leaves it in place (its buffer only ever sees zeros).

The student map is ``atsc.student_feature`` (default ``'pre_head'``: the public code's ``feat_s[-2]``, as SimKD's,
see ``tgeo_jax.methods.simkd``).

The student never sees a label: its only loss is the MSE. **Evaluation** goes student -> projector -> GAP -> the
*adapted* teacher classifier (the public code evaluates the student's own, untrained head: a bug not copied).
The adapted teacher (parameters and BatchNorm statistics) and both optimizer states are in the checkpointed state,
so a restored run rebuilds exactly this predictor.

**Teacher BatchNorm.** ``atsc.teacher_train_mode = True`` (default) runs the adapting teacher's BatchNorm on batch
statistics and updates its running averages, as the public code does (it puts every module, the teacher included,
in ``train()`` mode). It is also the consistent choice: the teacher is being trained, its pretrained classifier was
fit to batch-normalised features, and the MSE targets are then what the teacher computes while learning. The CE
step's second teacher forward uses the same mode but does not update the running averages again (each batch is
counted once). Under data parallelism the batch statistics are those of the global batch (PyTorch DDP without
SyncBN would use each GPU's). ``False`` keeps the pretrained running statistics fixed (scale/shift still train):
a per-sample teacher function, for ablations and small batches.

**Multiple teachers** (``atsc.extra_teachers``; the public code has no multi-teacher implementation). Design:
teacher ``j`` gets its own projector ``P_j`` from the shared student map and its own ``Omega_j`` against its own
pretrained copy; the joint loss is ``sum_j [MSE(P_j(F_s), F_t_j) + w Omega_j]``, so each teacher and projector
receives exactly the gradient it would receive alone and the student the sum; each classifier takes its own CE
step with its own optimizer state; the prediction is the mean of the teachers' classifier logits on their projected
features, ``mean_j head_j(GAP(P_j(F_s)))``. Every teacher must be trained on this task's classes (checked).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tgeo_jax import config_checks, losses, models
from tgeo_jax import teacher as teacher_lib
from tgeo_jax.errors import UserError
from tgeo_jax.methods import base, simkd

__all__ = ["CLASSIFIER_UPDATES", "parameter_drift", "atsc_loss", "parse_extra_teachers", "classifier_mask", "ATSC"]

CLASSIFIER_UPDATES = ("bias", "all")


def parameter_drift(params, init_params) -> jax.Array:
  """``Omega = sum ||theta - theta_0||^2`` over every leaf with two or more axes (conv kernels, linear weights).

  ``init_params`` is stop-gradient: Omega pulls ``params`` back, never the pretrained copy. Float32 scalar.
  """
  init_params = jax.lax.stop_gradient(init_params)
  terms = [jnp.sum(jnp.square(p.astype(jnp.float32) - p0.astype(jnp.float32)))
           for p, p0 in zip(jax.tree.leaves(params), jax.tree.leaves(init_params)) if p.ndim >= 2]
  return sum(terms, jnp.zeros((), jnp.float32))


def atsc_loss(projected, teacher_fmaps, teacher_params, init_params, *, w: float):
  """The joint objective ``sum_j [MSE(projected_j, teacher_fmap_j) + w Omega(teacher_params_j)]``.

  Args:
    projected: per teacher, the projected student map ``[B, h, w, C_t]``.
    teacher_fmaps: per teacher, its feature map pooled to the same shape (not stop-gradient: the teacher adapts).
    teacher_params, init_params: per teacher, its trainable parameters and the pretrained copy.
    w: Omega's weight.
  Returns:
    ``(loss, {"mse", "omega"})`` (float32 scalars; ``mse``/``omega`` summed over teachers).
  """
  mse = sum(simkd.feature_mse(p, t) for p, t in zip(projected, teacher_fmaps))
  omega = sum(parameter_drift(p, p0) for p, p0 in zip(teacher_params, init_params))
  return mse + w * omega, {"mse": mse, "omega": omega}


def parse_extra_teachers(value) -> list[tuple[str, str]]:
  """``atsc.extra_teachers`` as ``[(model, workdir), ...]``; entries are pairs or ``'model:workdir'`` strings."""
  entries = (value,) if isinstance(value, str) else value
  parsed = []
  try:
    for i, entry in enumerate(entries):
      if isinstance(entry, str) and ":" in entry:
        entry = tuple(entry.split(":", 1))
      if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and all(isinstance(e, str) and e for e in entry)):
        raise UserError(f"atsc.extra_teachers: entry {i} is {entry!r}; expected a ('model', 'workdir') pair "
                        "or a 'model:workdir' string")
      parsed.append((entry[0], entry[1]))
  except TypeError:
    raise UserError(f"atsc.extra_teachers: expected a list of ('model', 'workdir') pairs, got {value!r}") from None
  return parsed


def _key_names(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def classifier_mask(params, num_classes: int, *, what: str, include_kernel: bool, field: str):
  """A bool pytree shaped like ``params``: True on the classifier's bias (and its weight matrix if asked).

  The classifier is the model's only two-axis parameter ``[C, num_classes]`` (every zoo conv model: convolutions
  are 4-D); its bias sits beside it.
  """
  matrices = [(_key_names(path), x.shape) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
              if x.ndim == 2]
  if len(matrices) != 1 or matrices[0][1][-1] != num_classes:
    raise UserError(f"{field}: ATSC needs a teacher whose only matrix parameter is its [C, {num_classes}] "
                    f"classifier; {what!r} has {[shape for _, shape in matrices]}")
  kernel = matrices[0][0]
  at = max(i for i, name in enumerate(kernel) if name == "kernel")
  module = kernel[:at]

  def selected(path, _):
    names = _key_names(path)
    if names[:at] != module or len(names) <= at:
      return False
    return names[at] == "bias" or (include_kernel and names[at] == "kernel")

  return jax.tree_util.tree_map_with_path(selected, params)


def _select(tree, mask):
  """``tree`` with zeros where ``mask`` is False."""
  return jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), tree, mask)


class ATSC(base.Method):
  """SimKD with adapting teacher(s) and a CE-trained shared classifier; predicts through the adapted head(s)."""

  name = "atsc"
  config_group = "atsc"

  @classmethod
  def defaults(cls):
    # SimKD whose teacher adapts (MSE + w * Omega), its classifier then takes a CE step (docs/methods.md §4).
    c = ml_collections.ConfigDict()
    c.factor = 2  # projector bottleneck r, as simkd.factor
    c.student_feature = "pre_head"  # the student map projected, as simkd.student_feature (public code: feat_s[-2])
    # Weight of Omega = sum ||theta_T - theta_T0||^2 over the teacher's conv kernels and classifier matrix
    # (1 on CIFAR-100, 10 on ImageNet).
    c.w = 1.0
    c.classifier_update = "bias"  # CE step on the teacher classifier: 'bias' (public code) or 'all' (+ matrix)
    # True: the adapting teacher's BatchNorm uses batch statistics and updates its running averages (public code);
    # False: it keeps the pretrained running statistics (scale/shift still train).
    c.teacher_train_mode = True
    # More teachers besides teacher.model/teacher.checkpoint: ('model', 'workdir') pairs or 'model:workdir' strings.
    # Each gets its own projector and Omega; the prediction is the mean of the teachers' classifier logits.
    c.extra_teachers = ()
    return c
  teacher_logits_fixed = False  # the teacher adapts: its logits change every step

  @classmethod
  def validate_config(cls, config) -> None:
    config_checks.positive_int(config, "atsc.factor")
    simkd.validate_student_feature(config, "atsc.student_feature")
    config_checks.nonnegative_number(config, "atsc.w")
    config_checks.require(config, "atsc.classifier_update", lambda v: v in CLASSIFIER_UPDATES,
                          f"one of {list(CLASSIFIER_UPDATES)}")
    config_checks.require(config, "atsc.teacher_train_mode", lambda v: isinstance(v, bool), "True or False")
    parse_extra_teachers(config.atsc.extra_teachers)

  def __init__(self, config, spec, **kwargs):
    super().__init__(config, spec, **kwargs)
    cfg = config.atsc
    self.teachers = [self.teacher]
    fields = ["teacher.model"]
    for i, (model_name, path) in enumerate(parse_extra_teachers(cfg.extra_teachers)):
      field = f"atsc.extra_teachers[{i}]"
      self.teachers.append(teacher_lib.load_teacher_from(model_name, path, spec, field=field,
                                                         model_field=f"{field} model",
                                                         dtype=models.compute_dtype(config)))
      fields.append(field)
    self.student_stage = cfg.student_feature
    s_shape = simkd.feature_map_shape(*self.student, spec.input_shape, stage=self.student_stage)
    self.sizes, self.projectors, self.head_masks = [], [], []
    for j, (t, field) in enumerate(zip(self.teachers, fields)):
      params = t.variables["params"]
      t_shape = simkd.feature_map_shape(t.graphdef, params, t.variables["rest"], spec.input_shape)
      self.sizes.append(simkd.common_size(s_shape, t_shape, method=self.name, student_model=config.model.name,
                                          teacher_model=t.name, teacher_field=field))
      c_s, c_t = simkd.projector_channels(s_shape, t_shape, factor=cfg.factor, factor_field="atsc.factor")
      self.projectors.append(simkd.make_projector(c_s, c_t, factor=cfg.factor, seed=config.seed + 1 + j))
      self.head_masks.append(classifier_mask(params, spec.num_classes, what=t.name,
                                             include_kernel=cfg.classifier_update == "all", field=field))
    # Step 1 updates everything, the classifier bias included (zero gradient, weight decay: module docstring).
    self.joint_tx = self.tx
    self.head_txs = [optax.masked(self.tx, mask) for mask in self.head_masks]

  def init(self, rng):
    del rng  # projectors come from config.seed
    # Copies: the trainable teachers must not share buffers with the frozen pretrained ones, because the trainer
    # donates the (non-frozen) state to the jitted step.
    teachers = [jax.tree.map(jnp.copy, t.variables["params"]) for t in self.teachers]
    params = {"student": self.student.params, "projectors": [p.params for p in self.projectors],
              "teachers": teachers}
    rest = {"student": self.student.rest, "projectors": [p.rest for p in self.projectors],
            "teachers": [jax.tree.map(jnp.copy, t.variables["rest"]) for t in self.teachers]}
    state = base.trainable_state(params, rest, self.joint_tx,
                                 head_opt_state=[tx.init(p) for tx, p in zip(self.head_txs, teachers)])
    return state, {"teachers_init": [t.variables["params"] for t in self.teachers]}

  # ---- forward pieces
  def project(self, params, rest, inputs, *, train: bool):
    """``([P_j(F_s)], new student rest, [new projector rest])``: one student pass, one projection per teacher."""
    _, fmap, student_rest = models.apply_features(self.student.graphdef, params["student"], rest["student"], inputs,
                                                  train=train, stage=self.student_stage)
    projected, projector_rests = [], []
    for proj, size, p, r in zip(self.projectors, self.sizes, params["projectors"], rest["projectors"]):
      out, new_r = models.apply(proj.graphdef, p, r, simkd.adaptive_avg_pool(fmap, size), train=train)
      projected.append(out)
      projector_rests.append(new_r)
    return projected, student_rest, projector_rests

  def shared_head_logits(self, teacher_params, teacher_rest, projected):
    """``mean_j head_j(GAP(P_j(F_s)))`` ``[B, K]`` through the (adapted) teacher classifiers."""
    logits = [models.apply_classifier(t.graphdef, p, r, x)
              for t, p, r, x in zip(self.teachers, teacher_params, teacher_rest, projected)]
    return sum(logits) / len(logits)

  # ---- interface
  def train_step(self, state, frozen, batch, kind=None):
    del kind  # a single compiled variant
    cfg = self.config.atsc
    inputs, labels = batch["inputs"], batch["labels"]
    rest = state["rest"]
    teacher_train = bool(cfg.teacher_train_mode)

    def joint_objective(params):
      projected, student_rest, projector_rests = self.project(params, rest, inputs, train=True)
      targets, teacher_rests = [], []
      for t, size, p, r in zip(self.teachers, self.sizes, params["teachers"], rest["teachers"]):
        _, fmap, new_r = models.apply_features(t.graphdef, p, r, inputs, train=teacher_train)
        targets.append(simkd.adaptive_avg_pool(fmap, size))
        teacher_rests.append(new_r)
      loss, metrics = atsc_loss(projected, targets, params["teachers"], frozen["teachers_init"], w=cfg.w)
      new_rest = {"student": student_rest, "projectors": projector_rests, "teachers": teacher_rests}
      return loss, (new_rest, projected, metrics)

    loss, (new_rest, projected, metrics), params, opt_state, grads = base.minimize_step(
        self.joint_tx, joint_objective, state["params"], state["opt_state"])
    # The predictor's accuracy on this batch, before either update (as the public code logs it).
    logits = self.shared_head_logits(state["params"]["teachers"], rest["teachers"],
                                     jax.lax.stop_gradient(projected))

    # Classifier step: CE on the updated teacher's own logits; features are fixed, only the head can move.
    teachers, head_opt_states, teacher_ce, teacher_acc = [], [], 0.0, 0.0
    for t, mask, tx, p, r, s in zip(self.teachers, self.head_masks, self.head_txs, params["teachers"],
                                    new_rest["teachers"], state["head_opt_state"]):
      _, fmap, _ = models.apply_features(t.graphdef, p, r, inputs, train=teacher_train)
      fmap = jax.lax.stop_gradient(fmap)

      def head_objective(p, t=t, r=r, fmap=fmap):
        logits_t = models.apply_classifier(t.graphdef, p, r, fmap)
        return jnp.mean(losses.cross_entropy(logits_t, labels)), logits_t

      (ce, logits_t), head_grads = jax.value_and_grad(head_objective, has_aux=True)(p)
      head_updates, s = tx.update(_select(head_grads, mask), s, p)
      teachers.append(optax.apply_updates(p, head_updates))
      head_opt_states.append(s)
      teacher_ce += ce / len(self.teachers)
      teacher_acc += base.batch_accuracy(logits_t, labels) / len(self.teachers)

    new_state = dict(state, params=dict(params, teachers=teachers), rest=new_rest, opt_state=opt_state,
                     head_opt_state=head_opt_states, step=state["step"] + 1)
    return new_state, dict(metrics, loss=loss, teacher_ce=teacher_ce, teacher_accuracy=teacher_acc,
                           accuracy=base.batch_accuracy(logits, labels), grad_norm=optax.tree.norm(grads))

  def predict(self, state, frozen, inputs):
    del frozen
    projected, _, _ = self.project(state["params"], state["rest"], inputs, train=False)
    return self.shared_head_logits(state["params"]["teachers"], state["rest"]["teachers"], projected)

  def teacher_logits(self, state, frozen, inputs):
    """The adapted teachers' own predictions (eval mode), averaged: what evaluation reports as the teacher."""
    del frozen
    logits = [models.apply(t.graphdef, p, r, inputs, train=False)[0]
              for t, p, r in zip(self.teachers, state["params"]["teachers"], state["rest"]["teachers"])]
    return jax.lax.stop_gradient(sum(logits) / len(logits))
