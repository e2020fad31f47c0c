"""Run outputs: ``metrics.jsonl``, optional TensorBoard, ``summary.json``.

``metrics.jsonl`` holds one JSON object per line, in step order, of two kinds: ``"kind": "eval"`` at every epoch
end (test metrics, the method's epoch report, the last training averages) and ``"kind": "train"`` every
``log.every_steps`` (the training averages since the previous one, ``steps_per_second``, ``examples_per_second``,
measured between host syncs and excluding evaluation). ``evaluation_records`` selects the first kind.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np


def _jsonable(value):
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.item() if np.ndim(value) == 0 else value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricWriter:
  """Appends records to ``workdir/metrics.jsonl`` (and TensorBoard when asked).

  On resume from step ``s``, records of steps after ``s`` (written before a crash that lost their checkpoint) are
  dropped, and so is a last line torn by a kill during its write (with a warning), so the file always describes
  exactly the run that continues. ``records``: the records kept.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = False):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.records: list[dict] = []
    if resume_step is not None and os.path.exists(self.path):
      self.records = [r for r in read_jsonl(self.path, torn_tail="drop") if r.get("step", 0) <= resume_step]
      _atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
    elif resume_step is None and os.path.exists(self.path):
      os.remove(self.path)
    self.tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # optional extra: pip install 'tgeo_jax[tensorboard]'
      except ImportError:
        raise ImportError("log.tensorboard=True needs tensorboardX: pip install 'tgeo_jax[tensorboard]'") from None
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict) -> None:
    record = {k: _jsonable(v) for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self.records.append(record)
    if self.tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step":
          self.tb.add_scalar(k, v, record["step"])
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def evaluation_records(records: list[dict]) -> list[dict]:
  """The epoch-end evaluation records of ``metrics.jsonl`` (written before the kinds existed: no ``kind``)."""
  return [r for r in records if r.get("kind", "eval") == "eval"]


def read_jsonl(path: str, *, torn_tail: str = "error") -> list[dict]:
  """The JSON objects of a JSON-lines file. ``torn_tail='drop'``: a last line that a kill cut short (no final
  newline, not JSON) is dropped with a warning on stderr; any other bad line is a ``UserError`` naming it."""
  from tgeo_jax.errors import UserError
  with open(path) as f:
    text = f.read()
  lines = text.split("\n")
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError:
      if torn_tail == "drop" and number == len(lines) and not text.endswith("\n"):
        import sys
        print(f"warning: {path}: dropped a last line cut short by an interrupted write ({len(line)} bytes)",
              file=sys.stderr, flush=True)
        continue
      raise UserError(f"{path}: line {number} is not a JSON record; move the file away to continue") from None
  return records


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _atomic_write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj: dict) -> None:
  _atomic_write(path, json.dumps({k: _jsonable(v) for k, v in obj.items()}, indent=2) + "\n")


def format_table(rows: list[dict], columns: list[str]) -> str:
  """A plain-text table (used by the demo and the benchmarks)."""
  cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _fmt(v):
  if isinstance(v, float):
    return f"{v:.4f}"
  return str(v)
