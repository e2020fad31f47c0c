"""One table across runs: ``python -m tgeo_jax.compare RUN_DIR... [--format=csv] [--sort=COLUMN] [--out=FILE]
[--plot=FILE.png]``.

Every ``RUN_DIR`` is a work directory of ``train.py`` (or a glob of them, quoted or expanded by the shell, e.g.
``'runs/*/'``). Finished runs are grouped by ``group_fingerprint`` from their ``summary.json`` (the run's identity
without the seed: config, data identity and teacher digests, see ``run_identity``), never by path, so runs of two
configurations never share a row. Per group: a label (method, model and the config fields that differ between the
groups), the number of seeds and, over the seeds, the mean ± sample standard deviation of the final test accuracy,
the best epoch's test accuracy, the validation accuracy, the teacher's test accuracy (when the runs have one), AUC
(tabular tasks) and the wall time. Below the table: every field whose value differs between the groups (flattened
config, data identity, teacher digests), with the groups that hold each value, and the unfinished runs (no
``summary.json`` or ``finished: false``), which are listed there and kept out of the table.

``--format=csv``: one row per group with raw fractions (``accuracy_mean``, ``accuracy_std``, ...), one column per
differing config field, the group fingerprint and the run directories; the notes then go to stderr, so stdout
stays plain CSV. ``--plot=FILE.png``: test accuracy (evaluation records) and training loss (training records,
else the evaluations' ``train_loss``) over steps, one line per run, one color and one legend entry per group,
unfinished runs dashed.

Bad input (a directory that is not a run, a pattern matching nothing, an unknown option) is one line on stderr and
exit status 2, as for ``train.py``. Reading runs imports no JAX: the table of a hundred runs takes well under a
second.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import glob
import io
import json
import os
import socket
import sys

import numpy as np

from tgeo_jax import report, run_identity
from tgeo_jax.errors import UserError

__all__ = ["RUN_FILES", "Metric", "METRICS", "SORT_KEYS", "LABEL_BASE_FIELDS", "LABEL_MAX_FIELDS", "Run",
           "is_run_dir", "expand", "load_run", "Group", "group_runs", "Difference", "ABSENT", "differences",
           "label_groups", "sort_groups", "shown_metrics", "markdown_table", "notes", "csv_table", "PLOT_SUFFIXES",
           "plot", "DESCRIPTION", "compare", "main"]

SUMMARY_FILE, FAILED_FILE, METRICS_FILE = "summary.json", "failed.json", "metrics.jsonl"
# Any of these marks a work directory; failed.json alone is a run bench/study.py rejected before it wrote the others.
RUN_FILES = (SUMMARY_FILE, run_identity.CONFIG_FILE, run_identity.IDENTITY_FILE, FAILED_FILE)


@dataclasses.dataclass(frozen=True)
class Metric:
  """A per-group statistic: ``key`` in summary.json, its markdown heading, the factor and decimals it is shown with,
  and whether the column is shown when no run has it."""
  key: str
  heading: str
  scale: float
  decimals: int
  always: bool


METRICS = (
    Metric("accuracy", "test acc %", 100, 2, True),
    Metric("best_accuracy", "best test acc %", 100, 2, True),
    Metric("val_accuracy", "val acc %", 100, 2, False),
    Metric("teacher_accuracy", "teacher acc %", 100, 2, False),
    Metric("auc", "test AUC", 1, 4, False),
    Metric("val_auc", "val AUC", 1, 4, False),
    Metric("seconds", "seconds", 1, 1, True),
)
SORT_KEYS = ("label", "seeds", *(m.key for m in METRICS))
# Already in every label's leading words; listed with the other differing fields, but never repeated in a label.
LABEL_BASE_FIELDS = ("method", "model.name")
LABEL_MAX_FIELDS = 4


# ------------------------------------------------------------------------------------------------ reading runs


@dataclasses.dataclass
class Run:
  """One work directory: ``summary`` is None for a run that never finished; ``config`` is the fingerprinted config,
  flattened (summary.json's, else identity.json's, else config.json's); ``status`` says why it is unfinished."""
  path: str
  summary: dict | None
  identity: dict | None
  config: dict
  status: str = ""

  @property
  def finished(self) -> bool:
    return not self.status

  @property
  def imported(self) -> dict | None:
    """``data.imported_from`` of a teacher made by ``python -m tgeo_jax.import_teacher`` (never trained here)."""
    return ((self.identity or {}).get("data") or {}).get("imported_from")

  @property
  def group_fingerprint(self) -> str | None:
    return (self.summary or {}).get("group_fingerprint") or (self.identity or {}).get("group_fingerprint")

  @property
  def fingerprint(self) -> str | None:
    return (self.summary or {}).get("fingerprint") or (self.identity or {}).get("fingerprint")

  def brief(self) -> str:
    """``method model seed N`` (what identifies an unfinished run in a list)."""
    method = (self.summary or {}).get("method") or self.config.get("method", "?")
    model = (self.summary or {}).get("model") or self.config.get("model.name", "?")
    return f"{method} {model} seed {self.config.get('seed', '?')}"


def is_run_dir(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, name)) for name in RUN_FILES)


