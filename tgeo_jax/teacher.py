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
  """
  path = config.teacher.checkpoint
  if not path:
    raise UserError(f"teacher.checkpoint: method {config.method!r} needs a trained teacher; train one with "
                    "'python train.py --config=configs/fashion_mnist.py:teacher --workdir=DIR' and pass "
                    "--config.teacher.checkpoint=DIR")
  ckpt_dir = checkpoint_dir(path)
  try:
    model = models.create(config.teacher.model, num_classes=spec.num_classes, input_shape=spec.input_shape)
  except KeyError as e:
    raise UserError(f"teacher.model: {e.args[0]}") from None
  fn = models.split(model)
  variables, meta = checkpoint.restore_params(ckpt_dir, {"params": fn.params, "rest": fn.rest},
                                              what="teacher.checkpoint")
  saved = meta.get("config", {})
  saved_model = saved.get("model", {}).get("name")
  if saved_model != config.teacher.model:
    raise UserError(f"teacher.checkpoint: {path!r} holds a {saved_model!r} model, but teacher.model is "
                    f"{config.teacher.model!r}")
  if meta.get("num_classes") != spec.num_classes:
    raise UserError(f"teacher.checkpoint: {path!r} was trained on {meta.get('num_classes')} classes, "
                    f"this task has {spec.num_classes}")
  if not meta.get("finished", False):
    raise UserError(f"teacher.checkpoint: the run in {path!r} has not finished (step {meta.get('step')} of "
                    f"{meta.get('total_steps')}); finish it first by running its command again")
  return Teacher(config.teacher.model, fn.graphdef, variables)
