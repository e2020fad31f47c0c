"""``python -m tgeo_jax.compare``: seeds grouped by fingerprint, differing fields named, CSV, bad input, plots.

Most runs here are fake work directories with the trainer's file layout (summary.json, identity.json,
metrics.jsonl, fingerprints from ``run_identity.make_identity``); one module fixture trains two real tiny seeds and
stops a third early, so the files the trainer really writes are parsed too.
"""

import csv
import io
import json
import os
import re

import numpy as np
import pytest

from tgeo_jax import compare, run_identity

BASE_CONFIG = {"method": "kd", "model.name": "mlp", "seed": 0, "num_epochs": 2, "batch_size": 64,
               "optimizer.learning_rate": 0.1, "kd.temperature": 4.0, "data.name": "synthetic"}
DATA = {"name": "synthetic", "digest": "d" * 64, "sizes": {"train": 100, "val": 10, "test": 50},
        "membership": {"train": "a" * 64, "val": "b" * 64, "test": "c" * 64}}
TEACHER = {"field": "teacher.checkpoint", "model": "cnn_tiny", "variables_sha256": "7" * 64, "path": "/t"}


def fake_run(root, name, *, seed=0, accuracy=0.5, best=None, val=0.4, teacher_accuracy=0.9, seconds=10.0,
             teacher=TEACHER, finished=True, summary=True, **config):
  """A work directory as the trainer leaves it (``summary=False``: stopped before the end, no summary.json)."""
  workdir = os.path.join(str(root), name)
  os.makedirs(workdir)
  config = dict(BASE_CONFIG, seed=seed, **config)
  identity = run_identity.make_identity(config, DATA, [teacher])
  with open(os.path.join(workdir, "identity.json"), "w") as f:
    json.dump(identity, f)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  records = [{"kind": "train", "step": 5, "epoch": 0, "train_loss": 2.0, "train_accuracy": 0.2},
             {"kind": "eval", "step": 10, "epoch": 1, "accuracy": accuracy / 2, "loss": 2.1, "train_loss": 1.9},
             {"kind": "train", "step": 15, "epoch": 1, "train_loss": 1.5, "train_accuracy": 0.4},
             {"kind": "eval", "step": 20, "epoch": 2, "accuracy": accuracy, "loss": 1.4, "train_loss": 1.4}]
  if not summary:
    records = records[:2]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  if summary:
    record = {"method": config["method"], "model": config["model.name"], "accuracy": accuracy,
              "best_accuracy": accuracy if best is None else best, "loss": 1.4, "num_steps": 20, "seconds": seconds,
              "seed": seed, "finished": finished, "val_accuracy": val, "teacher_accuracy": teacher_accuracy,
              "dataset": "synthetic",
              **{k: identity[k] for k in ("fingerprint", "config_fingerprint", "group_fingerprint", "config")},
              "data": {k: DATA[k] for k in ("name", "digest", "sizes")},
              "teachers": [{k: teacher[k] for k in ("field", "model", "variables_sha256")}]}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(record, f)
  return workdir


def run_compare(capsys, *args):
  """``(exit status, stdout, stderr)`` of ``python -m tgeo_jax.compare ARGS``, in this process."""
  capsys.readouterr()
  rc = compare.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return rc, out, err


def csv_rows(text):
  return list(csv.DictReader(io.StringIO(text)))


def assert_one_error_line(rc, out, err, *fragments):
  assert rc == 2 and out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------ grouping


def test_seeds_form_one_group_with_numpy_mean_and_sample_std(tmp_path, capsys):
  acc, best, val, secs = [0.61, 0.65, 0.70], [0.62, 0.66, 0.71], [0.5, 0.55, 0.58], [10.0, 12.5, 11.0]
  for seed in range(3):
    fake_run(tmp_path, f"kd_s{seed}", seed=seed, accuracy=acc[seed], best=best[seed], val=val[seed],
             seconds=secs[seed])
  rc, out, err = run_compare(capsys, f"{tmp_path}/*/", "--format=csv")
  assert rc == 0, err
  [row] = csv_rows(out)
  assert row["seeds"] == "3" and row["seed_values"] == "0;1;2" and row["label"] == "kd mlp"
  for key, values in (("accuracy", acc), ("best_accuracy", best), ("val_accuracy", val), ("seconds", secs),
                      ("teacher_accuracy", [0.9] * 3)):
    np.testing.assert_allclose(float(row[f"{key}_mean"]), np.mean(values), rtol=1e-12)
    np.testing.assert_allclose(float(row[f"{key}_std"]), np.std(values, ddof=1), rtol=1e-12, atol=1e-15)
  assert "differ only in seed" in err  # CSV mode: the notes go to stderr, stdout stays CSV
  rc, out, _ = run_compare(capsys, f"{tmp_path}/*/")
  a = 100 * np.array(acc)
  assert re.search(rf"^\| +1 \| kd mlp +\| +3 \| +{a.mean():.2f} ± {a.std(ddof=1):.2f} \|", out, re.M), out


