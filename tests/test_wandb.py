"""Weights & Biases logging (``log.wandb``, tgeo_jax/report.py) against a fake ``wandb`` module that records its
calls: the run's name, config and id, resuming into the same W&B run, the offline fallback without credentials,
one-line errors, and the records of a tiny in-process run."""

import os
import sys
import types

import pytest

from conftest import error_lines, run_inprocess, tiny_config
from tgeo_jax import report
from tgeo_jax.errors import UserError


class FakeRun:
  def __init__(self, calls):
    self.calls = calls

  def log(self, data, step=None):
    self.calls.append(("log", dict(data), step))

  def finish(self):
    self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch, tmp_path):
  """A ``wandb`` module whose ``init`` records its keyword arguments; ``module.calls`` lists every call. No
  credentials are visible (HOME without ``.netrc``, no WANDB_* variables) unless a test sets them."""
  calls = []
  module = types.ModuleType("wandb")
  module.calls = calls

  def init(**kwargs):
    calls.append(("init", kwargs))
    return FakeRun(calls)

  module.init = init
  monkeypatch.setitem(sys.modules, "wandb", module)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_BASE_URL"):
    monkeypatch.delenv(name, raising=False)
  return module


def inits(module):
  return [c[1] for c in module.calls if c[0] == "init"]


def test_writer_names_the_run_after_its_workdir_and_resumes_into_it(fake_wandb, monkeypatch, tmp_path):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  workdir = tmp_path / "kd_seed3"
  workdir.mkdir()
  config = {"method": "kd", "log": {"wandb": True}}
  writer = report.MetricWriter(str(workdir), wandb=True, config=config)
  writer.write({"kind": "train", "step": 5, "epoch": 0, "train_loss": 1.5, "note": "text"})
  writer.write({"kind": "eval", "step": 14, "epoch": 1, "accuracy": 0.25, "loss": float("nan")})
  writer.close()
  (first,) = inits(fake_wandb)
  run_id = (workdir / report.WANDB_ID_FILE).read_text().strip()
  assert first["name"] == "kd_seed3" and first["config"] == config and first["id"] == run_id
  assert first["resume"] == "allow" and first["dir"] == str(workdir) and first["project"] == "tgeo_jax"
  assert "mode" not in first  # WANDB_MODE is set: wandb reads it itself
  logs = [c[1:] for c in fake_wandb.calls if c[0] == "log"]
  # Numbers only (the NaN became the string "nan" in metrics.jsonl), prefixed by the record's kind, at its step.
  assert logs == [({"train/epoch": 0, "train/train_loss": 1.5}, 5), ({"eval/epoch": 1, "eval/accuracy": 0.25}, 14)]
  assert fake_wandb.calls[-1] == ("finish",)

  # A resumed run continues the same W&B run; a fresh start in the directory begins a new one.
  report.MetricWriter(str(workdir), resume_step=14, wandb=True, config=config).close()
  report.MetricWriter(str(workdir), wandb=True, config=config).close()
  resumed, fresh = inits(fake_wandb)[1:]
  assert resumed["id"] == run_id and fresh["id"] != run_id
  assert (workdir / report.WANDB_ID_FILE).read_text().strip() == fresh["id"]


def test_without_credentials_or_mode_it_logs_offline(fake_wandb, monkeypatch, tmp_path, capsys):
  report.MetricWriter(str(tmp_path), wandb=True).close()
  assert inits(fake_wandb)[0]["mode"] == "offline"
  assert "warning: log.wandb: no W&B API key" in capsys.readouterr().err
  monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
  monkeypatch.setenv("WANDB_PROJECT", "kd-sweep")
  report.MetricWriter(str(tmp_path), wandb=True).close()
  assert "mode" not in inits(fake_wandb)[1] and inits(fake_wandb)[1]["project"] == "kd-sweep"


def test_a_failing_init_is_one_line(fake_wandb, monkeypatch, tmp_path):
  monkeypatch.setenv("WANDB_MODE", "online")

  def init(**kwargs):
    raise RuntimeError("Network error (ConnectionError),\n entering retry loop")

  monkeypatch.setattr(fake_wandb, "init", init)
  with pytest.raises(UserError, match=r"^log.wandb: wandb.init failed \(RuntimeError: Network error "
                                      r"\(ConnectionError\), entering retry loop\); set WANDB_MODE=offline"):
    report.MetricWriter(str(tmp_path), wandb=True)


def test_tiny_run_logs_every_record(fake_wandb, monkeypatch, tmp_path, capsys):
  monkeypatch.setenv("WANDB_MODE", "disabled")
  rc, _, err = run_inprocess(tiny_config("ce", **{"log.wandb": True}), tmp_path / "run", capsys)
  assert rc == 0, err
  assert inits(fake_wandb), "trainer.setup passes wandb=config.log.wandb, config=config_dict to report.MetricWriter"
  (init,) = inits(fake_wandb)
  assert init["name"] == "run" and init["config"]["method"] == "ce" and init["config"]["log"]["wandb"] is True
  assert init["id"] == (tmp_path / "run" / report.WANDB_ID_FILE).read_text().strip()
  records = report.read_jsonl(os.path.join(tmp_path, "run", "metrics.jsonl"))
  logs = [c for c in fake_wandb.calls if c[0] == "log"]
  assert [step for _, _, step in logs] == [r["step"] for r in records]
  final = next(data for _, data, _ in reversed(logs) if "eval/accuracy" in data)
  assert final["eval/accuracy"] == report.evaluation_records(records)[-1]["accuracy"]
  assert fake_wandb.calls[-1] == ("finish",) and not error_lines(err)
