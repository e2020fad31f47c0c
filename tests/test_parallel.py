"""Multi-host data parallelism (tgeo_jax/parallel.py + the per-process slicing of tgeo_jax/data): two real JAX
processes on localhost, CPU devices, gloo collectives (jax 0.10's CPU default), against one process.

Each process runs ``compute()`` below after ``jax.distributed.initialize``: it reads only its own slice of every
global batch (``data.train_batches / validation_batches / eval_batches`` with its process index), builds the
global arrays with ``parallel.shard_batch`` (``jax.make_array_from_process_local_data``) and takes one jitted KD
step with a BatchNorm student. The pytest process runs the same ``compute()`` as a single process: the gathered
global batches must be identical and the step's loss and new parameters equal up to float32 reduction order.

Run as a script (``python tests/test_parallel.py PORT PROCESS_ID NUM_PROCESSES``) it is one such process.

``test_train_py_in_two_processes_equals_one_process`` runs the real CLI, ``train.py --config.distributed=True``,
in two processes and compares its final checkpoint with a one-process run's.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, TINY, device_flags, run_cli

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2  # 4 global devices: the batch axis is split inside and across processes
GLOBAL_BATCH = 16
NUM_EXAMPLES = 72  # eval: 4 full batches of 16 and a last one with 8 real examples, padded and masked
TIMEOUT_S = 150  # for the whole multi-process run; it takes ~10 s on an idle 2-core machine


def compute() -> dict:
  """The global batches this process helped build (gathered to every process) and one KD step's results."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils

  from configs import fashion_mnist
  from tgeo_jax import data, methods, models, optim, parallel
  from tgeo_jax.data import sources
  from tgeo_jax.methods.base import Teacher

  index, count = jax.process_index(), jax.process_count()
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  # Example i's first pixel is i, so a gathered batch shows which examples it holds and in which order.
  images = rng.normal(size=(NUM_EXAMPLES, 8, 8, 1)).astype(np.float32)
  images[:, 0, 0, 0] = np.arange(NUM_EXAMPLES)
  source = sources.ArraySource(images, rng.integers(0, 3, NUM_EXAMPLES))

  def global_batch(local):
    """This process's slice -> the global array -> its full value on every process (numpy)."""
    assert len(jax.tree.leaves(local)[0]) == GLOBAL_BATCH // count
    sharded = parallel.shard_batch(local, mesh)
    assert all(x.shape[0] == GLOBAL_BATCH for x in jax.tree.leaves(sharded))
    return sharded, jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), sharded)

  out = {"process_count": count, "device_count": jax.device_count()}
  train_local = data.train_batches(source, batch_size=GLOBAL_BATCH, seed=0, epoch=1, process_index=index,
                                   process_count=count)[2]
  train, train_full = global_batch(train_local)
  out["train_index"] = train_full["index"].tolist()
  out["train_first_pixel"] = train_full["inputs"][:, 0, 0, 0].tolist()
  out["train_labels"] = train_full["labels"].tolist()
  val_local = data.validation_batches(source, batch_size=GLOBAL_BATCH, seed=0, process_index=index,
                                      process_count=count)[5]
  _, val_full = global_batch(val_local)
  out["val_first_pixel"] = val_full["inputs"][:, 0, 0, 0].tolist()
  out["eval_first_pixel"], out["eval_mask"] = [], []
  for local in data.eval_batches(source, batch_size=GLOBAL_BATCH, process_index=index, process_count=count):
    _, full = global_batch(local)
    out["eval_first_pixel"].append(full["inputs"][:, 0, 0, 0].tolist())
    out["eval_mask"].append(full["mask"].tolist())

  # A jitted reduction whose every term depends on the row's position in the global batch.
  weighted = jax.jit(lambda x: jnp.sum(x[:, 0, 0, 0] * jnp.arange(1.0, GLOBAL_BATCH + 1)))(train["inputs"])
  out["weighted_sum"] = float(weighted.addressable_data(0))

  # One KD step (SGD-momentum, clipping): cnn_tiny student and teacher, train-mode BatchNorm over the global batch.
  config = fashion_mnist.get_config("kd")
  spec = data.TaskSpec(name="parallel_test", num_classes=3, input_shape=(8, 8, 1), train_size=NUM_EXAMPLES)
  student = models.split(models.create("cnn_tiny", num_classes=3, input_shape=(8, 8, 1), seed=0))
  teacher = models.split(models.create("cnn_tiny", num_classes=3, input_shape=(8, 8, 1), seed=7))
  # Committed to a local device, as a teacher restored from its checkpoint is: parallel.replicate must not try a
  # cross-host device transfer with it (JAX's CPU and GPU backends have none).
  teacher = jax.device_put(teacher, jax.local_devices()[0])
  tx = optim.make_optimizer(config.optimizer, steps_per_epoch=4, num_epochs=1)
  method = methods.get_class("kd")(config, spec, student=student, tx=tx, task=None,
                                   teacher=Teacher("cnn_tiny", teacher.graphdef,
                                                   {"params": teacher.params, "rest": teacher.rest}))
  state, frozen = parallel.replicate(method.init(jax.random.PRNGKey(0)), mesh)
  new_state, metrics = jax.jit(method.train_step)(state, frozen,
                                                  {"inputs": train["inputs"], "labels": train["labels"]})
  local_value = lambda x: np.asarray(x.addressable_data(0)).ravel().tolist()  # noqa: E731 (replicated)
  out["loss"] = local_value(metrics["loss"])[0]
  out["params"] = [local_value(x) for x in jax.tree.leaves(new_state["params"])]
  out["batch_stats"] = [local_value(x) for x in jax.tree.leaves(new_state["rest"])]
  return out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_processes(tmp_path, command) -> list[str]:
  """Starts ``NUM_PROCESSES`` processes, ``command(i) -> (argv, extra environment)``, and waits for all of them,
  killing every one if any fails or the time runs out. Returns their stdouts."""
  procs, logs = [], []
  for i in range(NUM_PROCESSES):
    argv, extra_env = command(i)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra_env)
    out, err = open(tmp_path / f"out{i}.txt", "w+"), open(tmp_path / f"err{i}.txt", "w+")
    logs.append((out, err))
    procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err))
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs):
      # A process that failed leaves the others waiting for it at the next collective: stop them all.
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  stdouts = []
  for i, (p, (out, err)) in enumerate(zip(procs, logs)):
    out.seek(0), err.seek(0)
    stdout, stderr = out.read(), err.read()
    out.close(), err.close()
    assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{stdout}\n{stderr[-4000:]}"
    stdouts.append(stdout)
  return stdouts