def test_configs_differing_in_learning_rate_are_two_groups_naming_the_field(tmp_path, capsys):
  for seed in range(2):
    fake_run(tmp_path, f"lr01_s{seed}", seed=seed, accuracy=0.6 + seed / 100)
    fake_run(tmp_path, f"lr005_s{seed}", seed=seed, accuracy=0.7 + seed / 100, **{"optimizer.learning_rate": 0.05})
  rc, out, err = run_compare(capsys, f"{tmp_path}/lr01_s0", f"{tmp_path}/lr01_s1", f"{tmp_path}/lr005_*")
  assert rc == 0, err
  assert "kd mlp, learning_rate=0.1 " in out and "kd mlp, learning_rate=0.05 " in out
  assert "- `optimizer.learning_rate`: 0.1 in 1; 0.05 in 2" in out
  assert "`seed`" not in out and "kd.temperature" not in out  # only the fields that differ between groups
  rc, out, _ = run_compare(capsys, f"{tmp_path}/*", "--format=csv", "--sort=-accuracy")
  rows = csv_rows(out)
  assert [r["optimizer.learning_rate"] for r in rows] == ["0.05", "0.1"] and [r["seeds"] for r in rows] == ["2", "2"]
  np.testing.assert_allclose([float(r["accuracy_mean"]) for r in rows], [0.705, 0.605])
  assert all(len(r["run_dirs"].split(";")) == 2 for r in rows)


def test_teacher_and_data_identity_separate_groups_of_equal_config(tmp_path, capsys):
  # teacher.checkpoint (a path) is outside the fingerprint; the teacher's variables digest is in it.
  other = dict(TEACHER, variables_sha256="9" * 64)
  fake_run(tmp_path, "a", accuracy=0.6)
  fake_run(tmp_path, "b", accuracy=0.7, teacher=other)
  rc, out, err = run_compare(capsys, f"{tmp_path}/*/")
  assert rc == 0, err
  assert "kd mlp, teacher 777777777777" in out and "kd mlp, teacher 999999999999" in out
  assert "- `teacher teacher.checkpoint`: cnn_tiny 777777777777 in 1; cnn_tiny 999999999999 in 2" in out


def test_same_configuration_and_seed_twice_is_counted_once(tmp_path, capsys):
  fake_run(tmp_path, "a", accuracy=0.6)
  fake_run(tmp_path, "copy_of_a", accuracy=0.6)
  fake_run(tmp_path, "b", seed=1, accuracy=0.8)
  rc, out, err = run_compare(capsys, f"{tmp_path}/a", f"{tmp_path}/*/", "--format=csv")  # a named twice, too
  assert rc == 0, err
  [row] = csv_rows(out)
  assert row["seeds"] == "2" and float(row["accuracy_mean"]) == pytest.approx(0.7)
  assert "copy_of_a: the same configuration and seed as" in err


# ------------------------------------------------------------------------------------------------ unfinished


def test_unfinished_runs_are_listed_apart_from_the_table(tmp_path, capsys):
  fake_run(tmp_path, "done", accuracy=0.6)
  fake_run(tmp_path, "stopped", seed=1, summary=False)
  fake_run(tmp_path, "flagged", seed=2, finished=False, accuracy=0.99)
  rc, out, err = run_compare(capsys, f"{tmp_path}/*/", "--format=csv")
  assert rc == 0, err
  [row] = csv_rows(out)
  assert row["seeds"] == "1" and float(row["accuracy_mean"]) == 0.6
  rc, out, _ = run_compare(capsys, f"{tmp_path}/*/")
  section = out.split("Unfinished runs (not in the table): 2")[1]
  assert "stopped: kd mlp seed 1 (group 1): no summary.json; last record at step 10, epoch 1 of 2" in section
  assert "(test accuracy 0.2500 at epoch 1)" in section
  assert "flagged: kd mlp seed 2 (group 1): summary.json says finished: false" in section
  rc, out, _ = run_compare(capsys, tmp_path / "stopped")
  assert rc == 0 and out.startswith("No finished run among the 1 selected.")


