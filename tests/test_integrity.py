"""Nothing a fault or a bad input does loses, mixes or misreports a run: the teacher-logit cache is verified, an
epoch is saved before it is evaluated, torn records and full disks are survivable, and bad inputs are one line.
Runs go through ``tgeo_jax.cli.run`` in this process on the tiny synthetic task."""

import errno
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import attack_config, comparable_records, error_lines, fake_fashion_mnist_gz, final_arrays, run_inprocess, tiny_config
from tgeo_jax import data, report, teacher, trainer
from tgeo_jax.errors import UserError


def assert_same_records(a_dir, b_dir):
  """Bit-identical final checkpoints and the same evaluation records, training metrics included."""
  step_a, a = final_arrays(a_dir)
  step_b, b = final_arrays(b_dir)
  assert step_a == step_b and a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert comparable_records(a_dir) == comparable_records(b_dir)


@pytest.fixture(scope="module")
def straight_ce(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight_ce"))
  trainer.train_and_evaluate(tiny_config("ce", num_epochs=2), workdir)
  return workdir


# ------------------------------------------------------------------------------------------ teacher-logit cache


def test_logit_cache_detects_garbled_and_truncated_tables(tmp_path, capsys):
  table = np.arange(12, dtype=np.float32).reshape(4, 3)
  calls = []

  def compute():
    calls.append(1)
    return table

  cache = teacher.LogitCache(str(tmp_path), key=[np.ones(3)])
  np.testing.assert_array_equal(cache.get_or_compute(compute, shape=(4, 3)), table)
  np.testing.assert_array_equal(cache.get_or_compute(compute, shape=(4, 3)), table)
  assert len(calls) == 1  # the second read came from disk
  with np.load(cache.path) as f:  # garble one value, keep the file readable: only the checksum can tell
    garbled = {"logits": f["logits"].copy(), "sha256": f["sha256"]}
  garbled["logits"][2, 1] += 1.0
  np.savez(cache.path, **garbled)
  capsys.readouterr()
  np.testing.assert_array_equal(cache.get_or_compute(compute, shape=(4, 3)), table)
  err = capsys.readouterr().err
  assert len(calls) == 2 and "its checksum does not match" in err and "recomputing" in err
  assert os.path.exists(cache.path + ".corrupt") and len(err.strip().splitlines()) == 1
  raw = open(cache.path, "rb").read()
  open(cache.path, "wb").write(raw[: len(raw) // 2])  # truncated by a crash of a foreign writer
  np.testing.assert_array_equal(cache.get_or_compute(compute, shape=(4, 3)), table)
  assert len(calls) == 3 and "unreadable" in capsys.readouterr().err
  np.testing.assert_array_equal(cache.get_or_compute(compute, shape=(4, 3)), table)  # rewritten whole
  assert len(calls) == 3
  # Another shape (e.g. another class count under a colliding key) is bad too.
  assert cache.get_or_compute(lambda: np.zeros((4, 5), np.float32), shape=(4, 5)).shape == (4, 5)


def test_logit_cache_write_failure_warns_and_stale_temporaries_go(tmp_path, capsys, monkeypatch):
  cache = teacher.LogitCache(str(tmp_path), key=[np.zeros(2)])
  import socket
  dead = subprocess.Popen(["true"])
  dead.wait()
  stale = f"{cache.path}.{socket.gethostname()}.{dead.pid}.tmp.npz"
  live = f"{cache.path}.{socket.gethostname()}.{os.getpid()}.tmp.npz"
  open(stale, "wb").write(b"partial")
  open(live, "wb").write(b"in progress")

  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(np, "savez", no_space)
  capsys.readouterr()
  table = cache.get_or_compute(lambda: np.ones((2, 2), np.float32), shape=(2, 2))
  np.testing.assert_array_equal(table, np.ones((2, 2)))
  err = capsys.readouterr().err
  assert "could not store the teacher-logit table" in err and "No space left on device" in err
  assert not os.path.exists(stale) and not os.path.exists(cache.path)
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp.npz") and str(os.getpid()) not in n]


def test_a_garbled_shared_table_does_not_reach_a_later_run(tiny_teacher, tmp_path, capsys):
  cache_dir = str(tmp_path / "cache")
  args = {"teacher.checkpoint": tiny_teacher, "teacher.logits_cache_dir": cache_dir}
  rc, _, err = run_inprocess(tiny_config("kd", **args), tmp_path / "first", capsys)
  assert rc == 0, err
  (path,) = [os.path.join(cache_dir, n) for n in os.listdir(cache_dir)]
  with np.load(path) as f:
    garbled = {"logits": f["logits"] * 1.5, "sha256": f["sha256"]}
  np.savez(path, **garbled)
  rc, _, err = run_inprocess(tiny_config("kd", **args), tmp_path / "second", capsys)
  assert rc == 0 and "its checksum does not match" in err, err
  assert_same_records(str(tmp_path / "first"), str(tmp_path / "second"))


# ------------------------------------------------------------------------------------------ evaluation and saves


def test_an_evaluation_failure_never_costs_the_epoch(straight_ce, tmp_path, capsys, monkeypatch):
  workdir = str(tmp_path / "run")

  def failing_evaluate(*args, **kwargs):
    raise MemoryError("evaluation ran out of memory")

  monkeypatch.setattr(trainer, "evaluate", failing_evaluate)
  with pytest.raises(MemoryError):
    trainer.train_and_evaluate(tiny_config("ce", num_epochs=2), workdir)
  monkeypatch.undo()
  assert final_arrays(workdir)[0] == 14  # the epoch's checkpoint was saved before its evaluation
  rc, out, err = run_inprocess(tiny_config("ce", num_epochs=2), workdir, capsys)
  assert rc == 0 and "Resuming ce" in out and "epoch 1/2 step 14" in out, err  # the missed evaluation, redone
  assert_same_records(straight_ce, workdir)


def test_an_oversized_evaluation_batch_is_clamped(straight_ce, tmp_path, capsys):
  rc, _, err = run_inprocess(tiny_config("ce", num_epochs=2, eval_batch_size=10**9), tmp_path / "run", capsys)
  assert rc == 0, err
  a = report.read_json(os.path.join(straight_ce, "summary.json"))
  b = report.read_json(os.path.join(tmp_path / "run", "summary.json"))
  assert a["accuracy"] == b["accuracy"] and a["val_accuracy"] == b["val_accuracy"]


def test_a_torn_metrics_line_is_dropped_and_train_metrics_resume_exactly(straight_ce, tmp_path, capsys):
  """Stopped at step 20 (mid-epoch, 1 step after a log point), the last line torn by a kill; the resumed records
  equal the uninterrupted run's, ``train_*`` averages of the interrupted log interval included."""
  workdir = str(tmp_path / "run")
  rc, out, err = run_inprocess(tiny_config("ce", num_epochs=2, steps_per_run=20), workdir, capsys)
  assert rc == 0 and "Stopping after 20 steps" in out, err
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 28, "epoch": 2, "accur')
  rc, out, err = run_inprocess(tiny_config("ce", num_epochs=2), workdir, capsys)
  assert rc == 0, err
  assert "warning: " in err and "dropped a last line cut short" in err and not error_lines(err), err
  assert_same_records(straight_ce, workdir)


def test_a_bad_line_inside_metrics_is_named(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(UserError, match=r"metrics.jsonl: line 2 is not a JSON record"):
    report.read_jsonl(str(path), torn_tail="drop")


# ------------------------------------------------------------------------------------------ filesystem faults


@pytest.mark.parametrize("kind", ["empty", "file", "below_file", "read_only"])
def test_unusable_work_directories_are_one_line(kind, tmp_path, capsys):
  afile = tmp_path / "afile"
  afile.write_text("x")
  workdir = {"empty": "", "file": str(afile), "below_file": str(afile / "run"),
             "read_only": str(tmp_path / "ro")}[kind]
  if kind == "read_only":
    os.makedirs(workdir)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", workdir], capture_output=True).returncode:
      pytest.skip("cannot mount a read-only tmpfs here")
  try:
    rc, _, err = run_inprocess(tiny_config("ce"), workdir, capsys)
  finally:
    if kind == "read_only":
      subprocess.run(["umount", workdir])
  lines = error_lines(err)
  assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: workdir: "), err
  expected = {"empty": "expected a directory path", "file": "is a file, expected a directory",
              "below_file": "cannot create", "read_only": "not writable"}[kind]
  assert expected in lines[0], lines[0]


def test_a_full_disk_is_one_line_and_costs_no_checkpoint(straight_ce, tmp_path, capsys):
  mount = str(tmp_path / "small")
  os.makedirs(mount)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mount], capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here")
  try:
    workdir = os.path.join(mount, "run")
    rc, _, err = run_inprocess(tiny_config("ce", num_epochs=2, steps_per_run=14), workdir, capsys)
    assert rc == 0, err
    filler = os.path.join(mount, "filler")
    with open(filler, "wb", buffering=0) as f:  # fill the disk to the last block (unbuffered: close flushes nothing)
      try:
        while True:
          f.write(b"\0" * 4096)
      except OSError:
        pass
    rc, _, err = run_inprocess(tiny_config("ce", num_epochs=2), workdir, capsys)
    lines = error_lines(err)
    assert rc == 1 and len(lines) == 1 and "no space left on device" in lines[0].lower(), err
    assert "Traceback" not in err
    os.remove(filler)
    rc, _, err = run_inprocess(tiny_config("ce", num_epochs=2), workdir, capsys)
    assert rc == 0, err
    assert_same_records(straight_ce, workdir)
  finally:
    subprocess.run(["umount", "-l", mount])


# ------------------------------------------------------------------------------------------ bad inputs


def test_a_column_that_overflows_scaling_is_named(tmp_path):
  rows = ["f1,f2,label"] + [f"{i},{'1e308' if i == 4 else ('-1e308' if i == 7 else i)},{i % 3}" for i in range(30)]
  (tmp_path / "attack.csv").write_text("\n".join(rows) + "\n")
  with pytest.raises(UserError, match=r"attack.csv line \d+, column 2: the \w+ input is (nan|-?inf) after preprocessing"):
    data.load(attack_config(str(tmp_path)).data, seed=0)


def test_a_csv_with_a_byte_order_mark_and_no_header_keeps_its_first_row(tmp_path):
  from tgeo_jax.data import tabular
  (tmp_path / "bom.csv").write_bytes("\ufeff1.5,2,0\n3,4,1\n5,6,2\n".encode("utf-8"))
  x, y, names = tabular.read_numeric_csv(str(tmp_path / "bom.csv"))
  assert names is None and x.shape == (3, 2) and x[0, 0] == 1.5 and list(y) == [0, 1, 2]


def test_a_stale_uncompressed_idx_file_is_refused(tmp_path):
  from tgeo_jax.data import sources
  directory = fake_fashion_mnist_gz(str(tmp_path))
  sources.write_idx(os.path.join(directory, "train-labels-idx1-ubyte"), (np.arange(120) + 1) % 10)
  with pytest.raises(UserError, match=r"train-labels-idx1-ubyte: differs from .*train-labels-idx1-ubyte.gz"):
    sources.fashion_mnist(directory)
  sources.write_idx(os.path.join(directory, "train-labels-idx1-ubyte"), np.arange(120) % 10)  # the same: fine
  assert len(sources.fashion_mnist(directory)["train"]) == 120


BAD = [  # (method, overrides, the error line must contain)
    ("ce", {"seed": -1}, "seed: expected an integer in [0, 2**32), got -1"),
    ("ce", {"data.split_seed": -1}, "data.split_seed: expected an integer in [0, 2**32), got -1"),
    ("tgeo", {"tgeo.fusion_hidden": (0,)}, "tgeo.fusion_hidden: expected a tuple of positive layer widths"),
    ("tgeo", {"tgeo.fusion_hidden": (32, -4)}, "tgeo.fusion_hidden: expected a tuple of positive layer widths"),
    ("ce", {"optimizer.warmup_epochs": 1e30}, "optimizer.warmup_epochs: expected a number in [0, num_epochs=1]"),
    ("ce", {"data.synthetic.num_classes": 0}, "data.synthetic.num_classes: expected an integer >= 2, got 0"),
    ("tgeo", {"val_batch_size": 64}, "val_batch_size: 64 exceeds the 50 held-out validation examples"),
    ("kd", {"teacher.logits_cache_dir": "{file}"}, "teacher.logits_cache_dir: "),
    ("kd", {"teacher.checkpoint": "{truncated_teacher}"}, "teacher.checkpoint: checkpoint "),
]


@pytest.mark.parametrize("method,overrides,expected", BAD, ids=[f"{m}-{next(iter(o))}" for m, o, _ in BAD])
def test_bad_input_is_one_line(method, overrides, expected, tiny_teacher, tmp_path, capsys):
  afile = tmp_path / "afile"
  afile.write_text("x")
  truncated = str(tmp_path / "truncated_teacher")
  if "{truncated_teacher}" in overrides.values():
    shutil.copytree(tiny_teacher, truncated)
    meta = os.path.join(truncated, "checkpoints", "28", "meta", "metadata")
    open(meta, "w").write(open(meta).read()[:40])
  overrides = {k: {"{file}": str(afile), "{truncated_teacher}": truncated}.get(v, v) if isinstance(v, str) else v
               for k, v in overrides.items()}
  config = tiny_config(method, **{"teacher.checkpoint": tiny_teacher, **overrides})
  rc, _, err = run_inprocess(config, tmp_path / "run", capsys)
  lines = error_lines(err)
  assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
  assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


def test_tensorboard_without_tensorboardx_is_one_line(tmp_path, capsys):
  try:
    import tensorboardX  # noqa: F401
    pytest.skip("tensorboardX is installed")
  except ImportError:
    pass
  rc, _, err = run_inprocess(tiny_config("ce", **{"log.tensorboard": True}), tmp_path / "run", capsys)
  lines = error_lines(err)
  assert rc == 2 and len(lines) == 1 and "log.tensorboard: True needs tensorboardX" in lines[0], err
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_signal_swallowed_during_setup_still_stops_before_training(tmp_path, capsys, monkeypatch):
  """A handler's exception raised inside a gc callback is swallowed and the process goes on; the recorded signal
  stops the run when the loop would start (nothing trained, nothing saved), as ``Interrupted`` to the caller."""
  from tgeo_jax import signals
  monkeypatch.setattr(signals, "received", [])
  real_load = data.load

  def load_then_signal(*args, **kwargs):
    task = real_load(*args, **kwargs)
    signals.record(15)  # what the handler does before raising (the raise itself was swallowed)
    return task

  monkeypatch.setattr(data, "load", load_then_signal)
  rc, _, err = run_inprocess(tiny_config("ce"), tmp_path / "run", capsys)
  assert rc == 128 + 15 and "Traceback" not in err, err
  assert not os.path.exists(tmp_path / "run" / "checkpoints") or not os.listdir(tmp_path / "run" / "checkpoints")
  with pytest.raises(trainer.Interrupted):  # library callers (TriKD generations, the study) see it too
    trainer.train_and_evaluate(tiny_config("ce"), str(tmp_path / "run2"))


@pytest.mark.parametrize("damage,cache", [("nan", "off"), ("nan", "on"), ("constant", "off")])
def test_a_damaged_teacher_is_refused_before_training(damage, cache, tiny_teacher, tmp_path):
  """Under jit a teacher with NaN weights gives NaN (or finite garbage) logits and a zeroed one a constant function;
  the student looks at the teacher's logits (its cached table, or the first training examples) and stops, one line."""
  import jax
  import numpy as np

  from conftest import tiny_config
  from tgeo_jax import data, trainer
  from tgeo_jax import teacher as teacher_lib
  from tgeo_jax.errors import UserError
  config = tiny_config("kd", **{"teacher.checkpoint": tiny_teacher, "teacher.model": "cnn_tiny",
                                "teacher.cache_logits": cache})
  spec = data.load(config.data, seed=0).spec
  good = teacher_lib.load_teacher_from("cnn_tiny", tiny_teacher, spec, field="teacher.checkpoint")
  leaves, treedef = jax.tree.flatten(good.variables["params"])
  if damage == "nan":  # a NaN classifier (the last leaves): an early NaN can vanish in a max-pool under XLA:CPU
    leaves = leaves[:-1] + [np.full_like(leaves[-1], np.nan)]
  else:
    leaves = [np.zeros_like(leaf) for leaf in leaves]
  bad = teacher_lib.Teacher("cnn_tiny", good.graphdef, {**good.variables,
                                                      "params": jax.tree.unflatten(treedef, leaves)})
  workdir = tmp_path / "student"
  with pytest.raises(UserError) as info:
    trainer.train_and_evaluate(config, str(workdir), teacher=bad)
  message = str(info.value)
  where = "over the" if cache == "on" else "on the first"
  # NaN weights give NaN logits, or -- XLA:CPU's max-pooling drops NaNs -- finite garbage that is the same for
  # every example (what happens here): either is refused.
  expected = (("non-finite logits", "the same logits for every example") if damage == "nan"
              else ("the same logits for every example",))
  assert message.startswith("teacher.checkpoint: the teacher in ''") and where in message
  assert any(e in message for e in expected), message
  assert "\n" not in message and not workdir.exists()


def test_a_teacher_checkpoint_with_nan_weights_is_refused_on_load(tiny_teacher, tmp_path):
  """A finished teacher run whose saved variables hold a NaN (checksums consistent: saved that way) is refused by
  the loader, naming the leaf, before any student step."""
  import jax

  from tgeo_jax import checkpoint, models
  from tgeo_jax import teacher as teacher_lib
  spec = data.load(tiny_config("kd").data, seed=0).spec
  fn = models.split(models.create("cnn_tiny", num_classes=spec.num_classes, input_shape=spec.input_shape))
  ckpt_dir = teacher_lib.checkpoint_dir(tiny_teacher)
  variables, meta, _ = checkpoint.restore_params(ckpt_dir, {"params": fn.params, "rest": fn.rest}, what="teacher")
  leaves, treedef = jax.tree.flatten(variables["params"])
  leaves[0] = np.asarray(leaves[0]).copy()
  leaves[0].reshape(-1)[3] = np.nan
  damaged = str(tmp_path / "damaged")
  shutil.copytree(tiny_teacher, damaged, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
  ckpt = checkpoint.Checkpointer(os.path.join(damaged, "checkpoints"), max_to_keep=1)
  try:
    meta = {k: v for k, v in meta.items() if k != "array_records"}
    ckpt.save(int(meta["step"]), {"params": jax.tree.unflatten(treedef, leaves), "rest": variables["rest"]}, meta)
  finally:
    ckpt.close()
  with pytest.raises(UserError, match=r"^teacher.checkpoint: the teacher in '.*damaged' holds 1 non-finite value in "
                                      r"\['params'\]\['convs'\]\[0\]\['kernel'\]: damaged weights \(or a run that diverged\), refused$"):
    teacher_lib.load_teacher_from("cnn_tiny", damaged, spec, field="teacher.checkpoint")
