"""Checkpoints with orbax: atomic saves, verified restores, fall back past a corrupt step.

A checkpoint holds two items: ``state`` (every array the run needs to continue bit-exactly: student params and
BatchNorm statistics, optimizer states, fusion net, step, RNG key) and ``meta`` (JSON: the config, the epoch/data
position, the method, and an integrity record). Orbax writes each step into a temporary directory and renames it
when complete, so a crash (even SIGKILL) during a save leaves the previous checkpoint intact.

Integrity: orbax/tensorstore read some damaged files without complaint (bytes overwritten inside a data file can
come back as silently wrong numbers), so ``save`` also records each array's shape, dtype and the sha256 of its
bytes (computed on the host) in ``meta``, and every restore recomputes and compares them. A step whose meta or
arrays cannot be read, or whose arrays do not hash to what was saved, is corrupt: ``restore_latest`` moves it aside
to ``<step>.corrupt`` (kept on disk for inspection, invisible to orbax, never deleted), says so in one line, and
resumes from the newest good step.

Asynchronous saves (``async_save=True``): ``save`` copies the state to host memory (the only part that must
happen before the next step reuses the device buffers), then hashes and writes it in one background thread while
training continues. The write is the same atomic orbax save; the next ``save``, ``steps``, ``restore*`` and
``close`` first wait for it, and a failed background write is raised there (``wait``), so no failure is lost. A
process killed during a background write leaves the previous checkpoint intact, exactly as a synchronous one.

Only orbax reads checkpoints (tensorstore arrays + JSON); nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import logging
import os
import sys
import threading
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from tgeo_jax import fileio
from tgeo_jax.errors import UserError

__all__ = ["INTEGRITY_KEY", "CorruptCheckpointError", "Checkpointer", "restore_params", "array_records", "verify",
           "structure_mismatch"]

INTEGRITY_KEY = "_integrity"


class CorruptCheckpointError(UserError):
  """A checkpoint step that cannot be read or does not match its recorded checksums."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"checkpoint {path} is corrupt: {reason}")
    self.path, self.reason = path, reason


