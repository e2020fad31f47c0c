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


class CliResult:
  """What a CLI run gave: ``returncode``, ``stdout``, ``stderr`` (as ``subprocess.CompletedProcess`` has them)."""

  def __init__(self, returncode, stdout, stderr):
    self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(args, *, env=None, check=True, timeout=300, process=False):
  """Runs the CLI (``train.py ARGS``) and returns its ``CliResult``.

  In this process (``tgeo_jax.cli.main``: the flag parsing and run that ``train.py`` calls; fast, no JAX start-up)
  unless ``env`` is given or ``process=True``: then ``python train.py ARGS`` in a subprocess (the process
  contract, or another device count via ``XLA_FLAGS``).
  """
  if env is None and not process:
    import contextlib
    import io
    from tgeo_jax import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      rc = cli.main(["train.py", *args])
    result = CliResult(rc, out.getvalue(), err.getvalue())
  else:
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    result = CliResult(proc.returncode, proc.stdout, proc.stderr)
  if check and result.returncode != 0:
    raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
  return result


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
  """A finished tiny teacher run on the synthetic task (work directory path)."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  run_cli(["--config=configs/fashion_mnist.py:teacher", f"--workdir={workdir}", *TINY,
           "--config.model.name=cnn_tiny", "--config.num_epochs=2"])
  return workdir


# ------------------------------------------------------------------------------------------ in-process runs


def tiny_config(arg="ce", **overrides):
  """``configs/fashion_mnist.py:ARG`` with the ``TINY`` overrides and ``overrides`` (dotted names) applied."""
  from configs import fashion_mnist
  config = fashion_mnist.get_config(arg)
  for flag in TINY:
    key, value = flag.removeprefix("--config.").split("=", 1)
    _set(config, key, {"False": False, "True": True}.get(value, int(value) if value.isdigit() else value))
  if arg == "teacher":
    config.model.name = "cnn_tiny"
  for key, value in overrides.items():
    _set(config, key, value)
  return config


def _set(config, dotted, value):
  node = config
  *parents, leaf = dotted.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value


def run_inprocess(config, workdir, capsys):
  """``tgeo_jax.cli.run(config, workdir)`` in this process (the CLI minus flag parsing): (exit status, stdout,
  stderr)."""
  from tgeo_jax import cli
  capsys.readouterr()
  rc = cli.run(config, str(workdir))
  out, err = capsys.readouterr()
  return rc, out, err


def error_lines(stderr):
  """The non-warning lines of ``stderr``."""
  return [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
