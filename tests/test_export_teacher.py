"""The weights-only teacher export: same variables, same students, smaller directory, clear refusals."""

import json
import os

import pytest

from conftest import run_inprocess, tiny_config


def _size(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_exported_teacher_teaches_like_its_run(tiny_teacher, tmp_path, capsys):
  from tgeo_jax import export_teacher
  out = str(tmp_path / "exported")
  digest = export_teacher.export_teacher(tiny_teacher, out, log=lambda m: None)
  assert _size(os.path.join(out, "checkpoints")) < _size(os.path.join(tiny_teacher, "checkpoints"))
  assert export_teacher.export_teacher(tiny_teacher, out, log=lambda m: None) == digest  # idempotent

  summaries = []
  for i, teacher_dir in enumerate((tiny_teacher, out)):
    config = tiny_config("kd", **{"teacher.checkpoint": teacher_dir, "num_epochs": 1})
    rc, _, err = run_inprocess(config, tmp_path / f"kd{i}", capsys)
    assert rc == 0, err
    with open(tmp_path / f"kd{i}" / "summary.json") as f:
      summaries.append(json.load(f))
  assert [t["variables_sha256"] for s in summaries for t in s["teachers"]] == [digest, digest]
  assert summaries[0]["accuracy"] == summaries[1]["accuracy"]
  assert summaries[0]["loss"] == summaries[1]["loss"]


def test_export_refuses_directories_without_a_run(tiny_teacher, tmp_path):
  from tgeo_jax import export_teacher
  from tgeo_jax.errors import UserError
  with pytest.raises(UserError, match=r"--workdir: .* holds no config.json"):
    export_teacher.export_teacher(str(tmp_path), str(tmp_path / "out"), log=lambda m: None)
  meta_free = tmp_path / "no_checkpoint"
  os.makedirs(meta_free)
  for name in ("config.json",):
    with open(os.path.join(tiny_teacher, name)) as src, open(meta_free / name, "w") as dst:
      dst.write(src.read())
  with pytest.raises(UserError, match=r"--workdir: .* holds no checkpoint"):
    export_teacher.export_teacher(str(meta_free), str(tmp_path / "out2"), log=lambda m: None)


def test_cli_one_line_error(tmp_path):
  from conftest import error_lines
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-m", "tgeo_jax.export_teacher", f"--workdir={tmp_path}",
                         f"--out={tmp_path / 'o'}"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert error_lines(proc.stderr) == [f"error: --workdir: {str(tmp_path)!r} holds no config.json (not a run's work "
                                      "directory)"]


def test_committed_study_teachers_match_the_studys_digests():
  # The studies' teachers are committed (teachers/); bench/study.py refuses any other variables. A changed file in
  # those directories fails here before it fails a three-hour study.
  import sys
  from tgeo_jax import data, teacher
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.join(root, "bench"))
  import study
  spec = data.TaskSpec("fashion_mnist", 10, (28, 28, 1), 54000)
  assert study.TEACHER_DIR in study.COMMITTED_TEACHERS
  for teacher_dir, (model, sha256) in study.COMMITTED_TEACHERS.items():
    loaded = teacher.load_teacher_from(model, os.path.join(root, teacher_dir), spec, field="teacher")
    assert loaded.identity["variables_sha256"] == sha256, teacher_dir


def test_export_and_import_refuse_an_occupied_or_file_target(tiny_teacher, tmp_path):
  """--out / --workdir naming a file, or a directory holding other files: one line, nothing changed."""
  from tgeo_jax import export_teacher, import_teacher
  from tgeo_jax.errors import UserError
  a_file = tmp_path / "a_file"
  a_file.write_text("keep me")
  occupied = tmp_path / "occupied"
  occupied.mkdir()
  (occupied / "summary.json").write_text('{"mine": true}')
  with pytest.raises(UserError, match=r"^--out: '.*a_file' is a file, expected a directory"):
    export_teacher.export_teacher(tiny_teacher, str(a_file), log=lambda m: None)
  with pytest.raises(UserError, match=r"^--out: '.*occupied' already holds other files \(summary.json, \.\.\.\) and "
                                      r"no exported teacher"):
    export_teacher.export_teacher(tiny_teacher, str(occupied), log=lambda m: None)
  for target, pattern in ((a_file, r"is a file"), (occupied, r"already holds other files \(summary.json")):
    with pytest.raises(UserError, match=rf"^--workdir: '.*' {pattern}"):
      import_teacher.import_teacher("repdistiller", "resnet8", str(tmp_path / "x.pth"), str(target), log=lambda m: None)
  assert a_file.read_text() == "keep me" and (occupied / "summary.json").read_text() == '{"mine": true}'