# ------------------------------------------------------------------------------------------------ bad input


def test_a_directory_that_is_not_a_run_is_one_error_line(tmp_path, capsys):
  fake_run(tmp_path / "runs", "a")
  (tmp_path / "empty").mkdir()
  assert_one_error_line(*run_compare(capsys, tmp_path / "runs" / "a", tmp_path / "empty"),
                        f"RUN_DIR '{tmp_path / 'empty'}': not a run directory")
  # The folder that holds the runs: the message says which pattern was meant.
  assert_one_error_line(*run_compare(capsys, tmp_path / "runs"), f"pass '{tmp_path / 'runs'}/*/'")
  assert_one_error_line(*run_compare(capsys, f"{tmp_path}/nothing_*/"), "no matching directory")
  assert_one_error_line(*run_compare(capsys, tmp_path / "missing"), "no such directory")
  assert_one_error_line(*run_compare(capsys), "RUN_DIR")
  assert_one_error_line(*run_compare(capsys, tmp_path / "runs" / "a", "--format=xml"), "--format")
  assert_one_error_line(*run_compare(capsys, tmp_path / "runs" / "a", "--sort=speed"), "--sort", "accuracy")
  assert_one_error_line(*run_compare(capsys, tmp_path / "runs" / "a", "--out", tmp_path / "no" / "t.md"), "--out")
  with open(tmp_path / "runs" / "a" / "summary.json", "w") as f:
    f.write('{"method": "kd", ')
  assert_one_error_line(*run_compare(capsys, tmp_path / "runs" / "a"), "summary.json: not a JSON object")


def test_out_writes_the_document(tmp_path, capsys):
  fake_run(tmp_path, "a")
  rc, out, err = run_compare(capsys, tmp_path / "a", "--out", tmp_path / "table.md")
  assert rc == 0 and out == "" and f"wrote {tmp_path / 'table.md'}" in err
  assert (tmp_path / "table.md").read_text().startswith("| # | runs")


# ------------------------------------------------------------------------------------------------ real runs, plots


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
  """Two finished seeds of the tiny synthetic CE config and one stopped after 3 of its 14 steps."""
  from conftest import tiny_config
  from tgeo_jax import cli
  root = tmp_path_factory.mktemp("real_runs")
  for name, overrides in (("ce_s0", {"seed": 0}), ("ce_s1", {"seed": 1}), ("ce_part", {"seed": 2, "steps_per_run": 3})):
    assert cli.run(tiny_config("ce", **overrides), str(root / name)) == 0
  return root


def test_real_run_directories_parse(real_runs, capsys):
  rc, out, err = run_compare(capsys, f"{real_runs}/*/", "--format=csv")
  assert rc == 0, err
  [row] = csv_rows(out)
  summaries = [json.loads((real_runs / f"ce_s{s}" / "summary.json").read_text()) for s in (0, 1)]
  assert row["seeds"] == "2" and row["label"] == "ce cnn_tiny"
  for key in ("accuracy", "val_accuracy", "seconds"):
    values = [s[key] for s in summaries]
    np.testing.assert_allclose(float(row[f"{key}_mean"]), np.mean(values), rtol=1e-12)
    np.testing.assert_allclose(float(row[f"{key}_std"]), np.std(values, ddof=1), rtol=1e-12, atol=1e-15)
  assert "ce_part: ce cnn_tiny seed 2 (group 1): no summary.json; latest checkpoint at step 3 of 14" in err


