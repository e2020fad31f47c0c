"""Killed runs lose nothing, signals save a checkpoint, non-finite values never reach a checkpoint, nothing is
unpickled. Training runs go through the real CLI (``python train.py``) on the tiny synthetic task."""

import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, TINY, assert_same_run, final_arrays, run_cli
from tgeo_jax import report

TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Two epochs of 14 steps with a checkpoint every 2 steps: many saves to land a kill in.
FREQUENT = [*TINY, "--config.num_epochs=2", "--config.checkpoint.every_steps=2"]


def kd_args(teacher):
  return ["--config=configs/fashion_mnist.py:kd", *FREQUENT, f"--config.teacher.checkpoint={teacher}"]


def tgeo_args(teacher):
  return ["--config=configs/fashion_mnist.py:tgeo", *FREQUENT, f"--config.teacher.checkpoint={teacher}",
          "--config.tgeo.analysis_examples=0"]


def start(args, log_path):
  log = open(log_path, "a")
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT, text=True)


def listing(ckpt_dir):
  try:
    return set(os.listdir(ckpt_dir))
  except FileNotFoundError:
    return set()


def finished_steps(names):
  return {int(n) for n in names if n.isdigit()}


def wait_and_kill(proc, ckpt_dir, trigger, rng, *, sig=signal.SIGKILL, timeout=120.0):
  """Polls the checkpoint directory and sends ``sig`` at ``trigger``; returns True if the signal was sent.

  ``("save", n)``: when the n-th save of this process has begun (orbax's temporary directory is there): a kill
  inside a checkpoint save. ``("step", n)``: a random 0-0.3 s after the n-th new finished checkpoint of this
  process appeared: a kill anywhere in the loop (a step, an evaluation, the next save).
  """
  kind, n = trigger
  names = listing(ckpt_dir)
  before = finished_steps(names)
  # Saves begun by this process: temporary directories appearing (one left by a killed predecessor is removed
  # when the run starts, and a new save of that step makes it appear again).
  present, saves = {x for x in names if x.endswith(TMP_SUFFIX)}, 0
  deadline = time.time() + timeout
  while proc.poll() is None and time.time() < deadline:
    names = listing(ckpt_dir)
    tmp = {x for x in names if x.endswith(TMP_SUFFIX)}
    saves += len(tmp - present)
    present = tmp
    if (kind == "save" and saves >= n) or (kind == "step" and len(finished_steps(names) - before) >= n):
      if kind == "step":
        time.sleep(rng.uniform(0.0, 0.3))
      if proc.poll() is None:
        proc.send_signal(sig)
        return True
    time.sleep(0.002)
  return False