def test_two_processes_build_the_global_batches_and_step_like_one(tmp_path):
  port = _free_port()
  stdouts = _run_processes(tmp_path, lambda i: (
      [sys.executable, os.path.abspath(__file__), str(port), str(i), str(NUM_PROCESSES)],
      {"XLA_FLAGS": device_flags(DEVICES_PER_PROCESS)}))
  results = [json.loads(out.strip().splitlines()[-1]) for out in stdouts]
  reference = compute()  # this pytest process alone: every slice is the whole batch
  assert reference["process_count"] == 1
  for i, result in enumerate(results):
    assert result["process_count"] == NUM_PROCESSES
    assert result["device_count"] == NUM_PROCESSES * DEVICES_PER_PROCESS
    # The global arrays hold exactly the single-process batches, in order (bit-identical).
    for key in ("train_index", "train_first_pixel", "train_labels", "val_first_pixel", "eval_first_pixel",
                "eval_mask"):
      assert result[key] == reference[key], (i, key)
    assert result["eval_mask"][-1] == [1.0] * 8 + [0.0] * 8  # the padded last batch spans both processes
    np.testing.assert_array_equal(result["train_first_pixel"], result["train_index"])
    # Computations over the global arrays: equal up to the order of float32 reductions.
    np.testing.assert_allclose(result["weighted_sum"], reference["weighted_sum"], rtol=1e-6)
    np.testing.assert_allclose(result["loss"], reference["loss"], rtol=1e-5)
    for a, b in zip(result["params"] + result["batch_stats"], reference["params"] + reference["batch_stats"]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The step moved the parameters (a comparison of untouched parameters would prove nothing).
  init = _initial_student_params()
  assert max(float(np.max(np.abs(np.subtract(a, b)))) for a, b in zip(reference["params"], init)) > 1e-4


def test_train_py_in_two_processes_equals_one_process(tiny_teacher, tmp_path):
  """``train.py --config.distributed=True`` (the coordinator, process count and index from the environment) in
  two processes of one CPU device each: a KD run (teacher restored from its checkpoint, evaluation, checkpoint
  saves) ends with the parameters, BatchNorm statistics and optimizer state of the same run in one process, up to
  float32 reduction order, and process 0 alone writes metrics.jsonl / summary.json."""
  from conftest import final_arrays
  common = ["--config=configs/fashion_mnist.py:kd", *TINY, f"--config.teacher.checkpoint={tiny_teacher}"]
  one, two = tmp_path / "one", tmp_path / "two"
  port = _free_port()
  stdouts = _run_processes(tmp_path, lambda i: (
      [sys.executable, os.path.join(ROOT, "train.py"), *common, f"--workdir={two}", "--config.distributed=True"],
      {"XLA_FLAGS": device_flags(1), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
       "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(NUM_PROCESSES),
       "JAX_PROCESS_ID": str(i)}))
  assert all("done: kd test accuracy" in out for out in stdouts)
  assert "2 device(s)" in stdouts[0] and "Training kd" not in stdouts[1]  # process 0 logs
  run_cli([*common, f"--workdir={one}"])  # this process: one CPU device, the suite's XLA flags

  step_one, arrays_one = final_arrays(str(one))
  step_two, arrays_two = final_arrays(str(two))
  assert step_one == step_two and sorted(arrays_one) == sorted(arrays_two)
  for key, value in arrays_one.items():
    if value.dtype.kind == "f":
      np.testing.assert_allclose(arrays_two[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    else:
      np.testing.assert_array_equal(arrays_two[key], value, err_msg=key)
  summary_one, summary_two = (json.load(open(d / "summary.json")) for d in (one, two))
  assert summary_two["num_devices"] == 2 and summary_one["num_devices"] == 1
  assert summary_two["accuracy"] == summary_one["accuracy"]
  assert len(open(two / "metrics.jsonl").read().splitlines()) == len(open(one / "metrics.jsonl").read().splitlines())


def test_distributed_without_a_cluster_is_one_line(tmp_path):
  """``distributed=True`` with nothing to say how many processes there are: a one-line error, exit status 2."""
  assert "JAX_NUM_PROCESSES" not in os.environ and "JAX_PROCESS_ID" not in os.environ
  proc = run_cli(["--config=configs/fashion_mnist.py:ce", *TINY, f"--workdir={tmp_path}",
                  "--config.distributed=True"], env={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, check=False,
                 timeout=120)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: distributed: jax.distributed.initialize() failed")
  assert "JAX_NUM_PROCESSES" in lines[0]


def _initial_student_params() -> list[list[float]]:
  import jax
  from tgeo_jax import models
  params = models.split(models.create("cnn_tiny", num_classes=3, input_shape=(8, 8, 1), seed=0)).params
  return [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(params)]


if __name__ == "__main__":
  port_arg, process_id, num_processes = (int(a) for a in sys.argv[1:4])
  import jax
  # Before any other JAX call. Binding the coordinator to 127.0.0.1 (JAX's default is [::]) keeps it off the
  # network and works where IPv6 is disabled.
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port_arg}", num_processes=num_processes,
                             process_id=process_id, coordinator_bind_address=f"127.0.0.1:{port_arg}",
                             initialization_timeout=60)
  print(json.dumps(compute()), flush=True)
  jax.distributed.shutdown()


def test_when_a_process_dies_the_other_stops_with_one_line(tmp_path):
  """Two real train.py processes; process 1 is killed mid-training. Process 0 meets the lost connection at its next
  collective (a step, a transfer or a checkpoint's gather) and exits 1 at once with one line -- no traceback, no
  wait at the shutdown barrier for the heartbeat timeout and JAX's C++ abort after it."""
  port = _free_port()
  procs, errs = [], []
  for i in range(NUM_PROCESSES):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=device_flags(1),
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(NUM_PROCESSES), JAX_PROCESS_ID=str(i))
    errs.append(open(tmp_path / f"err{i}.txt", "w+"))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/fashion_mnist.py:ce", *TINY,
         "--config.num_epochs=50", f"--workdir={tmp_path / 'run'}", "--config.distributed=True",
         "--config.distributed_heartbeat_timeout=20"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=errs[i]))
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not (tmp_path / "run" / "metrics.jsonl").exists():  # training has started on both
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not start"
      time.sleep(0.1)
    time.sleep(1.0)
    procs[1].kill()
    start = time.monotonic()
    rc = procs[0].wait(timeout=60)
    seconds = time.monotonic() - start
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  errs[0].seek(0)
  stderr = errs[0].read()
  assert rc == 1 and seconds < 30, (rc, seconds, stderr)
  assert re.fullmatch(r"error: distributed: (another process|process 1) of 2 stopped or lost contact \(.+\); process "
                      r"0 stops too, nothing was lost: run the same command on every process to resume\n", stderr), stderr


