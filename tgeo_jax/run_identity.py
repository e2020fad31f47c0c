"""A run's identity: a work directory belongs to one configuration, and one process at a time.

Every run writes ``config.json`` (its full resolved config) and ``identity.json`` into its work directory when it
starts, and saves the same identity record in every checkpoint's meta:

* ``config``: every config field, flattened to dotted names, except ``RESUMABLE_FIELDS`` (below);
* ``data``: the dataset's identity (name, a digest of its raw content, the parts' sizes and a digest of each
  part's membership, see ``data.load``);
* ``teachers``: each loaded teacher's field, model and a digest of its variables.

``fingerprint`` is the sha256 of those three; ``config_fingerprint`` of the config part alone (what a sweep can
compute without loading data, e.g. ``bench/study.py``), and ``group_fingerprint`` the fingerprint without
``seed`` (runs that differ only by seed: the rows a results table averages).

Resuming compares the saved record with the current one and refuses any difference, naming every differing field
(old -> new), before anything is restored or written. ``membership.npz`` beside them lists the example ids of the
training / validation / test parts: a student reads its teacher's to refuse a teacher whose training data overlaps
its own validation or test part (``check_teacher_provenance``). A teacher imported from a PyTorch checkpoint
(``tgeo_jax.import_teacher``) has the same files, with its publisher's claim in place of a recorded training run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time

import numpy as np

from tgeo_jax import fileio
from tgeo_jax.errors import UserError

__all__ = ["RESUMABLE_FIELDS", "flatten", "config_record", "filter_record", "make_identity", "config_fingerprint",
           "matches_fingerprint",
           "identity_differences", "resume_error", "read_json_file", "write_run_files", "ids_digest", "run_dir_of",
           "check_teacher_provenance", "WorkdirLock", "pid_alive", "prepare_workdir"]

# Fields that may change when a run resumes, and why none of them changes what the run computes.
RESUMABLE_FIELDS = {
    "log.every_steps": "how often training metrics are averaged and printed (reporting only)",
    "log.progress": "the progress bar",
    "log.tensorboard": "an extra copy of metrics.jsonl for TensorBoard",
    "log.wandb": "an extra copy of metrics.jsonl for Weights & Biases",
    "checkpoint.every_steps": "when checkpoints are saved (resume is exact from any step)",
    "checkpoint.max_to_keep": "how many checkpoints stay on disk",
    "checkpoint.async_save": "whether the checkpoint is written in the background (the same bytes either way)",
    "log.profile_steps": "which steps a profiler trace records (observation only)",
    "compilation_cache_dir": "where compiled programs are cached (the same programs either way)",
    "steps_per_run": "where this process stops; the same command continues",
    "eval_batch_size": "evaluation is a masked sum over every test example: the batch size changes only the order "
                       "of that sum (accuracy counts are exact)",
    "distributed": "how processes find each other (results do not depend on the device count)",
    "distributed_init_timeout": "how long processes wait for each other at start-up",
    "distributed_heartbeat_timeout": "after how long a silent process counts as dead",
    "teacher.logits_cache_dir": "where the teacher-logit table is cached (verified, equal to recomputing it)",
    "data.dir": "where the data lives: its content is in the fingerprint (data.digest)",
    "teacher.checkpoint": "where the teacher lives: its variables' digest is in the fingerprint",
    "trikd.anchor_checkpoint": "where the anchor lives: its variables' digest is in the fingerprint",
    "data.workers": "how many processes decode batches: grain returns them in the same order for any count",
    "data.in_memory": "decoded once into memory or per record: the batches are bit-identical (tests/test_tfds_local.py)",
    "data.cache_dir": "where decoded splits are cached (verified by sha256, equal to decoding again)",
    "device_pipeline.mode": "whether batches are built on the device: the same batches, the same steps, the same log "
                            "points and checkpoints (bit-identical training on CPU, tests/test_device_pipeline.py; an "
                            "accelerator may round the scanned step differently, as it may another device count)",
    "device_pipeline.steps_per_dispatch": "how many steps one dispatch may take (the steps are the same)",
}

CONFIG_FILE, IDENTITY_FILE, MEMBERSHIP_FILE, LOCK_FILE = "config.json", "identity.json", "membership.npz", ".lock"


# ------------------------------------------------------------------------------------------------ identity


def flatten(tree: dict, prefix: str = "") -> dict:
  """``{"a": {"b": 1}} -> {"a.b": 1}``; lists (config tuples) are leaves."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


