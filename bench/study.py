"""The Fashion-MNIST study: a strong teacher, every method, several seeds, three data settings, α analytics.

    python bench/study.py --workdir runs/study2 --out bench/results/study2_X.json \
        [--settings full,subset10,noise20] [--students mlp,cnn_small] [--seeds 3] [--methods ...] \
        [--teacher teachers/fmnist_cnn_deep_fc] [--archive bench/results/study3_runs] [--worker 0]

What runs, in order (each run is an ordinary ``train.py`` run in its own work directory, so the study resumes:
finished runs are read back after their config fingerprint and teacher digest are checked, an interrupted one
continues from its checkpoint):

1. **Teacher**: the committed ``--teacher`` directory (``configs/fashion_mnist.py:strong_teacher``, exported with
   ``python -m tgeo_jax.export_teacher``); its variables' sha256 must equal ``--teacher_sha256`` (by default the committed teacher's,
   ``COMMITTED_TEACHERS``).
2. **Learning rate** per (setting, student): CE at seed 0 for every rate of ``--lr_grid``; the rate with the best
   *validation* accuracy is used for every method. A method that diverges at that rate (a non-finite step, or a
   validation accuracy below half of CE's) is re-run at the next smaller rate of the grid until one is stable.
3. **Methods** x seeds: CE, KD with α (the weight of the teacher term) in {0.1, 0.3, 0.5, 0.7, 0.9}, ANL-, ADA-,
   WLS-, RW-KD, DIST, DKD, TGeo-KD with each hypergradient (``one_step``, ``unroll`` K = 4, ``implicit``,
   ``head_only``).
4. **Derived** (after 3): ``kd_best`` = the α of the grid with the best mean *validation* accuracy over the seeds
   (the main control; no new runs), ``kd_trainval`` = KD at that α on train + validation (the labels TGeo-KD
   learns from, used as training data), ``kd_tgeo_mean_alpha`` = KD at the mean α TGeo-KD (one_step) learned over
   its epochs and seeds, ``tgeo_center`` = TGeo-KD whose α is centred per batch on the best constant α (mean α
   fixed to the control's, only the per-sample spread learned).

Settings: ``full`` (the 54,000-example training part), ``subset10`` (a 10% stratified subset: 5,400 training
and 600 validation examples), ``noise20`` (the full training part with 20% symmetric label noise on the
student's training labels; the teacher, validation and test labels are clean).

Statistics: test accuracy at the last epoch and the best epoch, mean ± std over seeds; Welch's t-test of each
method's last-epoch accuracy against ``kd_best``'s (scipy). The JSON has every run's summary, the chosen rates and
α, the α-by-group records per epoch and the wall time. Several processes may share one ``--workdir`` (start each
with its own ``--worker i``): a run is claimed by creating its ``.claim`` file, a claim of a dead process is taken
over; each process first takes every free run of the named methods (a job queue across methods), then waits
for the others' runs it needs.

The first study (a 3-epoch ``cnn_medium`` teacher at 88.8%, weaker than the CNN student) is docs/history/study_v1.md,
produced by this script as of commit e97d303 (`git show e97d303:bench/study.py`).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tgeo_jax import default_config, run_identity  # noqa: E402 (after the path set-up; imports no JAX)

# ----------------------------------------------------------------------------------------------- the design

# setting -> data overrides and the training schedule of the students in it.
SETTINGS = {
    "full": dict(overrides={"data.train_subset": 0}, batch_size=128, num_epochs=5),
    "subset10": dict(overrides={"data.train_subset": 5400, "data.val_subset": 600}, batch_size=64, num_epochs=10),
    "noise20": dict(overrides={"data.train_subset": 0, "data.label_noise": 0.2}, batch_size=128, num_epochs=5),
    # The fourth study (docs/study4.md): the full training part, clean labels, and the study-only teacher made
    # confidently wrong on a known set S (tgeo_jax/study_teacher.py): a random 30% of the examples, or every
    # example of the first three classes (also 30%). CE, which reads no teacher, runs without it.
    "wrong30": dict(overrides={"data.train_subset": 0, "study_wrong_teacher.kind": "random_examples",
                               "study_wrong_teacher.fraction": 0.3}, batch_size=128, num_epochs=5),
    "wrongcls": dict(overrides={"data.train_subset": 0, "study_wrong_teacher.kind": "classes",
                                "study_wrong_teacher.classes": (0, 1, 2)}, batch_size=128, num_epochs=5),
    # The same on subset10's training part, where the (clean) teacher is worth 1.5 points over CE to the MLP (the
    # third study); on the full part it is worth 0.08, which leaves a per-sample α nothing to gain.
    "s10_wrong30": dict(overrides={"data.train_subset": 5400, "data.val_subset": 600,
                                   "study_wrong_teacher.kind": "random_examples", "study_wrong_teacher.fraction": 0.3},
                        batch_size=64, num_epochs=10),
    "s10_wrongcls": dict(overrides={"data.train_subset": 5400, "data.val_subset": 600,
                                    "study_wrong_teacher.kind": "classes", "study_wrong_teacher.classes": (0, 1, 2)},
                         batch_size=64, num_epochs=10),
}
WRONG_TEACHER_SETTINGS = ("wrong30", "wrongcls", "s10_wrong30", "s10_wrongcls")

# α: the weight of the teacher term, KD = (1 - α) CE + α τ² KL (the library's kd.w_ce / kd.w_kd).
ALPHA_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)


def kd_at(alpha: float) -> dict:
  return {"method": "kd", "kd.w_kd": alpha, "kd.w_ce": round(1 - alpha, 6)}


# name -> config overrides (on configs/fashion_mnist.py:<method>).
METHODS = {
    "ce": {"method": "ce"},
    **{f"kd_a{a:g}": kd_at(a) for a in ALPHA_GRID},
    # The fourth study's oracle grid: α = 0 on the teacher's wrong set S, α elsewhere (wrong-teacher settings only).
    **{f"kd_oracle_a{a:g}": dict(kd_at(a), **{"study_wrong_teacher.oracle": True}) for a in ALPHA_GRID},
    "anl_kd": {"method": "anl_kd"},
    "ada_kd": {"method": "ada_kd"},
    "wls_kd": {"method": "wls_kd"},
    "rw_kd": {"method": "rw_kd"},
    "dist": {"method": "dist"},
    "dkd": {"method": "dkd"},
    "tgeo": {"method": "tgeo"},  # hypergrad one_step (the default)
    "tgeo_unroll4": {"method": "tgeo", "tgeo.hypergrad": "unroll", "tgeo.unroll_steps": 4},
    "tgeo_unroll8": {"method": "tgeo", "tgeo.hypergrad": "unroll", "tgeo.unroll_steps": 8},
    # Horizon or speed: unroll K = 4 updates φ once per 4 steps; with a 4x fusion learning rate φ moves as fast per
    # student step as one_step's.
    "tgeo_unroll4_flr4": {"method": "tgeo", "tgeo.hypergrad": "unroll", "tgeo.unroll_steps": 4,
                          "tgeo.fusion_lr": 4e-3},
    "tgeo_implicit": {"method": "tgeo", "tgeo.hypergrad": "implicit"},
    # The default Neumann step η = 0.1 diverges on the MLP (η λ_max(H) > 2); a smaller step keeps the series bounded.
    "tgeo_implicit_eta0.01": {"method": "tgeo", "tgeo.hypergrad": "implicit", "tgeo.implicit_lr": 0.01},
    # On a CNN an implicit meta step costs ~60x a KD step on XLA:CPU (docs/benchmarks.md): one meta step every 5.
    "tgeo_implicit_eta0.01_m5": {"method": "tgeo", "tgeo.hypergrad": "implicit", "tgeo.implicit_lr": 0.01,
                                 "tgeo.meta_interval": 5},
    "tgeo_head_only": {"method": "tgeo", "tgeo.hypergrad": "head_only"},
    # The paper's outlier probe: Gaussian-noise images with random labels appended to the training part.
    "tgeo_outliers": {"method": "tgeo", "data.outliers": 500},
}
DERIVED = ("kd_best", "kd_trainval", "kd_tgeo_mean_alpha", "tgeo_center", "kd_oracle")
# What the study runs by default, in this order (a derived control after what it is derived from).
DEFAULT_ORDER = ("ce", *(f"kd_a{a:g}" for a in ALPHA_GRID), "kd_best", "tgeo", "tgeo_unroll4", "tgeo_implicit",
                 "tgeo_head_only", "tgeo_center", "kd_tgeo_mean_alpha", "kd_trainval", "dist", "dkd", "anl_kd",
                 "rw_kd", "ada_kd", "wls_kd")
LEARNED = ("tgeo", "tgeo_unroll4", "tgeo_unroll4_flr4", "tgeo_unroll8", "tgeo_implicit", "tgeo_implicit_eta0.01", "tgeo_implicit_eta0.01_m5",
           "tgeo_head_only", "tgeo_center",
           "tgeo_outliers", "rw_kd")

LR_GRID = (0.05, 0.1, 0.2)
# The committed teachers -> the sha256 of their variables (teacher.variables_digest: paths, shapes, dtypes, each
# array's sha256): the third study's (the default) and the second's (bench/run_study.sh).
COMMITTED_TEACHERS = {
    "teachers/fmnist_cnn_deep_fc": ("cnn_deep_fc", "55400c22c7640d118c813b8d8b1442ce82c1f078e6ac2e34e2878017141175e6"),
    "teachers/fmnist_cnn_medium_fc": ("cnn_medium_fc", "08bc95440c2ab989d10979c791ceb77208bd652a8b559500f334abdcb3333d94"),
}
TEACHER_DIR = "teachers/fmnist_cnn_deep_fc"


def load_fashion_mnist_config(arg: str):
  return default_config.load_config_file(os.path.join(ROOT, "configs", "fashion_mnist.py"), arg)


apply_overrides = default_config.override


# ------------------------------------------------------------------------------------------------ running


class Runner:
  """Runs (or reads back) one training run per work directory, sharing the runs among worker processes."""

  def __init__(self, root: str, log, teacher_sha256: str | None = None, read_only: bool = False,
               archive: str | None = None):
    self.root, self.log, self.teacher_sha256, self.read_only = root, log, teacher_sha256, read_only
    self.archive = archive
    self.runs_started = 0  # runs this process trained (not read back)

  def _workdir_summary(self, workdir: str):
    for name in ("summary.json", "failed.json"):
      path = os.path.join(workdir, name)
      if os.path.exists(path):
        with open(path) as f:
          return json.load(f)
    return None

  def archive_path(self, workdir: str) -> str:
    return os.path.join(self.archive, os.path.relpath(workdir, self.root) + ".json")

  def archived(self, workdir: str) -> dict | None:
    """The run's archive record ``{"summary", "alpha", "label_noise"}``, or None."""
    if not self.archive:
      return None
    return run_identity.read_json_file(self.archive_path(workdir))

  def summary(self, workdir: str):
    """The finished (or failed) run's summary: from its work directory, else from the archive."""
    done = self._workdir_summary(workdir)
    if done is None and (record := self.archived(workdir)) is not None:
      done = record["summary"]
    return done

  def alpha_records(self, workdir: str) -> list[dict]:
    """The run's α-by-group records per epoch (alpha.jsonl), from its work directory, else from the archive."""
    records = read_alpha_records(workdir)
    if not records and (record := self.archived(workdir)) is not None:
      records = record.get("alpha") or []
    return records

  def save_to_archive(self, workdir: str, summary: dict) -> None:
    """Keeps what the tables need of a finished run (summary, α records and, for a learned α on noisy labels,
    the flipped-label detection) in the archive, which is small enough to commit: the study then resumes on
    another machine, or after the work directory is gone, by reading these back."""
    if not self.archive or self.archived(workdir) is not None:
      return
    record = dict(summary=summary, alpha=read_alpha_records(workdir))
    config = summary.get("config") or {}
    if "failed" not in summary and record["alpha"] and config.get("data.label_noise", 0) > 0:
      import alpha_label_noise
      record["label_noise"] = alpha_label_noise.flipped_label_row(workdir)
    path = self.archive_path(workdir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_json(path, record)

  def _claim(self, workdir: str) -> bool:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".claim")
    for _ in range(2):
      try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        try:
          with open(path) as f:
            pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
          return False
        if pid == os.getpid():
          return True
        if run_identity.pid_alive(pid):
          return False
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)  # a crashed worker's claim
        continue
      with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
      return True
    return False

  def run(self, config, workdir: str, *, wait: bool = True):
    """The run's summary (``{"failed": ...}`` when it diverged or was rejected); None if another worker has it
    and ``wait`` is False."""
    from tgeo_jax import trainer
    from tgeo_jax.errors import UserError
    while True:
      done = self.summary(workdir)
      if done is not None and done.get("finished", True):
        check_same_config(done, config, workdir, self.teacher_sha256)
        if not self.read_only:
          self.save_to_archive(workdir, done)
        return done
      if self.read_only:  # --tables_only: an unfinished run is missing from the tables, never run
        return None
      check_same_config(run_identity.read_json_file(os.path.join(workdir, run_identity.IDENTITY_FILE)), config,
                        workdir)
      if self._claim(workdir):
        break
      if not wait:
        return None
      time.sleep(5)
    self.log(f"run {os.path.relpath(workdir, self.root)}")
    self.runs_started += 1
    start = time.time()
    try:
      summary = trainer.train_and_evaluate(config, workdir)
    except (UserError, trainer.NonFiniteError) as e:
      summary = {"failed": str(e), "method": config.method, "finished": True, "seed": config.seed,
                 "config_fingerprint": run_identity.config_fingerprint(config, _reads(config)),
                 "config": run_identity.config_record(json.loads(config.to_json_best_effort()), _reads(config))}
      _write_json(os.path.join(workdir, "failed.json"), summary)
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(workdir, ".claim"))
    self.log(f"  -> {_brief(summary)} ({time.time() - start:.0f} s)")
    self.save_to_archive(workdir, summary)
    return summary


