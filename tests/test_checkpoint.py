"""Checkpoints: verified restores, fall back past a corrupt step (one line, nothing deleted), config mismatches."""

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TINY, run_cli
from tgeo_jax import checkpoint
from tgeo_jax.errors import UserError
from conftest import final_arrays


def make_state(scale: float):
  """A small state like a run's: params (one incompressible random array, the largest), an optax state, a step
  and a key."""
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 64)) * scale, "b": jnp.full((64,), scale)}
  tx = optax.sgd(0.1, momentum=0.9)
  opt_state = tx.update(jax.tree.map(jnp.sign, params), tx.init(params), params)[1]  # compressible momentum
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(scale), "rng": jax.random.PRNGKey(7)}


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def all_files(directory):
  return sorted(os.path.relpath(os.path.join(root, f), directory)
                for root, _, files in os.walk(directory) for f in files)


def data_files(step_dir):
  """The array data files of a step (OCDBT: ``state/d/*`` and ``state/ocdbt.process_*/d/*``)."""
  return sorted(os.path.join(root, f) for root, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
                if os.path.basename(root) == "d")


def largest_data_file(step_dir):
  """The biggest array data file of a step (for ``make_state``: where the random (64, 64) array's bytes are)."""
  return max(data_files(step_dir), key=os.path.getsize)


def garble(path):
  """Flips 16 bytes in the middle of a file (size unchanged)."""
  data = bytearray(open(path, "rb").read())
  middle = len(data) // 2
  for i in range(middle, middle + 16):
    data[i] ^= 0x5A
  open(path, "wb").write(bytes(data))


def truncate(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])


@pytest.fixture
def two_steps(tmp_path):
  """A checkpoint directory with good steps 1 and 2 (states make_state(1.0) and make_state(2.0))."""
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=5)
  for step in (1, 2):
    ckpt.save(step, make_state(float(step)), {"step": step, "note": "x"})
  ckpt.close()
  return directory


def test_roundtrip_with_integrity_record(two_steps):
  ckpt = checkpoint.Checkpointer(two_steps)
  step, state, meta = ckpt.restore_latest(make_state(0.0))
  assert step == 2 and meta == {"step": 2, "note": "x"}  # the integrity record is internal
  assert_trees_equal(state, make_state(2.0))
  # optax states come back as their named tuples (restored into the target's structure).
  assert type(state["opt_state"]) is type(make_state(0.0)["opt_state"])
  raw = json.load(open(os.path.join(two_steps, "2", "meta", "metadata")))
  records = raw[checkpoint.INTEGRITY_KEY]["arrays"]
  assert records["['params']['w']"]["shape"] == [64, 64] and len(records["['params']['w']"]["sha256"]) == 64
  assert ckpt.read_meta(1) == {"step": 1, "note": "x"}
  ckpt.close()


# (case id, how the newest step is damaged, text the warning must contain)
DAMAGE = [
    # Bytes overwritten inside the random array's data: orbax/tensorstore read it back without an error (the
    # chunk is stored uncompressed), so only the sha256 record catches it.
    ("garbled_array_data", lambda d: garble(largest_data_file(d)), "does not match its sha256 checksum"),
    ("truncated_array_data", lambda d: truncate(largest_data_file(d)), "corrupt"),
    ("deleted_manifest", lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")), "state unreadable"),
    ("deleted_state_dir", lambda d: shutil.rmtree(os.path.join(d, "state")), "state unreadable"),
    ("garbled_meta", lambda d: open(os.path.join(d, "meta", "metadata"), "w").write("{not json"), "meta unreadable"),
    ("empty_meta", lambda d: open(os.path.join(d, "meta", "metadata"), "w").close(), "meta unreadable"),
]


@pytest.mark.parametrize("name,damage,expected", DAMAGE, ids=[c[0] for c in DAMAGE])
def test_corrupt_latest_falls_back_in_one_line(name, damage, expected, two_steps, capfd):
  del name
  damage(os.path.join(two_steps, "2"))
  files_before = all_files(os.path.join(two_steps, "2"))
  ckpt = checkpoint.Checkpointer(two_steps)
  step, state, meta = ckpt.restore_latest(make_state(0.0))
  out, err = capfd.readouterr()
  assert step == 1 and meta["step"] == 1
  assert_trees_equal(state, make_state(1.0))
  lines = [line for line in (out + err).splitlines() if line.strip()]
  assert len(lines) == 1, out + err  # one line, no orbax/tensorstore tracebacks
  assert lines[0].startswith("warning: checkpoint step 2 in ") and expected in lines[0], lines[0]
  assert "resuming from step 1" in lines[0]
  # Nothing deleted: the corrupt step is kept, renamed so that orbax ignores it and the step can be saved again.
  assert all_files(os.path.join(two_steps, "2.corrupt")) == files_before
  assert ckpt.steps() == [1]
  ckpt.save(2, make_state(5.0), {"step": 2})
  assert_trees_equal(ckpt.restore_latest(make_state(0.0))[1], make_state(5.0))
  assert all_files(os.path.join(two_steps, "2.corrupt")) == files_before
  ckpt.close()


def test_tampered_checksum_is_detected(two_steps, capfd):
  """Intact arrays whose recorded sha256 differs: the verification really runs on every restore."""
  path = os.path.join(two_steps, "2", "meta", "metadata")
  meta = json.load(open(path))
  meta[checkpoint.INTEGRITY_KEY]["arrays"]["['params']['b']"]["sha256"] = "0" * 64
  json.dump(meta, open(path, "w"))
  ckpt = checkpoint.Checkpointer(two_steps)
  assert ckpt.restore_latest(make_state(0.0))[0] == 1
  assert "array ['params']['b'] does not match its sha256 checksum" in capfd.readouterr().err
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"2\.corrupt is corrupt: array \['params'\]\['b'\]"):
    checkpoint.verify(make_state(2.0), meta[checkpoint.INTEGRITY_KEY], where=os.path.join(two_steps, "2.corrupt"))
  ckpt.close()


