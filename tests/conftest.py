"""Shared test set-up: CPU only, a persistent compilation cache, and helpers to run the real CLI."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(ROOT, ".jax_cache")
# Before JAX is imported anywhere: CPU, and the persistent cache shared by the test processes and subprocesses,
# holding every program (at optimisation level 0 most compile in under the 1 s JAX caches by default; caching all
# took a fresh-clone suite from 512 s to 449 s). Since the older fusion emitters below halved compile times, it is
# neutral: 353 s with it, 355 s without (2026-12-07, one run each); JAX's own count of the in-process cache hits
# says loading a program takes about as long as compiling it did (1,434 hits, 9.8 s to load, 3.8 s *lost*).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# XLA:CPU at backend optimisation level 0 and with its older (elemental) fusion emitters: the suite checks values,
# never speed, and its tiny programs compile in about half the time (level 0: five compile-bound tests, cold
# cache, 75.6 s -> 59.2 s; the older emitters on top: XLA compile time of five tiny CLI runs 4.5 s -> 2.2 s, the
# whole suite with a fresh cache on the same machine 656 s -> 397 s). Every process the suite starts inherits the
# flags; one with another device count gets them through ``device_flags``. A jaxlib that no longer knows one of
# the later flags (XLA aborts on an unknown flag) gets level 0 alone: one probe, in the first process, which the
# others inherit through the environment. A program whose run time dominates opts out (``RUN_TIME_BOUND``).
# Each program's code generated as one LLVM module, not split into parts compiled on several threads: 15% less
# compile CPU (the 1,145 programs that test_tgeo.py and test_loss_contract.py compile, each recompiled with both
# settings in turn in one process: 21.1 -> 17.6 CPU seconds; with test_hypergrad.py's, 1,698: 29.8 -> 25.4;
# bench/compile_replay.py).
# The cost: two programs that compile alike at level 0 may round differently under the default flags users run
# (a device-pipeline step once did, and the demo's digits moved unseen). A bit-identity that matters there gets a
# test under the default flags (``XLA_FLAGS=""`` in a subprocess: test_device_pipeline.py's one-kind test).
SUITE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                   "--xla_cpu_parallel_codegen_split_count=1")


def _known_xla_flags(flags):
  """``flags`` if a fresh process starts XLA:CPU with them, else the first alone (level 0, known everywhere)."""
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)})
  return flags if probe.returncode == 0 else flags[:1]


if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = " ".join(_known_xla_flags(SUITE_XLA_FLAGS))

# ``compiler_options`` for the few programs whose run time outweighs their compile time (Monte Carlo sampling, a
# long scan): XLA's defaults again, for that program alone.
RUN_TIME_BOUND = {"xla_backend_optimization_level": 3,
                  **({"xla_cpu_use_fusion_emitters": True} if SUITE_XLA_FLAGS[1] in os.environ["XLA_FLAGS"] else {})}


def device_flags(count: int) -> str:
  """``XLA_FLAGS`` for a process with ``count`` CPU devices (and the suite's other XLA flags)."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()

from tgeo_jax import default_config  # noqa: E402 (imports no JAX)


# The files whose tests take longest (real processes, several CLI runs each; measured on a fresh clone, 2026-12-07)
# run first, the others after them in name order. pytest-xdist hands each worker a contiguous share of this order and
# an idle worker steals from the end of the other's: with short tests at the end both finish together (before, a
# 10-12 s test was often the last one left, its worker alone).
LONGEST_FIRST = ("test_reliability.py", "test_parallel.py", "test_tgeo_variants.py", "test_device_pipeline.py",
                 "test_study.py", "test_tfds_local.py", "test_trainer.py", "test_tgeo.py", "test_hypergrad.py",
                 "test_tfds.py", "test_mixed_precision.py", "test_simkd.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept


def pytest_collection_finish(session):
  """Python's cyclic garbage collector, tuned for a test process whose heap only grows (imported modules, JAX's
  caches of traced and compiled programs): what exists once the tests are collected is frozen out of every later
  collection, and a full collection waits for 100 younger ones instead of 10. On four test files (253 tests, one
  process, two rounds with CPython's defaults interleaved): full collections 5.9-6.2 s -> 2.1-2.2 s, the files
  58.1-58.6 s -> 53.4-57.4 s, at the same peak memory (3.36 GB); the garbage is still collected, later."""
  del session
  import gc
  gc.collect()
  gc.freeze()
  gc.set_threshold(700, 10, 100)  # CPython's defaults: (700, 10, 10)

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


class LazyModule:
  """A module imported at its first attribute access: ``torch = LazyModule("torch")`` at a test module's top keeps
  collection (which every pytest worker does for every file) from importing it (torch: ~2.4 s per process). Pair it
  with ``pytestmark = requires("torch")``, which skips the file's tests when the module is not installed."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr):
    if attr.startswith("_"):  # pytest's collection probes objects for its own markers (``_pytestfixturefunction``)
      raise AttributeError(attr)
    import importlib
    return getattr(importlib.import_module(self._name), attr)


def requires(*modules: str):
  """A skip marker for tests that need ``modules`` (found without importing them)."""
  import importlib.util
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


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
  config = default_config.override(fashion_mnist.get_config(arg), [f.removeprefix("--config.") for f in TINY])
  if arg == "teacher":
    config.model.name = "cnn_tiny"
  return default_config.override(config, overrides)


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


# ------------------------------------------------------------------------------------------ shared helpers


def final_arrays(workdir):
  """The latest checkpoint's saved state as a flat {path: numpy array} dict (restored without a target)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(ckpt_dir, item_names=("state", "meta")) as mgr:
    step = mgr.latest_step()
    to_host = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # the run may have used other devices
    state = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fallback_sharding=to_host)))["state"]
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_same_run(a_dir, b_dir):
  """The final checkpoints are bit-identical (every array) and both describe the same evaluations."""
  import numpy as np
  from tgeo_jax import report
  step_a, a = final_arrays(a_dir)
  step_b, b = final_arrays(b_dir)
  assert step_a == step_b == 28 and a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert comparable_records(a_dir) == comparable_records(b_dir)
  summary_a = report.read_json(os.path.join(a_dir, "summary.json"))
  summary_b = report.read_json(os.path.join(b_dir, "summary.json"))
  assert summary_a["accuracy"] == summary_b["accuracy"] and summary_b["num_steps"] == 28