class Checkpointer:
  """Orbax ``CheckpointManager`` over ``directory`` with the items ``state`` (arrays) and ``meta`` (JSON).

  ``cleanup_tmp``: on start, remove unfinished saves (``<step>.orbax-checkpoint-tmp`` left by a killed process).
  Only for the run's own work directory, never for one another process may be writing (e.g. a teacher's).
  ``async_save``: write in a background thread (see the module docstring); single-process runs only, since a
  multi-host save needs every process's arrays on device (an array sharded across hosts cannot be copied here).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2, cleanup_tmp: bool = False, async_save: bool = False):
    self.directory = os.path.abspath(directory)
    self.async_save = bool(async_save) and jax.process_count() == 1
    self._pending: threading.Thread | None = None
    self._pending_error: BaseException | None = None
    self._pending_step: int | None = None
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=cleanup_tmp,
                                           enable_async_checkpointing=False)
    with _quiet():  # a damaged step's _CHECKPOINT_METADATA makes orbax log errors while listing steps
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` and ``meta`` (JSON-able) as ``step``, with the arrays' checksums added to ``meta``.

    Asynchronous: returns once ``state`` is copied to host memory (after the previous save has finished); the
    hashing and writing happen in the background. Synchronous: returns when the checkpoint is on disk.
    """
    self.wait()
    if not self.async_save:
      self._write(step, state, meta)
      return
    host_state = _host_copy(state)
    self._pending_step = step
    self._pending = threading.Thread(target=self._write_in_background, args=(step, host_state, meta),
                                     name=f"checkpoint-{step}")
    self._pending.start()

  def wait(self) -> None:
    """Blocks until a background save has finished; re-raises its error (the previous checkpoints are intact)."""
    if self._pending is not None:
      self._pending.join()
      self._pending = None
    if self._pending_error is not None:
      error, self._pending_error = self._pending_error, None
      raise error

  def _write(self, step: int, state: Any, meta: dict) -> None:
    meta = dict(meta)
    meta[INTEGRITY_KEY] = {"algorithm": "sha256", "arrays": array_records(state)}
    with _quiet_failed_writes():
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
      self.manager.wait_until_finished()
    # orbax renames the finished temporary directory into place; the rename (and the files) reach the disk only
    # with an fsync of the files and of the directories that hold them: without it a crash or a read-only remount
    # right after a save can lose the newest step that "was saved".
    _fsync_tree(os.path.join(self.directory, str(step)))
    _fsync_path(self.directory)

  def _write_in_background(self, step: int, host_state: Any, meta: dict) -> None:
    try:
      self._write(step, host_state, meta)
    except BaseException as e:  # noqa: BLE001 - re-raised by ``wait`` on the caller's thread
      self._pending_error = e

  def steps(self) -> list[int]:
    self.wait()
    with _quiet():
      self.manager.reload()
      return sorted(self.manager.all_steps())

  def read_meta(self, step: int) -> dict:
    """The ``meta`` item of ``step`` without the integrity record; ``CorruptCheckpointError`` if unreadable."""
    return _strip(self._read_meta_with_integrity(step))

  def restore(self, step: int, target: Any, *, partial: bool = False) -> tuple[Any, dict]:
    """``(state, meta)`` of ``step``, restored into ``target``'s structure and shardings and verified.

    ``target`` is a pytree of arrays or ShapeDtypeStructs (without it optax states would come back as plain
    lists). ``partial``: ``target`` is a subset of the saved tree (e.g. a teacher's params out of a whole run).
    Raises ``CorruptCheckpointError`` when the step is unreadable or an array differs from its checksum.
    """
    state, meta, _ = self._restore(step, target, self._read_meta_with_integrity(step), partial=partial)
    return state, meta

  def restore_latest(self, target: Any, *, check_meta: Callable[[dict], None] | None = None,
                     ) -> tuple[int, Any, dict] | None:
    """``(step, state, meta)`` from the newest good checkpoint, or None when the directory holds none.

    ``check_meta(meta)`` runs on each candidate's meta before its arrays are read; it raises (e.g. a ``UserError``
    for a checkpoint of another configuration) to stop without restoring or moving anything. The saved
    shapes/dtypes are then compared with ``target``'s: a difference is a ``UserError`` (another configuration),
    not corruption. Corrupt steps newer than the good one are moved aside to ``<step>.corrupt``, with one warning
    line on stderr. If no step is good, raises ``UserError`` and moves nothing.
    """
    steps = self.steps()
    if not steps:
      return None
    expected = array_records(target, with_hash=False)
    corrupt = []  # (step, reason), newest first
    for step in reversed(steps):
      try:
        meta = self._read_meta_with_integrity(step)
        if check_meta is not None:
          check_meta(_strip(meta))
        mismatch = structure_mismatch(meta.get(INTEGRITY_KEY), expected)
        if mismatch:
          raise UserError(f"workdir: the checkpoint {self._step_dir(step)} holds a state of another shape than "
                          f"this config builds ({mismatch}); use another --workdir (nothing was overwritten)")
        state, meta, _ = self._restore(step, target, meta)
      except CorruptCheckpointError as e:
        corrupt.append((step, e.reason))
        continue
      if corrupt:
        moved = [self._move_aside(s) for s, _ in corrupt]
        many = len(corrupt) > 1
        print(f"warning: checkpoint step{'s' if many else ''} {', '.join(str(s) for s, _ in corrupt)} in "
              f"{self.directory} {'are' if many else 'is'} corrupt ({corrupt[0][1]}); resuming from step {step}, "
              f"the newest good one; kept (not deleted) as {', '.join(moved)}", file=sys.stderr, flush=True)
      return step, state, meta
    raise UserError(f"workdir: none of the checkpoints {steps} in {self.directory} is readable (step "
                    f"{corrupt[0][0]}: {corrupt[0][1]}); nothing was changed: move {self.directory} away to start over")

  def close(self):
    """Waits for a background save (raising its error after closing), then closes the manager."""
    try:
      self.wait()
    finally:
      self.manager.close()

  # ---- internals
  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _read_meta_with_integrity(self, step: int) -> dict:
    self.wait()
    reason = None
    with _quiet() as settle:
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # noqa: BLE001 - any failure to read means "not a good checkpoint"
        reason = _reason(e)
      if reason is not None:  # outside the except block: the failed read's frames are gone, settle can collect
        settle()
    if reason is not None:
      raise CorruptCheckpointError(self._step_dir(step), f"meta unreadable: {reason}")
    if not isinstance(meta, dict):
      raise CorruptCheckpointError(self._step_dir(step), "meta is not a JSON object")
    return meta

  def _restore(self, step: int, target: Any, meta: dict, *, partial: bool = False) -> tuple[Any, dict, dict | None]:
    """``(state, meta, the restored arrays' records or None)``, verified against the saved checksums."""
    self.wait()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    reason = None
    with _quiet() as settle:
      try:
        if partial:
          args = ocp.args.PyTreeRestore(item=abstract, partial_restore=True,
                                        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
        else:
          args = ocp.args.StandardRestore(abstract)
        state = self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]
      except Exception as e:  # noqa: BLE001
        reason = _reason(e)
      if reason is not None:
        settle()
    if reason is not None:
      raise CorruptCheckpointError(self._step_dir(step), f"state unreadable: {reason}")
    records = verify(state, meta.get(INTEGRITY_KEY), where=self._step_dir(step), partial=partial)
    return state, _strip(meta), records

  def _move_aside(self, step: int) -> str:
    """Renames a corrupt step directory to ``<step>.corrupt[.N]``: orbax ignores it, nothing is deleted, and the
    run can save that step number again."""
    src = self._step_dir(step)
    dst, n = src + ".corrupt", 1
    while os.path.exists(dst):
      n += 1
      dst = f"{src}.corrupt.{n}"
    if jax.process_index() == 0:
      os.rename(src, dst)
    self.steps()  # re-list
    return os.path.basename(dst)