def test_plot_writes_a_png(real_runs, tmp_path, capsys):
  pytest.importorskip("matplotlib")
  fake_run(tmp_path, "lr005", **{"optimizer.learning_rate": 0.05})
  fake_run(tmp_path, "stopped", seed=1, summary=False, **{"optimizer.learning_rate": 0.05})
  png = tmp_path / "curves.png"
  rc, out, err = run_compare(capsys, f"{real_runs}/*/", f"{tmp_path}/*/", "--plot", png)
  assert rc == 0, err
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
  assert f"wrote {png}" in err and "ce_part: no metrics.jsonl records, not plotted" in err  # stopped before step 5
  assert_one_error_line(*run_compare(capsys, f"{real_runs}/ce_s0", "--plot", tmp_path / "c.jpg"), "--plot", ".png")


def test_plot_without_matplotlib_is_one_error_line(tmp_path, capsys, monkeypatch):
  import sys
  fake_run(tmp_path, "a")
  monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what a missing package makes `import` raise
  assert_one_error_line(*run_compare(capsys, tmp_path / "a", "--plot", tmp_path / "c.png"),
                        "--plot: needs matplotlib", "pip install")
  assert not (tmp_path / "c.png").exists()


def test_labels_name_only_the_fields_a_method_reads(tmp_path, capsys):
  # A KD run and a TGeo-KD run from one config family: dkd.warmup_epochs and val_batch_size differ, but KD reads
  # neither; TGeo-KD reads val_batch_size. Two KD runs that differ only in an unread field still get distinct labels.
  fake_run(tmp_path, "kd", method="kd", **{"dkd.warmup_epochs": 20.0, "val_batch_size": 64})
  fake_run(tmp_path, "tgeo", method="tgeo", **{"dkd.warmup_epochs": 1.0, "val_batch_size": 16})
  fake_run(tmp_path, "kd_other", method="kd", **{"dkd.warmup_epochs": 1.0, "val_batch_size": 64})
  rc, out, err = run_compare(capsys, tmp_path / "kd", tmp_path / "tgeo", "--format=csv")
  assert rc == 0, err
  assert sorted(r["label"] for r in csv_rows(out)) == ["kd mlp", "tgeo mlp, val_batch_size=16"]
  rc, out, err = run_compare(capsys, tmp_path / "kd", tmp_path / "kd_other", "--format=csv")
  assert rc == 0, err
  assert sorted(r["label"] for r in csv_rows(out)) == ["kd mlp, warmup_epochs=1", "kd mlp, warmup_epochs=20"]


def test_imported_teachers_are_listed_as_such(tmp_path, capsys):
  fake_run(tmp_path, "kd", method="kd")
  teacher = tmp_path / "imported"
  teacher.mkdir()
  config = {"method": "imported", "model": {"name": "resnet32x4"}, "data": {"name": "cifar100"}}
  data = dict(DATA, imported_from={"file": "/x/ckpt_epoch_240.pth", "format": "repdistiller", "sha256": "e" * 64})
  identity = run_identity.make_identity(config, data, [])
  identity["data"]["imported_from"] = data["imported_from"]
  (teacher / "identity.json").write_text(json.dumps(identity))
  (teacher / "config.json").write_text(json.dumps(config))
  rc, out, err = run_compare(capsys, tmp_path / "kd", teacher)
  assert rc == 0, err
  assert "Unfinished" not in out + err
  text = out + err
  assert "Imported teachers (not in the table): 1" in text
  assert (f"- {teacher}: imported teacher (resnet32x4, repdistiller checkpoint ckpt_epoch_240.pth, sha256 "
          "eeeeeeeeeeee); not trained here: score it with python -m tgeo_jax.evaluate") in text


def test_a_nan_metric_and_a_non_utf8_terminal(tmp_path, capsys):
  fake_run(tmp_path, "a", seed=0, val=float("nan"))  # e.g. a NaN AUC; report.py writes it as 'nan'
  fake_run(tmp_path, "b", seed=1, val=float("nan"))
  rc, out, err = run_compare(capsys, tmp_path / "a", tmp_path / "b")
  assert rc == 0, err
  assert "nan ± nan" in out and "50.00 ± 0.00" in out

  class AsciiStream:
    encoding = "ascii"

  assert compare._encodable("71.00 ± 1.00 – x", AsciiStream()) == "71.00 +- 1.00 - x"
  assert compare._encodable("71.00 ± 1.00", io.StringIO()) == "71.00 ± 1.00"  # no encoding attribute: UTF-8