def test_the_peer_failure_line_leaves_in_one_write(monkeypatch):
  """``stop_after_peer_failure``'s line is one ``write(2)`` (atomic on a pipe), so a line JAX's C++ runtime logs at the
  same moment cannot land inside it. ``print`` writes a text and its newline separately when PYTHONUNBUFFERED=1
  (pytest-xdist sets it, as do many containers): the coordinator test below once got "...to resumeE1207 ..."."""
  from tgeo_jax import parallel
  real_write, writes = os.write, []

  def write(fd, data):
    if fd != 2:
      return real_write(fd, data)
    writes.append(bytes(data))
    return len(data)

  class Exited(Exception):
    pass

  def exit_(status):
    raise Exited(status)

  monkeypatch.setattr(os, "write", write)
  monkeypatch.setattr(os, "_exit", exit_)
  with pytest.raises(Exited, match="1"):
    parallel.stop_after_peer_failure("Gloo all-reduce failed: [pair.cc:538] Read error: Connection reset by peer")
  assert len(writes) == 1, writes
  assert re.fullmatch(r"error: distributed: another process of 1 stopped or lost contact \(Gloo all-reduce failed: "
                      r"\[pair.cc:538\] Read error: Connection reset by peer\); process 0 stops too, nothing was "
                      r"lost: run the same command on every process to resume\n", writes[0].decode()), writes