def _reads(config):
  """The fields ``config``'s method reads: only those identify its runs (``run_identity.config_record``)."""
  from tgeo_jax import methods
  return functools.partial(methods.reads_field, config.method)


class StudyMismatch(RuntimeError):
  """A work directory of the study holds a run of another configuration than the study asks for."""


def check_same_config(record: dict | None, config, workdir: str, teacher_sha256: str | None = None) -> None:
  """Runs are keyed by their config fingerprint, never by path: a summary, failure record or identity of another
  configuration (e.g. the study re-run with other --epochs) stops the study naming the differing fields, and so
  does a finished run taught by other teacher variables than ``teacher_sha256``."""
  if record is None:
    return
  if not run_identity.matches_fingerprint(record.get("config_fingerprint"), config, _reads(config)):
    current = run_identity.config_record(json.loads(config.to_json_best_effort()), _reads(config))
    saved = run_identity.filter_record(record.get("config", {}), _reads(config))
    diffs = run_identity.identity_differences({"config": saved}, {"config": current})
    raise StudyMismatch(f"{workdir}: holds a run of another configuration ({'; '.join(diffs) or 'no fingerprint'});"
                        " use another --workdir for this protocol")
  taught_by = [t.get("variables_sha256") for t in record.get("teachers") or []]
  if teacher_sha256 and taught_by and taught_by[0] != teacher_sha256:
    raise StudyMismatch(f"{workdir}: was taught by other teacher variables (sha256 {taught_by[0][:12]}, this study's "
                        f"{teacher_sha256[:12]}); use another --workdir for this teacher")