def run_with_kills(args, workdir, triggers, rng, log_path):
  """Runs ``train.py ARGS`` on ``workdir``, SIGKILLs it at each trigger in turn (restarting the same command each
  time), then lets a last run finish. Returns the number of kills that landed while a save was in progress."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  mid_save = 0
  for trigger in triggers:
    proc = start([*args, f"--workdir={workdir}"], log_path)
    killed = wait_and_kill(proc, ckpt_dir, trigger, rng)
    rc = proc.wait(timeout=120)
    if killed and rc == -signal.SIGKILL:
      # A temporary directory left behind: the process died inside a save (orbax never renamed it).
      mid_save += any(n.endswith(TMP_SUFFIX) for n in listing(ckpt_dir))
    else:
      assert rc == 0, open(log_path).read()  # it finished before the kill: correctness is still checked
  final = run_cli([*args, f"--workdir={workdir}"])
  assert "Traceback" not in final.stderr, final.stderr
  return mid_save


@pytest.fixture(scope="module")
def straight_kd(tiny_teacher, tmp_path_factory):
  """An uninterrupted kd run with the same flags (the reference for the kill and signal tests)."""
  workdir = str(tmp_path_factory.mktemp("straight_kd"))
  run_cli([*kd_args(tiny_teacher), f"--workdir={workdir}"])
  return workdir


def test_sigkill_anywhere_then_resume_is_bit_exact_kd(tiny_teacher, straight_kd, tmp_path):
  rng = random.Random(1234)
  # Two kills inside a save (the 2nd and a later save of that process) and one at a random point of the loop.
  triggers = [("save", rng.randint(1, 3)), ("step", rng.randint(1, 3)), ("save", rng.randint(2, 4))]
  workdir = str(tmp_path / "killed")
  mid_save = run_with_kills(kd_args(tiny_teacher), workdir, triggers, rng, str(tmp_path / "log.txt"))
  assert mid_save >= 1, open(tmp_path / "log.txt").read()  # at least one kill really landed inside a save
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*" + TMP_SUFFIX))  # unfinished saves were cleaned up
  assert_same_run(straight_kd, workdir)


def test_sigkill_then_resume_is_bit_exact_tgeo(tiny_teacher, tmp_path):
  """TGeo-KD's state adds the fusion net (meta_params) and its optimizer state to the student's."""
  rng = random.Random(5678)
  triggers = [("save", rng.randint(1, 3)), ("step", rng.randint(2, 5))]
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  run_cli([*tgeo_args(tiny_teacher), f"--workdir={straight}"])
  run_with_kills(tgeo_args(tiny_teacher), killed, triggers, rng, str(tmp_path / "log.txt"))
  keys = final_arrays(killed)[1].keys()
  assert any("meta_params" in k for k in keys) and any("meta_opt_state" in k for k in keys)
  assert any("['opt_state']" in k for k in keys)
  assert_same_run(straight, killed)


def test_sigterm_and_sigint_save_a_checkpoint(tiny_teacher, straight_kd, tmp_path):
  workdir = str(tmp_path / "signalled")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  args = [*kd_args(tiny_teacher), f"--workdir={workdir}"]
  rng = random.Random(0)
  for sig in (signal.SIGTERM, signal.SIGINT):
    log_path = str(tmp_path / f"log_{sig.name}.txt")
    proc = start(args, log_path)
    # After a new checkpoint of this process: the training loop (and its signal handler) is running.
    wait_and_kill(proc, ckpt_dir, ("step", 1), rng, sig=sig)
    rc = proc.wait(timeout=120)
    out = open(log_path).read()
    assert "Traceback" not in out, out
    if rc == 0:  # finished before the signal arrived
      break
    assert rc == 128 + sig, out
    match = re.search(rf"Received signal {int(sig)}: saved a checkpoint at step (\d+); run the same command", out)
    assert match, out
    assert max(finished_steps(listing(ckpt_dir))) == int(match.group(1))
  run_cli(args)
  assert_same_run(straight_kd, workdir)


def test_two_processes_on_one_workdir_one_is_refused(tiny_teacher, straight_kd, tmp_path):
  workdir = str(tmp_path / "shared")
  args = [*kd_args(tiny_teacher), f"--workdir={workdir}"]
  procs = [start(args, str(tmp_path / f"log{i}.txt")) for i in range(2)]
  codes = [p.wait(timeout=300) for p in procs]
  logs = [open(tmp_path / f"log{i}.txt").read() for i in range(2)]
  assert sorted(codes) == [0, 2], logs
  refused = logs[codes.index(2)]
  errors = [line for line in refused.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in refused, refused
  survivor = procs[codes.index(0)].pid
  assert re.search(rf"error: workdir: .* is in use by pid {survivor} on host ", errors[0]), errors[0]
  assert_same_run(straight_kd, workdir)  # the survivor's run is exactly a solo run
  records = report.evaluation_records(report.read_jsonl(os.path.join(workdir, "metrics.jsonl")))
  assert [r["step"] for r in records] == [14, 28]  # each epoch once


def test_a_signal_while_loading_exits_quietly(tmp_path):
  """SIGINT/SIGTERM before the training loop (imports, config, data, teacher): exit 128 + signal at once, no
  traceback (nothing to save yet)."""
  # Three points of the loading: a tiny run's loop starts ~1.6 s after the process on this machine (with JAX's
  # import at 0.4 s since ml_dtypes 0.7.0 is excluded; 2.0 / 3.5 s, the delays before, landed in the loop or after
  # the run). A slower machine reaches the loop later: each point is still before it or in it.
  for sig, delay in ((signal.SIGINT, 0.5), (signal.SIGTERM, 1.0), (signal.SIGINT, 1.5)):
    log_path = str(tmp_path / f"log_{int(sig)}_{delay}.txt")
    proc = start(["--config=configs/fashion_mnist.py:ce", *FREQUENT, f"--workdir={tmp_path / 'run'}"], log_path)
    time.sleep(delay)
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    out = open(log_path).read()
    assert "Traceback" not in out and "Exception" not in out, out
    assert rc in (0, 128 + sig), (rc, out)
    if delay == 0.5:  # half a second in, the run is still loading: the signal must have stopped it
      assert rc == 128 + sig and not finished_steps(listing(os.path.join(tmp_path, "run", "checkpoints"))), out


def test_after_the_run_train_py_ignores_signals(tmp_path, monkeypatch):
  """Once ``cli.main`` has returned (here: a refused run), ``train.py`` ignores SIGINT/SIGTERM. The interpreter's
  teardown resets Python-level handlers to the default action (it leaves SIG_IGN), so a signal landing there killed
  the finished process (exit -2 after its summary: the test above, once its third signal came that late)."""
  import runpy
  saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # train.py installs its own
  monkeypatch.setattr(sys, "argv", ["train.py", "--config=configs/fashion_mnist.py:ce", f"--workdir={tmp_path}",
                                    "extra"])
  try:
    with pytest.raises(SystemExit) as stopped:
      runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    after = {sig: signal.getsignal(sig) for sig in saved}
  finally:
    for sig, handler in saved.items():
      signal.signal(sig, handler)
  assert stopped.value.code == 2
  assert after == {signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN}


def test_the_demo_command_handles_signals_like_train_py(tmp_path):
  """``python -m tgeo_jax.demo`` (``make demo``): a signal while it loads exits 128 + signal with nothing on
  stderr; after its runs have returned (here the teacher's run, refused) SIGINT/SIGTERM are ignored, so a signal
  in the interpreter's teardown cannot kill the finished command (tgeo_jax.signals.finish, as in train.py)."""
  demo = [sys.executable, "-m", "tgeo_jax.demo", f"--workdir={tmp_path / 'demo'}"]
  proc = subprocess.Popen(demo, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(0.5)  # loading: absl, the configs, JAX, the teacher's data
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert (proc.returncode, err) == (130, ""), (proc.returncode, out, err)
  assert not os.path.exists(tmp_path / "demo" / "teacher" / "checkpoints"), out

  (tmp_path / "refused").mkdir()
  (tmp_path / "refused" / "teacher").write_text("")  # a file where the teacher's workdir goes: refused at once
  probe = ("import runpy, signal, sys\n"
           f"sys.argv = ['demo', '--workdir={tmp_path / 'refused'}']\n"
           "try:\n"
           "  runpy.run_module('tgeo_jax.demo', run_name='__main__', alter_sys=True)\n"
           "except SystemExit as stop:\n"
           "  print('exit', stop.code, signal.getsignal(signal.SIGINT) is signal.SIG_IGN,\n"
           "        signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)\n")
  done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done
  assert done.stderr == f"error: workdir: '{tmp_path / 'refused' / 'teacher'}' is a file, expected a directory\n"
  assert done.stdout.splitlines() == [f"== teacher ({tmp_path / 'refused' / 'teacher'})", "exit 2 True True"]


def all_checkpoint_arrays(workdir):
  """Every array of every checkpoint step on disk."""
  import orbax.checkpoint as ocp
  import jax
  out = {}
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(ckpt_dir, item_names=("state", "meta")) as mgr:
    to_host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for step in mgr.all_steps():
      state = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(fallback_sharding=to_host)))["state"]
      for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        out[(step, jax.tree_util.keystr(path))] = np.asarray(leaf)
  return out