def expand(patterns: list[str]) -> list[str]:
  """The run directories ``patterns`` name, in argument order (each glob's matches sorted), each once.

  A path to a run's ``summary.json`` / ``config.json`` stands for its directory; plain files that a glob matches
  (``runs/*`` also matching ``runs/notes.txt``) are passed over, since nobody asks to compare a text file.
  """
  paths, seen = [], set()
  for pattern in patterns:
    if glob.has_magic(pattern):
      matches = sorted(glob.glob(pattern, recursive=True))
      found = [m for m in matches if os.path.isdir(m) or os.path.basename(m) in RUN_FILES]
      if not found:
        what = "no matching directory" if not matches else f"matches only files ({matches[0]!r}, ...)"
        raise UserError(f"RUN_DIR {pattern!r}: {what}; expected work directories of train.py")
    elif os.path.isdir(pattern) or (os.path.isfile(pattern) and os.path.basename(pattern) in RUN_FILES):
      found = [pattern]
    elif os.path.exists(pattern):
      raise UserError(f"RUN_DIR {pattern!r}: is a file, expected a work directory of train.py")
    else:
      raise UserError(f"RUN_DIR {pattern!r}: no such directory")
    for path in found:
      if os.path.isfile(path):
        path = os.path.dirname(path) or "."
      path = path.rstrip(os.sep) or os.sep
      real = os.path.realpath(path)
      if real not in seen:
        seen.add(real)
        paths.append(path)
  return paths


def _not_a_run(path: str) -> UserError:
  # The usual slip is naming the folder that holds the runs: say which pattern would have worked.
  try:
    children = sum(1 for e in os.scandir(path) if e.is_dir() and is_run_dir(e.path))
  except OSError:
    children = 0
  hint = (f"; it holds {children} run director{'y' if children == 1 else 'ies'}: pass '{path.rstrip(os.sep)}/*/'"
          if children else "")
  return UserError(f"RUN_DIR {path!r}: not a run directory (no summary.json or config.json){hint}")