PLATFORM_FILE = "platform.json"


def check_platform(directory: str, backend: str) -> None:
  """One backend per work directory and archive: XLA's CPU, GPU and TPU kernels round differently (and their
  runs take other wall times), and a run's config fingerprint does not say where it ran. The first process to use
  ``directory`` records ``backend`` there; a process on another backend stops, so a GPU session can never mix its
  runs into a study run on CPU (or the other way round)."""
  path = os.path.join(directory, PLATFORM_FILE)
  recorded = run_identity.read_json_file(path)
  if recorded is None:
    os.makedirs(directory, exist_ok=True)
    _write_json(path, dict(platform=backend))
  elif recorded.get("platform") != backend:
    raise StudyMismatch(f"{directory}: holds runs made on {recorded.get('platform')!r}, this process runs on "
                        f"{backend!r}; use another --workdir / --archive for this backend")


def _brief(summary: dict) -> str:
  if "failed" in summary:
    return "failed: " + summary["failed"].splitlines()[0][:120]
  return (f"test {summary['accuracy']:.4f} (best {summary['best_accuracy']:.4f}), "
          f"val {summary.get('val_accuracy', float('nan')):.4f}")


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"  # two workers may write the same file (the platform record) at once
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=float)
  os.replace(tmp, path)


def read_alpha_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "alpha.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------ statistics


def welch(a: list[float], b: list[float]) -> float | None:
  """Two-sided p-value of Welch's t-test (None with fewer than two values on a side or no variance)."""
  from scipy import stats
  if len(a) < 2 or len(b) < 2 or (statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0):
    return None
  p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
  return None if math.isnan(p) else p


def aggregate(runs: dict[str, list[dict]], reference: str = "kd_best") -> list[dict]:
  """Rows ``method, n, last mean/std, best mean/std, p vs reference, mean α`` over the finished runs."""
  ref = [r["accuracy"] for r in runs.get(reference, []) if "accuracy" in r]
  rows = []
  for name, rs in runs.items():
    ok = [r for r in rs if "accuracy" in r]
    last = [r["accuracy"] for r in ok]
    best = [r["best_accuracy"] for r in ok]
    row = dict(method=name, n=len(ok), failed=len(rs) - len(ok),
               last_mean=statistics.mean(last) if last else None,
               last_std=statistics.stdev(last) if len(last) > 1 else None,
               best_mean=statistics.mean(best) if best else None,
               best_std=statistics.stdev(best) if len(best) > 1 else None,
               val_mean=statistics.mean([r["val_accuracy"] for r in ok]) if ok else None,
               p_vs_kd=None if name == reference else welch(last, ref),
               seconds=statistics.mean([r["seconds"] for r in ok]) if ok else None,
               learning_rate=ok[0].get("learning_rate") if ok else None)
    rows.append(row)
  return rows


# TGeo-KD against the controls that separate its parts: label-only, the tuned and untuned constant α, its own
# mean α, more data, and the strongest other methods.
KEY_COMPARISONS = ("ce", "kd_best", "kd_a0.9", "kd_tgeo_mean_alpha", "kd_trainval", "anl_kd", "rw_kd", "dist", "dkd")


def key_comparisons(runs: dict[str, list[dict]], method: str = "tgeo") -> list[dict]:
  """Welch's t-test of ``method``'s last-epoch test accuracy against each control's (mean difference, p)."""
  mine = [r["accuracy"] for r in runs.get(method, []) if "accuracy" in r]
  out = []
  for other in KEY_COMPARISONS:
    theirs = [r["accuracy"] for r in runs.get(other, []) if "accuracy" in r]
    if mine and theirs:
      out.append(dict(method=method, against=other, difference=statistics.mean(mine) - statistics.mean(theirs),
                      p=welch(mine, theirs)))
  return out