def assert_close_runs(a_dir, b_dir, tol=1e-5):
  """The final checkpoints' floating arrays agree to ``tol`` (absolute and relative): e.g. 1 and 4 devices."""
  import numpy as np
  _, a = final_arrays(a_dir)
  _, b = final_arrays(b_dir)
  for key in a:
    if a[key].dtype.kind == "f":
      np.testing.assert_allclose(a[key], b[key], atol=tol, rtol=tol, err_msg=key)


def comparable_records(workdir):
  """Every record of ``workdir/metrics.jsonl`` (evaluations and training intervals, whose averages are checkpointed:
  a resumed interval is not mixed with the killed process's part of it) without its wall-time measurements, the
  only fields two runs of one configuration may differ in."""
  from tgeo_jax import report
  timing = ("seconds", "steps_per_second", "examples_per_second")
  return [{k: v for k, v in r.items() if k not in timing}
          for r in report.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def fake_fashion_mnist_gz(directory, *, n_train=120, n_test=40, seed=0):
  """Gzipped Fashion-MNIST IDX files (random pixels, labels cycling 0..9) as Debian's package lays them out."""
  import numpy as np
  from tgeo_jax.data import sources
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  for split, n in (("train", n_train), ("t10k", n_test)):
    sources.write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, 28, 28)))
    sources.write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), np.arange(n) % 10)
  return directory


def attack_config(csv_dir, **overrides):
  """``configs/attack.py:ce`` reading ``csv_dir/attack.csv`` (3 classes), 1 epoch, small batches."""
  from configs import attack
  config = attack.get_config("ce")
  config.data.dir, config.data.file = csv_dir, "attack.csv"
  config.data.num_classes = 3
  config.num_epochs, config.batch_size, config.val_batch_size, config.eval_batch_size = 1, 16, 16, 64
  config.log.progress = False
  default_config.override(config, overrides)
  return config


def build_method_state(method, teacher_dir, **overrides):
  """A method on the tiny synthetic task with its initial state and one training batch (+ a validation batch):
  ``(method, state, batch)``, built the way the trainer builds them."""
  import jax
  import jax.numpy as jnp
  from configs import fashion_mnist
  from tgeo_jax import data, trainer
  config = fashion_mnist.get_config(method)
  config.data.name = "synthetic"
  config.data.train_subset = 0
  config.model.name = config.teacher.model = "cnn_tiny"
  config.batch_size = config.val_batch_size = 32
  config.teacher.checkpoint = teacher_dir
  default_config.override(config, overrides)
  task = data.load(config.data, seed=0)
  method_obj = trainer.build_method(config, task, steps_per_epoch=len(task.train) // 32)
  state, frozen = method_obj.init(jax.random.PRNGKey(0))
  batch = data.train_batches(task.train, batch_size=32, seed=0, epoch=0)[0]
  batch["val"] = data.validation_batches(task.val, batch_size=32, seed=0)[0]
  return method_obj, state, frozen, jax.tree.map(jnp.asarray, batch)


# ------------------------------------------------------------------ numeric helpers of the hypergradient tests
# NumPy on the host: an eager jax op outside jit costs a compilation of its own.


def flat(tree):
  """Every leaf of ``tree``, raveled and concatenated (NumPy)."""
  import jax
  import numpy as np
  leaves = [np.ravel(np.asarray(v)) for v in jax.tree.leaves(tree)]
  return np.concatenate(leaves) if leaves else np.zeros(0)


def tree_norm(tree) -> float:
  import numpy as np
  return float(np.linalg.norm(flat(tree)))


def relative_l2(approx, exact) -> float:
  """``‖approx − exact‖ / ‖exact‖`` over all leaves."""
  import numpy as np
  return float(np.linalg.norm(flat(approx) - flat(exact)) / np.linalg.norm(flat(exact)))


def central_differences(fn, meta: dict, eps: float = 1e-5) -> dict:
  """``d fn / d meta`` by central differences, one coordinate of the NumPy dict ``meta`` at a time."""
  import numpy as np
  grads = {}
  for key, value in meta.items():
    grad = np.zeros_like(value)
    for idx in np.ndindex(value.shape):
      plus, minus = dict(meta), dict(meta)
      plus[key], minus[key] = value.copy(), value.copy()
      plus[key][idx] += eps
      minus[key][idx] -= eps
      grad[idx] = (float(fn(plus)) - float(fn(minus))) / (2 * eps)
    grads[key] = grad
  return grads