def load_run(path: str) -> Run:
  """The run in ``path``; a directory that holds no run, or a summary.json that cannot be read, is a UserError."""
  if not is_run_dir(path):
    raise _not_a_run(path)
  summary_path = os.path.join(path, SUMMARY_FILE)
  summary = None
  if os.path.exists(summary_path):
    summary = run_identity.read_json_file(summary_path)
    if summary is None:  # written atomically by the trainer: an unreadable one was damaged afterwards
      raise UserError(f"{summary_path}: not a JSON object (expected the summary a finished run writes); move the "
                      "run away or rerun it")
  identity = run_identity.read_json_file(os.path.join(path, run_identity.IDENTITY_FILE))
  if summary is not None and isinstance(summary.get("config"), dict):
    config = summary["config"]
  elif identity is not None and isinstance(identity.get("config"), dict):
    config = identity["config"]
  else:  # config.json is the resolved config, nested; a failed.json of bench/study.py holds the flattened record
    raw = run_identity.read_json_file(os.path.join(path, run_identity.CONFIG_FILE))
    failed = run_identity.read_json_file(os.path.join(path, FAILED_FILE)) or {}
    reads = None
    if raw and isinstance(raw.get("method"), str):  # the fields its method reads, as the trainer records them
      from tgeo_jax import methods
      reads = functools.partial(methods.reads_field, raw["method"])
    config = run_identity.config_record(raw, reads) if raw else failed.get("config") or {}
  run = Run(path, summary, identity, config)
  if summary is not None and summary.get("finished", True) and "failed" not in summary:
    for key in ("accuracy", "best_accuracy"):
      if _number(summary.get(key)) is None:
        raise UserError(f"{summary_path}: expected a number in {key!r}, got {summary.get(key)!r}")
    if not run.group_fingerprint:
      raise UserError(f"{summary_path}: records no group_fingerprint (a run written before tgeo_jax recorded run "
                      "identities): rerun it to compare it")
  elif run.imported:
    source = run.imported
    run.summary = None
    run.status = (f"imported teacher ({config.get('model.name', '?')}, {source.get('format', '?')} checkpoint "
                  f"{os.path.basename(str(source.get('file', '?')))}, sha256 {str(source.get('sha256', '?'))[:12]}); "
                  "not trained here: score it with python -m tgeo_jax.evaluate")
  else:
    run.summary, run.status = None, _unfinished_status(path, summary, config)
  return run


def _unfinished_status(path: str, summary: dict | None, config: dict) -> str:
  """Why the run is not in the table and how far it got (its last metrics record; whether its process lives)."""
  failed = run_identity.read_json_file(os.path.join(path, FAILED_FILE))
  if summary is not None:
    why = f"failed: {str(summary['failed']).splitlines()[0][:120]}" if "failed" in summary else \
        "summary.json says finished: false"
  elif failed is not None:
    why = f"failed: {str(failed.get('failed', '?')).splitlines()[0][:120]}"
  else:
    why = "no summary.json"
  checkpoint = _checkpoint_progress(path)
  if checkpoint:
    why += f"; {checkpoint}"
  records = _records(path) or []
  if records:
    last = records[-1]
    why += f"; last record at step {last.get('step', '?')}, epoch {last.get('epoch', '?')} of " \
           f"{config.get('num_epochs', '?')}"
    evals = [r for r in report.evaluation_records(records) if _number(r.get("accuracy")) is not None]
    if evals:
      why += f" (test accuracy {_number(evals[-1]['accuracy']):.4f} at epoch {evals[-1].get('epoch', '?')})"
  holder = _lock_holder(path)
  if holder:
    why += f"; {holder}"
  return why


def _checkpoint_progress(path: str) -> str:
  """``latest checkpoint at step S of T``, from the newest step directory under ``path/checkpoints``.

  Read as plain files (no orbax: the table stays JAX-free): the step is the directory's name, the total the
  ``meta`` item's JSON when it is there and readable; a layout this does not know just gives the step or nothing.
  """
  try:
    steps = [int(e.name) for e in os.scandir(os.path.join(path, "checkpoints")) if e.is_dir() and e.name.isdigit()]
  except OSError:
    return ""
  if not steps:
    return ""
  step = max(steps)
  meta = run_identity.read_json_file(os.path.join(path, "checkpoints", str(step), "meta", "metadata")) or {}
  total = meta.get("total_steps")
  return f"latest checkpoint at step {step}" + (f" of {total}" if isinstance(total, int) else "")


def _lock_holder(path: str) -> str:
  """``pid N is alive``, when the process that last locked the work directory still exists on this host.

  Only the lock file's text is read: taking the lock to probe it could refuse a run starting at that moment.
  """
  info = run_identity.read_json_file(os.path.join(path, run_identity.LOCK_FILE))
  if not info or info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
    return ""
  return f"its process (pid {info['pid']}) is alive: still running?" if run_identity.pid_alive(info["pid"]) else ""


