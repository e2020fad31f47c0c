"""A work directory belongs to one configuration: fingerprints, resume refusals, the work-directory lock, teacher
provenance and the records tables read. Runs go through ``tgeo_jax.cli.run`` in this process (the CLI minus flag
parsing) on the tiny synthetic task."""

import json
import os
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import ROOT, attack_config, error_lines, fake_fashion_mnist_gz, run_inprocess, tiny_config
from tgeo_jax import data, report, run_identity
from tgeo_jax.errors import UserError


def listing(workdir):
  """Every file under ``workdir`` with its size and mtime (to show that a refused run wrote nothing; the lock
  file, which names the process that last held it, aside)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      if f == run_identity.LOCK_FILE:
        continue
      path = os.path.join(root, f)
      st = os.stat(path)
      out[os.path.relpath(path, workdir)] = (st.st_size, st.st_mtime_ns)
  return out


# ------------------------------------------------------------------------------------------------ records


def test_config_record_leaves_out_exactly_the_allow_list():
  config = tiny_config("kd")
  record = run_identity.config_record(json.loads(config.to_json_best_effort()))
  assert "optimizer.learning_rate" in record and "data.label_noise" in record and "num_epochs" in record
  assert not set(record) & set(run_identity.RESUMABLE_FIELDS)
  flat = run_identity.flatten(json.loads(config.to_json_best_effort()))
  # ... and the fields of an optional group that is off (study_wrong_teacher: kind 'none').
  off_groups = {k for k in flat if k.split(".")[0] in run_identity.OPTIONAL_GROUPS}
  assert off_groups and "study_wrong_teacher.kind" in off_groups
  assert set(flat) - set(record) == (set(run_identity.RESUMABLE_FIELDS) & set(flat)) | off_groups


def _reads(method):
  import functools

  from tgeo_jax import methods
  return functools.partial(methods.reads_field, method)


def _record(config, method):
  return run_identity.config_record(json.loads(config.to_json_best_effort()), _reads(method))


def test_only_the_fields_a_method_reads_identify_its_runs():
  config = tiny_config("kd")
  record = _record(config, "kd")
  assert "kd.temperature" in record and "teacher.model" in record and "optimizer.learning_rate" in record
  assert not any(k.startswith(("dkd.", "tgeo.", "dist.", "ce.", "trikd.")) for k in record)
  assert "val_batch_size" not in record  # KD draws no validation batches; TGeo-KD does
  assert "val_batch_size" in _record(tiny_config("tgeo"), "tgeo")
  fingerprint = run_identity.config_fingerprint(config, _reads("kd"))
  config.dkd.alpha = 7.0  # another method's field (or one added to it in a later version)
  assert run_identity.config_fingerprint(config, _reads("kd")) == fingerprint
  config.kd.temperature = 7.0
  assert run_identity.config_fingerprint(config, _reads("kd")) != fingerprint
  assert not any(k.startswith("teacher.") for k in _record(tiny_config("ce"), "ce"))  # CE has no teacher
  assert "teacher.model" in _record(tiny_config("trikd"), "trikd")  # TriKD's online teacher


def test_a_work_directory_of_identity_version_1_resumes_on_the_fields_its_method_reads(tmp_path):
  """Version 1 records held every field: a field another method gained since (``<absent>`` in the old record)
  no longer refuses the resume; a field the method reads still does, naming it."""
  data = {"name": "synthetic", "digest": "d" * 64, "sizes": {"train": 10}}
  config = tiny_config("kd")
  config_dict = json.loads(config.to_json_best_effort())
  v1 = run_identity.make_identity(config_dict, data, [])
  assert v1["version"] == 1
  del v1["config"]["dkd.warmup_epochs"]  # written before that DKD field existed
  current = run_identity.make_identity(config_dict, data, [], _reads("kd"))
  assert current["version"] == 2
  workdir = str(tmp_path)
  run_identity.refuse_differences(workdir, v1, current, _reads("kd"))
  run_identity.check_resume_compatible({"identity": v1, "num_classes": 10}, current, 10, workdir, _reads("kd"))
  assert run_identity.matches_fingerprint(run_identity.config_fingerprint(config), config, _reads("kd"))  # v1
  assert run_identity.matches_fingerprint(current["config_fingerprint"], config, _reads("kd"))  # v2
  v1["config"]["kd.temperature"] = 9.0
  with pytest.raises(UserError, match=r"kd.temperature: 9.0 -> 4.0"):
    run_identity.refuse_differences(workdir, v1, current, _reads("kd"))
  with pytest.raises(UserError, match=r"kd.temperature: 9.0 -> 4.0"):
    run_identity.check_resume_compatible({"identity": v1, "num_classes": 10}, current, 10, workdir, _reads("kd"))


def test_identity_differences_name_every_field_old_to_new():
  base = {"config": {"a": 1, "b.c": "x", "log.every_steps": 5},
          "data": {"name": "synthetic", "digest": "d" * 64, "sizes": {"train": 10}},
          "teachers": [{"field": "teacher.checkpoint", "model": "cnn", "variables_sha256": "1" * 64, "path": "/t"}]}
  other = json.loads(json.dumps(base))
  other["config"].update({"a": 2, "log.every_steps": 50, "new": True})
  other["data"]["sizes"]["train"] = 9
  other["teachers"][0].update(variables_sha256="2" * 64, path="/u")
  diffs = run_identity.identity_differences(base, other)
  assert "a: 1 -> 2" in diffs and "new: '<absent>' -> True" in diffs and "data sizes.train: 10 -> 9" in diffs
  assert not any("every_steps" in d for d in diffs)  # allow-listed
  assert any(d.startswith("teacher.checkpoint (teacher identity): 'cnn' variables 111111111111 ('/t') -> "
                          "'cnn' variables 222222222222 ('/u')") for d in diffs)
  moved = json.loads(json.dumps(base))
  moved["teachers"][0]["path"] = "/moved"  # the same teacher elsewhere is the same run
  assert run_identity.identity_differences(base, moved) == []
  a = run_identity.make_identity({"seed": 0, "x": 1}, base["data"], base["teachers"])
  b = run_identity.make_identity({"seed": 1, "x": 1}, base["data"], base["teachers"])
  assert a["fingerprint"] != b["fingerprint"] and a["group_fingerprint"] == b["group_fingerprint"]


# ------------------------------------------------------------------------------------------------ locking


def test_lock_refuses_a_second_holder_and_the_os_releases_it_on_kill(tmp_path):
  workdir = str(tmp_path)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from tgeo_jax import run_identity; "
       "run_identity.WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)", workdir],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=rf"workdir: .* is in use by pid {holder.pid} on host .*, running since"):
      run_identity.WorkdirLock(workdir).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    run_identity.WorkdirLock(workdir).acquire().release()  # no stale lock after kill -9
  finally:
    holder.kill()
  with run_identity.WorkdirLock(workdir).acquire():
    with pytest.raises(UserError, match="is in use by pid"):  # also within one process (flock per open file)
      run_identity.WorkdirLock(workdir).acquire()


# ------------------------------------------------------------------------------------------------ resume


@pytest.fixture(scope="module")
def finished_ce(tmp_path_factory):
  """A finished 2-epoch CE run (work directory) and its config."""
  workdir = str(tmp_path_factory.mktemp("ce"))
  config = tiny_config("ce", num_epochs=2)
  from tgeo_jax import trainer
  trainer.train_and_evaluate(config, workdir)
  return workdir, config


CHANGES = [  # (method, override, the text the refusal names)
    ("ce", {"optimizer.learning_rate": 0.2}, "optimizer.learning_rate: 0.1 -> 0.2"),
    ("ce", {"optimizer.schedule": "constant"}, "optimizer.schedule: 'cosine' -> 'constant'"),
    ("kd", {"kd.temperature": 2.0}, "kd.temperature: 4.0 -> 2.0"),
    ("kd", {"kd.w_ce": 0.5, "kd.w_kd": 0.5}, "kd.w_ce: 0.1 -> 0.5; kd.w_kd: 0.9 -> 0.5"),
    ("ce", {"data.label_noise": 0.2}, "data.label_noise: 0.0 -> 0.2"),
    ("ce", {"data.augment": "flip"}, "data.augment: 'none' -> 'flip'"),
    ("tgeo", {"tgeo.fusion_lr": 0.01}, "tgeo.fusion_lr: 0.001 -> 0.01"),
    ("tgeo", {"tgeo.ordering": "lookahead"}, "tgeo.ordering: 'reuse' -> 'lookahead'"),
    ("tgeo", {"tgeo.alpha_normalization": "center"}, "tgeo.alpha_normalization: 'none' -> 'center'"),
    ("tgeo", {"tgeo.layout": "edges"}, "tgeo.layout: 'reference' -> 'edges'"),
    ("ce", {"data.train_subset": 300}, "data.train_subset: 0 -> 300"),
    ("ce", {"data.val_fraction": 0.2}, "data.val_fraction: 0.1 -> 0.2"),
    ("ce", {"num_epochs": 4}, "num_epochs: 2 -> 4"),
]


def _as_run_of(method, finished_workdir, workdir):
  """``finished_workdir`` (a finished CE run) copied to ``workdir`` with its identity record made ``method``'s: the
  config part, which a resume compares first (before any data or teacher is read), is all a refusal needs."""
  shutil.copytree(finished_workdir, workdir)
  path = os.path.join(workdir, run_identity.IDENTITY_FILE)
  identity = json.load(open(path))
  identity["config"] = _record(tiny_config(method, num_epochs=2), method)
  with open(path, "w") as f:
    json.dump(identity, f)
  return workdir


def test_resume_with_any_changed_field_is_refused_naming_it(finished_ce, tmp_path, capsys):
  workdir, _ = finished_ce
  runs = {"ce": workdir, **{m: _as_run_of(m, workdir, str(tmp_path / m)) for m in ("kd", "tgeo")}}
  before = {m: listing(d) for m, d in runs.items()}
  for method, overrides, expected in CHANGES:
    rc, _, err = run_inprocess(tiny_config(method, **{"num_epochs": 2, **overrides}), runs[method], capsys)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1, (overrides, err)
    assert expected in lines[0] and "nothing was read or written" in lines[0], lines[0]
    if "num_epochs" in overrides:
      assert "the learning-rate schedule spans num_epochs" in lines[0]
    assert listing(runs[method]) == before[method], overrides


def test_a_field_the_method_does_not_read_never_refuses_a_resume(finished_ce, capsys):
  """Another method's group (and, for CE, the teacher): not part of a CE run's identity."""
  workdir, _ = finished_ce
  summary = report.read_json(os.path.join(workdir, "summary.json"))
  rc, out, err = run_inprocess(tiny_config("ce", num_epochs=2, **{
      "kd.temperature": 2.0, "tgeo.fusion_lr": 0.01, "dkd.beta": 2.0, "teacher.model": "mlp"}), workdir, capsys)
  assert rc == 0 and "already finished" in out, err
  again = report.read_json(os.path.join(workdir, "summary.json"))
  assert again["fingerprint"] == summary["fingerprint"] and again["accuracy"] == summary["accuracy"]


def test_allow_listed_fields_may_change_on_resume(finished_ce, capsys):
  workdir, _ = finished_ce
  summary = report.read_json(os.path.join(workdir, "summary.json"))
  rc, out, err = run_inprocess(tiny_config("ce", num_epochs=2, **{
      "log.every_steps": 3, "checkpoint.every_steps": 4, "checkpoint.max_to_keep": 3, "eval_batch_size": 32,
      "steps_per_run": 5, "teacher.checkpoint": "/elsewhere", "data.dir": "/not/read/by/synthetic"}), workdir, capsys)
  assert rc == 0 and "already finished" in out, err
  again = report.read_json(os.path.join(workdir, "summary.json"))
  assert again["accuracy"] == summary["accuracy"] and again["fingerprint"] == summary["fingerprint"]


def test_run_files_and_summary_identify_the_run(finished_ce, tmp_path):
  workdir, config = finished_ce
  saved_config = json.load(open(os.path.join(workdir, "config.json")))
  assert saved_config == json.loads(config.to_json_best_effort())  # the full resolved config
  identity = json.load(open(os.path.join(workdir, "identity.json")))
  summary = report.read_json(os.path.join(workdir, "summary.json"))
  assert summary["fingerprint"] == identity["fingerprint"] and summary["dataset"] == "synthetic"
  assert summary["config"]["optimizer.learning_rate"] == 0.1 and summary["data"]["sizes"]["train"] == 462
  assert summary["config_fingerprint"] == run_identity.config_fingerprint(config, _reads("ce"))
  with np.load(os.path.join(workdir, "membership.npz")) as f:
    assert len(f["train"]) == 462 and len(f["val"]) == 50 and len(f["test"]) == 256
    assert not np.intersect1d(f["train"], f["val"]).size and not np.intersect1d(f["train"], f["test"]).size
    assert run_identity.ids_digest(f["train"]) == identity["data"]["membership"]["train"]
  # The study reads finished runs back by config fingerprint, never by path alone.
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  import study
  study.check_same_config(summary, config, workdir)
  with pytest.raises(study.StudyMismatch, match=r"num_epochs: 2 -> 10"):
    study.check_same_config(summary, tiny_config("ce", num_epochs=10), workdir)


def test_a_run_that_differs_only_by_seed_shares_the_group_fingerprint(finished_ce, tmp_path):
  from tgeo_jax import trainer
  workdir, _ = finished_ce
  other = trainer.train_and_evaluate(tiny_config("ce", num_epochs=2, seed=1), str(tmp_path / "seed1"))
  summary = report.read_json(os.path.join(workdir, "summary.json"))
  assert other["group_fingerprint"] == summary["group_fingerprint"]
  assert other["fingerprint"] != summary["fingerprint"]


def test_changed_data_content_is_refused(tmp_path, capsys):
  data_dir = fake_fashion_mnist_gz(str(tmp_path / "fmnist"))
  config = tiny_config("ce", **{"data.name": "fashion_mnist", "data.dir": data_dir, "batch_size": 16})
  workdir = str(tmp_path / "run")
  rc, _, err = run_inprocess(config, workdir, capsys)
  assert rc == 0, err
  fake_fashion_mnist_gz(data_dir, seed=1)  # other pixels, same sizes and fields
  rc, _, err = run_inprocess(config, workdir, capsys)
  lines = error_lines(err)
  assert rc == 2 and len(lines) == 1 and "data digest: " in lines[0], err


def test_another_teacher_is_refused_and_a_moved_one_accepted(tiny_teacher, tmp_path, capsys):
  from tgeo_jax import trainer
  other_teacher = str(tmp_path / "teacher2")
  trainer.train_and_evaluate(tiny_config("teacher", seed=1), other_teacher)
  workdir = str(tmp_path / "kd")
  rc, _, err = run_inprocess(tiny_config("kd", **{"teacher.checkpoint": tiny_teacher}), workdir, capsys)
  assert rc == 0, err
  rc, _, err = run_inprocess(tiny_config("kd", **{"teacher.checkpoint": other_teacher}), workdir, capsys)
  lines = error_lines(err)
  assert rc == 2 and len(lines) == 1, err
  assert "teacher.checkpoint (teacher identity): 'cnn_tiny' variables" in lines[0] and other_teacher in lines[0]
  moved = str(tmp_path / "moved_teacher")
  shutil.copytree(tiny_teacher, moved)
  rc, out, err = run_inprocess(tiny_config("kd", **{"teacher.checkpoint": moved}), workdir, capsys)
  assert rc == 0 and "already finished" in out, err


def test_a_config_change_before_the_first_checkpoint_starts_afresh(tmp_path, capsys):
  """Nothing of a run exists before its first checkpoint: another config may take the directory over."""
  workdir = str(tmp_path / "run")
  rc, _, err = run_inprocess(tiny_config("ce", **{"optimizer.learning_rate": 1e10, "optimizer.clip_norm": 0.0}),
                             workdir, capsys)
  assert rc == 1, err  # diverged before any checkpoint
  rc, _, err = run_inprocess(tiny_config("ce"), workdir, capsys)
  assert rc == 0, err
  assert json.load(open(os.path.join(workdir, "config.json")))["optimizer"]["learning_rate"] == 0.1


# ------------------------------------------------------------------------------------------------ provenance


def teacher_like(data_identity, run_dir):
  return types.SimpleNamespace(identity={"field": "teacher.checkpoint", "path": run_dir, "data": data_identity,
                                         "run_dir": run_dir})


def test_provenance_check_unit(tmp_path, capsys):
  task = data.load(tiny_config("ce").data, seed=0)
  run_dir = str(tmp_path)
  np.savez(os.path.join(run_dir, "membership.npz"), train=task.membership["train"])
  run_identity.check_teacher_provenance(teacher_like(task.identity, run_dir), task, verify=True)  # same split: ok
  with pytest.raises(UserError, match="records no data provenance.*teacher.verify_provenance=False"):
    run_identity.check_teacher_provenance(teacher_like(None, run_dir), task, verify=True)
  other = dict(task.identity, name="fashion_mnist", digest="f" * 64)
  with pytest.raises(UserError, match=r"trained on dataset 'fashion_mnist' \(content ffffffffffff\), this run reads "
                                      r"'synthetic'"):
    run_identity.check_teacher_provenance(teacher_like(other, run_dir), task, verify=True)
  leaky_train = np.union1d(task.membership["train"], task.membership["test"][:7])
  np.savez(os.path.join(run_dir, "membership.npz"), train=leaky_train)
  leaky = dict(task.identity, membership=dict(task.identity["membership"], train=run_identity.ids_digest(leaky_train)))
  with pytest.raises(UserError, match=r"trained on 0 of this run's 50 validation and 7 of its 256 test examples"):
    run_identity.check_teacher_provenance(teacher_like(leaky, run_dir), task, verify=True)
  capsys.readouterr()
  run_identity.check_teacher_provenance(teacher_like(leaky, run_dir), task, verify=False)
  assert "warning: teacher.checkpoint: " in capsys.readouterr().err
  with pytest.raises(UserError, match="does not match the training membership its checkpoint recorded"):
    run_identity.check_teacher_provenance(teacher_like(task.identity, run_dir), task, verify=True)


def test_imported_teacher_provenance_unit(tmp_path, capsys):
  """A teacher imported from a PyTorch checkpoint (tgeo_jax.import_teacher): no content digest, a claimed training
  membership. Claimed on the whole training split, it overlaps the validation part: refused, or accepted with a
  warning under verify_provenance=False. A claim that overlaps neither part is accepted, still with a warning.
  Another dataset is refused as for any teacher."""
  from tgeo_jax import import_teacher
  config = tiny_config("ce")
  task = data.load(config.data, seed=0)
  run_dir, n_train = str(tmp_path), config.data.synthetic.num_train
  dataset = import_teacher.Dataset("synthetic", 10, n_train, (28, 28, 1), "the synthetic training split")
  source = import_teacher.source_record("repdistiller", "/x/ckpt.pth", "ab" * 32, "model", dataset)
  claimed = import_teacher.data_identity(dataset, source)
  np.savez(os.path.join(run_dir, "membership.npz"), train=np.arange(n_train))
  n_val, n_test = len(task.membership["val"]), len(task.membership["test"])
  with pytest.raises(UserError, match=rf"imported from '/x/ckpt.pth' \(repdistiller, sha256 abababababab\), trained "
                                      rf"by their publisher on the synthetic training split: by that claim it has seen "
                                      rf"{n_val} of this run's {n_val} validation and 0 of its {n_test} test examples "
                                      r"\(test accuracy is unaffected; .*set teacher.verify_provenance=False"):
    run_identity.check_teacher_provenance(teacher_like(claimed, run_dir), task, verify=True)
  capsys.readouterr()
  run_identity.check_teacher_provenance(teacher_like(claimed, run_dir), task, verify=False)
  err = capsys.readouterr().err
  assert err.startswith("warning: teacher.checkpoint: ") and err.rstrip().endswith(
      "accepted (teacher.verify_provenance=False)")
  np.savez(os.path.join(run_dir, "membership.npz"), train=task.membership["train"])
  disjoint = dict(claimed, membership={"train": run_identity.ids_digest(task.membership["train"])})
  run_identity.check_teacher_provenance(teacher_like(disjoint, run_dir), task, verify=True)
  err = capsys.readouterr().err
  assert "it has seen 0 of this run's" in err and err.rstrip().endswith("; accepted")
  with pytest.raises(UserError, match="trained on dataset 'cifar100'"):
    run_identity.check_teacher_provenance(teacher_like(dict(claimed, name="cifar100"), run_dir), task, verify=True)


def test_teacher_with_overlapping_or_foreign_data_is_refused(tiny_teacher, tmp_path, capsys):
  from tgeo_jax import trainer
  leaky_teacher = str(tmp_path / "leaky_teacher")  # another validation split: it trained on the student's
  trainer.train_and_evaluate(tiny_config("teacher", **{"data.split_seed": 3, "num_epochs": 1}), leaky_teacher)
  rc, _, err = run_inprocess(tiny_config("kd", **{"teacher.checkpoint": leaky_teacher}), str(tmp_path / "a"), capsys)
  lines = error_lines(err)
  assert rc == 2 and len(lines) == 1, err
  assert "teacher.checkpoint: the teacher in" in lines[0] and "of this run's 50 validation" in lines[0]
  assert "teacher.verify_provenance=False" in lines[0]
  rc, _, err = run_inprocess(tiny_config("kd", **{"teacher.checkpoint": leaky_teacher,
                                                  "teacher.verify_provenance": False}), str(tmp_path / "b"), capsys)
  assert rc == 0 and "warning: teacher.checkpoint: the teacher in" in err, err
  # A synthetic teacher for a Fashion-MNIST student (same shapes and classes: only provenance tells them apart).
  data_dir = fake_fashion_mnist_gz(str(tmp_path / "fmnist"))
  rc, _, err = run_inprocess(tiny_config("kd", **{"teacher.checkpoint": tiny_teacher, "data.name": "fashion_mnist",
                                                  "data.dir": data_dir, "batch_size": 16}), str(tmp_path / "c"), capsys)
  lines = error_lines(err)
  assert rc == 2 and len(lines) == 1 and "was trained on dataset 'synthetic'" in lines[0], err


def test_attack_teacher_split_with_other_fields_is_refused(tmp_path, capsys):
  """The case that leaked: an attack-detection teacher trained with another data.test_fraction holds the student's
  test rows in its training part; examples are compared by file row."""
  rng = np.random.default_rng(0)
  rows = ["f1,f2,f3,label"] + [f"{a:.4f},{b:.4f},{c:.4f},{i % 3}" for i, (a, b, c) in
                               enumerate(rng.normal(size=(240, 3)))]
  (tmp_path / "attack.csv").write_text("\n".join(rows) + "\n")
  teacher_dir = str(tmp_path / "teacher")
  rc, _, err = run_inprocess(attack_config(str(tmp_path), **{"data.test_fraction": 0.1}), teacher_dir, capsys)
  assert rc == 0, err
  student = attack_config(str(tmp_path), method="kd", **{"teacher.checkpoint": teacher_dir,
                                                          "teacher.model": attack_config(str(tmp_path)).model.name})
  rc, _, err = run_inprocess(student, str(tmp_path / "student"), capsys)
  lines = error_lines(err)
  assert rc == 2 and len(lines) == 1 and "test examples (leakage" in lines[0], err
  same = attack_config(str(tmp_path), method="kd", **{"data.test_fraction": 0.1, "teacher.checkpoint": teacher_dir,
                                                       "teacher.model": attack_config(str(tmp_path)).model.name})
  rc, _, err = run_inprocess(same, str(tmp_path / "student_same_split"), capsys)
  assert rc == 0, err