def _fsync_path(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_tree(root: str) -> None:
  """fsync every file and directory under ``root`` (deepest first), then ``root`` itself."""
  for directory, _, files in os.walk(root, topdown=False):
    for name in files:
      _fsync_path(os.path.join(directory, name))
    _fsync_path(directory)


def restore_params(directory: str, target: Any, *, what: str) -> tuple[Any, dict, dict]:
  """Restores ``state`` (restricted to ``target``'s structure) and meta from the latest checkpoint in ``directory``;
  also returns the restored arrays' ``array_records`` (checksums included).

  Used to load a frozen teacher: ``target`` is ``{"params": ..., "rest": ...}``; other saved entries are ignored.
  A corrupt latest step is an error naming ``what`` (no silent fall back to an older teacher).
  """
  if not os.path.isdir(directory):
    raise UserError(f"{what}: no checkpoint directory {directory!r}")
  ckpt = Checkpointer(directory)
  try:
    steps = ckpt.steps()
    if not steps:
      raise UserError(f"{what}: {directory!r} holds no checkpoint")
    try:
      meta = ckpt._read_meta_with_integrity(steps[-1])  # noqa: SLF001
    except CorruptCheckpointError as e:
      raise UserError(f"{what}: {e}") from None
    integrity = meta.get(INTEGRITY_KEY)
    # Shapes first: another model is a mismatch, not corruption.
    mismatch = structure_mismatch(integrity, array_records(target, with_hash=False), partial=True)
    if mismatch:
      raise UserError(f"{what}: checkpoint {directory!r} does not match the expected model ({mismatch})")
    try:
      state, meta, records = ckpt._restore(steps[-1], target, meta, partial=True)  # noqa: SLF001
    except CorruptCheckpointError as e:
      if integrity is None:  # a checkpoint without records: a failed read may be a model mismatch
        raise UserError(f"{what}: checkpoint {directory!r} does not match the expected model ({e})") from None
      raise UserError(f"{what}: {e}") from None
    return state, meta, records if records is not None else array_records(state)
  finally:
    ckpt.close()


# ---------------------------------------------------------------------------------------------------- integrity


def _host_copy(tree: Any) -> Any:
  """``tree`` with every array copied off the device into numpy (typed PRNG keys: copied on the device), so that
  the next step may donate or overwrite the device buffers while a background save writes these copies."""
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  for x in leaves:  # start every transfer before waiting for any (one round trip on an accelerator)
    if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x.copy_to_host_async()

  def copy(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(jax.numpy.copy(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    # np.array copies: on CPU np.asarray of a jax.Array may be a view of the very buffer the next step donates.
    return np.array(x) if isinstance(x, (jax.Array, np.ndarray)) else x

  return jax.tree.map(copy, tree)


def _host_array(x) -> np.ndarray | None:
  """``x``'s value on this host (key arrays as their key data), or None for an array sharded across hosts."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:
      # Multi-host: a replicated array has a full copy on every process; a sharded one is not hashed here.
      if not x.is_fully_replicated:
        return None
      x = x.addressable_data(0)
  return np.ascontiguousarray(np.asarray(x))


def array_records(tree: Any, *, with_hash: bool = True) -> dict:
  """``{keystr(path): {"shape", "dtype"[, "sha256"]}}`` for every leaf of ``tree`` (hashing copies to host).

  Leaves may be arrays, or ShapeDtypeStructs when ``with_hash=False``.
  """
  records = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    record = {"shape": [int(d) for d in np.shape(leaf)],
              "dtype": str(dtype if dtype is not None else np.asarray(leaf).dtype)}
    if with_hash:
      host = _host_array(leaf)
      if host is not None:
        record["sha256"] = hashlib.sha256(host.tobytes()).hexdigest()
    records[jax.tree_util.keystr(path)] = record
  return records


def verify(state: Any, integrity: dict | None, *, where: str, partial: bool = False) -> dict | None:
  """Recomputes the sha256 of every restored array and compares it with the saved record; returns the records
  (``array_records(state)``, so callers need not hash the arrays again).

  ``integrity`` None (a checkpoint written before integrity records existed) skips the check (returns None).
  """
  if not integrity:
    return None
  saved = integrity.get("arrays", {})
  restored = array_records(state)
  if not partial and set(saved) != set(restored):
    raise CorruptCheckpointError(where, f"the restored arrays differ from the saved ones "
                                        f"({sorted(set(saved) ^ set(restored))[0]})")
  for key, record in restored.items():
    want = saved.get(key)
    if want is None:
      raise CorruptCheckpointError(where, f"array {key} has no integrity record")
    if "sha256" in want and "sha256" in record and want["sha256"] != record["sha256"]:
      raise CorruptCheckpointError(where, f"array {key} does not match its sha256 checksum")
  return restored


def structure_mismatch(integrity: dict | None, expected: dict, *, partial: bool = False) -> str | None:
  """Saved shapes/dtypes vs ``expected`` (``array_records(target, with_hash=False)``): the first difference as
  text, or None. A difference means another configuration or model, not corruption."""
  if not integrity:
    return None
  saved = {k: {f: v for f, v in r.items() if f != "sha256"} for k, r in integrity.get("arrays", {}).items()}
  for key in (sorted(expected) if partial else sorted(set(saved) | set(expected))):
    if saved.get(key) != expected.get(key):
      return f"{key}: saved {_describe(saved.get(key))}, expected {_describe(expected.get(key))}"
  return None


def _describe(record) -> str:
  return "nothing" if record is None else f"{record['dtype']}{record['shape']}"


def _strip(meta: dict) -> dict:
  return {k: v for k, v in meta.items() if k != INTEGRITY_KEY}


def _reason(e: Exception) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:120]}"


# ------------------------------------------------------------------------------------------------- quiet reads


def _abandoned_read_noise(unraisable) -> bool:
  """What a failed orbax restore's abandoned tensorstore reads report when they finish later: their callbacks
  find orbax's event loop closed, and their coroutines are collected with an exception nobody awaited."""
  exc, obj = unraisable.exc_value, unraisable.object
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  code = getattr(obj, "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


class _AbandonedFutureFilter(logging.Filter):
  """asyncio's "Future/Task exception was never retrieved" for those reads (tensorstore errors), and for a failed
  write's other fragments: a future that failed with no space or a read-only file system (the error the save
  raises, which the trainer reports as one line; seen under load, after that line)."""

  def filter(self, record):
    message = record.getMessage()
    if "exception was never retrieved" not in message:
      return True
    if any(word in message for word in ("tensorstore", "TensorStore", "zarr", "ocdbt", "orbax")):
      return False
    exc = record.exc_info[1] if record.exc_info else None
    return not (isinstance(exc, OSError) and fileio.known_write_failure(exc))


class _OrbaxThreadErrorFilter(logging.Filter):
  """orbax's ERROR log of a failed write's worker thread ("_SignalingThread.run() raised an exception: ..."): the
  save raises the same error, which the trainer reports as one line."""

  def filter(self, record):
    return not (record.levelno >= logging.ERROR and "_SignalingThread.run() raised an exception" in record.getMessage())


# jax's array serialization (orbax's StandardSave) makes one coroutine per array fragment; a failed write can
# leave some never started.
_UNSTARTED_WRITE = r"coroutine 'async_serialize_from_host\.<locals>\.write_fragment' was never awaited\Z"


@contextlib.contextmanager
def _quiet_failed_writes():
  """While a checkpoint is written, and for the rest of the process if the write fails (a full or read-only disk),
  filters the known reports of a failed write: orbax's thread errors, tensorstore callbacks that find orbax's event
  loop closed (printed through ``sys.excepthook``), asyncio's "exception was never retrieved" at exit, and the
  RuntimeWarning for the array writer's coroutine that the failure left unstarted (printed when the garbage
  collector finds it, often in the interpreter's teardown: ``sys:1: RuntimeWarning: coroutine ... was never
  awaited``, seen when the machine is loaded). Each filter matches those reports' exact text; anything else still
  prints. After a successful write the previous hooks come back (the warning filter stays)."""
  absl_logger = logging.getLogger("absl")
  added = _OrbaxThreadErrorFilter()
  absl_logger.addFilter(added)
  # For the rest of the process (it can print at exit) and idempotent: it matches only that coroutine's warning.
  warnings.filterwarnings("ignore", message=_UNSTARTED_WRITE, category=RuntimeWarning)
  saved_unraisable, saved_except = sys.unraisablehook, sys.excepthook
  sys.unraisablehook = _with_noise_filters(saved_unraisable)

  def excepthook(exc_type, exc, tb):
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
      saved_except(exc_type, exc, tb)

  sys.excepthook = excepthook
  try:
    yield
  except BaseException:
    raise  # the filters stay: the failed write's late reports arrive after this
  else:
    absl_logger.removeFilter(added)
    if sys.unraisablehook is not saved_unraisable and not getattr(saved_unraisable, "drops_abandoned_read_noise",
                                                                 False):
      sys.unraisablehook = saved_unraisable
    if sys.excepthook is excepthook:
      sys.excepthook = saved_except


def _with_noise_filters(hook):
  """``hook`` wrapped to drop the late, known-benign reports of a failed read's abandoned reads (used for the
  rest of the process after a failed read, and only then); anything else still reaches ``hook``. Also filters
  asyncio's log of them."""
  if getattr(hook, "drops_abandoned_read_noise", False):
    return hook

  def filtered(unraisable):
    if not _abandoned_read_noise(unraisable):
      hook(unraisable)

  filtered.drops_abandoned_read_noise = True
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedFutureFilter) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedFutureFilter())
  return filtered


@contextlib.contextmanager
def _quiet():
  """Silences what orbax/tensorstore print while reading a damaged checkpoint.

  A failing restore leaves tensorstore reads in flight; when they complete, their callbacks report errors
  ("Event loop is closed", "Exception ignored in <coroutine>", "Future exception was never retrieved"), and orbax
  logs errors. The caller's one-line message says what happened instead. Yields ``settle()``, to call on failure:
  it installs filters for those reports and waits for the in-flight reads (local files: milliseconds) while output
  is still redirected.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  saved_fd = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  os.close(devnull)
  saved_stderr, saved_hook = sys.stderr, sys.unraisablehook
  previous_disable = logging.root.manager.disable
  sys.stderr = io.StringIO()
  sys.unraisablehook = lambda unraisable: None
  logging.disable(logging.CRITICAL)

  def settle():
    nonlocal saved_hook
    saved_hook = _with_noise_filters(saved_hook)
    # The failed reads' futures and coroutines die in reference cycles (exception <-> traceback frames): young
    # objects, found by collecting the two younger generations while the reads finish; one full collection at the
    # end for any promoted meanwhile. (Four full collections cost ~0.5 s each in a process with a large heap.)
    for _ in range(4):
      time.sleep(0.05)
      gc.collect(1)
    gc.collect()

  try:
    yield settle
  finally:
    logging.disable(previous_disable)
    sys.unraisablehook = saved_hook
    sys.stderr = saved_stderr
    os.dup2(saved_fd, 2)
    os.close(saved_fd)