def _records(path: str) -> list[dict] | None:
  """The records of ``path/metrics.jsonl``; None when there is none. A last line torn by a write in progress (a run
  still going) is dropped with a warning; any other bad line is a UserError naming the file."""
  metrics_path = os.path.join(path, METRICS_FILE)
  if not os.path.isfile(metrics_path):
    return None
  return [r for r in report.read_jsonl(metrics_path, torn_tail="drop") if isinstance(r, dict)]


def _number(value) -> float | None:
  """A metric as a float (report.py writes non-finite floats as the strings 'nan' / 'inf'); None if not a number."""
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, str):
    try:
      return float(value)
    except ValueError:
      return None
  return None


# ------------------------------------------------------------------------------------------------ grouping


@dataclasses.dataclass
class Group:
  """The finished runs of one ``group_fingerprint`` (one configuration, several seeds)."""
  fingerprint: str
  runs: list[Run]
  number: int = 0
  label: str = ""

  @property
  def config(self) -> dict:
    """The shared config, seed removed (equal in every run of the group: the fingerprint covers it)."""
    return {k: v for k, v in self.runs[0].config.items() if k != "seed"}

  @property
  def method(self) -> str:
    return str(self.runs[0].summary.get("method") or self.config.get("method", "?"))

  @property
  def model(self) -> str:
    return str(self.runs[0].summary.get("model") or self.config.get("model.name", "?"))

  def values(self, key: str) -> list[float]:
    return [v for v in (_number(r.summary.get(key)) for r in self.runs) if v is not None]

  def stat(self, key: str) -> tuple[float | None, float | None, int]:
    """``(mean, sample std, n)`` over the seeds that recorded ``key``; std is None for fewer than two."""
    values = self.values(key)
    if not values:
      return None, None, 0
    # numpy, not statistics: a NaN metric (a NaN AUC, say) stays NaN in the cell instead of raising.
    array = np.asarray(values, np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if len(values) > 1 else None), len(values)


def group_runs(runs: list[Run]) -> tuple[list[Group], list[str]]:
  """The finished runs grouped by fingerprint, in order of first appearance, and notes on runs counted once.

  Two directories with the same full fingerprint hold the same configuration and seed (a copied or re-run
  directory): averaging both would count one seed twice, so the first one named is kept.
  """
  groups: dict[str, Group] = {}
  kept: dict[str, Run] = {}
  notes = []
  for run in runs:
    if not run.finished:
      continue
    if run.fingerprint and run.fingerprint in kept:
      notes.append(f"{run.path}: the same configuration and seed as {kept[run.fingerprint].path} (fingerprint "
                   f"{run.fingerprint[:12]}); counted once")
      continue
    if run.fingerprint:
      kept[run.fingerprint] = run
    groups.setdefault(run.group_fingerprint, Group(run.group_fingerprint, [])).runs.append(run)
  return list(groups.values()), notes


def _data_identity(run: Run) -> dict:
  # identity.json's data record also holds each part's membership digest, which summary.json leaves out: two
  # groups that differ only in which examples they trained on still show a differing field.
  data = (run.identity or {}).get("data")
  return data if isinstance(data, dict) else (run.summary or {}).get("data") or {}


def _teacher_identities(run: Run) -> dict:
  teachers = (run.summary or {}).get("teachers") or (run.identity or {}).get("teachers") or []
  return {f"teacher {t.get('field', '?')}": f"{t.get('model')} {str(t.get('variables_sha256'))[:12]}"
          for t in teachers if isinstance(t, dict)}


@dataclasses.dataclass
class Difference:
  """A field whose value differs between groups: ``values[i]`` is group ``i``'s, already formatted."""
  name: str
  kind: str  # "config", "data" or "teacher"
  values: list[str]


ABSENT = "<absent>"


