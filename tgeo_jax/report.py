"""Run outputs: ``metrics.jsonl``, optional TensorBoard and Weights & Biases, ``summary.json``.

``metrics.jsonl`` holds one JSON object per line, in step order, of two kinds: ``"kind": "eval"`` at every epoch
end (test metrics, the method's epoch report, the last training averages) and ``"kind": "train"`` every
``log.every_steps`` (the training averages since the previous one, ``steps_per_second``, ``examples_per_second``,
measured between host syncs and excluding evaluation). ``evaluation_records`` selects the first kind.

Weights & Biases (``log.wandb=True``, optional extra ``pip install 'tgeo_jax[wandb]'``): the same records, their
numbers logged as ``eval/NAME`` / ``train/NAME`` at the record's step, under a W&B run named after the work
directory whose config is the run's resolved config. Its id is kept in ``WORKDIR/wandb_run_id``, so a resumed run
continues the same W&B run (``resume="allow"``) and a fresh start in the directory begins a new one. W&B's own
files go to ``WORKDIR/wandb``; the project is ``$WANDB_PROJECT`` or ``tgeo_jax``; ``WANDB_MODE`` (online, offline,
disabled) is respected, and without it and without an API key (``WANDB_API_KEY`` or ``wandb login``) the run logs
offline with a one-line warning instead of stopping at a login prompt (upload later with ``wandb sync``). W&B cannot
rewind a run: points logged after the checkpoint a crashed run resumes from stay in its history (W&B drops the
resumed run's re-logged steps below its last one with a warning); ``metrics.jsonl`` is the exact record.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import sys

import numpy as np

from tgeo_jax import fileio

__all__ = ["WANDB_ID_FILE", "WANDB_DEFAULT_PROJECT", "start_wandb", "MetricWriter", "evaluation_records",
           "read_jsonl", "read_json", "write_json", "format_table"]


def _jsonable(value):
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.item() if np.ndim(value) == 0 else value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


WANDB_ID_FILE = "wandb_run_id"
WANDB_DEFAULT_PROJECT = "tgeo_jax"


def _has_wandb_credentials() -> bool:
  """An API key in the environment or in ``~/.netrc`` (where ``wandb login`` stores it)."""
  if os.environ.get("WANDB_API_KEY"):
    return True
  host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
  try:
    return netrc.netrc().authenticators(host) is not None
  except (OSError, netrc.NetrcParseError):
    return False


def start_wandb(workdir: str, config: dict | None, *, resume: bool):
  """``wandb.init`` for the run in ``workdir`` (see the module docstring); returns the W&B run object.

  ``resume``: continue the run whose id ``WORKDIR/wandb_run_id`` holds (a fresh start writes a new id first, so a
  crash at any point later still resumes into it). A failing ``wandb.init`` is a one-line ``UserError``.
  """
  from tgeo_jax.errors import UserError
  try:
    import wandb  # optional extra: pip install 'tgeo_jax[wandb]'
  except ImportError:
    raise UserError("log.wandb: True needs wandb: pip install 'tgeo_jax[wandb]' (or set log.wandb=False)") from None
  id_path = os.path.join(workdir, WANDB_ID_FILE)
  run_id = None
  if resume and os.path.exists(id_path):
    with open(id_path) as f:
      run_id = f.read().strip() or None
  if run_id is None:
    run_id = secrets.token_hex(8)
    _atomic_write(id_path, run_id + "\n")
  kwargs = {}
  if "WANDB_MODE" not in os.environ and not _has_wandb_credentials():
    kwargs["mode"] = "offline"
    print(f"warning: log.wandb: no W&B API key (WANDB_API_KEY or `wandb login`) and no WANDB_MODE: logging offline "
          f"to {os.path.join(workdir, 'wandb')} (upload with `wandb sync`)", file=sys.stderr, flush=True)
  os.makedirs(os.path.join(workdir, "wandb"), exist_ok=True)
  try:
    return wandb.init(project=os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT,
                      name=os.path.basename(os.path.normpath(os.path.abspath(workdir))), id=run_id, resume="allow",
                      config=config or {}, dir=workdir, **kwargs)
  except Exception as e:  # noqa: BLE001 - wandb raises its own types (CommError, UsageError, ...)
    message = " ".join(str(e).split())[:200]
    raise UserError(f"log.wandb: wandb.init failed ({type(e).__name__}: {message}); set WANDB_MODE=offline to log "
                    "locally, or log.wandb=False") from None


def _is_primary_process() -> bool:
  import jax
  return jax.process_index() == 0


class MetricWriter:
  """Appends records to ``workdir/metrics.jsonl`` (and TensorBoard / Weights & Biases when asked).

  On resume from step ``s``, records of steps after ``s`` (written before a crash that lost their checkpoint) are
  dropped, and so is a last line torn by a kill during its write (with a warning), so the file always describes
  exactly the run that continues. ``records``: the records kept. ``wandb``: log to W&B as well (process 0 only;
  ``config``, the resolved config as a JSON dict, becomes the W&B run's config).
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = False,
               wandb: bool = False, config: dict | None = None):
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
    self.wandb_run = None
    if wandb and _is_primary_process():
      self.wandb_run = start_wandb(workdir, config, resume=resume_step is not None)

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
    if self.wandb_run is not None:
      kind = record.get("kind", "eval")
      numbers = {f"{kind}/{k}": v for k, v in record.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
      self.wandb_run.log(numbers, step=record["step"])

  def close(self):
    if self.tb is not None:
      self.tb.close()
    if self.wandb_run is not None:
      self.wandb_run.finish()
      self.wandb_run = None


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


read_json = fileio.read_json
_atomic_write = fileio.write_text  # fsynced, the temporary named by process and thread


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
