"""The method interface and the pieces every method shares.

Two tiers. Most KD methods are a pure loss of (student logits, teacher logits, batch): they subclass
``LossMethod`` and define ``loss`` -- the student step, the teacher lookup and the accuracy metric are shared.
Methods that need more (a meta step, a projector, an adapting or online teacher) subclass ``Method`` and define
``train_step``. Either way a method is built from (config, task spec, teacher) and its functions are pure and
jit-able::

    init(rng) -> (state, frozen)                                 # two dict pytrees
    train_step(state, frozen, batch, kind) -> (state, metrics)   # metrics: dict of scalar means over the batch
    predict(state, frozen, inputs) -> logits [B, K]              # the eval head

plus ``teacher_logits(state, frozen, inputs)`` for distillation methods (evaluation reports the teacher too).

``state`` is what training changes: it is checkpointed, restored and donated to the jitted step.
``state["step"]`` (int32 scalar) counts the method's own steps (DKD's warm-up and TGeo-KD's windows read it; the
trainer keeps its own step count). Students use ``params`` / ``rest`` (BatchNorm statistics) / ``opt_state``.
``frozen`` is what training never changes (the frozen teacher's variables, quantities derived from it such as its
logit table): built by ``init``, passed to every call, never checkpointed (it is rebuilt from the teacher).

Each method class carries its config group's defaults (``config_group``, ``defaults()``); the registry composes
them into ``tgeo_jax.default_config.base_config()``.
"""

from __future__ import annotations

import json
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from tgeo_jax import losses, models, study_teacher
from tgeo_jax.errors import UserError
from tgeo_jax import teacher as teacher_lib
from tgeo_jax.teacher import Teacher

__all__ = ["Method", "LossMethod", "trainable_state", "minimize_step", "batch_accuracy"]