# Config groups that leave a run's results untouched while off: an off group is not part of the fingerprint, so
# adding one keeps every earlier run's fingerprint (and its work directory resumable). group -> "is it off?".
OPTIONAL_GROUPS = {"study_wrong_teacher": lambda group: group.get("kind", "none") == "none"}


def config_record(config_dict: dict, reads=None) -> dict:
  """The fingerprinted part of a config (a JSON dict, e.g. ``json.loads(config.to_json_best_effort())``), flat.

  ``reads(field) -> bool``, when given, keeps only the fields the run's method reads (``methods.reads_field``:
  its own config group and no other method's, ``teacher.*`` only with a teacher, ``val_batch_size`` only with
  validation batches): a field added to one method then changes no other method's fingerprint. Without it every
  field is kept (the record of work directories written before version 2 of the identity record).
  """
  config_dict = {k: v for k, v in config_dict.items()
                 if not (k in OPTIONAL_GROUPS and isinstance(v, dict) and OPTIONAL_GROUPS[k](v))}
  return filter_record({k: v for k, v in sorted(flatten(config_dict).items()) if k not in RESUMABLE_FIELDS}, reads)


def filter_record(record: dict, reads=None) -> dict:
  """``record`` (a flat config record) without the fields ``reads`` says the method does not read."""
  return record if reads is None else {k: v for k, v in record.items() if reads(k)}


