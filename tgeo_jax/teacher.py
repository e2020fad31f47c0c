"""Loading a frozen teacher from the work directory of the run that trained it, with its identity."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from typing import Any

from tgeo_jax import checkpoint, models, run_identity
from tgeo_jax.errors import UserError

__all__ = ["Teacher", "check_outputs", "collect_loaded", "variables_digest", "checkpoint_dir", "load_teacher", "load_teacher_from",
           "latest_checkpoint_meta", "LogitCache"]


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher: static graphdef plus its variables (which travel in ``frozen['teacher']``, beside the state).

  ``identity`` (None for a teacher built in code): ``{"field", "model", "path", "variables_sha256",
  "run_fingerprint", "data", "run_dir"}`` -- what a run's fingerprint records of it (``field``, ``model``,
  ``variables_sha256``) and what its provenance check reads (``data``: the teacher run's data identity).
  """

  name: str
  graphdef: Any
  variables: dict  # {"params": ..., "rest": ...}
  identity: dict | None = dataclasses.field(default=None, compare=False)


# Lists that ``collect_loaded`` hands out: every teacher loaded while one is open is appended to it.
_collectors: list[list] = []


@contextlib.contextmanager
def collect_loaded():
  """Yields a list that receives every ``Teacher`` loaded from a checkpoint inside the block (the trainer uses it
  to fingerprint and provenance-check every teacher a method loads: ATSC's extra teachers, TriKD's anchor)."""
  loaded: list = []
  _collectors.append(loaded)
  try:
    yield loaded
  finally:
    _collectors.remove(loaded)


def variables_digest(records: dict) -> str:
  """sha256 over ``checkpoint.array_records`` of a teacher's variables (paths, shapes, dtypes, each array's
  sha256): the records its restore already computed to verify the checkpoint."""
  return hashlib.sha256(repr(sorted(records.items())).encode()).hexdigest()


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
    from tgeo_jax import default_config
    raise UserError(f"teacher.checkpoint: method {config.method!r} needs a trained teacher; train one with "
                    f"'{default_config.train_command(config, config.teacher.model)}' and pass "
                    "--config.teacher.checkpoint=DIR")
  return load_teacher_from(config.teacher.model, config.teacher.checkpoint, spec, field="teacher.checkpoint",
                           model_field="teacher.model", dtype=models.compute_dtype(config))


def _check_variables(variables: dict, path: str, field: str) -> None:
  """Every floating variable finite and every BatchNorm variance non-negative, else one line naming the leaf."""
  import jax
  import numpy as np
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    array = np.asarray(leaf)
    if not np.issubdtype(array.dtype, np.floating):
      continue
    name = jax.tree_util.keystr(key_path).removesuffix(".value")  # nnx.Variable's field
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
      raise UserError(f"{field}: the teacher in {path!r} holds {bad} non-finite value{'s' * (bad != 1)} in {name}: "
                      "damaged weights (or a run that diverged), refused")
    if name.endswith("['var']"):  # BatchNorm's running variance
      if np.any(array < 0):
        raise UserError(f"{field}: the teacher in {path!r} holds a negative BatchNorm variance in {name}: damaged "
                        "weights, refused")


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
  meta = latest_checkpoint_meta(ckpt_dir, field)
  if meta.get("num_classes") != spec.num_classes:
    raise UserError(f"{field}: {path!r} was trained on {meta.get('num_classes')} classes, "
                    f"this task has {spec.num_classes}")
  fn = models.split(model)
  variables, meta, records = checkpoint.restore_params(ckpt_dir, {"params": fn.params, "rest": fn.rest},
                                                       what=field)
  saved_model = meta.get("config", {}).get("model", {}).get("name")
  if saved_model != model_name:
    raise UserError(f"{field}: {path!r} holds a {saved_model!r} model, but {model_field} is {model_name!r}")
  if not meta.get("finished", False):
    raise UserError(f"{field}: the run in {path!r} has not finished (step {meta.get('step')} of "
                    f"{meta.get('total_steps')}); finish it first by running its command again")
  _check_variables(variables, path, field)
  saved_identity = meta.get("identity") or {}
  identity = {"field": field, "model": model_name, "path": os.path.abspath(path),
              "variables_sha256": variables_digest(records),
              "run_fingerprint": saved_identity.get("fingerprint"), "data": saved_identity.get("data"),
              "run_dir": run_identity.run_dir_of(ckpt_dir)}
  teacher = Teacher(model_name, fn.graphdef, variables, identity)
  for loaded in _collectors:
    loaded.append(teacher)
  return teacher


def latest_checkpoint_meta(ckpt_dir: str, field: str) -> dict:
  """The metadata of the newest checkpoint in ``ckpt_dir`` (a one-line UserError naming ``field`` when there is
  none or it is torn)."""
  # Checked before constructing a Checkpointer, which would create the directory.
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"{field}: no checkpoint directory {ckpt_dir!r}")
  ckpt = checkpoint.Checkpointer(ckpt_dir)
  try:
    steps = ckpt.steps()
    if not steps:
      raise UserError(f"{field}: {ckpt_dir!r} holds no checkpoint")
    try:
      return ckpt.read_meta(steps[-1])
    except checkpoint.CorruptCheckpointError as e:
      raise UserError(f"{field}: {e}") from None
  finally:
    ckpt.close()