class Method:
  """Base class: a student trained with ``tx``; subclasses define ``train_step`` (or use ``LossMethod``)."""

  name: str = "?"
  # The config group of this method's own fields (``config.<config_group>``), None when it has none.
  config_group: str | None = None
  # Whether the trainer loads ``teacher.checkpoint`` as the frozen teacher (False: CE, and TriKD, which loads
  # its own anchor and online teacher).
  loads_teacher_checkpoint: bool = True
  # Whether the method reads the ``teacher.*`` fields at all (False: CE). Only the fields a method reads identify
  # its runs (``methods.reads_field``, ``run_identity.config_record``).
  reads_teacher_fields: bool = True
  uses_validation_batch: bool = False
  # teacher_logits(state, frozen, x) reads only ``frozen`` (evaluation may then compute them once).
  teacher_logits_fixed: bool = True

  @classmethod
  def defaults(cls):
    """The defaults of ``config.<config_group>`` (an ``ml_collections.ConfigDict``), or None."""
    return None

  def __init__(self, config, spec, *, student: models.Functional, tx: optax.GradientTransformation,
               teacher: Teacher | None, task=None, steps_per_epoch: int | None = None):
    # ``task`` (data.TaskData) is for methods that precompute over the training split (e.g. TGeo-KD's class-mean
    # teacher); step functions never read it.
    self.config, self.spec, self.task = config, spec, task
    # The trainer's epoch length (DKD's warm-up, unroll windows); built without a trainer, the full batches of the
    # training part.
    self.steps_per_epoch = max(1, steps_per_epoch if steps_per_epoch is not None
                               else spec.train_size // config.batch_size)
    self.student, self.tx, self.teacher = student, tx, teacher
    # The study-only wrong teacher (tgeo_jax/study_teacher.py): per training example, the rotation of its teacher
    # logits (0 = untouched); None when off.
    self.study_teacher_shift = None
    if teacher is not None and task is not None and study_teacher.active(config):
      study_teacher.validate(config, spec.num_classes)
      g = config[study_teacher.FIELD]
      self.study_teacher_shift = study_teacher.wrong_teacher_shift(
          task.train.labels, spec.num_classes, kind=g.kind, fraction=g.fraction, classes=tuple(g.classes),
          seed=g.seed)

  # A method trained in a chain of runs (TriKD's generations) names its fields here: ``{"count": FIELD,
  # "previous": FIELD, "name": NAME}``; ``tgeo_jax.generations`` drives the chain above the trainer.
  generations = None

  @classmethod
  def validate_config(cls, config) -> None:
    """Raises ``UserError`` naming a bad method-specific field; the common fields are checked already."""
    del config

  # ---- interface
  def init(self, rng: jax.Array) -> tuple[dict, dict]:
    """``(state, frozen)``: the trainable state and what never changes (see the module docstring)."""
    del rng  # every initial value comes from config.seed (models, projectors, fusion nets)
    state = trainable_state(self.student.params, self.student.rest, self.tx)
    frozen = {}
    if self.teacher is not None:
      frozen["teacher"] = self.teacher.variables
      if self.study_teacher_shift is not None:
        frozen["study_teacher_shift"] = jnp.asarray(self.study_teacher_shift)
      if self.caches_teacher_logits():
        frozen["teacher_logits_table"] = self.teacher_logits_over_train(frozen)
    return state, frozen

  def caches_teacher_logits(self) -> bool:
    """``teacher.cache_logits``: 'auto' caches when training inputs are not augmented (the teacher's outputs
    are then a fixed function of the example), 'on'/'off' force it."""
    mode = self.config.teacher.cache_logits  # one of 'auto', 'on', 'off' (config_checks.validate)
    if mode == "on" and self.task is not None and self.task.augment is not None:
      raise UserError("teacher.cache_logits: 'on' needs data.augment='none' (augmented inputs change the "
                      "teacher's outputs every epoch)")
    if mode == "auto":
      return self.task is not None and self.task.augment is None
    return mode == "on"

  def teacher_logits_over_train(self, frozen: dict, chunk: int = 1000) -> jax.Array:
    """``[len(train), K]`` frozen-teacher logits of every training example (one jitted pass, in chunks), with the
    study's wrong teacher applied when it is on (the stored table is always the real teacher's).

    With ``teacher.logits_cache_dir`` set, the table is stored there under a hash of the teacher's variables and
    the training inputs, with a checksum verified on every read (``teacher_lib.LogitCache``), so runs that share
    a teacher and a training part (other methods, seeds, label noise) read it instead of recomputing it.
    """
    import numpy as np
    source = self.task.train
    inputs = [source.gather(np.arange(s, min(s + chunk, len(source)))) for s in range(0, len(source), chunk)]
    # A frozen teacher's logits read only ``frozen`` (teacher_logits_fixed): no trainable state is needed.
    fn = jax.jit(lambda f, x: self.teacher_logits(None, f, x))

    def compute():
      return np.concatenate([np.asarray(fn(frozen, x)) for x in inputs])

    cache_dir = self.config.teacher.logits_cache_dir
    if not cache_dir:
      return self._study_wrong(jnp.asarray(compute()), self.study_teacher_shift)
    # Everything that changes the table's values is in the key: the teacher's variables, the training inputs (after
    # preprocessing), and how the logits are computed -- the model graph, the compute dtype (a bfloat16 student
    # runs its teacher in bfloat16) and the method's teacher path.
    how = json.dumps({"teacher_model": self.config.teacher.model,
                      "compute_dtype": str(models.compute_dtype(self.config) or "float32"),
                      "teacher_logits": f"{type(self).teacher_logits.__module__}."
                                        f"{type(self).teacher_logits.__qualname__}"}, sort_keys=True)
    cache = teacher_lib.LogitCache(cache_dir, key=(frozen["teacher"], inputs, np.frombuffer(how.encode(), np.uint8)))
    table = jnp.asarray(cache.get_or_compute(compute, shape=(len(source), self.spec.num_classes)))
    return self._study_wrong(table, self.study_teacher_shift)

  @staticmethod
  def _study_wrong(logits, shift):
    """``logits [B, K]`` of training examples with the study's wrong teacher applied (``shift [B]``; None = off)."""
    return logits if shift is None else study_teacher.shift_logits(logits, shift)

  def batch_teacher_logits(self, state: dict, frozen: dict, batch: dict) -> jax.Array:
    """The teacher's logits for a training batch ``[B, K]``: looked up by example index when cached
    (``frozen['teacher_logits_table']``), else one forward pass of the teacher."""
    table = frozen.get("teacher_logits_table")
    if table is not None:
      return table[batch["index"]]  # the study's wrong teacher, when on, is in the table already
    shift = frozen.get("study_teacher_shift")
    return self._study_wrong(self.teacher_logits(state, frozen, batch["inputs"]),
                             None if shift is None else shift[batch["index"]])

  def train_step(self, state: dict, frozen: dict, batch: dict, kind=None) -> tuple[dict, dict]:
    """``kind`` is ``step_kind(step)``, a static (hashable) choice among compiled variants of the step."""
    raise NotImplementedError

  def step_kind(self, step: int):
    """Which variant of ``train_step`` runs at host step ``step`` (e.g. meta vs plain steps of TGeo-KD).

    Chosen on the host and passed to ``train_step`` as a static argument: one compiled program per kind with the
    host pipeline; the device pipeline's chunk runs each step's kind through a ``lax.switch`` (since the models'
    convolutions keep XLA:CPU's fast layout inside control flow it costs nothing visible: docs/benchmarks.md).
    """
    del step
    return None

  def epoch_report(self, state: dict, frozen: dict, workdir: str, epoch: int) -> dict:
    """Method-specific analysis after each evaluation (host side); scalars are added to metrics.jsonl.

    With the study's wrong teacher on, the set S (training positions and shifts) is written once to
    ``WORKDIR/study_wrong_teacher.npz`` for analysis."""
    del state, frozen, epoch
    if self.study_teacher_shift is not None:
      study_teacher.record(workdir, self.study_teacher_shift)
    return {}

  def predict(self, state: dict, frozen: dict, inputs: jax.Array) -> jax.Array:
    del frozen
    logits, _ = models.apply(self.student.graphdef, state["params"], state["rest"], inputs, train=False)
    return logits

  def teacher_logits(self, state: dict | None, frozen: dict, inputs: jax.Array) -> jax.Array | None:
    """``[B, K]`` eval-mode teacher logits (None without a teacher). With ``teacher_logits_fixed`` they read
    only ``frozen`` and ``state`` may be None."""
    del state
    if self.teacher is None:
      return None
    t = frozen["teacher"]
    logits, _ = models.apply(self.teacher.graphdef, t["params"], t["rest"], inputs, train=False)
    return jax.lax.stop_gradient(logits)

  # ---- shared pieces
  def student_forward(self, params, rest, inputs, *, train: bool = True):
    return models.apply(self.student.graphdef, params, rest, inputs, train=train)

  def gradient_step(self, state: dict, inputs: jax.Array,
                    loss_from_logits: Callable[[jax.Array], tuple[jax.Array, dict]]) -> tuple[dict, dict]:
    """One optimizer step of the student on ``loss_from_logits(student_logits [B, K]) -> (scalar, metrics)``."""

    def objective(params):
      logits, new_rest = self.student_forward(params, state["rest"], inputs)
      loss, metrics = loss_from_logits(logits)
      return loss, (new_rest, metrics)

    loss, (new_rest, metrics), params, opt_state, grads = minimize_step(self.tx, objective, state["params"],
                                                                        state["opt_state"])
    new_state = dict(state, params=params, rest=new_rest, opt_state=opt_state, step=state["step"] + 1)
    return new_state, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))


