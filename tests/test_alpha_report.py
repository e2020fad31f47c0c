"""α analytics: group summaries on a hand example, files written, and the outlier probe's injection."""

import json
import os

import numpy as np

from configs import fashion_mnist
from tgeo_jax import alpha_report, data


def test_summarize_hand_example():
  # 10 examples; discrepancy 0..9: top 20% = {8, 9}, bottom 20% = {0, 1}.
  alpha = np.array([0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.8, 0.9])
  teacher_correct = np.array([True, False, True, True, True, True, True, True, True, False])
  gap = np.arange(10.0)
  outliers = np.zeros(10, bool)
  outliers[[0, 9]] = True
  s = alpha_report.summarize(alpha, teacher_correct, gap, outliers)
  assert s["alpha_tc_large"] == 0.8 and s["count_tc_large"] == 1
  assert s["alpha_ti_large"] == 0.9 and s["alpha_tc_small"] == 0.1 and s["alpha_ti_small"] == 0.2
  np.testing.assert_allclose(s["alpha_outlier"], 0.5)
  np.testing.assert_allclose(s["alpha_normal"], np.mean(alpha[1:9]))


def test_write_appends_and_draws(tmp_path):
  rng = np.random.default_rng(0)
  for epoch in (1, 2):
    alpha_report.write(str(tmp_path), epoch, epoch * 10, rng.random(50), rng.random(50) < 0.8, rng.random(50))
  alpha_report.write(str(tmp_path), 2, 20, rng.random(50), rng.random(50) < 0.8, rng.random(50))  # resumed epoch 2
  records = [json.loads(line) for line in open(tmp_path / "alpha.jsonl")]
  assert [r["epoch"] for r in records] == [1, 2]
  assert os.path.getsize(tmp_path / "alpha_hist.png") > 0 and os.path.getsize(tmp_path / "alpha_groups.png") > 0


def test_outlier_injection():
  c = fashion_mnist.base_config().data
  c.name, c.outliers = "synthetic", 20
  task = data.load(c, seed=0)
  assert task.outlier_mask.sum() == 20 and len(task.outlier_mask) == len(task.train)
  assert task.outlier_mask[-20:].all()
  labels = task.train.labels[task.outlier_mask]
  assert labels.min() >= 0 and labels.max() < 10
