"""python -m tgeo_jax.evaluate: a finished run's model scored on its task's test and validation parts, read-only,
equal to what the run itself measured; bad input one line."""

import json
import os

from conftest import TINY
from tgeo_jax import evaluate


def run_evaluate(argv, capsys):
  capsys.readouterr()
  rc = evaluate.main(["python -m tgeo_jax.evaluate", *argv])
  out, err = capsys.readouterr()
  return rc, out, err


def test_scores_a_run_as_its_own_final_evaluation(tiny_teacher, capsys):
  before = sorted(os.listdir(tiny_teacher))
  rc, out, err = run_evaluate(["--config=configs/fashion_mnist.py:teacher", f"--workdir={tiny_teacher}", *TINY,
                               "--config.model.name=cnn_tiny"], capsys)
  assert rc == 0, err
  with open(os.path.join(tiny_teacher, "summary.json")) as f:
    summary = json.load(f)
  lines = out.splitlines()
  assert [line.split(" (")[0].rsplit(" ", 1)[0] for line in lines] == [
      "test accuracy", "test loss", "validation accuracy", "validation loss"]
  test_accuracy = float(lines[0].split()[2])
  assert abs(test_accuracy - summary["accuracy"]) < 5e-5, (lines[0], summary["accuracy"])  # the run's own number
  assert lines[0].endswith(f"({summary['data']['sizes']['test']} examples)")
  assert abs(float(lines[1].split()[2]) - summary["loss"]) < 5e-5
  assert sorted(os.listdir(tiny_teacher)) == before  # nothing written


def test_bad_workdir_is_one_line(tmp_path, capsys):
  rc, out, err = run_evaluate(["--config=configs/fashion_mnist.py:teacher", f"--workdir={tmp_path / 'none'}",
                               *TINY], capsys)
  assert rc == 2 and out == ""
  assert err == f"error: --workdir: no checkpoint directory {str(tmp_path / 'none')!r}\n"