# lr 1e10 without clipping: finite for a couple of steps, then NaN/Inf (a checkpoint exists before it).
DIVERGING = ["--config=configs/fashion_mnist.py:ce", *FREQUENT, "--config.optimizer.learning_rate=1e10",
             "--config.optimizer.clip_norm=0"]


def test_nonfinite_stops_naming_the_step_and_never_checkpoints_it(tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_cli([*DIVERGING, f"--workdir={workdir}"], check=False)
  assert proc.returncode == 1, (proc.stdout, proc.stderr)
  assert "Traceback" not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, proc.stderr
  match = re.fullmatch(r"error: step (\d+): the (training \w+ is (nan|inf|-inf)|\w+ state has NaN/Inf entries); "
                       r"stopped at step (\d+) before saving it, .*nonfinite='skip'.*", lines[0])
  assert match, lines[0]
  first_bad, stopped = int(match.group(1)), int(match.group(4))
  assert first_bad <= stopped
  arrays = all_checkpoint_arrays(workdir)
  assert all(step < first_bad for step, _ in arrays)  # nothing at or after the first bad step was saved
  for key, value in arrays.items():
    if value.dtype.kind == "f":
      assert np.all(np.isfinite(value)), key


def test_nonfinite_skip_mode_finishes_and_counts(tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_cli([*DIVERGING, f"--workdir={workdir}", "--config.nonfinite=skip"])
  assert "non-finite step(s) skipped so far (first: step" in proc.stdout, proc.stdout
  summary = report.read_json(os.path.join(workdir, "summary.json"))
  assert summary["finished"] and summary["num_steps"] == 28 and 0 < summary["skipped_steps"] <= 28
  records = report.evaluation_records(report.read_jsonl(os.path.join(workdir, "metrics.jsonl")))
  assert [r["skipped_steps"] for r in records][-1] == summary["skipped_steps"]
  arrays = all_checkpoint_arrays(workdir)
  assert arrays
  for key, value in arrays.items():
    if value.dtype.kind == "f":
      assert np.all(np.isfinite(value)), key
  meta = json.load(open(os.path.join(workdir, "checkpoints", "28", "meta", "metadata")))
  assert meta["skipped_steps"] == summary["skipped_steps"]


# ------------------------------------------------------------------------------------------- nothing unsafe

UNSAFE = [
    (r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b", "a pickle-family import"),
    (r"\b(c?pickle|dill|cloudpickle|shelve|marshal)\.(load|loads|Unpickler)\b", "unpickling"),
    (r"allow_pickle\s*=\s*True", "np.load(allow_pickle=True)"),
    # torch.load unpickles unless weights_only=True (then only tensors and plain containers are accepted).
    (r"\btorch\.load\s*\((?![^)]*weights_only\s*=\s*True)", "torch.load without weights_only=True"),
    (r"\bread_pickle\s*\(", "pandas.read_pickle"),
    (r"\bjoblib\.load\s*\(", "joblib.load"),
]


def unsafe_loads(text):
  return [(what, line.strip()) for line in text.splitlines() for pattern, what in UNSAFE if re.search(pattern, line)]


def test_no_pickle_anywhere():
  assert unsafe_loads("import pickle\nx = np.load(f, allow_pickle=True)\nstate = torch.load(p)\n")  # the check bites
  assert len(unsafe_loads("a = torch.load(p, weights_only=False)\nb = torch.load(p, weights_only=True)\n")) == 1
  assert not unsafe_loads('"""nothing is unpickled"""\nx = np.load(f)\n')
  sources = glob.glob(os.path.join(ROOT, "tgeo_jax", "**", "*.py"), recursive=True)
  sources += [os.path.join(ROOT, "train.py")] + glob.glob(os.path.join(ROOT, "configs", "*.py"))
  assert len(sources) > 10
  found = {os.path.relpath(path, ROOT): unsafe_loads(open(path).read()) for path in sources}
  # The one exception: CIFAR-100's python archive is a pickle, read by tgeo_jax/prepare.py's restricted unpickler,
  # whose find_class admits numpy's array reconstruction only (a pickle asking for anything else is refused:
  # tests/test_prepare.py runs one that would call os.system). Nothing else may import pickle.
  assert [w for w, _ in found.pop(os.path.join("tgeo_jax", "prepare.py"))] == ["a pickle-family import", "unpickling"]
  from tgeo_jax import prepare
  assert prepare._CifarUnpickler.find_class is not __import__("pickle").Unpickler.find_class
  assert not {k: v for k, v in found.items() if v}
  # Checkpoints are read only through orbax (tensorstore arrays + JSON).
  checkpoint_source = open(os.path.join(ROOT, "tgeo_jax", "checkpoint.py")).read()
  assert "import orbax.checkpoint as ocp" in checkpoint_source and "np.load" not in checkpoint_source


@pytest.fixture
def tiny_disk(tmp_path):
  """A 3 MiB tmpfs (a real full disk for a real process); skipped where mounting is not permitted."""
  mount = tmp_path / "disk"
  mount.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()[:80]})")
  try:
    yield mount
  finally:
    subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_during_a_save_is_one_line_in_a_real_process(tiny_disk, async_save):
  """orbax, tensorstore and asyncio report a failed write from their own threads (108-124 lines of tracebacks
  before); the whole stderr of the real train.py process is now the trainer's one line."""
  stat = os.statvfs(tiny_disk)
  with open(tiny_disk / "filler", "wb") as f:  # leave ~60 kB: the run files fit, the first checkpoint does not
    f.write(b"\0" * (stat.f_bavail * stat.f_frsize - 60_000))
  workdir = tiny_disk / "run"
  proc = run_cli(["--config=configs/fashion_mnist.py:teacher", f"--workdir={workdir}", *TINY,
                  "--config.model.name=cnn_tiny", f"--config.checkpoint.async_save={async_save}"], process=True,
                 check=False)
  assert proc.returncode == 1, proc.stderr
  assert re.fullmatch(rf"error: checkpoint: saving step \d+ in {re.escape(str(workdir / 'checkpoints'))} failed \(no "
                      r"space left on device\); the previous checkpoints are intact: free space and run the same "
                      r"command to resume\n", proc.stderr), proc.stderr


def test_a_read_only_checkpoint_directory_is_one_line_and_keeps_the_newest_checkpoint(tmp_path):
  """The checkpoints directory turns read-only mid-run (a read-only bind mount over it, as after an ext4 journal
  abort): the next save fails with one line that says read-only (not "free space"), exit 1; made writable again,
  the same command resumes from the newest checkpoint written before (it was fsynced and is intact)."""
  workdir = tmp_path / "run"
  args = ["--config=configs/fashion_mnist.py:ce", f"--workdir={workdir}", *TINY, "--config.num_epochs=6",
          "--config.checkpoint.every_steps=4", "--config.log.progress=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  ckpt = workdir / "checkpoints"
  mounted = False
  try:
    deadline = time.monotonic() + 120
    while not (ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())):
      assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "no save"
      time.sleep(0.05)
    bind = subprocess.run(["mount", "--bind", str(ckpt), str(ckpt)], capture_output=True, text=True)
    if bind.returncode != 0:
      proc.kill()
      pytest.skip(f"cannot bind-mount here ({bind.stderr.strip()[:80]})")
    mounted = True
    for _ in range(100):  # "busy" while a save has a file open for writing: retry until between two saves
      remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(ckpt)], capture_output=True, text=True)
      if remount.returncode == 0:
        break
      time.sleep(0.02)
    assert remount.returncode == 0, remount.stderr
    newest = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    stderr = proc.communicate(timeout=120)[1]
  finally:
    if proc.poll() is None:
      proc.kill()
    if mounted:
      subprocess.run(["umount", str(ckpt)], capture_output=True)
  assert proc.returncode == 1, stderr
  assert re.fullmatch(rf"error: checkpoint: saving step \d+ in {re.escape(str(ckpt))} failed \(read-only file "
                      r"system\); the previous checkpoints are intact: make the file system writable again \(it is "
                      r"read-only\) and run the same command to resume\n", stderr), stderr
  assert max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) >= newest
  done = run_cli(args)
  assert re.search(rf"^Resuming ce in .* from step {newest} of 84 ", done.stdout, re.M), done.stdout
