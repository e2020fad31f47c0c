"""The loop's input/output path: asynchronous checkpoints, training-throughput records, the profiler trace and the
persistent compilation cache (bad values of their fields: tests/test_cli_errors.py)."""

import errno
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CACHE_DIR, error_lines, run_inprocess, tiny_config
from tgeo_jax import checkpoint, report


def _state(scale):
  return {"w": jnp.full((8, 8), scale), "step": jnp.int32(scale), "rng": jax.random.PRNGKey(3)}


def test_async_save_writes_the_same_checkpoint_and_waits_before_reading(tmp_path):
  sync_ckpt = checkpoint.Checkpointer(str(tmp_path / "sync"))
  async_ckpt = checkpoint.Checkpointer(str(tmp_path / "async"), async_save=True)
  state = _state(1.0)
  sync_ckpt.save(1, state, {"step": 1})
  async_ckpt.save(1, state, {"step": 1})
  state = jax.tree.map(lambda x: x + 1, state)  # the caller moves on; the save holds its own host copy
  async_ckpt.save(2, state, {"step": 2})  # waits for step 1, then starts step 2
  assert async_ckpt.steps() == [1, 2]  # steps() waits for the pending save
  restored_async, meta = async_ckpt.restore(1, _state(0.0))
  restored_sync, _ = sync_ckpt.restore(1, _state(0.0))
  assert meta["step"] == 1
  for a, b in zip(jax.tree.leaves(restored_async), jax.tree.leaves(restored_sync)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert async_ckpt.read_meta(2)["step"] == 2
  sync_ckpt.close()
  async_ckpt.close()


def test_a_failed_background_save_is_raised_by_the_next_wait(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), async_save=True)

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ckpt.manager, "save", full_disk)
  ckpt.save(1, _state(1.0), {})  # returns: the write fails in the background
  with pytest.raises(OSError, match="No space left"):
    ckpt.wait()
  ckpt.wait()  # reported once
  monkeypatch.undo()
  ckpt.close()


def test_a_failed_background_save_stops_the_run_with_one_line(tmp_path, capsys, monkeypatch):
  writes = []
  original = checkpoint.Checkpointer._write

  def fail_second(self, step, state, meta):
    writes.append(step)
    if len(writes) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, step, state, meta)

  monkeypatch.setattr(checkpoint.Checkpointer, "_write", fail_second)
  config = tiny_config("ce", **{"checkpoint.every_steps": 4})
  rc, _, err = run_inprocess(config, tmp_path / "run", capsys)
  assert rc == 1, err
  lines = error_lines(err)
  assert len(lines) == 1 and "Traceback" not in err, err
  assert "checkpoint: saving step 8" in lines[0] and "no space left on device" in lines[0], lines[0]
  assert "the previous checkpoints are intact" in lines[0]
  assert sorted(int(n) for n in os.listdir(tmp_path / "run" / "checkpoints") if n.isdigit()) == [4]


def test_training_records_carry_throughput(tmp_path, capsys):
  config = tiny_config("ce", **{"log.every_steps": 5})
  rc, _, err = run_inprocess(config, tmp_path / "run", capsys)
  assert rc == 0, err
  records = report.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
  train = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train] == [5, 10, 14]  # every 5 steps and at the epoch end (14 steps)
  for r in train:
    assert r["steps_per_second"] > 0 and "train_loss" in r and np.isfinite(r["train_loss"])
    assert r["examples_per_second"] == pytest.approx(r["steps_per_second"] * config.batch_size)
  assert [r["step"] for r in report.evaluation_records(records)] == [14]


def test_profile_steps_write_a_trace(tmp_path, capsys):
  config = tiny_config("ce", **{"log.profile_steps": "2:4"})
  rc, out, err = run_inprocess(config, tmp_path / "run", capsys)
  assert rc == 0, err
  assert "Profiling steps 2:4" in out
  assert glob.glob(str(tmp_path / "run" / "profile" / "**" / "*.xplane.pb"), recursive=True)


def test_compilation_cache_dir_is_used(tmp_path, capsys):
  from jax.experimental.compilation_cache import compilation_cache
  cache = tmp_path / "jax_cache"
  config = tiny_config("ce", compilation_cache_dir=str(cache))
  try:
    rc, _, err = run_inprocess(config, tmp_path / "run", capsys)
  finally:  # the rest of this test process goes back to the suite's cache
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(os.environ.get("JAX_COMPILATION_CACHE_DIR", CACHE_DIR))
  assert rc == 0, err
  assert [f for f in os.listdir(cache) if not f.startswith(".")]  # compiled programs were written there


def test_prefetched_keeps_order_and_forwards_errors():
  from tgeo_jax.evaluation import prefetched
  assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))

  def failing():
    yield 1
    raise ValueError("bad record 2")

  out = []
  with pytest.raises(ValueError, match="bad record 2"):
    for x in prefetched(failing()):
      out.append(x)
  assert out == [1]
  consumed = []

  def counting():
    for i in range(1000):
      consumed.append(i)
      yield i

  for x in prefetched(counting(), depth=2):
    if x == 3:
      break
  import time
  time.sleep(0.3)
  assert len(consumed) <= 3 + 2 + 2  # the producer stopped soon after the consumer left


@pytest.mark.parametrize("pipeline", ["host", "device"])
def test_the_step_compiles_once_also_after_a_resume(tmp_path, pipeline):
  """The running metric sums enter the jitted step replicated, as it returns them: fresh zeros after a log point
  and sums restored from a checkpoint are the same input signature as the step's own output (else a second
  compilation of the whole step). The device pipeline's chunk step too (3 steps per dispatch, chunks cut at the
  log points and at each budget's end: 7, then 12)."""
  from tgeo_jax import trainer

  class NoStop:
    signum = None

  workdir = str(tmp_path / "run")
  for budget in (7, 5):  # 7 steps (a log point at 5), then a resume from step 7 with restored sums
    config = tiny_config("ce", **{"steps_per_run": budget, "device_pipeline.mode": "on" if pipeline == "device" else "off",
                                  "device_pipeline.steps_per_dispatch": 3})
    run = trainer.setup(config, workdir)
    try:
      with pytest.raises(trainer.StopTraining):
        trainer.train(run, NoStop())
      trainer.save(run)
      step = run.steps.train_step if pipeline == "host" else run.steps.chunk_step
      assert step._cache_size() == 1
    finally:
      run.close()