def _start_train_py(tmp_path, i, port, *extra):
  """Process ``i`` of a two-process ``train.py`` CE run on the synthetic task (stderr to ``tmp_path/err<i>.txt``)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=device_flags(1),
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES=str(NUM_PROCESSES), JAX_PROCESS_ID=str(i))
  err = open(tmp_path / f"err{i}.txt", "w+")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/fashion_mnist.py:ce", *TINY,
       "--config.num_epochs=50", f"--workdir={tmp_path / 'run'}", "--config.distributed=True", *extra],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
  return proc, err


def test_when_the_coordinator_dies_the_other_stops_with_one_line(tmp_path):
  """Process 0 (the coordinator) is killed mid-training. JAX's C++ client in process 1 aborts the training process
  itself (SIGABRT, a C++ stack); train.py's supervising parent turns that into one line naming the coordinator, exit
  1, and keeps JAX's report in the work directory."""
  port = _free_port()
  procs = [_start_train_py(tmp_path, i, port) for i in range(NUM_PROCESSES)]
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not (tmp_path / "run" / "metrics.jsonl").exists():
      assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), "the run did not start"
      time.sleep(0.1)
    time.sleep(1.0)
    procs[0][0].kill()
    start = time.monotonic()
    rc = procs[1][0].wait(timeout=60)
    seconds = time.monotonic() - start
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
  procs[1][1].seek(0)
  stderr = procs[1][1].read()
  assert rc == 1 and seconds < 30, (rc, seconds, stderr)
  # Whichever sees it first: JAX's coordination client aborting the process (the supervisor's line names the
  # coordinator) or the next collective failing in Python (the trainer's line); one line either way.
  assert re.fullmatch(r"error: distributed: (process 0 \(the coordinator\) of 2 stopped or lost contact \(UNAVAILABLE: "
                      r"Failed to send RPC to coordination service\)|another process of 2 stopped or lost contact "
                      r"\((Gloo|Connection)[^\n]+\)); process 1 stops too, nothing was lost: run the same command on "
                      r"every process to resume\n", stderr), stderr
  report = tmp_path / "run" / "distributed_abort.1.log"
  if "the coordinator" in stderr:  # the supervisor's line: JAX's own report is kept whole
    assert "coordination" in report.read_text()
  elif report.exists():  # the trainer's line came first; JAX's lines about the same event, if any, went there
    assert report.read_text().strip()