def differences(groups: list[Group]) -> list[Difference]:
  """Every field (config without the seed, data identity, teacher identities) whose value differs between groups."""
  if len(groups) < 2:
    return []
  out = []
  sources = (("config", [g.config for g in groups]),
             ("data", [run_identity.flatten(_data_identity(g.runs[0]), "data ") for g in groups]),
             ("teacher", [_teacher_identities(g.runs[0]) for g in groups]))
  for kind, dicts in sources:
    # Data digests print as their first 12 hex digits (as the resume message does); config values in full.
    fmt = _value if kind == "config" else _short_digest
    for name in sorted(set().union(*dicts)):
      values = [fmt(d[name]) if name in d else ABSENT for d in dicts]
      if len(set(values)) > 1:
        out.append(Difference(name, kind, values))
  return out


def _value(value) -> str:
  """A config value as one would write it in a ``--config.FIELD=VALUE`` override."""
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, dict)):
    return json.dumps(value, separators=(",", ":"))
  return str(value)


def _short_digest(value) -> str:
  return value[:12] if isinstance(value, str) and len(value) == 64 else _value(value)


def label_groups(groups: list[Group], diffs: list[Difference]) -> None:
  """Sets each group's label: ``method model, field=value, ...`` with the differing config fields (a field by its
  last name when that is unambiguous), then, for labels still equal, the data and teacher digests that tell apart."""
  from tgeo_jax import methods
  fields = [d for d in diffs if d.kind == "config" and d.name not in LABEL_BASE_FIELDS]
  last = [d.name.rsplit(".", 1)[-1] for d in fields]
  names = [short if last.count(short) == 1 else d.name for d, short in zip(fields, last)]

  def label(i, group, only_read):
    # A field of a method the run does not use (another method's group, a validation batch it never draws) is
    # left out unless it is what tells two groups apart.
    parts = [f"{n}={d.values[i]}" for n, d in zip(names, fields)
             if not only_read or methods.reads_field(group.method, d.name)]
    shown = parts[:LABEL_MAX_FIELDS] + ([f"+{len(parts) - LABEL_MAX_FIELDS} more"] if len(parts) > LABEL_MAX_FIELDS
                                       else [])
    return ", ".join([f"{group.method} {group.model}", *shown])

  for i, group in enumerate(groups):
    group.label = label(i, group, only_read=True)
  read_labels = [g.label for g in groups]
  for i, group in enumerate(groups):
    if read_labels.count(read_labels[i]) > 1:
      group.label = label(i, group, only_read=False)
  for kind, word in (("data", "data"), ("teacher", "teacher")):
    for d in (d for d in diffs if d.kind == kind):
      labels = [g.label for g in groups]
      for i, group in enumerate(groups):
        twins = [j for j, other in enumerate(labels) if other == labels[i] and j != i]
        if twins and any(d.values[j] != d.values[i] for j in twins):
          group.label += f", {word} {d.values[i].split()[-1]}"


def sort_groups(groups: list[Group], key: str) -> list[Group]:
  """``key``: a SORT_KEYS column, ascending; ``-key`` descending. Groups without a value come last either way."""
  descending = key.startswith("-")
  name = key.lstrip("-")
  if name == "label":
    return sorted(groups, key=lambda g: g.label, reverse=descending)
  if name == "seeds":
    return sorted(groups, key=lambda g: len(g.runs), reverse=descending)
  have = [g for g in groups if g.stat(name)[0] is not None]
  missing = [g for g in groups if g.stat(name)[0] is None]
  return sorted(have, key=lambda g: g.stat(name)[0], reverse=descending) + missing


# ------------------------------------------------------------------------------------------------ output


def shown_metrics(groups: list[Group]) -> list[Metric]:
  return [m for m in METRICS if m.always or any(g.values(m.key) for g in groups)]


def _cell(group: Group, metric: Metric) -> str:
  mean, std, n = group.stat(metric.key)
  if mean is None:
    return "–"
  text = f"{metric.scale * mean:.{metric.decimals}f}"
  if std is not None:
    text += f" ± {metric.scale * std:.{metric.decimals}f}"
  if n < len(group.runs):
    text += f" ({n} of {len(group.runs)})"
  return text


