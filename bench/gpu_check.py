"""GPU check in one run: the accelerator-relevant tests, KD / TGeo-KD step throughput and FLOPs utilisation, the
input pipeline against that rate, and the environment. Writes ONE JSON file and prints a short table.

On the device machine (a copy of the working tree, run from the repository root, results under $OUT; budgeted to
7.5 minutes on one H200, ``--budget-s``; nothing is installed or downloaded):

    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json

That machine's image lacks grain and ml_collections: without them the script writes a JSON naming the missing
modules and exits 2. ``bash bench/gpu_check.sh`` runs the same command after putting wheels carried in .whl/ on the
path (see there). Here, on CPU, as a smoke test (under 3 minutes on 2 cores):

    .venv/bin/python bench/gpu_check.py --quick --out /tmp/gpu_check_quick.json

Stages (each recorded in the JSON as it finishes, so a run killed at its time limit still leaves what it did):

1. ``pytest``: two pytest subprocesses, run at the same time, each with its own time limit (``--pytest-timeout``;
   a timeout is recorded as such, with the outcomes seen so far).
   ``real_devices``: the bfloat16 / mixed-precision tests (tests/test_mixed_precision.py and the bfloat16 cases of
   test_losses / test_dist) with ``JAX_PLATFORMS=''``, so tests/conftest.py does not force the CPU and JAX picks
   the accelerator when there is one. ``host_devices``: the sharding / data-parallel and 1-vs-4-device tests
   (test_parallel, test_dist / test_trainer / test_tgeo / test_tgeo_variants 1-vs-4, the batch-divisibility
   error). They fake 4 devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` on the CPU
   (``JAX_PLATFORMS=cpu``, as the tests set themselves): a one-GPU machine has no 4 real devices, so these never
   run on the accelerator there. Each group's ``platform`` in the JSON says where it ran.
2. ``steps``: the method's jitted ``train_step(state, frozen, batch, kind)`` (built by ``trainer.build_method`` with
   the teacher given in code, as bench/pipeline.py does; compiled with the state donated, as the trainer does,
   through bench/hypergrad_cost.py's ``Program`` / ``compile_all``) for KD and TGeo-KD (its default
   ``hypergrad='one_step'``, ``meta_interval=1``: every step is a meta step with a validation batch), teacher
   resnet32x4 -> student resnet8x4 from configs/cifar100.py's protocol on a synthetic task of CIFAR-100's shapes
   (32x32x3, 100 classes), at ``--batches`` in ``--dtypes`` (``config.compute_dtype``). The teacher is randomly
   initialised and runs ONLINE (``teacher.cache_logits='off'``, the CIFAR protocol's setting for augmented
   batches): its forward is part of every step. Per program: ``--warmup`` untimed calls, then up to ``--steps``
   timed calls (each on a fresh copy of the same state, ``jax.block_until_ready``, median reported), then
   ``--steps`` chained calls with one sync at the end (``pipelined``: what the training loop gets, dispatch
   overlapped). FLOPs per step from the compiled program's ``cost_analysis()`` (and the pre-optimisation count of
   the lowered program as a cross-check); achieved FLOP/s = FLOPs / median step time; the fraction of the
   device's dense peak where it is known (``PEAK_FLOPS``; null on CPU).
3. ``pipeline``: the real ``data.train_batches(...)`` over an in-memory uint8 CIFAR-like source
   (``sources.ArraySource`` with CIFAR-100 normalisation as ``to_model``) with the ``crop_flip_cifar100``
   augmentation, batch 128: images/s through ``to_iter_dataset()`` (grain's default read options), the same with
   each batch put on the device (``parallel.shard_batch``, as the trainer feeds the step), with TGeo-KD's
   validation batch per step, one thread without prefetch, and ``data.iterate(batches, workers=0 / 2)`` when that
   function exists; each as a ratio to the training steps' images/s at batch 128 (>= 1: the host keeps up).
4. ``environment``: versions, backend, devices, CPUs, date, git commit, wall time.

``--quick``: teacher resnet8x4 -> student resnet8 (the same code path, programs that compile in half a minute on
CPU), batch 8, 1 warm-up + 3 timed steps, two tiny tests only, a short pipeline: for CPU smoke tests.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Dense (non-sparse) peaks, NVIDIA H200 SXM datasheet. 'float32' is the CUDA-core rate the comparison is against;
# XLA's default precision for float32 convolutions / dots lets cuDNN / cuBLAS use TF32 tensor cores on Hopper, so
# 'tf32' is recorded beside it (a float32 fraction of the CUDA-core peak above 1 would mean TF32 was used).
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float32": 67e12, "tf32": 494.7e12, "source": "NVIDIA H200 SXM datasheet, dense"},
}
# Imported by the library or the step builders; the device image may lack some (grain, ml_collections): checked
# first, so a missing one is one line in the JSON rather than a traceback halfway.
REQUIRED_MODULES = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "grain", "ml_collections", "numpy",
                    "absl", "PIL", "tqdm")

REAL_DEVICE_TESTS = [
    "tests/test_mixed_precision.py",
    "tests/test_losses.py::LossesTest::test_bfloat16_logits_reduce_in_float32",
    "tests/test_dist.py::DistLossTest::test_teacher_is_stop_gradient_and_float32",
]
HOST_DEVICE_TESTS = [
    "tests/test_parallel.py",
    "tests/test_dist.py::test_intra_is_over_the_global_batch_on_four_devices",
    "tests/test_trainer.py::test_one_and_four_devices_agree",
    "tests/test_tgeo.py::test_tgeo_one_and_four_devices_agree",
    "tests/test_tgeo_variants.py::test_variants_agree_on_one_and_four_devices",
    "tests/test_cli_errors.py::test_bad_input[batch_not_divisible]",
]
# --quick: no training run (no tiny_teacher fixture), no subprocess; seconds on a CPU.
QUICK_TESTS = [
    "tests/test_mixed_precision.py::test_compute_dtype_field",
    "tests/test_mixed_precision.py::test_bfloat16_convolutions_take_bfloat16_operands",
]
# ``-v`` lines: "tests/f.py::test PASSED [ 50%]"; with pytest-xdist: "[gw0] [ 50%] PASSED tests/f.py::test".
OUTCOME_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
                          r"|^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+::\S+)")
SUMMARY_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b")


# ------------------------------------------------------------------------------------------------- helpers

def write_json(path: str, result: dict) -> None:
  """Atomically (a rename), so that a run killed mid-write leaves the previous stage's complete file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1, default=str)
  os.replace(tmp, path)


