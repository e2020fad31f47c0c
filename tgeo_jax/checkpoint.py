"""Checkpoints with orbax: atomic saves, restore of the latest good step, fall back past a corrupt one.

A checkpoint holds two items: ``state`` (every array the run needs to continue bit-exactly: student params and
BatchNorm statistics, optimizer states, fusion net, step, RNG key) and ``meta`` (JSON: the config, the epoch/data
position, the method). Orbax writes each step into a temporary directory and renames it when complete, so a
crash during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from tgeo_jax.errors import UserError


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, target: Any) -> tuple[int, Any, dict] | None:
    """``(step, state, meta)`` from the newest readable checkpoint, or None when there is none.

    ``target`` is a pytree of arrays (or ShapeDtypeStructs) with the shardings to restore into; without it
    optax states would come back as plain lists. A checkpoint that fails to restore is skipped with a one-line
    warning (never deleted), and the previous one is tried.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any failure to read means "not a good checkpoint"
        logging.warning("checkpoint %s/%d is unreadable (%s: %s); falling back to the previous one",
                        self.directory, step, type(e).__name__, str(e).splitlines()[0][:200])
        print(f"warning: checkpoint step {step} in {self.directory} is unreadable; trying the previous one")
        continue
      return step, restored["state"], restored["meta"]
    return None

  def close(self):
    self.manager.close()


def restore_params(directory: str, target: Any, *, what: str) -> tuple[Any, dict]:
  """Restores ``state`` (restricted to ``target``'s structure) and meta from the latest checkpoint in ``directory``.

  Used to load a frozen teacher: ``target`` is ``{"params": ..., "rest": ...}``; other saved entries are ignored.
  """
  if not os.path.isdir(directory):
    raise UserError(f"{what}: no checkpoint directory {directory!r}")
  ckpt = Checkpointer(directory)
  steps = ckpt.steps()
  if not steps:
    raise UserError(f"{what}: {directory!r} holds no checkpoint")
  meta = ckpt.read_meta(steps[-1])
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    state = ckpt.manager.restore(steps[-1], args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=abstract, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))["state"]
  except Exception as e:  # noqa: BLE001
    raise UserError(f"{what}: checkpoint {directory!r} does not match the expected model "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
  return state, meta