def test_a_peer_that_never_starts_is_one_line(tmp_path):
  """Only process 0 of 2 starts: after ``distributed_init_timeout`` JAX aborts it (SIGABRT); one line, exit 1."""
  proc, err = _start_train_py(tmp_path, 0, _free_port(), "--config.distributed_init_timeout=1")
  start = time.monotonic()
  try:
    rc = proc.wait(timeout=90)
  finally:
    if proc.poll() is None:
      proc.kill()
  seconds = time.monotonic() - start
  err.seek(0)
  stderr = err.read()
  assert rc == 1 and seconds < 60, (rc, seconds, stderr)
  assert stderr == ("error: distributed: process 0 of 2: not every process joined the run within "
                    "distributed_init_timeout=1 s (DEADLINE_EXCEEDED: Deadline Exceeded); start the same command on "
                    "each of the 2 processes\n"), stderr


_FAKE_NATIVE = "W1207 08:47:52.624149   13914 preemption_sync_manager.cc:147] Failed to retrieve preemption notice"


@pytest.mark.parametrize("script, rc, stderr", [
    # Not an abort: every line reaches stderr unchanged (native ones held, then written), the exit status kept.
    (f"import sys; print('warning: a', file=sys.stderr); print({_FAKE_NATIVE!r}, file=sys.stderr); "
     "print('more', file=sys.stderr); sys.exit(3)", 3, f"warning: a\n{_FAKE_NATIVE}\nmore\n"),
    # JAX's coordination client aborting the process: one line, exit 1.
    (f"import os, sys; print({_FAKE_NATIVE!r}, file=sys.stderr); print('F1207 08:47:52.624272   13914 client.h:80] "
     "Terminating process because the JAX distributed service detected fatal errors. absl::Status: UNAVAILABLE: "
     "Failed to send RPC to coordination service. Either the leader task was preempted/died', file=sys.stderr); "
     "sys.stderr.flush(); os.abort()", 1,
     "error: distributed: process 0 (the coordinator) of 2 stopped or lost contact (UNAVAILABLE: Failed to send RPC "
     "to coordination service); process 1 stops too, nothing was lost: run the same command on every process to "
     "resume\n"),
    # The child met the lost peer in Python first (its one line, exit 1): JAX's lines about it go to the report.
    (f"import sys; print({_FAKE_NATIVE!r}, file=sys.stderr); print('error: distributed: another process of 2 "
     "stopped or lost contact (Gloo); process 1 stops too', file=sys.stderr); sys.exit(1)", 1,
     "error: distributed: another process of 2 stopped or lost contact (Gloo); process 1 stops too\n"),
    # Any other abort is left as it is: its lines, 128 + SIGABRT.
    (f"import os, sys; print({_FAKE_NATIVE!r}, file=sys.stderr); sys.stderr.flush(); os.abort()", 134,
     f"{_FAKE_NATIVE}\n"),
])
def test_the_supervisor_rewrites_only_jax_aborts(tmp_path, monkeypatch, capfd, script, rc, stderr):
  from tgeo_jax import supervise
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  assert supervise.supervise([sys.executable, "-c", script], str(tmp_path)) == rc
  assert capfd.readouterr().err == stderr
  assert os.path.exists(tmp_path / "distributed_abort.1.log") == (rc == 1)


def test_sigterm_reaches_the_supervised_child(tmp_path):
  """The parent forwards SIGTERM; the child's own handler decides the exit (here 143 after a last line)."""
  import signal
  child = ("import signal, sys, time\n"
           "def stop(*_):\n  print('child stopping', file=sys.stderr); sys.exit(143)\n"
           "signal.signal(signal.SIGTERM, stop)\nprint('ready', file=sys.stderr, flush=True)\ntime.sleep(60)\n")
  parent = (f"import sys; sys.path.insert(0, {ROOT!r}); from tgeo_jax import supervise; "
            f"sys.exit(supervise.supervise([sys.executable, '-c', {child!r}], {str(tmp_path)!r}))")
  proc = subprocess.Popen([sys.executable, "-c", parent], stderr=subprocess.PIPE, text=True)
  assert proc.stderr.readline() == "ready\n"
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == 143
  assert proc.stderr.read() == "child stopping\n"