def _sha256_json(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _teacher_key(teacher: dict) -> dict:
  """The part of a teacher record that identifies it (not its path)."""
  return {k: teacher.get(k) for k in ("field", "model", "variables_sha256")}


def make_identity(config_dict: dict, data_identity: dict, teachers: list[dict], reads=None) -> dict:
  """The identity record of a run: its config record (``config_record(config_dict, reads)``), data identity and
  teachers, and their fingerprints (``fingerprint``: all three; ``config_fingerprint``: the config;
  ``group_fingerprint``: all three without the seed, so that seeds of one setting group together)."""
  config = config_record(config_dict, reads)
  parts = {"config": _sha256_json(config), "data": _sha256_json(data_identity),
           "teachers": _sha256_json([_teacher_key(t) for t in teachers])}
  without_seed = dict(parts, config=_sha256_json({k: v for k, v in config.items() if k != "seed"}))
  return {
      "version": 2 if reads is not None else 1,  # 2: only the fields the method reads
      "fingerprint": _sha256_json(parts),
      "config_fingerprint": parts["config"],
      "group_fingerprint": _sha256_json(without_seed),
      "config": config,
      "data": data_identity,
      "teachers": teachers,
  }


def config_fingerprint(config, reads=None) -> str:
  """The ``config_fingerprint`` of an ``ml_collections`` config (no data or teacher needed); ``reads`` as in
  ``config_record``."""
  return _sha256_json(config_record(json.loads(config.to_json_best_effort()), reads))


def matches_fingerprint(recorded: str | None, config, reads) -> bool:
  """Whether ``recorded`` (a summary's ``config_fingerprint``) is ``config``'s: of the fields the method reads,
  or, for a run written before identity version 2, of every field."""
  return recorded is not None and recorded in (config_fingerprint(config, reads), config_fingerprint(config))


def _short(value) -> str:
  return repr(value) if not (isinstance(value, str) and len(value) == 64) else value[:12]


def identity_differences(saved: dict, current: dict) -> list[str]:
  """Every difference between two identity records, as ``field: old -> new`` strings."""
  diffs = []
  old, new = saved.get("config", {}), current.get("config", {})
  for key in sorted(set(old) | set(new)):
    if key in RESUMABLE_FIELDS:
      continue
    if old.get(key, "<absent>") != new.get(key, "<absent>"):
      diffs.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
  if "data" in saved:
    flat_old, flat_new = flatten(saved["data"], "data "), flatten(current.get("data", {}), "data ")
    for key in sorted(set(flat_old) | set(flat_new)):
      if flat_old.get(key) != flat_new.get(key):
        diffs.append(f"{key}: {_short(flat_old.get(key))} -> {_short(flat_new.get(key))}")
  if "teachers" in saved:
    old_t = {t.get("field"): t for t in saved["teachers"]}
    new_t = {t.get("field"): t for t in current.get("teachers", [])}
    for field in sorted(set(old_t) | set(new_t), key=str):
      a, b = old_t.get(field), new_t.get(field)
      if a is None or b is None or _teacher_key(a) != _teacher_key(b):
        diffs.append(f"{field} (teacher identity): {_describe_teacher(a)} -> {_describe_teacher(b)}")
  return diffs


def _describe_teacher(t: dict | None) -> str:
  if t is None:
    return "none"
  return f"{t.get('model')!r} variables {str(t.get('variables_sha256'))[:12]} ({t.get('path')!r})"


def resume_error(workdir: str, diffs: list[str]) -> UserError:
  hint = ""
  if any(d.startswith("num_epochs:") for d in diffs):
    hint = ("; num_epochs cannot change on resume: the learning-rate schedule spans num_epochs, so a longer run is "
            "another run (its schedule would jump)")
  return UserError(f"workdir: {workdir!r} holds a run of another configuration ({'; '.join(diffs)}){hint}; use "
                   "another --workdir (nothing was read or written)")


# ------------------------------------------------------------------------------------------------ run files


# A JSON object file, or None when absent or unreadable (a file torn by a kill is rewritten, not trusted).
read_json_file = fileio.read_json_or_none
_write_atomic = fileio.atomic_write


def write_run_files(workdir: str, config_dict: dict, identity: dict, membership: dict) -> None:
  """``config.json``, ``identity.json`` and ``membership.npz`` (each written atomically)."""
  _write_atomic(os.path.join(workdir, CONFIG_FILE),
                lambda f: f.write((json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode()))
  _write_atomic(os.path.join(workdir, IDENTITY_FILE),
                lambda f: f.write((json.dumps(identity, indent=2, sort_keys=True) + "\n").encode()))
  _write_atomic(os.path.join(workdir, MEMBERSHIP_FILE),
                lambda f: np.savez(f, **{k: np.asarray(v, np.int64) for k, v in membership.items()}))


def ids_digest(ids: np.ndarray) -> str:
  """sha256 of sorted unique example ids (little-endian int64), as ``data.load`` records them."""
  return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------- teacher provenance


def run_dir_of(checkpoint_dir: str) -> str:
  """The work directory of a run given its ``checkpoints/`` directory (or the work directory itself)."""
  checkpoint_dir = os.path.abspath(checkpoint_dir)
  return os.path.dirname(checkpoint_dir) if os.path.basename(checkpoint_dir) == "checkpoints" else checkpoint_dir


def check_teacher_provenance(teacher, task, *, verify: bool) -> None:
  """Refuses a teacher trained on another dataset, or on examples of this run's validation or test part.

  ``teacher.identity`` carries the teacher run's data identity (from its checkpoint) and its work directory, where
  ``membership.npz`` lists its training examples (checked against the digest its checkpoint recorded).
  ``verify=False`` (``teacher.verify_provenance``) turns each refusal into a warning line. A teacher imported from
  a published checkpoint (its data identity has ``imported_from``) has no content digest to compare and a claimed
  membership; ``_imported_teacher`` says what follows.
  """
  ident = teacher.identity or {}
  field, path = ident.get("field", "teacher.checkpoint"), ident.get("path", "?")
  override = "set teacher.verify_provenance=False to accept it anyway"

  def refuse(message):
    if verify:
      raise UserError(f"{field}: {message}; {override}")
    print(f"warning: {field}: {message}; accepted (teacher.verify_provenance=False)", file=sys.stderr, flush=True)

  data = ident.get("data")
  if not data:
    return refuse(f"{path!r} records no data provenance (a run written before tgeo_jax recorded it, or not a "
                  "tgeo_jax run); retrain it")
  mine = task.identity
  imported = data.get("imported_from")
  # An imported teacher's record names its dataset but holds no content digest: the import never saw the data.
  if data.get("name") != mine.get("name") or (not imported and data.get("digest") != mine.get("digest")):
    return refuse(f"{path!r} was trained on dataset {data.get('name')!r} (content {str(data.get('digest'))[:12]}), "
                  f"this run reads {mine.get('name')!r} (content {str(mine.get('digest'))[:12]})")
  membership_path = os.path.join(ident.get("run_dir", ""), MEMBERSHIP_FILE)
  try:
    with np.load(membership_path) as f:
      teacher_train = np.asarray(f["train"])
  except (OSError, KeyError, ValueError) as e:
    return refuse(f"cannot read the teacher's training membership {membership_path!r} "
                  f"({type(e).__name__}: {' '.join(str(e).split())[:80]})")
  if ids_digest(teacher_train) != data.get("membership", {}).get("train"):
    return refuse(f"{membership_path!r} does not match the training membership its checkpoint recorded")
  leaks = {part: int(np.intersect1d(teacher_train, task.membership[part], assume_unique=True).size)
           for part in ("val", "test")}
  if imported:
    return _imported_teacher(field, path, imported, leaks, task, verify=verify)
  if any(leaks.values()):
    return refuse(f"the teacher in {path!r} trained on {leaks['val']} of this run's {len(task.membership['val'])} "
                  f"validation and {leaks['test']} of its {len(task.membership['test'])} test examples (leakage: "
                  "train the teacher with this run's data.* split fields)")
  return None


def _imported_teacher(field: str, path: str, source: dict, leaks: dict, task, *, verify: bool) -> None:
  """The provenance verdict on a teacher imported from a published checkpoint (``tgeo_jax.import_teacher``).

  Its training membership is its publisher's claim (the whole published training split), which this run can count
  against its own parts but cannot verify. With the claim, the teacher has seen every example of the validation
  part (a slice of that split) and none of the test split. Test accuracy is then as clean as with a teacher of
  this library; validation metrics, and whatever is tuned or learned on them (TGeo-KD's fusion ratio, model
  selection), are optimistic. That is leakage by this library's rule, so it is refused like any other unless
  ``teacher.verify_provenance=False``; accepted, it is still named in a warning line on every run, because
  nothing about its data was checked. Without overlap (a claim that covers neither part) it is accepted with the
  same warning.
  """
  claim = (f"{path!r} holds weights imported from {source.get('file')!r} ({source.get('format')}, sha256 "
           f"{str(source.get('sha256'))[:12]}), trained by their publisher on {source.get('training_data')}: by that "
           f"claim it has seen {leaks['val']} of this run's {len(task.membership['val'])} validation and "
           f"{leaks['test']} of its {len(task.membership['test'])} test examples")
  if leaks["test"]:
    consequence = "its test accuracy and the student's are optimistic"
  elif leaks["val"]:
    consequence = "test accuracy is unaffected; validation metrics and what is tuned or learned on them are optimistic"
  else:
    consequence = "a claim no data of this run contradicts, but one that was not checked"
  if any(leaks.values()) and verify:
    raise UserError(f"{field}: {claim} ({consequence}); set teacher.verify_provenance=False to accept it")
  print(f"warning: {field}: {claim} ({consequence}); accepted"
        f"{' (teacher.verify_provenance=False)' if any(leaks.values()) else ''}", file=sys.stderr, flush=True)
  return None


# --------------------------------------------------------------------------------------------------- locking


class WorkdirLock:
  """An exclusive ``fcntl.flock`` on ``WORKDIR/.lock``, held for the whole run.

  The OS releases it when the holder exits or dies (kill -9 included), so there is never a stale lock to remove.
  The file records the holder (pid, host, start time) for the message a second process prints. On a multi-host
  run only process 0 takes it (all processes of one run share the work directory); ``acquire`` then tells the
  others whether it got it, so every process of a refused run stops.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.workdir = workdir
    self._fd = None

  def acquire(self, *, process_index: int = 0, process_count: int = 1) -> "WorkdirLock":
    holder, error = None, None
    if process_index == 0:
      try:
        holder = self._try_lock()
      except UserError as e:  # told to the other processes first, so that none waits for process 0 forever
        error = e
    if process_count > 1:
      from jax.experimental import multihost_utils
      code = int(multihost_utils.broadcast_one_to_all(np.int32(2 if error else int(holder is not None))))
      if code == 2 and error is None:
        raise UserError(f"workdir: process 0 could not lock {self.path!r} (see its message)")
      if code == 1 and holder is None:
        holder = "another run (see process 0)"
    if error is not None:
      raise error
    if holder is not None:
      raise UserError(f"workdir: {self.workdir!r} is in use by {holder}; wait for it to finish or use another "
                      "--workdir")
    return self

  def _try_lock(self) -> str | None:
    """Takes the lock; returns None, or a description of the process holding it."""
    try:
      # O_NOFOLLOW: a planted .lock symlink must not get its target truncated and overwritten.
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise UserError(f"workdir: {self.path!r} is a symbolic link; a lock file must be a plain file (remove the "
                        "link)") from None
      raise UserError(f"workdir: cannot create {self.path!r} ({e.strerror})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      try:
        info = json.loads(os.read(fd, 4096).decode() or "{}")
      except ValueError:
        info = {}
      os.close(fd)
      started = info.get("started")
      since = f", running since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
      return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{since}"
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode(),
                0)
    except OSError as e:
      os.close(fd)
      raise UserError(f"workdir: cannot write {self.path!r} ({e.strerror})") from None
    self._fd = fd
    return None

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def pid_alive(pid: int) -> bool:
  """Whether process ``pid`` exists on this host (a stale claim or temporary file of a dead writer: False)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def remove_unused_workdir(workdir: str, lock_path: str) -> None:
  """Removes ``workdir`` when it holds no file but its lock (a run refused before writing anything: at most the
  lock and empty directories, e.g. ``checkpoints/``)."""
  try:
    for root, _, files in os.walk(workdir):
      if any(os.path.join(root, f) != os.path.join(workdir, os.path.basename(lock_path)) for f in files):
        return
    os.remove(lock_path)
    for root, _, _ in sorted(os.walk(workdir), key=lambda entry: -len(entry[0])):  # deepest first
      os.rmdir(root)
  except OSError:
    pass  # another process got there, or the directory is not ours to clean: leave it


def prepare_workdir(workdir: str) -> str:
  """Creates ``workdir`` if needed; a path that cannot be a work directory is a one-line ``UserError``."""
  if not isinstance(workdir, str) or not workdir.strip():
    raise UserError(f"workdir: expected a directory path, got {workdir!r}")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"workdir: {workdir!r} is a file, expected a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"workdir: cannot create {workdir!r} ({e.strerror})") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f"workdir: {workdir!r} is not writable")
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.lexists(checkpoints) and not os.path.isdir(checkpoints):
    raise UserError(f"workdir: {checkpoints!r} is a file, expected the checkpoint directory (move it away)")
  return workdir


def refuse_differences(workdir: str, saved: dict, current: dict, reads=None) -> None:
  """A ``UserError`` naming every field in which ``current`` differs from ``saved`` (identity records); a saved
  record of every field (identity version 1) is compared on the fields ``reads`` keeps."""
  saved = dict(saved, config=filter_record(saved.get("config", {}), reads))
  diffs = identity_differences(saved, current)
  if diffs:
    raise resume_error(workdir, diffs)


def check_resume_compatible(saved_meta: dict, identity: dict, num_classes: int, workdir: str, reads=None) -> None:
  """The checkpoint's identity record (or, for a checkpoint written before identity records, its config) must
  equal this run's on the fields ``reads`` keeps; otherwise a ``UserError`` naming every differing field."""
  saved_identity = saved_meta.get("identity")
  if saved_identity is None:
    saved_identity = {"config": config_record(saved_meta.get("config", {}))}
  saved_identity = dict(saved_identity, config=filter_record(saved_identity.get("config", {}), reads))
  diffs = identity_differences(saved_identity, identity)
  if saved_meta.get("num_classes", num_classes) != num_classes:
    diffs.append(f"num_classes: {saved_meta['num_classes']} -> {num_classes}")
  if diffs:
    raise resume_error(workdir, diffs)
