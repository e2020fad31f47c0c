"""Shared test set-up: CPU only, a persistent compilation cache, and helpers to run the real CLI."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(ROOT, ".jax_cache")
# Before JAX is imported anywhere: CPU, and the persistent cache (roughly halves repeated compiles across the
# test processes and subprocesses).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# A tiny synthetic task and models: every CLI test uses these overrides.
TINY = [
    "--config.data.name=synthetic",
    "--config.model.name=cnn_tiny",
    "--config.teacher.model=cnn_tiny",
    "--config.data.train_subset=0",
    "--config.batch_size=32",
    "--config.val_batch_size=32",
    "--config.eval_batch_size=64",
    "--config.num_epochs=1",
    "--config.log.progress=False",
    "--config.log.every_steps=5",
]


def run_cli(args, *, env=None, check=True, timeout=300):
  """Runs ``python train.py ARGS`` in a subprocess; returns the CompletedProcess (text)."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
  """A finished tiny teacher run on the synthetic task (work directory path)."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  run_cli(["--config=configs/fashion_mnist.py:teacher", f"--workdir={workdir}", *TINY,
           "--config.model.name=cnn_tiny", "--config.num_epochs=2"])
  return workdir
