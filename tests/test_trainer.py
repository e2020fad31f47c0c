"""End to end through the CLI on a tiny synthetic task: outputs, resume, exactness, data parallelism (the first
test through ``python train.py`` itself, the others in this process, the device-count test in two processes)."""

import json
import os

import jax
import pytest

from conftest import TINY, assert_close_runs, assert_same_run, device_flags, final_arrays, run_cli
from tgeo_jax import report


def test_teacher_and_kd_student_outputs(tiny_teacher, tmp_path):
  summary = json.load(open(os.path.join(tiny_teacher, "summary.json")))
  assert summary["method"] == "ce" and 0 <= summary["accuracy"] <= 1
  workdir = str(tmp_path / "kd")
  proc = run_cli(["--config=configs/fashion_mnist.py:kd", f"--workdir={workdir}", *TINY,
                  f"--config.teacher.checkpoint={tiny_teacher}"], process=True)
  assert "done: kd test accuracy" in proc.stdout
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  for key in ("method", "accuracy", "best_accuracy", "teacher_accuracy", "num_steps", "seconds", "val_accuracy"):
    assert key in summary, key
  assert 0 <= summary["accuracy"] <= 1 and summary["num_steps"] == 14  # 462 training examples // 32
  assert 0 <= summary["val_accuracy"] <= 1 and summary["val_loss"] > 0  # the held-out part, for model selection
  records = report.evaluation_records(report.read_jsonl(os.path.join(workdir, "metrics.jsonl")))
  assert len(records) == 1
  for key in ("step", "epoch", "accuracy", "loss", "teacher_accuracy", "agreement", "teacher_kl", "train_loss"):
    assert key in records[0], key
  # The teacher's accuracy seen by the student run equals the teacher run's own final accuracy.
  teacher_summary = json.load(open(os.path.join(tiny_teacher, "summary.json")))
  assert summary["teacher_accuracy"] == pytest.approx(teacher_summary["accuracy"])
  # Running the same command again resumes (and does not train again); the teacher is never re-saved.
  teacher_files = sorted(os.listdir(os.path.join(tiny_teacher, "checkpoints")))
  again = run_cli(["--config=configs/fashion_mnist.py:kd", f"--workdir={workdir}", *TINY,
                   f"--config.teacher.checkpoint={tiny_teacher}"])
  assert "Resuming kd" in again.stdout and "already finished" in again.stdout
  assert sorted(os.listdir(os.path.join(tiny_teacher, "checkpoints"))) == teacher_files
  assert "frozen" not in str(final_arrays(workdir)[1].keys())


def test_resume_is_bit_exact(tiny_teacher, tmp_path):
  """N steps in one run == N/2 steps, a second run of the same command (resuming from the checkpoint), N/2 more
  (mid-epoch, with the optimizer's momentum)."""
  common = ["--config=configs/fashion_mnist.py:kd", *TINY, "--config.num_epochs=2",
            f"--config.teacher.checkpoint={tiny_teacher}"]
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  run_cli([*common, f"--workdir={straight}"])
  first = run_cli([*common, f"--workdir={split}", "--config.steps_per_run=9"])
  assert "Stopping after 9 steps" in first.stdout
  second = run_cli([*common, f"--workdir={split}"])
  assert "Resuming kd" in second.stdout and "from step 9 of 28" in second.stdout
  assert_same_run(straight, split)


def test_one_and_four_devices_agree(tiny_teacher, tmp_path):
  assert jax.device_count() == 1
  # crop + flip: the augmentation's draws are sharded over the devices with the indices (a live teacher then).
  common = ["--config=configs/fashion_mnist.py:kd", *TINY, f"--config.teacher.checkpoint={tiny_teacher}",
            "--config.data.augment=crop_flip"]
  one, four = str(tmp_path / "one"), str(tmp_path / "four")
  run_cli([*common, f"--workdir={one}"])  # in this process: one CPU device
  # The default pipeline, the device's: the batch gathered on 4 devices from the replicated split (the host
  # pipeline on 4 devices: tests/test_device_pipeline.py).
  proc = run_cli([*common, f"--workdir={four}"], env={"XLA_FLAGS": device_flags(4)})
  assert "4 device(s), batches built on the device (5 steps per dispatch at most)." in proc.stdout  # log every 5
  assert json.load(open(os.path.join(four, "summary.json")))["num_devices"] == 4
  assert_close_runs(one, four)