def _md_row(cells: list[str], widths: list[int]) -> str:
  # Numbers right-aligned (as the rule's colons ask a renderer to), the label left: readable as plain text too.
  return "| " + " | ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"


def markdown_table(groups: list[Group]) -> str:
  metrics = shown_metrics(groups)
  head = ["#", "runs", "seeds", *(m.heading for m in metrics)]
  rows = [[str(g.number), g.label.replace("|", "\\|"), str(len(g.runs)), *(_cell(g, m) for m in metrics)]
          for g in groups]
  widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
  rule = "|" + "|".join(("-" * (w + 1) + ":") if i != 1 else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
  return "\n".join([_md_row(head, widths), rule, *(_md_row(r, widths) for r in rows)])


def _by_value(values: list[str], numbers: list[int]) -> str:
  """``0.1 in 1, 3; 0.05 in 2``: each value with the groups that hold it."""
  holders: dict[str, list[str]] = {}
  for value, number in zip(values, numbers):
    holders.setdefault(value, []).append(str(number))
  return "; ".join(f"{value} in {', '.join(nums)}" for value, nums in holders.items())


def notes(runs: list[Run], groups: list[Group], diffs: list[Difference], duplicate_notes: list[str]) -> list[str]:
  """The lines below the table: what differs between the groups, duplicates, unfinished runs (markdown list)."""
  lines = []
  numbers = [g.number for g in groups]
  if len(groups) == 1 and len(groups[0].runs) == 1:
    lines.append(f"One finished run (group fingerprint {groups[0].fingerprint[:12]}).")
  elif len(groups) == 1:
    lines.append(f"All {len(groups[0].runs)} finished runs share one configuration (group fingerprint "
                 f"{groups[0].fingerprint[:12]}); they differ only in seed.")
  elif groups:
    lines.append("Fields that differ between the groups (value in group numbers):")
    lines += [f"- `{d.name}`: {_by_value(d.values, numbers)}" for d in diffs]
    if not diffs:  # the fingerprints cover more than the records read here (e.g. a hand-edited summary.json)
      lines.append("- none that summary.json or identity.json records: compare the runs' identity.json files")
  if duplicate_notes:
    lines += ["", "Counted once:", *(f"- {n}" for n in duplicate_notes)]
  imported = [r for r in runs if r.imported]
  if imported:
    lines += ["", f"Imported teachers (not in the table): {len(imported)}"]
    lines += [f"- {r.path}: {r.status}" for r in imported]
  unfinished = [r for r in runs if not r.finished and not r.imported]
  if unfinished:
    by_fp = {g.fingerprint: g.number for g in groups}
    lines += ["", f"Unfinished runs (not in the table): {len(unfinished)}"]
    for r in unfinished:
      group = f" (group {by_fp[r.group_fingerprint]})" if r.group_fingerprint in by_fp else ""
      lines.append(f"- {r.path}: {r.brief()}{group}: {r.status}")
  return lines


def csv_table(groups: list[Group], diffs: list[Difference]) -> str:
  metrics = shown_metrics(groups)
  fields = [d for d in diffs if d.kind == "config"]
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(["group", "label", "method", "model", "seeds",
                   *(f"{m.key}_{s}" for m in metrics for s in ("mean", "std")),
                   *(d.name for d in fields), "seed_values", "group_fingerprint", "run_dirs"])
  for i, g in enumerate(groups):
    stats = [v for m in metrics for v in g.stat(m.key)[:2]]
    writer.writerow([g.number, g.label, g.method, g.model, len(g.runs), *("" if v is None else repr(v) for v in stats),
                     *(d.values[i] for d in fields), ";".join(str(r.config.get("seed", "")) for r in g.runs),
                     g.fingerprint, ";".join(r.path for r in g.runs)])
  return buf.getvalue()


# ------------------------------------------------------------------------------------------------ plot


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def _require_matplotlib():
  try:
    from matplotlib.figure import Figure
  except ImportError:
    raise UserError("--plot: needs matplotlib, a dependency of tgeo_jax: pip install 'matplotlib>=3.8'") from None
  return Figure


def _curves(records: list[dict]) -> tuple[list, list]:
  """``(test accuracy, training loss)`` as ``[(step, value)]``: training loss from the training records (every
  log.every_steps), else the per-epoch averages the evaluation records carry (a run logged before the kinds)."""
  evals = report.evaluation_records(records)
  acc = [(r.get("step"), _number(r.get("accuracy"))) for r in evals]
  loss = [(r.get("step"), _number(r.get("train_loss"))) for r in records if r.get("kind") == "train"]
  if not any(v is not None for _, v in loss):
    loss = [(r.get("step"), _number(r.get("train_loss"))) for r in evals]
  keep = lambda pts: [(s, v) for s, v in pts if isinstance(s, (int, float)) and v is not None]  # noqa: E731
  return keep(acc), keep(loss)


def plot(path: str, runs: list[Run], groups: list[Group]) -> list[str]:
  """Draws every run's curves into ``path``; returns notes on runs without curves."""
  figure_cls = _require_matplotlib()
  from matplotlib.lines import Line2D
  fig = figure_cls(figsize=(11, 4.8), layout="constrained")
  ax_acc, ax_loss = fig.subplots(1, 2)
  colors = [f"C{i % 10}" for i in range(len(groups))]
  group_of = {g.fingerprint: i for i, g in enumerate(groups)}
  skipped, drew_unfinished = [], False
  for run in runs:
    records = _records(run.path)
    if not records:
      skipped.append(f"{run.path}: no metrics.jsonl records, not plotted")
      continue
    i = group_of.get(run.group_fingerprint)  # an unfinished run of a tabled configuration: that group's color
    color = colors[i] if i is not None else "0.5"
    style = "-" if run.finished else "--"
    drew_unfinished |= not run.finished
    for ax, points in zip((ax_acc, ax_loss), _curves(records)):
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, style, color=color, linewidth=1.2, alpha=0.85,
                marker="o" if len(points) < 12 else None, markersize=3)
  handles = [Line2D([], [], color=c, label=f"{g.number}: {g.label} ({len(g.runs)} seed{'s' * (len(g.runs) > 1)})")
             for g, c in zip(groups, colors)]
  if drew_unfinished:
    handles.append(Line2D([], [], color="0.5", linestyle="--", label="unfinished (dashed)"))
  ax_acc.set(xlabel="step", ylabel="test accuracy", title="test accuracy (evaluations)")
  ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
  for ax in (ax_acc, ax_loss):
    ax.grid(alpha=0.3)
  if handles:
    fig.legend(handles=handles, loc="outside lower center", ncols=1 if len(handles) > 4 else 2, fontsize="small")
  try:
    fig.savefig(path, dpi=120)
  except OSError as e:
    raise UserError(f"--plot: cannot write {path!r} ({e.strerror or e})") from None
  return skipped


