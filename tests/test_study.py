"""The study's selection and α summaries (bench/study.py): the control it compares against is chosen as documented."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import study


def _runs(val, test):
  return [{"val_accuracy": v, "accuracy": t} for v, t in zip(val, test)]


def test_best_alpha_is_chosen_on_validation_not_test():
  runs = {"kd_a0.1": _runs([0.80, 0.82], [0.95, 0.95]),  # best test, worse validation
          "kd_a0.5": _runs([0.85, 0.85], [0.80, 0.80]),
          "kd_a0.9": _runs([0.84], [0.90])}
  alpha, grid = study.best_alpha(runs)
  assert alpha == 0.5
  assert [g["alpha"] for g in grid] == [0.1, 0.5, 0.9]
  assert grid[0]["val_mean"] == pytest.approx(0.81) and grid[2]["n"] == 1


def test_best_alpha_tie_takes_the_first_and_empty_grid_is_none():
  runs = {"kd_a0.3": _runs([0.8], [0.1]), "kd_a0.7": _runs([0.8], [0.9])}
  assert study.best_alpha(runs)[0] == 0.3
  assert study.best_alpha({"ce": _runs([0.9], [0.9])}) == (None, [])


def test_alpha_summary_drift_and_group_separation():
  table = [{"alpha_mean": 0.5, "alpha_std": 0.01, "alpha_tc_large": 0.52, "alpha_tc_small": 0.50,
            "alpha_ti_large": 0.49},
           {"alpha_mean": 0.8, "alpha_std": 0.05, "alpha_tc_large": 0.9, "alpha_tc_small": 0.7, "alpha_ti_large": 0.6}]
  s = study.alpha_summary(table)
  assert s["drift"] == pytest.approx(0.3)
  assert s["trajectory"] == [0.5, 0.8]
  assert s["tc_large_minus_tc_small_first"] == pytest.approx(0.02)
  assert s["tc_large_minus_tc_small_last"] == pytest.approx(0.2)
  assert s["tc_minus_ti_large_last"] == pytest.approx(0.3)
  table[-1]["alpha_tc_small"] = None  # an empty group is reported as missing, not as 0
  assert study.alpha_summary(table)["tc_large_minus_tc_small_last"] is None
  assert study.alpha_summary([]) == {}


def test_kd_alpha_grid_is_the_documented_fusion():
  assert study.kd_at(0.3) == {"method": "kd", "kd.w_kd": 0.3, "kd.w_ce": 0.7}
  assert [m for m in study.METHODS if m.startswith("kd_a")] == ["kd_a0.1", "kd_a0.3", "kd_a0.5", "kd_a0.7", "kd_a0.9"]
  assert all(m in study.METHODS or m in study.DERIVED for m in study.DEFAULT_ORDER)


STUDY = os.path.join(study.ROOT, "bench", "study.py")


def _study(workdir, teacher_dir, *extra, worker=0, popen=False):
  """``bench/study.py`` on the tiny synthetic task: a ``subprocess.Popen`` for ``popen`` (a second worker beside this
  process), else in this process (``study.cli``, the command's entry; the suite's compilation cache is already
  JAX's) as a ``CliResult``."""
  import contextlib
  import io
  import subprocess
  from conftest import CliResult
  args = [f"--workdir={workdir}", f"--teacher={teacher_dir}", "--teacher_sha256=",
          "--settings=full", "--students=cnn_tiny", "--seeds=2", "--lr_grid=0.1", "--methods=ce,kd_a0.5,tgeo",
          "--override=data.name=synthetic", "--override=batch_size=32", "--override=val_batch_size=32",
          "--override=data.label_noise=0.25",
          f"--worker={worker}", *extra]
  if popen:
    return subprocess.Popen([sys.executable, STUDY, *args], cwd=study.ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = study.cli(args)
  return CliResult(rc, out.getvalue(), err.getvalue())


def _runs_started(stdout):
  return [line.split("] run ", 1)[1] for line in stdout.splitlines() if "] run " in line]


def test_two_workers_share_the_runs_then_read_back_and_a_changed_protocol_is_refused(tiny_teacher, tmp_path):
  """The study end to end on a tiny task: two workers on one work directory run every run exactly once (the
  learning-rate search, then 2 seeds of CE, KD and TGeo-KD), the tables come from their summaries, a second
  invocation re-runs nothing, and one with another protocol (more epochs) stops with a one-line error."""
  import json
  workdir, out, archive = str(tmp_path / "study"), str(tmp_path / "study.json"), str(tmp_path / "archive")
  other = _study(workdir, tiny_teacher, "--epochs=full=1", f"--archive={archive}", worker=1, popen=True)
  first = _study(workdir, tiny_teacher, "--epochs=full=1", f"--archive={archive}", f"--out={out}")
  other_out, other_err = other.communicate(timeout=600)
  assert first.returncode == 0, first.stderr
  assert other.returncode == 0, other_err
  started = _runs_started(first.stdout) + _runs_started(other_out)
  expected = {"full/cnn_tiny/lr_search/ce_lr0.1", "full/cnn_tiny/ce/seed1",
              *(f"full/cnn_tiny/{m}/seed{s}" for m in ("kd_a0.5", "tgeo") for s in (0, 1))}
  assert sorted(started) == sorted(expected)  # each run once, by one of the two workers
  with open(out) as f:
    result = json.load(f)["results"]["full/cnn_tiny"]
  rows = {r["method"]: r for r in result["rows"]}
  assert {m: rows[m]["n"] for m in rows} == {"ce": 2, "kd_a0.5": 2, "tgeo": 2}
  assert rows["tgeo"]["p_vs_kd"] is None  # no kd_best in this study: nothing to test against
  with open(os.path.join(workdir, "full/cnn_tiny/tgeo/seed1/summary.json")) as f:
    assert rows["tgeo"]["last_mean"] == pytest.approx((json.load(f)["accuracy"] + result["runs"]["tgeo"][0]["accuracy"]) / 2)
  assert result["alpha"]["tgeo"], "TGeo-KD's α-by-group records"

  again = _study(workdir, tiny_teacher, "--epochs=full=1")
  assert again.returncode == 0, again.stderr
  assert _runs_started(again.stdout) == []

  changed = _study(workdir, tiny_teacher, "--epochs=full=2")
  assert changed.returncode == 2
  assert changed.stderr.strip().count("\n") == 0, changed.stderr
  assert "holds a run of another configuration" in changed.stderr and "num_epochs" in changed.stderr

  # The archive: one record per run, enough for the tables without the work directory (a study that spans
  # machines or sessions); the learned α on noisy labels carries its flipped-label detection.
  assert sorted(os.path.relpath(os.path.join(d, f), archive).removesuffix(".json")
                for d, _, fs in os.walk(archive) for f in fs if f != study.PLATFORM_FILE) == sorted(expected)
  for directory in (workdir, archive):  # where these runs were made (XLA:CPU here)
    with open(os.path.join(directory, study.PLATFORM_FILE)) as f:
      assert json.load(f) == {"platform": "cpu"}
  noise = result["label_noise"]["tgeo"]
  assert len(noise) == 2 and all(0 < r["flipped"] < r["n"] and 0.0 <= r["auc_flipped"] <= 1.0 for r in noise)
  assert noise[0]["n"] == result["runs"]["tgeo"][0]["data"]["sizes"]["train"]
  import shutil
  shutil.rmtree(workdir)
  from_archive = _study(workdir, tiny_teacher, "--epochs=full=1", f"--archive={archive}", f"--out={out}.2")
  assert from_archive.returncode == 0, from_archive.stderr
  assert _runs_started(from_archive.stdout) == []
  with open(f"{out}.2") as f:
    again_result = json.load(f)["results"]["full/cnn_tiny"]
  assert again_result["rows"] == result["rows"] and again_result["label_noise"] == result["label_noise"]
  assert again_result["alpha"] == result["alpha"]

  changed = _study(workdir, tiny_teacher, "--epochs=full=2", f"--archive={archive}")  # archived runs are checked too
  assert changed.returncode == 2 and "holds a run of another configuration" in changed.stderr, changed.stderr


def test_a_directory_keeps_the_runs_of_one_backend(tmp_path):
  """The first process records its backend; the same backend passes, another stops with a one-line error."""
  archive = str(tmp_path / "archive")
  study.check_platform(archive, "cpu")
  study.check_platform(archive, "cpu")
  with pytest.raises(study.StudyMismatch, match=r"holds runs made on 'cpu', this process runs on 'gpu'"):
    study.check_platform(archive, "gpu")
  assert os.listdir(archive) == [study.PLATFORM_FILE]  # no temporary file left behind


def _row(method, last, p=None, n=3, seconds=10.0):
  return dict(method=method, n=n, failed=0, last_mean=last, last_std=0.001, p_vs_kd=p, seconds=seconds)


def test_tables_mark_significance_and_count_only_wins_above_the_control():
  import study_tables
  res = {"rows": [_row("kd_best", 0.85), _row("tgeo", 0.86, p=0.01), _row("tgeo_head_only", 0.84, p=0.01, n=2)],
         "tgeo_vs": {"tgeo": [dict(against="kd_best", difference=0.01, p=0.01)],
                     "tgeo_head_only": [dict(against="kd_best", difference=-0.01, p=0.01)]},
         "best_alpha": {"alpha": 0.7}, "learning_rate": 0.05}
  text = study_tables.tables({"full/mlp": res}, seeds=3)
  assert "| tgeo one_step | 86.00 ± 0.10† |" in text
  assert "| tgeo head_only | 84.00 ± 0.10† (2) |" in text  # significant, but worse: a † and no win
  assert "| tgeo one_step | +1.00 (p 0.010) | 1 of 1 |" in text
  assert "| tgeo head_only | -1.00 (p 0.010) | 0 of 1 |" in text


def test_cost_table_is_relative_to_the_one_kd_run():
  import study_tables
  res = {"rows": [_row("ce", 0.8, seconds=8.0), _row("kd_a0.7", 0.85, seconds=10.0), _row("tgeo", 0.86, seconds=25.0)]}
  text = study_tables.cost_table({"full/mlp": res})
  assert "reference: kd_a0.7" in text
  assert "| ce | 8 | 0.80 |" in text and "| tgeo one_step | 25 | 2.50 |" in text
  two_kd = {"rows": [*res["rows"], _row("kd_a0.3", 0.85)]}
  with pytest.raises(SystemExit, match="expected one KD run"):
    study_tables.cost_table({"full/mlp": two_kd})
  # A warm-up run (the process's first teacher run) is left out of the table, and named on its own line.
  text = study_tables.cost_table({"full/mlp": two_kd}, reference="kd_a0.7", warmup="kd_a0.3")
  assert "| kd α = 0.3 |" not in text and "warm-up" in text and "| tgeo one_step | 25 | 2.50 |" in text
  with pytest.raises(SystemExit, match="expected one KD run"):
    study_tables.cost_table({"full/mlp": two_kd}, reference="kd_a0.9")


def test_alpha_table_has_every_group_and_the_figure_takes_the_variant_each_pair_ran(tmp_path):
  import study_tables
  table = [dict(epoch=e, alpha_mean=0.5, alpha_std=0.1, alpha_tc_large=0.6, alpha_tc_small=0.3 + 0.1 * e,
                alpha_ti_large=0.45, alpha_ti_small=0.2) for e in (1, 2)]
  mlp = {"rows": [_row("kd_best", 0.85)], "alpha": {"tgeo": table, "tgeo_implicit": table},
         "alpha_summary": {n: {"tc_large_minus_tc_small_first": 0.2, "tc_large_minus_tc_small_last": 0.1}
                           for n in ("tgeo", "tgeo_implicit")},
         "best_alpha": {"alpha": 0.7}, "learning_rate": 0.05}
  text = study_tables.tables({"full/mlp": mlp}, seeds=3)
  assert "| full/mlp | tgeo one_step | 0.50 → 0.50 | 0.10 | 0.60 → 0.60 | 0.40 → 0.50 | +0.20 → +0.10 | 0.45 / 0.20 | – |" in text
  cnn = {"alpha": {"tgeo": table, "tgeo_implicit_eta0.01_m5": table}}
  choice = "tgeo_implicit_eta0.01_m5|tgeo_implicit"
  assert study_tables.pick_variant(mlp["alpha"], choice) == "tgeo_implicit"
  assert study_tables.pick_variant(cnn["alpha"], choice) == "tgeo_implicit_eta0.01_m5"
  assert study_tables.pick_variant(cnn["alpha"], "tgeo_unroll4") is None  # drawn as "not run"
  path = tmp_path / "alpha.png"
  study_tables.variant_figure(str(path), {"full/mlp": mlp, "full/cnn_small": cnn},
                              ["tgeo", "tgeo_unroll4", choice], ["full/mlp", "full/cnn_small"])
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