def git(*args) -> str | None:
  try:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def missing_modules() -> list[str]:
  """Required modules that are absent, then (if none is) the library's own import, which needs their imports."""
  missing = []
  for name in REQUIRED_MODULES:
    try:
      found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is absent
      found = False
    if not found:
      missing.append(name)
  if not missing:
    try:
      importlib.import_module("tgeo_jax.trainer")
      importlib.import_module("tgeo_jax.data")
    except ImportError as e:  # a dependency of a dependency (e.g. one of grain's)
      missing.append(f"{e.name or '?'} ({type(e).__name__}: {e})")
  return missing


def package_versions() -> dict:
  from importlib import metadata
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "grain", "ml_collections", "numpy",
               "jax-cuda12-plugin", "jax-cuda13-plugin", "pytest"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def nvidia_smi() -> str | None:
  if shutil.which("nvidia-smi") is None:
    return None
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return out.stdout.strip() or None


def environment(t_start_wall: str) -> dict:
  import jax
  from bench.machine import machine_info
  devices = jax.devices()
  env = machine_info(
      started=t_start_wall, backend=jax.default_backend(), devices=[d.device_kind for d in devices],
      packages=package_versions(), python_executable=sys.executable,
      git_commit=git("rev-parse", "HEAD"), git_dirty=None if git("rev-parse", "HEAD") is None else bool(
          git("status", "--porcelain", "--untracked-files=no")),
      default_matmul_precision=str(jax.config.jax_default_matmul_precision),
      env={k: os.environ.get(k) for k in ("JAX_PLATFORMS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                          "XLA_PYTHON_CLIENT_MEM_FRACTION", "CUDA_VISIBLE_DEVICES")},
      nvidia_smi=nvidia_smi())
  try:
    env["platform_version"] = devices[0].client.platform_version
  except AttributeError:
    env["platform_version"] = None
  return env


def peak_for(device_kind: str, platform: str) -> dict | None:
  if platform == "cpu":
    return None
  for key, peaks in PEAK_FLOPS.items():
    if key.lower() in device_kind.lower():
      return dict(peaks, matched=key)
  return None


# ------------------------------------------------------------------------------------------------ 1. pytest

def start_pytest(name: str, nodes: list[str], platforms: str, log_dir: str, workers: tuple = ()) -> dict:
  """Starts ``python -m pytest NODES`` in its own process group (so a timeout kills its test subprocesses too);
  ``workers``: extra pytest arguments (pytest-xdist's ``-n N``)."""
  env = dict(os.environ)
  # '' (not unset): tests/conftest.py only sets JAX_PLATFORMS=cpu when the variable is absent, and JAX reads ''
  # as "pick the best platform", i.e. the accelerator when there is one.
  env["JAX_PLATFORMS"] = platforms
  # This process holds most of the accelerator's memory once its backend is up; the test process allocates on
  # demand from the rest instead of failing to preallocate its own 75%.
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  log_path = os.path.join(log_dir, f"pytest_{name}.log")
  # -o addopts=: pyproject's '-q' would hide the per-test lines parsed below; -p no:cacheprovider: nothing written.
  cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-v", "-rfE", "-p", "no:cacheprovider", *workers, *nodes]
  log = open(log_path, "w")  # closed by finish_pytest
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  return dict(name=name, nodes=nodes, cmd=" ".join(cmd[1:]), proc=proc, log=log, log_path=log_path,
              t0=time.perf_counter(), platforms=platforms)


def finish_pytest(run: dict, deadline: float, platform: str, note: str) -> dict:
  """Waits until the run ends or ``deadline`` (then kills its process group); its outcomes from the -v log."""
  proc = run["proc"]
  timed_out = False
  try:
    proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
  except subprocess.TimeoutExpired:
    timed_out = True
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # the group this script started: pytest and its test subprocesses
    except ProcessLookupError:
      pass
    proc.wait()
  seconds = time.perf_counter() - run["t0"]
  run["log"].close()
  text = open(run["log_path"], errors="replace").read()
  outcomes: dict[str, str] = {}
  for line in text.splitlines():
    m = OUTCOME_LINE.match(line)
    if m:
      node, outcome = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
      # A teardown ERROR after PASSED is reported as a second line for the same test: the worse one counts.
      if outcomes.get(node) in (None, "PASSED", "SKIPPED"):
        outcomes[node] = outcome
  counts: dict[str, int] = {}
  for outcome in outcomes.values():
    counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
  summary = [ln for ln in text.splitlines() if re.match(r"^=+ .*(passed|failed|error|skipped).* in [\d.]+s", ln)]
  pytest_counts = None
  if summary:
    pytest_counts = {k.rstrip("s") if k.startswith("error") else k: int(n) for n, k in SUMMARY_COUNT.findall(
        summary[-1])}
  failures = [ln for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
  return dict(
      name=run["name"], platform=platform, jax_platforms_env=run["platforms"], note=note, nodes=run["nodes"],
      command=run["cmd"], returncode=None if timed_out else proc.returncode, timed_out=timed_out,
      seconds=round(seconds, 1), counts=counts, pytest_summary=pytest_counts,
      passed=counts.get("passed", 0), failed=counts.get("failed", 0), errors=counts.get("error", 0),
      skipped=counts.get("skipped", 0), outcomes=outcomes, failure_lines=failures[:40],
      log_tail=text[-6000:] if (timed_out or proc.returncode not in (0, None)) else text[-600:])


def run_pytest(args, backend: str, log_dir: str) -> dict:
  if importlib.util.find_spec("pytest") is None:
    return dict(skipped="pytest is not importable by this Python", groups=[])
  groups = [("real_devices", QUICK_TESTS if args.quick else REAL_DEVICE_TESTS, "", (),
             backend, f"JAX's default platform ({backend}): "
             + ("real accelerator devices" if backend != "cpu" else "the CPU (no accelerator here)"))]
  if not args.quick:
    # Its tests are independent CLI / multi-process runs: spread over 4 workers where the cores allow it (each
    # worker trains its own tiny teacher, ~10 s); on a small machine the workers would only contend.
    xdist = (("-n", "4") if (os.cpu_count() or 1) >= 12 and importlib.util.find_spec("xdist") is not None
             else ())
    groups.append(("host_devices", HOST_DEVICE_TESTS, "cpu", xdist, "cpu",
                   "CPU only: the 1-vs-n-device and multi-process tests fake 4 host devices with XLA_FLAGS="
                   "--xla_force_host_platform_device_count (their subprocesses set JAX_PLATFORMS=cpu themselves); "
                   "a one-GPU machine has no 4 real devices"))
  t0 = time.perf_counter()
  # At the same time: one mostly uses the accelerator, the other host CPUs; their sum would not fit the budget.
  runs = [(start_pytest(name, nodes, platforms, log_dir, workers), platform, note)
          for name, nodes, platforms, workers, platform, note in groups]
  deadline = t0 + args.pytest_timeout
  results = [finish_pytest(run, deadline, platform, note) for run, platform, note in runs]
  return dict(time_limit_s=args.pytest_timeout, wall_s=round(time.perf_counter() - t0, 1), groups=results,
              ran_on_accelerator=[g["name"] for g in results if g["platform"] != "cpu"])


# ------------------------------------------------------------------------------------------------- 2. steps

def make_config(method: str, batch: int, dtype: str, args):
  """configs/cifar100.py's protocol for the pair, on a synthetic task of CIFAR-100's shapes."""
  from configs import cifar100
  c = cifar100.get_config(f"resnet32x4_resnet8x4:{method}")
  c.teacher.model, c.model.name = args.teacher, args.student  # --teacher / --student: other models, same protocol
  c.data.name = "synthetic"
  c.data.synthetic.num_train = args.num_train
  c.data.synthetic.num_test = 256
  c.data.synthetic.input_shape = (32, 32, 3)
  c.data.synthetic.num_classes = 100
  c.batch_size = c.val_batch_size = batch
  c.compute_dtype = dtype
  c.teacher.cache_logits = "off"  # the protocol's already: an online teacher, as on augmented CIFAR batches
  if "tgeo" in c:
    c.tgeo.analysis_examples = 0  # the trainer's per-epoch analytics; no step reads it
  return c


def _keep_table(compute, tables: dict, dtype: str, frozen):
  tables[dtype] = compute(frozen)
  return tables[dtype]


def build_programs(args) -> tuple[list, dict]:
  """``Program``s (lowered, not compiled) for every (method, dtype, batch), and per-program settings."""
  import jax
  import jax.numpy as jnp
  from bench.hypergrad_cost import Program
  from tgeo_jax import data, methods, models, trainer
  from tgeo_jax.teacher import Teacher

  base = make_config("kd", max(args.batches), "float32", args)
  task = data.load(base.data, seed=base.seed)  # one task for all: its validation part holds the largest batch
  programs, info = [], {}
  tables = {}  # compute dtype -> the teacher's logits over the training part (TGeo-KD's init reads them)
  for dtype in args.dtypes:
    # One random teacher per compute dtype (the trainer loads the teacher in the student's compute dtype).
    tm = models.split(models.create(args.teacher, num_classes=task.num_classes, input_shape=task.input_shape,
                                    seed=base.seed + 100, dtype=models.compute_dtype(make_config("kd", 8, dtype,
                                                                                                 args))))
    teacher = Teacher(args.teacher, tm.graphdef, {"params": tm.params, "rest": tm.rest})
    for method_name in args.methods:
      for batch in args.batches:
        config = make_config(method_name, batch, dtype, args)
        methods.validate_config(config)
        method = trainer.build_method(config, task, data.steps_per_epoch(len(task.train), batch), teacher=teacher)
        if dtype in tables:  # the same frozen teacher: its logit table once per dtype (as bench/pipeline.py does)
          method.teacher_logits_over_train = lambda frozen, table=tables[dtype]: table
        else:  # computed (by a fresh jit each time) only by methods that need it, so kept on first use
          method.teacher_logits_over_train = functools.partial(_keep_table, method.teacher_logits_over_train,
                                                               tables, dtype)
        state, frozen = method.init(jax.random.PRNGKey(config.seed))
        assert "teacher_logits_table" not in frozen, "expected the online teacher"
        host = data.train_batches(task.train, batch_size=batch, seed=0, epoch=0)[0]
        if method.uses_validation_batch:
          host["val"] = data.validation_batches(task.val, batch_size=batch, seed=0)[0]
        b = jax.tree.map(jnp.asarray, host)
        kind = method.step_kind(0)
        name = f"{method_name}/{dtype}/b{batch}"
        t0 = time.perf_counter()
        p = Program(name, lambda s, f, bb, m=method, k=kind: m.train_step(s, f, bb, k), (state, frozen, b),
                    donate=True)
        lower_s = time.perf_counter() - t0
        try:
          flops_lowered = float((p.lowered.cost_analysis() or {}).get("flops", 0.0))
        except Exception:  # noqa: BLE001 - an optional cross-check; some backends have no pre-compile analysis
          flops_lowered = None
        programs.append(p)
        info[name] = dict(method=method_name, dtype=dtype, batch=batch, kind=kind, lower_s=lower_s,
                          flops_lowered=flops_lowered, student_params=models.num_params(state["params"]),
                          teacher_params=models.num_params(tm.params))
        print(f"  lowered {name:22s} in {lower_s:5.1f} s", file=sys.stderr, flush=True)
  return programs, info


def time_program(p, warmup: int, steps: int, max_s: float) -> dict:
  import jax
  import numpy as np
  from bench.hypergrad_cost import fresh_copy
  for _ in range(max(1, warmup)):
    p.call(timed=False)
  t0 = time.perf_counter()
  while len(p.times) < steps and (len(p.times) < 2 or time.perf_counter() - t0 < max_s):
    p.call()
  # Chained: each call donates and returns the state, one sync at the end (the training loop's situation).
  state, frozen, batch = fresh_copy(p.args[0]), p.args[1], p.args[2]
  n = len(p.times)
  t1 = time.perf_counter()
  for _ in range(n):
    state, metrics = p.exe(state, frozen, batch)
  jax.block_until_ready((state, metrics))
  pipelined = (time.perf_counter() - t1) / n
  loss = float(np.asarray(metrics["loss"]))
  return dict(times_ms=[1e3 * t for t in p.times], median_ms=p.ms, min_ms=1e3 * min(p.times),
              pipelined_ms=1e3 * pipelined, loss=loss, loss_finite=bool(np.isfinite(loss)))


def run_steps(args, result, out_path) -> list[dict]:
  import jax
  from bench.hypergrad_cost import compile_all
  t0 = time.perf_counter()
  programs, info = build_programs(args)
  stage = result["steps"]
  stage["lower_wall_s"] = time.perf_counter() - t0
  stage["compile_wall_s"] = compile_all(programs, args.compile_workers)
  write_json(out_path, result)
  device = jax.devices()[0]
  peak = peak_for(device.device_kind, device.platform)
  stage["peak_assumed"] = peak
  rows = []
  for p in programs:
    i = info[p.name]
    timing = time_program(p, args.warmup, args.steps, args.max_seconds_per_program)
    flops = p.flops
    achieved = flops / (timing["median_ms"] / 1e3) if flops else None
    peak_flops = peak.get(i["dtype"]) if peak else None
    row = dict(
        name=p.name, method=i["method"], dtype=i["dtype"], batch=i["batch"], kind=i["kind"],
        median_ms=timing["median_ms"], min_ms=timing["min_ms"], pipelined_ms=timing["pipelined_ms"],
        images_per_s=i["batch"] / (timing["median_ms"] / 1e3),
        pipelined_images_per_s=i["batch"] / (timing["pipelined_ms"] / 1e3),
        flops_per_step=flops, gflops_per_step=flops / 1e9, flops_per_step_lowered=i["flops_lowered"],
        has_loop=p.loops, achieved_tflops=None if achieved is None else achieved / 1e12,
        peak_tflops_assumed=None if peak_flops is None else peak_flops / 1e12,
        fraction_of_peak=None if (achieved is None or peak_flops is None) else achieved / peak_flops,
        fraction_of_tf32_peak=(achieved / peak["tf32"] if (peak and achieved and i["dtype"] == "float32")
                               else None),
        temp_mib=p.temp / 2**20, compile_s=p.compile_s, lower_s=i["lower_s"], timed_steps=len(p.times),
        warmup_steps=max(1, args.warmup), loss=timing["loss"], loss_finite=timing["loss_finite"],
        student_params=i["student_params"], teacher_params=i["teacher_params"], times_ms=timing["times_ms"])
    rows.append(row)
    stage["rows"] = rows
    write_json(out_path, result)
    print(f"  timed {p.name:22s} median {row['median_ms']:8.2f} ms, pipelined {row['pipelined_ms']:8.2f} ms",
          file=sys.stderr, flush=True)
    p.exe = None  # the executable's device memory is not needed any more
  try:
    stats = jax.devices()[0].memory_stats() or {}
    stage["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  except Exception:  # noqa: BLE001 - memory_stats is optional per backend (CPU has none)
    stage["device_peak_bytes_in_use"] = None
  return rows


# ---------------------------------------------------------------------------------------------- 3. pipeline

def measure_iterator(make_iter, num_batches: int, max_s: float, per_batch=None) -> dict:
  """Images/s of an iterator's steady state: the clock starts after its first batch (thread start-up, first
  prefetch) and runs for ``num_batches`` more, or ``max_s`` seconds."""
  t0 = time.perf_counter()
  it = iter(make_iter())
  first = next(it)
  if per_batch is not None:
    per_batch(first, 0)
  first_s = time.perf_counter() - t0
  n_images, n = 0, 0
  t1 = time.perf_counter()
  for batch in it:
    if per_batch is not None:
      per_batch(batch, n + 1)
    n_images += len(batch["labels"])
    n += 1
    if n >= num_batches or time.perf_counter() - t1 > max_s:
      break
  seconds = time.perf_counter() - t1
  close = getattr(it, "close", None)
  if close is not None:  # stops a multiprocess loader's workers now, not at garbage collection
    close()
  return dict(images_per_s=n_images / seconds if seconds > 0 else None, batches=n, seconds=seconds,
              first_batch_s=first_s)


def run_pipeline(args, step_rows: list[dict]) -> dict:
  import jax
  import numpy as np
  from tgeo_jax import data, parallel
  from tgeo_jax.data import augment as augment_lib
  from tgeo_jax.data import sources, tfds_sources

  rng = np.random.default_rng(0)
  n = args.pipeline_examples
  images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 100, size=n).astype(np.int32)
  # The TFDS CIFAR-100 source's own normalisation; a partial of a module function (not a lambda) so that a
  # multiprocess loader can pickle the source.
  to_model = functools.partial(tfds_sources._normalize, mean=tfds_sources.CIFAR100_MEAN,
                               std=tfds_sources.CIFAR100_STD)
  source = sources.ArraySource(images, labels, to_model)
  augment = augment_lib.get("crop_flip_cifar100")
  batch = args.pipeline_batch
  mesh = parallel.make_mesh()
  val = data.validation_batches(source, batch_size=batch, seed=0)

  def batches(epoch):
    return data.train_batches(source, batch_size=batch, seed=0, epoch=epoch, augment=augment)

  nb, max_s = args.pipeline_batches, args.pipeline_max_s
  # Untimed: the first batches pay one-off costs (numpy / grain code paths, the first host-to-device copies) that
  # would otherwise all land on whichever row runs first.
  measure_iterator(lambda: batches(0).to_iter_dataset(), 4, max_s,
                   per_batch=lambda b, i: jax.block_until_ready(parallel.shard_batch(b, mesh)))
  rows = {}
  rows["to_iter_dataset (grain default read options)"] = measure_iterator(
      lambda: batches(1).to_iter_dataset(), nb, max_s)
  rows["to_iter_dataset + shard_batch to device (as the trainer feeds the step)"] = measure_iterator(
      lambda: batches(2).to_iter_dataset(), nb, max_s,
      per_batch=lambda b, i: jax.block_until_ready(parallel.shard_batch(b, mesh)))
  rows["to_iter_dataset + validation batch + shard_batch (TGeo-KD's loader)"] = measure_iterator(
      lambda: batches(3).to_iter_dataset(), nb, max_s,
      per_batch=lambda b, i: jax.block_until_ready(parallel.shard_batch(dict(b, val=val[i]), mesh)))
  ds4 = batches(4)
  rows["ds[step], one thread, no prefetch"] = measure_iterator(
      lambda: (ds4[i] for i in range(len(ds4))), min(nb, max(4, nb // 4)), max_s)
  iterate = getattr(data, "iterate", None)
  iterate_note = None
  if iterate is None:
    iterate_note = "tgeo_jax.data.iterate does not exist in this tree: not timed"
  else:
    for workers in (0, 2):
      key = f"data.iterate(batches, workers={workers})"
      try:
        rows[key] = measure_iterator(lambda w=workers: iterate(batches(5 + w), workers=w), nb, max_s)
      except Exception as e:  # noqa: BLE001 - a function another change is adding: record how it failed
        rows[key] = dict(error=f"{type(e).__name__}: {e}")
  # Against every batch-`batch` step: the ratio says how many times over the host could feed that step.
  # Against the steps at the loader's batch size (--quick has none: its largest batch instead, as a smoke test).
  step_batch = batch if any(r["batch"] == batch for r in step_rows) else max((r["batch"] for r in step_rows),
                                                                                default=None)
  targets = {r["name"]: r["images_per_s"] for r in step_rows if r["batch"] == step_batch}
  chained = {r["name"]: r["pipelined_images_per_s"] for r in step_rows if r["batch"] == step_batch}
  for row in rows.values():
    if row.get("images_per_s"):
      row["ratio_to_step"] = {k: row["images_per_s"] / v for k, v in targets.items()}
      row["ratio_to_pipelined_step"] = {k: row["images_per_s"] / v for k, v in chained.items()}
  fastest = max(targets.items(), key=lambda kv: kv[1]) if targets else None
  feed = rows["to_iter_dataset + shard_batch to device (as the trainer feeds the step)"]
  summary = None
  if fastest is not None and feed.get("images_per_s"):
    ratio = feed["images_per_s"] / fastest[1]
    summary = dict(fastest_step=fastest[0], fastest_step_images_per_s=fastest[1],
                   fastest_step_pipelined_images_per_s=chained[fastest[0]], feed_images_per_s=feed["images_per_s"],
                   ratio=ratio, ratio_to_pipelined=feed["images_per_s"] / chained[fastest[0]],
                   host_keeps_up=ratio >= 1.0)
  return dict(source=f"ArraySource uint8 [{n}, 32, 32, 3], to_model = CIFAR-100 mean/std normalisation "
                     "(tfds_sources._normalize)",
              augment="crop_flip_cifar100", batch_size=batch, compared_with_steps_at_batch=step_batch,
              batches_per_row=nb, max_seconds_per_row=max_s,
              cpu_count=os.cpu_count(), rows=rows, iterate_note=iterate_note, summary=summary)


# ------------------------------------------------------------------------------------------------- output

def fmt(x, spec=".1f", none="-"):
  return none if x is None else format(x, spec)


def print_table(result: dict) -> None:
  env = result.get("environment") or {}
  print(f"\ngpu_check ({result['mode']}): {env.get('device_kind')} ({env.get('backend')}, "
        f"{env.get('device_count')} device(s)), jax {env.get('jax')}, {env.get('cpu_count')} CPUs, "
        f"commit {(env.get('git_commit') or '?')[:10]}; {fmt(result.get('total_seconds'))} s")
  pt = result.get("pytest") or {}
  if pt.get("skipped"):
    print(f"pytest: skipped ({pt['skipped']})")
  for g in pt.get("groups", []):
    print(f"pytest {g['name']:13s} on {g['platform']:4s}: {g['passed']} passed, {g['failed']} failed, "
          f"{g['errors']} errors, {g['skipped']} skipped in {g['seconds']} s"
          f"{'  TIMED OUT' if g['timed_out'] else ''}")
  rows = (result.get("steps") or {}).get("rows") or []
  if rows:
    print("\n| step | batch | ms/step | pipelined ms | img/s | GFLOP/step | TFLOP/s | of peak | compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
      frac = None if r["fraction_of_peak"] is None else 100 * r["fraction_of_peak"]
      print(f"| {r['method']} {r['dtype']} | {r['batch']} | {r['median_ms']:.2f} | {r['pipelined_ms']:.2f} | "
            f"{r['images_per_s']:.0f} | {r['gflops_per_step']:.2f} | {fmt(r['achieved_tflops'], '.2f')} | "
            f"{fmt(frac, '.1f')}{'%' if frac is not None else ''} | {r['compile_s']:.1f} |")
  pipe = result.get("pipeline") or {}
  if pipe.get("rows"):
    print(f"\n| input pipeline (batch {pipe['batch_size']}, {pipe['augment']}) | img/s | first batch s |")
    print("|---|---:|---:|")
    for k, r in pipe["rows"].items():
      if "error" in r:
        print(f"| {k} | error: {r['error'][:60]} | |")
      else:
        print(f"| {k} | {fmt(r['images_per_s'], '.0f')} | {r['first_batch_s']:.2f} |")
    s = pipe.get("summary")
    if s:
      print(f"trainer-like feed / fastest step ({s['fastest_step']}, {s['fastest_step_images_per_s']:.0f} img/s): "
            f"{s['ratio']:.2f}x -> host {'keeps up' if s['host_keeps_up'] else 'does NOT keep up'}")
    if pipe.get("iterate_note"):
      print(pipe["iterate_note"])
  for stage, err in (result.get("errors") or {}).items():
    print(f"ERROR in {stage}: {err.strip().splitlines()[-1]}")


def _ints(text):
  return [int(x) for x in text.split(",") if x.strip()]


def _names(text):
  return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu_check.json"))
  p.add_argument("--quick", action="store_true", help="tiny settings for a CPU smoke test")
  p.add_argument("--teacher", default=None, help="default resnet32x4 (--quick: resnet8x4)")
  p.add_argument("--student", default=None, help="default resnet8x4 (--quick: resnet8)")
  p.add_argument("--methods", type=_names, default=None, help="default kd,tgeo")
  p.add_argument("--dtypes", type=_names, default=None, help="compute dtypes, default float32,bfloat16")
  p.add_argument("--batches", type=_ints, default=None, help="default 64,128 (--quick: 8)")
  p.add_argument("--warmup", type=int, default=None, help="untimed calls per step program (default 3)")
  p.add_argument("--steps", type=int, default=None, help="timed calls per step program (default 20)")
  p.add_argument("--max-seconds-per-program", type=float, default=15.0)
  p.add_argument("--compile-workers", type=int, default=None,
                 help="step programs compiled at once (default min(8, CPUs)); XLA compiles outside the GIL")
  p.add_argument("--num-train", type=int, default=None, help="synthetic training examples (default 2048)")
  p.add_argument("--pytest-timeout", type=float, default=None, help="wall-clock limit of the tests (default 200 s)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="whole run's target wall time; the loader rows shrink to fit it (default 450 s)")
  p.add_argument("--skip-pytest", action="store_true")
  p.add_argument("--skip-steps", action="store_true")
  p.add_argument("--skip-pipeline", action="store_true")
  p.add_argument("--pipeline-batch", type=int, default=128)
  p.add_argument("--pipeline-batches", type=int, default=None, help="timed batches per loader row (default 300)")
  p.add_argument("--pipeline-max-s", type=float, default=None, help="seconds per loader row at most (default 10)")
  p.add_argument("--pipeline-examples", type=int, default=None, help="examples in the source (default 45000)")
  args = p.parse_args(argv)
  quick = args.quick
  # --quick: smaller CIFAR ResNets of the same code path (resnet32x4's step programs take ~1 min each to compile
  # on a 2-core CPU), and a training part just large enough for a validation batch of 8 over 100 classes.
  defaults = dict(teacher="resnet8x4" if quick else "resnet32x4", student="resnet8" if quick else "resnet8x4",
                  methods=["kd", "tgeo"], dtypes=["float32", "bfloat16"], batches=[8] if quick else [64, 128],
                  warmup=1 if quick else 3, steps=3 if quick else 20,
                  compile_workers=min(8, os.cpu_count() or 1), num_train=256 if quick else 2048,
                  pytest_timeout=120.0 if quick else 200.0, budget_s=170.0 if quick else 450.0,
                  pipeline_batches=8 if quick else 300,
                  pipeline_max_s=5.0 if quick else 10.0, pipeline_examples=4096 if quick else 45000)
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  t_start = time.perf_counter()
  started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  result = dict(tool="bench/gpu_check.py", mode="quick" if args.quick else "full", argv=sys.argv[1:],
                settings={k: v for k, v in vars(args).items() if k != "out"}, errors={})
  missing = missing_modules()
  if missing:
    result.update(missing_modules=missing, environment=dict(started=started, python_executable=sys.executable,
                                                            packages=package_versions(),
                                                            git_commit=git("rev-parse", "HEAD")),
                  total_seconds=time.perf_counter() - t_start)
    result["errors"]["imports"] = f"missing Python modules: {', '.join(missing)} (nothing is installed here)"
    write_json(args.out, result)
    print(f"gpu_check: missing Python modules {missing}; wrote {args.out}", file=sys.stderr)
    return 2

  import jax  # after the check: the backend starts here (and takes most of an accelerator's memory)
  result["environment"] = environment(started)
  backend = jax.default_backend()
  print(f"gpu_check: {result['environment']['device_kind']} ({backend}, {jax.device_count()} device(s)), jax "
        f"{jax.__version__}; writing {args.out}", flush=True)
  write_json(args.out, result)

  log_dir = tempfile.mkdtemp(prefix="gpu_check_")
  if args.skip_pytest:
    result["pytest"] = dict(skipped="--skip-pytest", groups=[])
  else:
    print(f"[1/3] pytest (limit {args.pytest_timeout:.0f} s) ...", flush=True)
    try:
      result["pytest"] = run_pytest(args, backend, log_dir)
    except Exception:  # noqa: BLE001 - every stage is recorded; one failing must not lose the others
      result["errors"]["pytest"] = traceback.format_exc()
  write_json(args.out, result)

  step_rows = []
  if not args.skip_steps:
    print(f"[2/3] training steps {args.teacher} -> {args.student}: {args.methods} x {args.dtypes} x batch "
          f"{args.batches} ...", flush=True)
    result["steps"] = dict(
        teacher=args.teacher, student=args.student, teacher_weights="random init (no checkpoint)",
        teacher_mode="online: teacher forward inside every step (teacher.cache_logits='off', as for augmented "
                     "CIFAR batches)",
        task="synthetic, CIFAR-100 shapes: 32x32x3 float32 inputs, 100 classes",
        config="configs/cifar100.py protocol (SGD momentum 0.9, wd 5e-4, no clipping); compute_dtype per row",
        step="method.train_step(state, frozen, batch, kind) jitted with the state donated (no trainer guard)",
        timing=f"{args.warmup} warm-up calls, then up to {args.steps} timed calls each on a fresh copy of the same "
               "state with jax.block_until_ready (median); pipelined = the same number of chained calls, one sync",
        flops="compiled.cost_analysis()['flops'] (flops_per_step_lowered: the pre-optimisation HLO count); a row "
              "with has_loop counts its loop body once (an undercount)",
        compile_workers=args.compile_workers,
        compile_note="programs compiled concurrently in threads; on a GPU their autotuning runs at the same time "
                     "(--compile-workers 1 rules out any interference, at the cost of wall time)",
        rows=[])
    try:
      step_rows = run_steps(args, result, args.out)
    except Exception:  # noqa: BLE001 - as above
      result["errors"]["steps"] = traceback.format_exc()
      step_rows = result["steps"].get("rows", [])
    write_json(args.out, result)

  if not args.skip_pipeline:
    # The loader rows are the only part that can shrink: keep the whole run inside --budget-s (7 rows, with
    # start-up and the warm-up pass).
    left = args.budget_s - (time.perf_counter() - t_start)
    if left < 8 * args.pipeline_max_s:
      args.pipeline_max_s = max(1.0, left / 8)
      result["settings"]["pipeline_max_s_shrunk_to"] = args.pipeline_max_s
    print("[3/3] input pipeline ...", flush=True)
    try:
      result["pipeline"] = run_pipeline(args, step_rows)
    except Exception:  # noqa: BLE001 - as above
      result["errors"]["pipeline"] = traceback.format_exc()

  result["total_seconds"] = time.perf_counter() - t_start
  result["environment"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  write_json(args.out, result)
  print_table(result)
  print(f"\nwrote {args.out}")
  shutil.rmtree(log_dir, ignore_errors=True)
  return 1 if result["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