class LossMethod(Method):
  """The loss-only tier: a method that is a pure loss of (student logits, teacher logits, batch).

  Subclasses define ``loss``; one optimizer step of the student on it, the teacher's logits for the batch (the
  cached table or a forward pass of the frozen teacher; None for a method without a teacher) and the batch
  accuracy are shared.
  """

  def loss(self, student_logits, teacher_logits, batch: dict, step) -> tuple[jax.Array, dict]:
    """``(scalar loss, metrics)`` for ``student_logits [B, K]``, ``teacher_logits [B, K]`` (or None), the batch
    (``labels [B]``, ``index [B]``, ...) and the int32 step count."""
    raise NotImplementedError

  def train_step(self, state, frozen, batch, kind=None):
    del kind  # one compiled variant
    teacher_logits = self.batch_teacher_logits(state, frozen, batch) if self.teacher is not None else None
    if "study_teacher_shift" in frozen:  # what the study's oracle reads: which examples the teacher is wrong on
      batch = dict(batch, study_teacher_wrong=frozen["study_teacher_shift"][batch["index"]] > 0)

    def loss_from_logits(logits):
      loss, metrics = self.loss(logits, teacher_logits, batch, state["step"])
      return loss, dict(metrics, accuracy=batch_accuracy(logits, batch["labels"]))

    return self.gradient_step(state, batch["inputs"], loss_from_logits)


def trainable_state(params, rest, tx: optax.GradientTransformation, **extra) -> dict:
  """The state skeleton every method starts from: ``step``, ``params``, ``rest`` (BatchNorm statistics),
  ``opt_state = tx.init(params)`` and any ``extra`` entries."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest, "opt_state": tx.init(params),
          **extra}


def minimize_step(tx: optax.GradientTransformation, objective, params, opt_state):
  """One step of ``tx`` on ``objective(params) -> (scalar loss, aux)``: ``(loss, aux, new params, new optimizer
  state, grads)``."""
  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  return loss, aux, optax.apply_updates(params, updates), new_opt_state, grads


def batch_accuracy(logits, labels):
  return jnp.mean(losses.accuracy(logits, labels))
