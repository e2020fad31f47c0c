"""Bad input through the real CLI: one line on stderr naming the field or file, exit status 2, no traceback."""

import os
import re

import pytest

from conftest import TINY, run_cli

KD = "--config=configs/fashion_mnist.py:kd"

# (case id, extra CLI args, regex the error line must match). "{teacher}" is the tiny teacher's work directory.
CASES = [
    ("unknown_method", ["--config=configs/fashion_mnist.py:nope"], r"method: unknown method 'nope'"),
    ("unknown_model", ["--config.model.name=resnet1000"], r"model.name: unknown model 'resnet1000'"),
    ("unknown_dataset", ["--config.data.name=mnist3d"], r"data.name: unknown dataset 'mnist3d'"),
    ("missing_data_dir", ["--config.data.name=fashion_mnist", "--config.data.dir=/nonexistent"],
     r"data.dir: .*apt-get install dataset-fashion-mnist.*--config.data.dir"),
    ("zero_batch", ["--config.batch_size=0"], r"batch_size: expected a positive integer, got 0"),
    ("negative_epochs", ["--config.num_epochs=-1"], r"num_epochs: expected a positive integer"),
    ("wrong_type", ["--config.num_epochs=abc"], r"--config.num_epochs=abc"),
    ("unknown_field", ["--config.nope=1"], r"--config.nope: no such config field"),
    ("missing_config_file", ["--config=configs/nope.py:kd"], r"--config: .*configs/nope.py"),
    ("val_fraction", ["--config.data.val_fraction=1.5"], r"data.val_fraction: expected a fraction in \(0, 1\)"),
    ("learning_rate", ["--config.optimizer.learning_rate=0.0"], r"optimizer.learning_rate: expected a positive"),
    ("temperature", ["--config.kd.temperature=0.0"], r"kd.temperature: expected a positive number"),
    ("unknown_optimizer", ["--config.optimizer.name=lamb"], r"optimizer.name: unknown optimizer 'lamb'"),
    ("unknown_augment", ["--config.data.augment=mixup"], r"data.augment: unknown augmentation 'mixup'"),
    ("batch_exceeds_data", ["--config.batch_size=4096"], r"batch_size: 4096 exceeds the 462 training"),
    ("no_teacher", [], r"teacher.checkpoint: method 'kd' needs a trained teacher"),
    ("teacher_missing", ["--config.teacher.checkpoint=/nonexistent"], r"teacher.checkpoint: no checkpoint"),
    ("teacher_other_model", ["--config.teacher.checkpoint={teacher}", "--config.teacher.model=mlp_tiny"],
     r"teacher.checkpoint: .*does not match"),
    ("batch_not_divisible", ["--config.teacher.checkpoint={teacher}", "--config.batch_size=30"],
     r"batch_size: 30 must be a positive multiple of the device count \(4\)"),
]


@pytest.mark.parametrize("name,args,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, args, pattern, tiny_teacher, tmp_path):
  args = [a.replace("{teacher}", tiny_teacher) for a in args]
  config = [a for a in args if a.startswith("--config=")] or [KD]
  rest = [a for a in args if not a.startswith("--config=")]
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"} if name == "batch_not_divisible" else None
  proc = run_cli([*config, f"--workdir={tmp_path / 'run'}", *TINY, *rest], env=env, check=False)
  assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
  lines = [line for line in proc.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
  assert len(lines) == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  assert lines[0].startswith("error: ")
  assert re.search(pattern, lines[0]), lines[0]


def test_resume_with_another_config_is_refused(tiny_teacher, tmp_path):
  workdir = str(tmp_path / "run")
  run_cli(["--config=configs/fashion_mnist.py:ce", f"--workdir={workdir}", *TINY])
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  proc = run_cli(["--config=configs/fashion_mnist.py:ce", f"--workdir={workdir}", *TINY,
                  "--config.model.name=mlp_tiny"], check=False)
  assert proc.returncode == 2
  assert "model.name: 'cnn_tiny' -> 'mlp_tiny'" in proc.stderr and "nothing was overwritten" in proc.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
