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