def _fmt(v, spec=".4f"):
  return "-" if v is None else format(v, spec)


def markdown_table(rows: list[dict]) -> str:
  lines = ["| method | n | test acc %, last (mean ± std) | best epoch | p vs best constant α (Welch) | val acc % | s/run "
           "| lr |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    last = f"{100 * r['last_mean']:.2f} ± {100 * (r['last_std'] or 0):.2f}" if r["last_mean"] is not None else "-"
    best = f"{100 * r['best_mean']:.2f} ± {100 * (r['best_std'] or 0):.2f}" if r["best_mean"] is not None else "-"
    n = f"{r['n']}" + (f" (+{r['failed']} failed)" if r["failed"] else "")
    val = f"{100 * r['val_mean']:.2f}" if r["val_mean"] is not None else "-"
    lines.append(f"| {r['method']} | {n} | {last} | {best} | {_fmt(r['p_vs_kd'], '.3f')} | {val} | "
                 f"{_fmt(r['seconds'], '.0f')} | {_fmt(r['learning_rate'], 'g')} |")
  return "\n".join(lines)


def alpha_table(records_by_seed: list[list[dict]]) -> list[dict]:
  """Per epoch, the α-by-group means averaged over seeds."""
  from tgeo_jax.alpha_report import GROUPS
  by_epoch: dict[int, list[dict]] = {}
  for records in records_by_seed:
    for r in records:
      by_epoch.setdefault(r["epoch"], []).append(r)
  table = []
  for epoch in sorted(by_epoch):
    rs = by_epoch[epoch]
    row = {"epoch": epoch, "seeds": len(rs)}
    for key in ("alpha_mean", "alpha_std", *(f"alpha_{g}" for g in GROUPS), "alpha_outlier", "alpha_normal",
                *WRONG_TEACHER_KEYS):
      values = [r[key] for r in rs if r.get(key) is not None]
      row[key] = statistics.mean(values) if values else None
    table.append(row)
  return table


WRONG_TEACHER_KEYS = ("alpha_wrong_teacher", "alpha_right_teacher", "auc_alpha_wrong_teacher",
                      "auc_disbelief_wrong_teacher")


def adaptivity_rows(runs: dict[str, list[dict]], alpha_records: dict[str, list[list[dict]]]) -> dict:
  """The fourth study's answers for one pair with the wrong teacher: the room for adaptivity (the oracle's gain over
  the best constant α, Welch p) and, per method, its gain, the fraction of the oracle's gain it closes and, for a
  learned α, the last epoch's AUC of α (and of the teacher's disbelief ``1 - p_T(y)``) for finding S, mean ± std
  over seeds."""
  def acc(name):
    return [r["accuracy"] for r in runs.get(name, []) if "accuracy" in r]

  ref, oracle = acc("kd_best"), acc("kd_oracle")
  if not ref:
    return {}
  ref_mean = statistics.mean(ref)
  room = dict(oracle_mean=statistics.mean(oracle) if oracle else None,
              oracle_std=statistics.stdev(oracle) if len(oracle) > 1 else None,
              constant_mean=ref_mean, constant_std=statistics.stdev(ref) if len(ref) > 1 else None,
              gain=statistics.mean(oracle) - ref_mean if oracle else None, p=welch(oracle, ref))
  rows = []
  for name in runs:
    mine = acc(name)
    if not mine or name == "kd_best" or name.startswith(("kd_a", "kd_oracle_a")):  # grids: at their own seeds
      continue
    gain = statistics.mean(mine) - ref_mean
    row = dict(method=name, n=len(mine), mean=statistics.mean(mine),
               std=statistics.stdev(mine) if len(mine) > 1 else None, gain=gain, p=welch(mine, ref),
               closed=gain / room["gain"] if room["gain"] else None)
    for key in ("auc_alpha_wrong_teacher", "auc_disbelief_wrong_teacher", "alpha_wrong_teacher",
                "alpha_right_teacher"):
      last = [records[-1][key] for records in alpha_records.get(name, []) if records and records[-1].get(key)
              is not None]
      row[key] = statistics.mean(last) if last else None
      row[key + "_std"] = statistics.stdev(last) if len(last) > 1 else None
    rows.append(row)
  return dict(room=room, rows=rows)


def adaptivity_markdown(res: dict) -> str:
  room = res["room"]
  pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
  lines = [f"Room for adaptivity: oracle {pct(room['oracle_mean'])} ± {pct(room['oracle_std'])} vs best constant α "
           f"{pct(room['constant_mean'])} ± {pct(room['constant_std'])}: gain {pct(room['gain'])} pp "
           f"(Welch p {_fmt(room['p'], '.3g')})", "",
           "| method | n | test acc % | gain vs best constant α, pp (p) | share of the oracle's gain | AUC of α for S "
           "| AUC of 1 - p_T(y) | α on S / elsewhere (last epoch) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in sorted(res["rows"], key=lambda r: -r["gain"]):
    auc = (f"{r['auc_alpha_wrong_teacher']:.3f} ± {r['auc_alpha_wrong_teacher_std'] or 0:.3f}"
           if r["auc_alpha_wrong_teacher"] is not None else "-")
    alphas = (f"{r['alpha_wrong_teacher']:.3f} / {r['alpha_right_teacher']:.3f}"
              if r["alpha_wrong_teacher"] is not None else "-")
    lines.append(f"| {r['method']} | {r['n']} | {pct(r['mean'])} ± {pct(r['std'] or 0)} | "
                 f"{100 * r['gain']:+.2f} ({_fmt(r['p'], '.3f')}) | {_fmt(r['closed'], '.2f')} | {auc} | "
                 f"{_fmt(r['auc_disbelief_wrong_teacher'], '.3f')} | {alphas} |")
  return "\n".join(lines)


def alpha_markdown(table: list[dict]) -> str:
  from tgeo_jax.alpha_report import GROUPS
  outliers = any(r.get("alpha_outlier") is not None for r in table)
  extra = ("outlier", "normal") if outliers else ()
  if any(r.get("alpha_wrong_teacher") is not None for r in table):
    extra += ("wrong_teacher", "right_teacher")
  head = "| epoch | mean α | std α | " + " | ".join((*GROUPS, *extra)) + " |"
  lines = [head, "|" + "---|" * (3 + len(GROUPS) + len(extra))]
  for r in table:
    lines.append(f"| {r['epoch']} | {_fmt(r['alpha_mean'], '.3f')} | {_fmt(r['alpha_std'], '.3f')} | "
                 + " | ".join(_fmt(r[f"alpha_{g}"], ".3f") for g in (*GROUPS, *extra)) + " |")
  return "\n".join(lines)


def alpha_figure(path: str, title: str, tables: dict) -> None:
  """One panel per method: mean α by group over epochs (seed-averaged), plus outliers when probed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from tgeo_jax.alpha_report import GROUP_LABELS, GROUPS
  names = [n for n, t in tables.items() if t]
  if not names:
    return
  cols = min(4, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharey=True)
  for ax, name in zip(axes.flat, names):
    table = tables[name]
    epochs = [r["epoch"] for r in table]
    if any(r.get("alpha_wrong_teacher") is not None for r in table):  # the fourth study: S against the rest
      ax.plot(epochs, [r.get("alpha_wrong_teacher") or math.nan for r in table], "r", marker="o", markersize=3,
              label="teacher made wrong (S)")
      ax.plot(epochs, [r.get("alpha_right_teacher") or math.nan for r in table], "b", marker="o", markersize=3,
              label="teacher untouched")
      ax.set(title=name, xlabel="epoch", ylim=(0, 1))
      continue
    for group in GROUPS:
      ax.plot(epochs, [math.nan if r[f"alpha_{group}"] is None else r[f"alpha_{group}"] for r in table],
              marker="o", markersize=3, label=GROUP_LABELS[group])
    ax.plot(epochs, [r["alpha_mean"] for r in table], color="0.5", linestyle="--", label="all examples")
    if any(r.get("alpha_outlier") is not None for r in table):
      ax.plot(epochs, [r.get("alpha_outlier") or math.nan for r in table], "k", marker="x", label="outliers")
    ax.set(title=name, xlabel="epoch", ylim=(0, 1))
  for ax in axes.flat[len(names):]:
    ax.axis("off")
  axes[0, 0].set_ylabel("mean α (seed average)")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  for ax in axes.flat[1:len(names)]:  # a panel with outliers adds its line to the legend
    for h, lab in zip(*ax.get_legend_handles_labels()):
      if lab not in labels:
        handles.append(h)
        labels.append(lab)
  fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout(rect=(0, 0.12 if rows == 1 else 0.07, 1, 1))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def teacher_digest(teacher_dir: str) -> tuple[str, str, dict]:
  """``(model name, variables sha256, summary)`` of the teacher directory (a finished run or an export)."""
  import ml_collections

  from tgeo_jax import data, teacher
  config = run_identity.read_json_file(os.path.join(teacher_dir, run_identity.CONFIG_FILE))
  if config is None:
    raise StudyMismatch(
        f"--teacher: no teacher in {teacher_dir!r}; produce it with: python train.py "
        "--config=configs/fashion_mnist.py:strong_teacher --workdir=runs/strong_teacher && python -m "
        f"tgeo_jax.export_teacher --workdir=runs/strong_teacher --out={teacher_dir}")
  spec = data.load(ml_collections.ConfigDict(config["data"]), seed=config.get("seed", 0)).spec
  loaded = teacher.load_teacher_from(config["model"]["name"], teacher_dir, spec, field="--teacher")
  summary = run_identity.read_json_file(os.path.join(teacher_dir, "summary.json")) or {}
  return config["model"]["name"], loaded.identity["variables_sha256"], summary


def best_alpha(run_lists: dict, prefix: str = "kd_a") -> tuple[float | None, list[dict]]:
  """The α of the KD grid (runs ``<prefix><α>``) with the best mean validation accuracy over its seeds (the first
  on a tie), and the grid's ``[{alpha, val_mean, test_mean, n}]``."""
  grid = []
  for a in ALPHA_GRID:
    ok = [r for r in run_lists.get(f"{prefix}{a:g}", []) if "val_accuracy" in r]
    if ok:
      grid.append(dict(alpha=a, n=len(ok), val_mean=statistics.mean(r["val_accuracy"] for r in ok),
                       test_mean=statistics.mean(r["accuracy"] for r in ok)))
  if not grid:
    return None, grid
  return max(grid, key=lambda g: g["val_mean"])["alpha"], grid


def alpha_summary(table: list[dict]) -> dict:
  """Q1/Q2 in numbers: first- and last-epoch mean α, its spread, and the separation of the paper's groups."""
  if not table:
    return {}
  first, last = table[0], table[-1]

  def gap(r, a, b):
    return None if r.get(f"alpha_{a}") is None or r.get(f"alpha_{b}") is None else r[f"alpha_{a}"] - r[f"alpha_{b}"]

  return dict(first_mean=first["alpha_mean"], last_mean=last["alpha_mean"], last_std=last["alpha_std"],
              drift=last["alpha_mean"] - first["alpha_mean"], trajectory=[r["alpha_mean"] for r in table],
              tc_large_minus_tc_small_first=gap(first, "tc_large", "tc_small"),
              tc_large_minus_tc_small_last=gap(last, "tc_large", "tc_small"),
              tc_minus_ti_large_last=gap(last, "tc_large", "ti_large"),
              outlier=last.get("alpha_outlier"), normal=last.get("alpha_normal"))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/study2")
  parser.add_argument("--out", default="", help="write the results JSON here")
  parser.add_argument("--settings", default="full,subset10,noise20")
  parser.add_argument("--students", default="mlp,cnn_small")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--method_seeds", default="",
                      help="fewer (or more) seeds for some methods, e.g. tgeo_implicit=2,tgeo_unroll4=2")
  parser.add_argument("--grid_seeds", type=int, default=0,
                      help="seeds of each KD α of the grid (0 = --seeds); kd_best then runs the rest at the chosen α")
  parser.add_argument("--methods", default=",".join(DEFAULT_ORDER))
  parser.add_argument("--lr_grid", default=",".join(map(str, LR_GRID)))
  parser.add_argument("--epochs", default="", help="override num_epochs per setting, e.g. full=3,subset10=10")
  parser.add_argument("--override", action="append", default=[],
                      help="extra config override for every student, KEY=VALUE (repeatable)")
  parser.add_argument("--teacher", default=os.path.join(ROOT, TEACHER_DIR))
  parser.add_argument("--teacher_sha256", default=None,
                      help="the teacher variables' expected sha256 ('' = do not check; default: the committed "
                           "teacher's, for a directory of COMMITTED_TEACHERS)")
  parser.add_argument("--figures", default="", help="write the α-by-group figures (PNG) into this directory")
  parser.add_argument("--tables_only", action="store_true",
                      help="run nothing: tabulate the finished runs (unfinished ones are left out of the tables)")
  parser.add_argument("--archive", default="",
                      help="keep each finished run's record (summary, α records) here and read runs back from it: "
                           "a directory small enough to commit, so that the study resumes without --workdir")
  parser.add_argument("--worker", type=int, default=0,
                      help="this process's number when several share --workdir (names its log only)")
  args = parser.parse_args(argv)

  settings = [s for s in args.settings.split(",") if s]
  students = [s for s in args.students.split(",") if s]
  methods = [m for m in args.methods.split(",") if m]
  for name in settings:
    if name not in SETTINGS:
      parser.error(f"--settings: unknown setting {name!r}; expected some of {list(SETTINGS)}")
  for name in methods:
    if name not in METHODS and name not in DERIVED:
      parser.error(f"--methods: unknown method {name!r}; expected some of {[*METHODS, *DERIVED]}")
  seeds_of = {}
  for item in (i for i in args.method_seeds.split(",") if i):
    name, _, n = item.partition("=")
    if name not in METHODS and name not in DERIVED or not n.isdigit() or int(n) < 1:
      parser.error(f"--method_seeds: expected NAME=N with a known method and N >= 1, got {item!r}")
    seeds_of[name] = int(n)

  def n_seeds(name):
    if name in seeds_of:
      return seeds_of[name]
    if args.grid_seeds and name.startswith(("kd_a", "kd_oracle_a")) and name in METHODS:
      return args.grid_seeds
    return args.seeds

  import jax
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  # Seeds and settings share compiled steps: the persistent cache skips recompiling identical programs. A cache the
  # caller chose (JAX_COMPILATION_CACHE_DIR, e.g. the test suite's, shared by all its processes) is kept.
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(args.workdir), ".jax_cache"))
  if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

  start = time.time()
  root = os.path.abspath(args.workdir)
  os.makedirs(root, exist_ok=True)
  log_path = os.path.join(root, f"study_worker{args.worker}.log")

  def log(msg):
    line = f"[{datetime.datetime.now():%H:%M:%S} w{args.worker}] {msg}"
    print(line, flush=True)
    with open(log_path, "a") as f:
      f.write(line + "\n")

  lr_grid = sorted(float(x) for x in args.lr_grid.split(","))
  epochs = {k: int(v) for k, v in (item.split("=") for item in args.epochs.split(",") if item)}
  extra = {}
  for item in args.override:
    key, _, value = item.partition("=")
    try:
      extra[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      extra[key] = value

  # 1. The teacher: the committed directory, checked by the digest of its variables.
  teacher_dir = os.path.abspath(args.teacher)
  if args.teacher_sha256 is None:
    committed = COMMITTED_TEACHERS.get(os.path.relpath(teacher_dir, ROOT))
    if committed is None:
      parser.error(f"--teacher: {args.teacher!r} is not a committed teacher ({', '.join(COMMITTED_TEACHERS)}): "
                   "pass its --teacher_sha256 ('' = do not check)")
    args.teacher_sha256 = committed[1]
  teacher_model, digest, teacher_summary = teacher_digest(teacher_dir)
  if args.teacher_sha256 and digest != args.teacher_sha256:
    raise StudyMismatch(f"--teacher: {teacher_dir!r} holds other variables (sha256 {digest[:12]}) than the study's "
                        f"teacher ({args.teacher_sha256[:12]}); pass --teacher_sha256='' to study this one")
  log(f"teacher {teacher_model} from {teacher_dir}: test accuracy {teacher_summary.get('accuracy')}, "
      f"variables sha256 {digest[:12]}")
  if not args.tables_only:  # tabulating reads, never mixes
    for directory in (root, os.path.abspath(args.archive) if args.archive else None):
      if directory:
        check_platform(directory, jax.default_backend())
  runner = Runner(root, log, digest, read_only=args.tables_only,
                  archive=os.path.abspath(args.archive) if args.archive else None)

  def student_config(setting, student, overrides, seed, lr):
    spec = SETTINGS[setting]
    c = load_fashion_mnist_config(overrides.get("method", "tgeo"))
    c.teacher.model = teacher_model
    c.teacher.checkpoint = teacher_dir
    # Every run on the same training part shares one teacher-logit table (computed by the first run).
    c.teacher.logits_cache_dir = os.path.join(root, "teacher_logits")
    c.model.name = student
    c.seed = seed
    c.batch_size = spec["batch_size"]
    c.val_batch_size = spec["batch_size"]
    c.num_epochs = epochs.get(setting, spec["num_epochs"])
    c.optimizer.learning_rate = lr
    c.log.progress = False
    setting_overrides = spec["overrides"]
    if overrides.get("method", "tgeo") == "ce":  # CE reads no teacher: the study's wrong teacher does not apply
      setting_overrides = {k: v for k, v in setting_overrides.items() if not k.startswith("study_wrong_teacher.")}
    apply_overrides(c, setting_overrides)
    apply_overrides(c, extra)
    apply_overrides(c, overrides)
    return c

  def job(setting, student, name, overrides, seed, lr):
    workdir = os.path.join(root, setting, student, name, f"seed{seed}")
    return (student_config(setting, student, overrides, seed, lr), workdir, lr)

  def run_all(jobs: dict, *, wait_for_others: bool = True) -> dict:
    """Runs every job (``key -> (config, workdir, lr)``): first each free one, then (``wait_for_others``) waits
    for the other workers' runs."""
    out = {}
    for wait in (False, True) if wait_for_others and not args.tables_only else (False,):
      for key, (config, workdir, lr) in jobs.items():
        if key in out:
          continue
        s = runner.run(config, workdir, wait=wait)
        if s is not None:
          out[key] = dict(s, learning_rate=lr, workdir=os.path.relpath(workdir, root))
    return out

  pairs = [(setting, student) for setting in settings for student in students]

  # 2. Learning rates chosen on validation by CE (seed 0).
  grid_runs = run_all({(setting, student, lr): (student_config(setting, student, METHODS["ce"], 0, lr),
                                                 os.path.join(root, setting, student, "lr_search", f"ce_lr{lr:g}"),
                                                 lr)
                       for setting, student in pairs for lr in lr_grid})
  if args.tables_only:  # a pair whose learning-rate search is unfinished has nothing to tabulate yet
    for pair in [p for p in pairs if any((*p, lr) not in grid_runs for lr in lr_grid)]:
      log(f"{'/'.join(pair)}: learning-rate search not finished: left out")
      pairs.remove(pair)
  chosen_lr, lr_search = {}, {}
  for setting, student in pairs:
    grid = [dict(learning_rate=lr, val_accuracy=grid_runs[(setting, student, lr)].get("val_accuracy"),
                 accuracy=grid_runs[(setting, student, lr)].get("accuracy"),
                 failed=grid_runs[(setting, student, lr)].get("failed")) for lr in lr_grid]
    best = max((r for r in grid if r["val_accuracy"] is not None), key=lambda r: r["val_accuracy"])
    chosen_lr[(setting, student)] = best["learning_rate"]
    lr_search[f"{setting}/{student}"] = dict(grid=grid, chosen=best["learning_rate"],
                                             ce_val_accuracy=best["val_accuracy"])
    log(f"{setting}/{student}: learning rate {best['learning_rate']:g} (CE validation accuracy "
        f"{best['val_accuracy']:.4f})")

  def diverged(s, setting, student):
    return "failed" in s or s.get("val_accuracy", 0) < 0.5 * lr_search[f"{setting}/{student}"]["ce_val_accuracy"]

  def run_method(name, overrides, run_name=None):
    """Every pair's seeds of one method; a method whose seed 0 diverges moves down the learning-rate grid."""
    run_name = run_name or name
    jobs = {(setting, student, seed): job(setting, student, run_name, overrides, seed, chosen_lr[(setting, student)])
            for setting, student in pairs for seed in range(n_seeds(name))}
    if name == "ce":  # CE's seed 0 at the chosen rate is the learning-rate search's run: read back, not re-run
      for setting, student in pairs:
        lr = chosen_lr[(setting, student)]
        jobs[(setting, student, 0)] = (student_config(setting, student, METHODS["ce"], 0, lr),
                                       os.path.join(root, setting, student, "lr_search", f"ce_lr{lr:g}"), lr)
    got = run_all(jobs)
    for setting, student in pairs:
      rs = [got[key] for key in ((setting, student, seed) for seed in range(n_seeds(name))) if key in got]
      if not rs:  # --tables_only and not run
        continue
      runs[(setting, student)][name] = rs
      if args.tables_only or not diverged(rs[0], setting, student):
        continue
      log(f"{setting}/{student}/{name}: diverged at learning rate {chosen_lr[(setting, student)]:g}")
      runs[(setting, student)][name], notes[(setting, student)][name] = [], "diverged at every rate of the grid"
      for lr in [lr for lr in sorted(lr_grid, reverse=True) if lr < chosen_lr[(setting, student)]]:
        first = run_all({0: job(setting, student, f"{run_name}_lr{lr:g}", overrides, 0, lr)})[0]
        if diverged(first, setting, student):
          log(f"{setting}/{student}/{name}: diverged at learning rate {lr:g}")
          continue
        rest = run_all({seed: job(setting, student, f"{run_name}_lr{lr:g}", overrides, seed, lr)
                        for seed in range(1, n_seeds(name))})
        runs[(setting, student)][name] = [first, *(rest[s] for s in range(1, n_seeds(name)))]
        notes[(setting, student)][name] = (f"diverged at the chosen rate {chosen_lr[(setting, student)]:g}; "
                                           f"run at {lr:g}")
        break

  def alpha_tables(run_lists: dict) -> dict:
    out = {}
    for name, rs in run_lists.items():
      records = [runner.alpha_records(os.path.join(root, r["workdir"])) for r in rs if "accuracy" in r]
      records = [r for r in records if r]
      if records:
        out[name] = alpha_table(records)
    return out

  # 3./4. Methods x seeds at the chosen rate, in the order of --methods; a derived control runs where it is named,
  # from the runs named before it (kd_best after the α grid; kd_trainval, tgeo_center after kd_best;
  # kd_tgeo_mean_alpha after tgeo).
  runs = {pair: {} for pair in pairs}
  notes = {pair: {} for pair in pairs}
  chosen_alpha, oracle_alpha = {}, {}

  def run_derived(name, specs):
    """``specs``: ``[(pair, overrides, run name, note)]``; every seed of each."""
    got = run_all({(pair, seed): job(*pair, run_name, overrides, seed, chosen_lr[pair])
                   for pair, overrides, run_name, _ in specs for seed in range(n_seeds(name))})
    for pair, _, _, note in specs:
      rs = [got[(pair, seed)] for seed in range(n_seeds(name)) if (pair, seed) in got]
      if rs:
        runs[pair][name] = rs
        notes[pair][name] = note

  def needs(name, before):
    if not all(b in done for b in before):
      parser.error(f"--methods: {name} is derived from {' and '.join(before)}: name it after them")

  # A job queue across methods: every worker first takes each free run of the named methods (not the derived
  # controls, which need finished runs), in the order of --methods, never waiting on another worker's run, so that
  # no core idles at a method with fewer runs than workers (one pair, the α grid at one seed). The ordered pass
  # below then reads them back, waits for the others', re-runs a diverged method and runs the derived controls.
  if not args.tables_only:
    run_all({(name, setting, student, seed): job(setting, student, name, METHODS[name], seed,
                                                 chosen_lr[(setting, student)])
             for name in methods if name in METHODS for setting, student in pairs
             for seed in range(n_seeds(name)) if not (name == "ce" and seed == 0)},  # CE seed 0: the lr search
            wait_for_others=False)

  done = []
  for name in methods:
    if name in METHODS:
      run_method(name, METHODS[name])
    elif name == "kd_best":
      needs(name, [f"kd_a{a:g}" for a in ALPHA_GRID])
      specs = []
      for pair in pairs:
        alpha, grid = best_alpha(runs[pair])
        if alpha is None:  # --tables_only and the grid not run
          continue
        chosen_alpha[pair] = dict(alpha=alpha, grid=grid, seeds=n_seeds("kd_a0.1"))
        specs.append((pair, kd_at(alpha), f"kd_a{alpha:g}",
                      f"KD at α = {alpha:g}: the grid's best validation accuracy (grid at "
                      f"{min(g['n'] for g in grid)} seed(s), then {n_seeds(name)} seeds at the chosen α)"))
      run_derived(name, specs)
    elif name == "kd_oracle":
      needs(name, [f"kd_oracle_a{a:g}" for a in ALPHA_GRID])
      specs = []
      for pair in (p for p in pairs if p[0] in WRONG_TEACHER_SETTINGS):
        alpha, grid = best_alpha(runs[pair], "kd_oracle_a")
        if alpha is None:
          continue
        oracle_alpha[pair] = dict(alpha=alpha, grid=grid)
        specs.append((pair, METHODS[f"kd_oracle_a{alpha:g}"], f"kd_oracle_a{alpha:g}",
                      f"the oracle: α = 0 on the teacher's wrong set S and {alpha:g} elsewhere (the oracle grid's "
                      "best validation accuracy)"))
      run_derived(name, specs)
    elif name in ("kd_trainval", "tgeo_center"):
      needs(name, ["kd_best"])
      specs = []
      for pair in (p for p in pairs if p in chosen_alpha):
        alpha = chosen_alpha[pair]["alpha"]
        if name == "kd_trainval":
          specs.append((pair, dict(kd_at(alpha), **{"data.train_with_val": True}), f"kd_trainval_a{alpha:g}",
                        f"KD at the best constant α = {alpha:g} on train + val"))
        else:
          specs.append((pair, {"method": "tgeo", "tgeo.alpha_normalization": "center", "tgeo.alpha_init": alpha},
                        f"tgeo_center_a{alpha:g}", f"TGeo-KD, α centred per batch on the best constant {alpha:g}"))
      run_derived(name, specs)
    elif name == "kd_tgeo_mean_alpha":
      needs(name, ["tgeo"])
      specs = []
      for pair in pairs:
        table = alpha_tables({"tgeo": runs[pair].get("tgeo", [])}).get("tgeo")
        if table:
          mean_alpha = round(statistics.mean(r["alpha_mean"] for r in table), 3)
          specs.append((pair, kd_at(mean_alpha), f"kd_a{mean_alpha:g}",
                        f"KD with α = {mean_alpha:g}, TGeo-KD's mean α over its epochs and seeds"))
      run_derived(name, specs)
    done.append(name)

  results = {}
  for pair in pairs:
    rs = runs[pair]
    learned = {k: v for k, v in rs.items() if k in LEARNED}
    tables = alpha_tables(learned)
    # The flipped-label detection of each learned-α run on noisy labels (archived runs only: see save_to_archive).
    label_noise = {}
    for name, rs_ in learned.items():
      found = [(runner.archived(os.path.join(root, r["workdir"])) or {}).get("label_noise") for r in rs_]
      if any(found):
        label_noise[name] = [f for f in found if f]
    adaptivity = {}
    if pair[0] in WRONG_TEACHER_SETTINGS:
      adaptivity = adaptivity_rows(rs, {name: [runner.alpha_records(os.path.join(root, r["workdir"]))
                                               for r in rs_ if "accuracy" in r] for name, rs_ in learned.items()})
    results["/".join(pair)] = dict(label_noise=label_noise, adaptivity=adaptivity,
        rows=aggregate(rs), runs=rs, alpha=tables, alpha_summary={k: alpha_summary(t) for k, t in tables.items()},
        tgeo_vs={m: key_comparisons(rs, m) for m in rs if m.startswith("tgeo")},
        notes=notes[pair], learning_rate=chosen_lr[pair], best_alpha=chosen_alpha.get(pair),
        oracle_alpha=oracle_alpha.get(pair),
        seeds={k: len(v) for k, v in rs.items()})

  total = time.time() - start
  print()
  print(f"Teacher ({teacher_model}, {teacher_dir}): test accuracy {teacher_summary.get('accuracy')}, "
        f"variables sha256 {digest}")
  for key, res in results.items():
    extra_note = f", best constant α {res['best_alpha']['alpha']:g}" if res["best_alpha"] else ""
    print(f"\n## {key} (learning rate {res['learning_rate']:g}{extra_note})\n")
    print(markdown_table(res["rows"]))
    for name, note in res["notes"].items():
      print(f"- {name}: {note}")
    if res["adaptivity"]:
      print(f"\nAdaptivity ({key}; S: the examples the teacher was made wrong on):\n")
      print(adaptivity_markdown(res["adaptivity"]))
    for m, comps in res["tgeo_vs"].items():
      if comps:
        print(f"\n{m} minus control (test accuracy, percentage points; Welch p): " + ", ".join(
            f"{c['against']} {100 * c['difference']:+.2f} (p {_fmt(c['p'], '.3f')})" for c in comps))
    for name, table in res["alpha"].items():
      print(f"\nα by group, {name} ({key}):\n")
      print(alpha_markdown(table))
  if args.figures:
    for key, res in results.items():
      name = key.replace("/", "_")
      alpha_figure(os.path.join(args.figures, f"alpha_{name}.png"), f"Fashion-MNIST {key}: mean α by group",
                   res["alpha"])
  print(f"\nworker {args.worker}: {total:.0f} s wall (finished runs are read back, not re-run)")
  if args.out:
    from tgeo_jax import report
    report.write_json(args.out, dict(
        date=datetime.date.today().isoformat(), machine=platform.platform(), processor=platform.processor(),
        cpu_count=os.cpu_count(), jax=jax.__version__, devices=[str(d) for d in jax.devices()],
        command=" ".join(["python", "bench/study.py", *(argv if argv is not None else sys.argv[1:])]),
        teacher=dict(teacher_summary, dir=os.path.relpath(teacher_dir, ROOT), variables_sha256=digest),
        learning_rates=lr_search, settings={k: SETTINGS[k] for k in settings}, epochs_override=epochs,
        seeds=args.seeds, method_seeds=seeds_of, results=results,
        # A pure read-back keeps the wall time of the invocation that trained the runs.
        worker_wall_seconds=total if runner.runs_started or not os.path.exists(args.out) else
        (run_identity.read_json_file(args.out) or {}).get("worker_wall_seconds", total),
        runs_trained_by_this_invocation=runner.runs_started))
    print(f"wrote {args.out}")
  return 0


def cli(argv=None) -> int:
  """``main`` as the command runs it: a study that does not match its work directory or archive is one line on
  stderr and exit status 2."""
  try:
    return main(argv)
  except StudyMismatch as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(cli())
