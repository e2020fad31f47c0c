"""Loading a frozen teacher from the work directory of the run that trained it."""

from __future__ import annotations

import os

from tgeo_jax import checkpoint, models
from tgeo_jax.errors import UserError
from tgeo_jax.methods.base import Teacher


def checkpoint_dir(path: str) -> str:
  """Accepts a run's work directory or its ``checkpoints/`` directory."""
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def load_teacher(config, spec) -> Teacher:
  """The teacher named by ``config.teacher.model`` with the weights of ``config.teacher.checkpoint``.

  Checks that the checkpoint was written by a finished run of that very model on the same number of classes.
  The teacher runs in the student's compute dtype (``config.compute_dtype``); its parameters stay float32, so a
  teacher trained in either mode loads in either mode.
  """
  if not config.teacher.checkpoint:
    raise UserError(f"teacher.checkpoint: method {config.method!r} needs a trained teacher; train one with "
                    "'python train.py --config=configs/fashion_mnist.py:teacher --workdir=DIR' and pass "
                    "--config.teacher.checkpoint=DIR")
  return load_teacher_from(config.teacher.model, config.teacher.checkpoint, spec, field="teacher.checkpoint",
                           model_field="teacher.model", dtype=models.compute_dtype(config))


def load_teacher_from(model_name: str, path: str, spec, *, field: str, model_field: str | None = None,
                      dtype=None) -> Teacher:
  """Model ``model_name`` with the weights of the finished run whose work directory is ``path``.

  For every model a method loads besides ``config.teacher`` (ATSC's extra teachers, TriKD's anchor). Bad input
  raises a one-line ``UserError`` naming ``field`` (the checkpoint's config field) or ``model_field`` (the field
  naming the model; defaults to ``field``). The class count is checked before the weights are read, so a teacher
  trained on another task is reported as such rather than as a shape mismatch. ``dtype``: the compute dtype
  (``models.compute_dtype(config)``; ``None``: float32).
  """
  model_field = model_field or field
  if not path:
    raise UserError(f"{field}: expected the work directory of a finished {model_name!r} run, got ''")
  ckpt_dir = checkpoint_dir(path)
  try:
    model = models.create(model_name, num_classes=spec.num_classes, input_shape=spec.input_shape, dtype=dtype,
                          **spec.model_kwargs)
  except KeyError as e:
    raise UserError(f"{model_field}: {e.args[0]}") from None
  meta = _latest_meta(ckpt_dir, field)
  if meta.get("num_classes") != spec.num_classes:
    raise UserError(f"{field}: {path!r} was trained on {meta.get('num_classes')} classes, "
                    f"this task has {spec.num_classes}")
  fn = models.split(model)
  variables, meta = checkpoint.restore_params(ckpt_dir, {"params": fn.params, "rest": fn.rest}, what=field)
  saved_model = meta.get("config", {}).get("model", {}).get("name")
  if saved_model != model_name:
    raise UserError(f"{field}: {path!r} holds a {saved_model!r} model, but {model_field} is {model_name!r}")
  if not meta.get("finished", False):
    raise UserError(f"{field}: the run in {path!r} has not finished (step {meta.get('step')} of "
                    f"{meta.get('total_steps')}); finish it first by running its command again")
  return Teacher(model_name, fn.graphdef, variables)


def _latest_meta(ckpt_dir: str, field: str) -> dict:
  # Checked before constructing a Checkpointer, which would create the directory.
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"{field}: no checkpoint directory {ckpt_dir!r}")
  ckpt = checkpoint.Checkpointer(ckpt_dir)
  try:
    steps = ckpt.steps()
    if not steps:
      raise UserError(f"{field}: {ckpt_dir!r} holds no checkpoint")
    return ckpt.read_meta(steps[-1])
  finally:
    ckpt.close()