# ------------------------------------------------------------------------------------------------ command line


DESCRIPTION = ("One table across runs: finished runs grouped by configuration minus the seed (summary.json's "
               "group_fingerprint), per group the mean ± std over seeds of test, best, validation and teacher "
               "accuracy and wall time; then the fields that differ between the groups and the unfinished runs. "
               "Reference: docs/compare.md.")


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one ``UserError`` line (argparse prints its usage too, and exits on its own)."""

  def error(self, message):
    if "--sort" in message and "expected one argument" in message:  # `--sort -accuracy` reads as an option
      message += " (a descending sort is written --sort=-COLUMN)"
    raise UserError(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m tgeo_jax.compare", description=DESCRIPTION)
  p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="work directories of train.py, or globs ('runs/*/')")
  p.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="table format (markdown)")
  p.add_argument("--sort", default=None, metavar="COLUMN",
                 help=f"sort groups by COLUMN ascending, -COLUMN descending (--sort=-accuracy); one of {', '.join(SORT_KEYS)}; "
                      "default: the order the runs are named in")
  p.add_argument("--out", default=None, metavar="FILE", help="write the table (and its notes) to FILE")
  p.add_argument("--plot", default=None, metavar="FILE.png",
                 help="training curves of the selected runs (test accuracy, training loss over steps)")
  return p


def _check_output_path(option: str, path: str) -> None:
  # Checked before anything is read or drawn, so a typo costs nothing and leaves no half-written output.
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise UserError(f"{option}: {path!r} is a directory, expected a file path")
  if not os.path.isdir(directory):
    raise UserError(f"{option}: the directory of {path!r} does not exist")


def compare(args) -> tuple[str, list[str], list[str]]:
  """``(document, notes for stderr, messages)`` for parsed ``args``: the table (and, in markdown, its notes)."""
  runs = [load_run(path) for path in expand(args.run_dirs)]
  groups, duplicate_notes = group_runs(runs)
  diffs = differences(groups)
  label_groups(groups, diffs)
  if args.sort:
    groups_sorted = sort_groups(groups, args.sort)
    order = [groups.index(g) for g in groups_sorted]
    diffs = [dataclasses.replace(d, values=[d.values[i] for i in order]) for d in diffs]
    groups = groups_sorted
  for number, group in enumerate(groups, 1):
    group.number = number
  lines = notes(runs, groups, diffs, duplicate_notes)
  messages = plot(args.plot, runs, groups) if args.plot else []
  if args.format == "csv":
    return (csv_table(groups, diffs) if groups else ""), [line for line in lines if line.strip()], messages
  head = [markdown_table(groups), "",
          "Mean ± sample std over seeds (no ± for one seed); test acc: last epoch; best: best epoch; seconds: wall "
          "time per run."] if groups else [f"No finished run among the {len(runs)} selected."]
  return "\n".join([*head, *([""] if lines else []), *lines]) + "\n", [], messages


def main(argv: list[str] | None = None) -> int:
  """``python -m tgeo_jax.compare ARGS`` (``argv`` without the program name); returns the exit status."""
  argv = sys.argv[1:] if argv is None else argv
  parser = _parser()
  if any(a in ("-h", "--help") for a in argv):
    parser.print_help()
    return 0
  try:
    args = parser.parse_args(argv)
    if args.sort is not None and args.sort.lstrip("-") not in SORT_KEYS:
      raise UserError(f"--sort: unknown column {args.sort!r}; expected one of {', '.join(SORT_KEYS)} "
                      "(prefix - for descending)")
    if args.out:
      _check_output_path("--out", args.out)
    if args.plot:
      _check_output_path("--plot", args.plot)
      if os.path.splitext(args.plot)[1].lower() not in PLOT_SUFFIXES:
        raise UserError(f"--plot: expected a {'/'.join(PLOT_SUFFIXES)} file, got {args.plot!r}")
      _require_matplotlib()
    document, stderr_notes, messages = compare(args)
    if args.out:
      try:
        with open(args.out, "w", encoding="utf-8") as f:
          f.write(document)
      except OSError as e:
        raise UserError(f"--out: cannot write {args.out!r} ({e.strerror or e})") from None
      messages.append(f"wrote {args.out}")
    else:
      sys.stdout.write(_encodable(document, sys.stdout))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for line in stderr_notes:
    print(f"note: {line.removeprefix('- ')}", file=sys.stderr)
  for line in messages:
    print(line if line.startswith("wrote") else f"note: {line}", file=sys.stderr)
  if args.plot:
    print(f"wrote {args.plot}", file=sys.stderr)
  return 0


def _encodable(text: str, stream) -> str:
  """``text`` as ``stream`` can print it: on a non-UTF-8 terminal (``LANG=C``) "±" becomes "+-" and any other
  character the encoding lacks a "?", instead of a UnicodeEncodeError."""
  encoding = getattr(stream, "encoding", None) or "utf-8"
  try:
    text.encode(encoding)
    return text
  except (UnicodeEncodeError, LookupError):
    text = text.replace("±", "+-").replace("–", "-")
    try:
      return text.encode(encoding, errors="replace").decode(encoding)
    except LookupError:
      return text


if __name__ == "__main__":
  sys.exit(main())