# --------------------------------------------------------------------------------------- teacher-logit cache


class LogitCache:
  """A frozen teacher's training-part logit table on disk, verified on every read.

  ``DIR/teacher_logits_<key>.npz`` holds ``logits [N, K]`` and ``sha256`` (of the logits' bytes), written to a
  temporary file and renamed, so a reader sees a whole file or none. A table that cannot be read, has another
  shape or does not match its checksum is moved aside (``.corrupt``) with one warning line and recomputed; a
  failed write (full disk, read-only directory) warns and the run goes on with the computed table; temporaries of
  writers that died (``.<host>.<pid>.tmp.npz`` whose pid is gone) are removed.
  """

  def __init__(self, directory: str, *, key):
    import numpy as np
    digest = hashlib.sha256()
    for leaf in _leaves(key):
      leaf = np.ascontiguousarray(np.asarray(leaf))
      digest.update(f"{leaf.dtype}{leaf.shape}".encode())
      digest.update(leaf.tobytes())
    self.directory = directory
    self.path = os.path.join(directory, f"teacher_logits_{digest.hexdigest()[:32]}.npz")

  def get_or_compute(self, compute, *, shape):
    import jax
    table = self._read(shape)
    if table is not None:
      return table
    table = compute()
    if jax.process_index() == 0:
      self._write(table)
    return table

  def _read(self, shape):
    import numpy as np
    if not os.path.exists(self.path):
      return None
    try:
      with np.load(self.path) as f:
        table, saved = np.asarray(f["logits"]), bytes(np.asarray(f["sha256"], np.uint8))
      if tuple(table.shape) != tuple(shape):
        problem = f"shape {tuple(table.shape)}, expected {tuple(shape)}"
      elif hashlib.sha256(np.ascontiguousarray(table).tobytes()).digest() != saved:
        problem = "its checksum does not match"
      else:
        return table
    except Exception as e:  # noqa: BLE001 - any unreadable file (truncated zip, garbage) is "bad"
      problem = f"unreadable ({type(e).__name__})"
    moved = self.path + ".corrupt"
    try:
      os.replace(self.path, moved)
      kept = f"moved to {moved}"
    except OSError as e:
      kept = f"could not move it aside ({e.strerror})"
    _warn(f"teacher.logits_cache_dir: {self.path} is bad ({problem}); {kept}; recomputing the table")
    return None

  def _write(self, table) -> None:
    import socket

    import numpy as np
    host = socket.gethostname()
    tmp = f"{self.path}.{host}.{os.getpid()}.tmp.npz"
    try:
      os.makedirs(self.directory, exist_ok=True)
      self._remove_stale_temporaries(host)
      table = np.ascontiguousarray(table)
      checksum = np.frombuffer(hashlib.sha256(table.tobytes()).digest(), np.uint8)
      with open(tmp, "wb") as f:
        np.savez(f, logits=table, sha256=checksum)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)  # atomic: a concurrent reader sees the whole table or none
    except OSError as e:
      _warn(f"teacher.logits_cache_dir: could not store the teacher-logit table in {self.directory} "
            f"({e.strerror or e}); continuing without caching it")
      try:
        if os.path.exists(tmp):
          os.remove(tmp)
      except OSError:
        pass

  def _remove_stale_temporaries(self, host: str) -> None:
    prefix = f"{os.path.basename(self.path)}.{host}."
    for name in os.listdir(self.directory):
      if name.startswith(prefix) and name.endswith(".tmp.npz"):
        pid = name[len(prefix):-len(".tmp.npz")]
        if pid.isdigit() and not run_identity.pid_alive(int(pid)):
          try:
            os.remove(os.path.join(self.directory, name))
          except OSError:
            pass


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def _warn(message: str) -> None:
  import sys
  print(f"warning: {message}", file=sys.stderr, flush=True)


def check_outputs(method, frozen: dict, task, examples: int = 64) -> None:
  """A frozen teacher's logits on the first training examples (or its cached table) are finite and not the same for
  every example; else a one-line ``UserError``. Under ``jit`` damaged weights (a NaN, a flipped byte) give finite
  garbage or NaN logits that the student's own non-finite guard would meet only later, if at all."""
  if method.teacher is None or not method.teacher_logits_fixed or "teacher" not in frozen:
    return
  import jax
  import numpy as np
  table = frozen.get("teacher_logits_table")
  if table is not None:
    logits, what = np.asarray(jax.device_get(table)), f"over the {len(task.train)} training examples"
  else:
    n = min(examples, len(task.train))
    inputs = task.train.gather(np.arange(n))
    logits = np.asarray(jax.jit(lambda f, x: method.teacher_logits(None, f, x))(frozen, inputs))
    what = f"on the first {n} training examples"
  field = (method.teacher.identity or {}).get("field", "teacher.checkpoint")
  path = (method.teacher.identity or {}).get("path", "")
  bad = int(logits.size - np.count_nonzero(np.isfinite(logits)))
  if bad:
    raise UserError(f"{field}: the teacher in {path!r} gives {bad} non-finite logits {what}: its weights are "
                    "damaged (NaN/Inf or a negative BatchNorm variance); refused")
  if len(logits) > 1 and np.all(np.ptp(logits, axis=0) == 0):
    raise UserError(f"{field}: the teacher in {path!r} gives the same logits for every example {what}: a constant "
                    "function (damaged or untrained weights); refused")