def test_every_step_corrupt_is_an_error_that_moves_nothing(two_steps):
  for step in ("1", "2"):
    garble(largest_data_file(os.path.join(two_steps, step)))
  ckpt = checkpoint.Checkpointer(two_steps)
  with pytest.raises(UserError, match=r"workdir: none of the checkpoints \[1, 2\] .* is readable .*nothing was "
                                      r"changed"):
    ckpt.restore_latest(make_state(0.0))
  assert sorted(os.listdir(two_steps)) == ["1", "2"]
  ckpt.close()


def test_another_shape_is_a_config_mismatch_not_corruption(two_steps):
  target = make_state(0.0)
  target["params"]["b"] = jnp.zeros((32,))
  ckpt = checkpoint.Checkpointer(two_steps)
  with pytest.raises(UserError, match=r"another shape .*\['params'\]\['b'\]: saved float32\[64\], expected "
                                      r"float32\[32\]"):
    ckpt.restore_latest(target)
  assert sorted(os.listdir(two_steps)) == ["1", "2"]  # nothing moved aside


def test_check_meta_stops_before_reading(two_steps):
  def refuse(meta):
    raise UserError(f"workdir: step {meta['step']} is another run's")

  ckpt = checkpoint.Checkpointer(two_steps)
  with pytest.raises(UserError, match="step 2 is another run's"):
    ckpt.restore_latest(make_state(0.0), check_meta=refuse)
  assert sorted(os.listdir(two_steps)) == ["1", "2"]


def test_unfinished_save_is_invisible_and_cleaned_up(two_steps):
  """A save killed before orbax renamed its temporary directory is not a checkpoint."""
  shutil.copytree(os.path.join(two_steps, "2"), os.path.join(two_steps, "3.orbax-checkpoint-tmp"))
  assert checkpoint.Checkpointer(two_steps).steps() == [1, 2]
  ckpt = checkpoint.Checkpointer(two_steps, max_to_keep=5, cleanup_tmp=True)
  ckpt.save(3, make_state(3.0), {"step": 3})
  assert sorted(os.listdir(two_steps)) == ["1", "2", "3"]
  assert ckpt.restore_latest(make_state(0.0))[0] == 3


def test_teacher_restore_refuses_a_corrupt_checkpoint(two_steps):
  for path in data_files(os.path.join(two_steps, "2")):
    garble(path)
  with pytest.raises(UserError, match=r"teacher.checkpoint: checkpoint .*/2 is corrupt: "):
    checkpoint.restore_params(two_steps, {"params": make_state(0.0)["params"]}, what="teacher.checkpoint")
  assert sorted(os.listdir(two_steps)) == ["1", "2"]  # a teacher's directory is read, never changed


