"""docs/adding_a_method.md is run: its method module, its test and its training run, so the tutorial cannot rot.

The tutorial's files are written to a temporary directory and the method is registered from there (as a method
living in another package would be): nothing in the repository is edited.
"""

import importlib
import os
import re
import sys

from conftest import ROOT
from tgeo_jax import methods, report

DOC = os.path.join(ROOT, "docs", "adding_a_method.md")


def code_blocks(text):
  """``{file name: code}`` of the doc's ```python file=NAME blocks."""
  return {m.group(1): m.group(2) for m in re.finditer(r"```python file=(\S+)\n(.*?)```", text, re.S)}


def test_the_tutorial_runs_end_to_end(tiny_teacher, tmp_path, monkeypatch):
  blocks = code_blocks(open(DOC).read())
  assert set(blocks) == {"logit_mse.py", "test_logit_mse.py", "run_logit_mse.py"}
  for name, code in blocks.items():
    (tmp_path / name).write_text(code)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(methods._METHODS, "logit_mse", "logit_mse:LogitMSE")
  for name in ("logit_mse", "test_logit_mse", "run_logit_mse"):
    monkeypatch.delitem(sys.modules, name, raising=False)

  tests = importlib.import_module("test_logit_mse")  # the tutorial's own test file
  tests.test_loss_against_numpy()
  tests.test_gradient_and_stop_gradient()

  run = importlib.import_module("run_logit_mse")
  workdir = str(tmp_path / "run")
  summary = run.train(workdir, tiny_teacher, **{
      "data.name": "synthetic", "data.train_subset": 0, "model.name": "cnn_tiny", "teacher.model": "cnn_tiny",
      "batch_size": 32, "num_epochs": 1, "log.progress": False, "logit_mse.w_mse": 0.05})
  assert summary["finished"] and summary["method"] == "logit_mse" and 0 <= summary["accuracy"] <= 1
  assert summary["config"]["logit_mse.w_mse"] == 0.05  # its config group, from the class defaults
  records = report.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert "train_mse" in records[-1] and "teacher_accuracy" in records[-1]