def test_cli_resumes_past_a_corrupt_checkpoint(tmp_path):
  """Through the real CLI: the final checkpoint's array data are garbled; the run falls back to the previous one
  (one line), retrains the lost steps and ends bit-identical to the original."""
  workdir = str(tmp_path / "run")
  args = ["--config=configs/fashion_mnist.py:ce", f"--workdir={workdir}", *TINY, "--config.checkpoint.every_steps=5"]
  run_cli(args)
  step, original = final_arrays(workdir)
  assert step == 14
  for path in data_files(os.path.join(workdir, "checkpoints", "14")):
    garble(path)
  os.remove(os.path.join(workdir, "summary.json"))
  proc = run_cli(args)
  lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "corrupt" in line]
  assert len(lines) == 1 and lines[0].startswith("warning: checkpoint step 14 in "), proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr
  assert "Resuming ce" in proc.stdout and "from step 10 of 14" in proc.stdout
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "14.corrupt"))
  step, again = final_arrays(workdir)
  assert step == 14 and again.keys() == original.keys()
  for key in original:
    np.testing.assert_array_equal(original[key], again[key], err_msg=key)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_save_is_fsynced_files_and_directories(tmp_path, monkeypatch, async_save):
  """The step's files, its directory and the checkpoint directory (which holds the rename) are fsynced."""
  synced = []
  real_fsync = os.fsync

  def fsync(fd):
    synced.append(os.readlink(f"/proc/self/fd/{fd}"))
    real_fsync(fd)

  monkeypatch.setattr(os, "fsync", fsync)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=async_save)
  try:
    ckpt.save(3, {"w": jnp.arange(4.0)}, {"step": 3})
    ckpt.wait()
  finally:
    ckpt.close()
  step_dir = str(tmp_path / "ckpt" / "3")
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  assert files and set(files) <= set(synced)
  assert step_dir in synced and str(tmp_path / "ckpt") in synced


def test_failed_write_remedies_name_the_cause():
  import errno

  from tgeo_jax import fileio
  assert fileio.failure_remedy(OSError(errno.ENOSPC, "No space left on device")) == "free space"
  assert fileio.failure_remedy(OSError(errno.EROFS, "Read-only file system")) == ("make the file system writable again "
                                                                          "(it is read-only)")
  assert fileio.failure_remedy(RuntimeError("tensorstore: Read-only file system [os error 30]")).startswith("make the file")
  assert fileio.failure_remedy(OSError(errno.EIO, "Input/output error")) == "fix the cause"


def test_after_a_failed_write_an_unstarted_array_write_warns_nothing(monkeypatch):
  """A failed save can leave jax's per-fragment write coroutines unstarted; when the garbage collector finds one
  (often in the interpreter's teardown, under load) Python warns "coroutine ... was never awaited" on stderr,
  after the trainer's one line. That exact warning is filtered once a write has begun; any other still shows."""
  import gc
  import warnings

  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # a failed write keeps its filters installed
  monkeypatch.setattr(sys, "excepthook", sys.excepthook)

  def unstarted(qualname):
    async def coroutine():
      pass

    coroutine.__qualname__ = qualname
    return coroutine()

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with pytest.raises(OSError):
      with checkpoint._quiet_failed_writes():
        raise OSError(28, "No space left on device")
    for qualname in ("async_serialize_from_host.<locals>.write_fragment", "some_other_coroutine"):
      orphan = unstarted(qualname)
      del orphan
      gc.collect()
  assert [str(w.message) for w in caught] == ["coroutine 'some_other_coroutine' was never awaited"]


def test_after_a_failed_write_asyncio_drops_its_other_fragments_failures(monkeypatch, caplog):
  """The other fragments of a failed write can fail the same way in futures nobody awaits; asyncio logs each
  ("Future exception was never retrieved") when it is collected. A future that failed with no space or a
  read-only file system is dropped (the trainer's one line says it); any other error is still logged."""
  import logging

  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  monkeypatch.setattr(sys, "excepthook", sys.excepthook)
  with pytest.raises(OSError):
    with checkpoint._quiet_failed_writes():
      raise OSError(28, "No space left on device")
  asyncio_log = logging.getLogger("asyncio")
  for err in (OSError(28, "No space left on device"), OSError(30, "Read-only file system"),
              OSError(13, "Permission denied"), ValueError("a bug")):
    asyncio_log.error("Future exception was never retrieved\nfuture: <Future finished exception=%r>", err,
                      exc_info=(type(err), err, None))
  assert [repr(r.exc_info[1]) for r in caplog.records if r.name == "asyncio"] == [
      "PermissionError(13, 'Permission denied')", "ValueError('a bug')"]
