"""The Fashion-MNIST study: every method, several seeds, three data settings, controls and α analytics.

    python bench/study.py --workdir runs/study --out bench/results/study_cpu.json \
        [--settings full,subset10,noise20] [--students mlp,cnn_small] [--seeds 5] [--methods ...] \
        [--variants ...] [--variant_seeds 2] [--worker 0]

What runs, in order (each run is an ordinary ``train.py`` run in its own work directory, so the study resumes:
finished runs are read back, an interrupted one continues from its checkpoint):

1. **Teacher**: ``configs/fashion_mnist.py:teacher`` (cnn_medium, CE on the full training part, clean labels).
2. **Learning rate** per (setting, student): CE at seed 0 for every rate of ``--lr_grid``; the rate with the best
   *validation* accuracy is used for every method. A method that diverges at that rate (a non-finite step, or a
   validation accuracy below half of CE's) is re-run at the next smaller rate of the grid until one is stable;
   the table then marks it.
3. **Methods** x seeds: CE, KD (fixed α = 0.9: ``0.1 CE + 0.9 τ² KL``), the fixed-α controls KD α = 0.5 and 1.0,
   ANL-KD, ADA-KD, WLS-KD, RW-KD, DIST, TGeo-KD and its ablations (intra-only layout, without the S-T edge), and KD
   on train + validation (TGeo-KD and RW-KD are the only methods that see the validation labels).
4. **KD at TGeo-KD's mean α**: a constant α equal to the mean α TGeo-KD learned (averaged over its epochs and
   seeds) in the same setting: separates "a better constant" from per-sample adaptivity.
5. **α variants** (``--variants``, fewer seeds): TGeo-KD with other fusion-net learning rates, α initialisation,
   per-batch centring of α, meta intervals and validation batch sizes; each reports its α-by-group table.

Settings: ``full`` (the 54,000-example training part), ``subset10`` (a 10% stratified subset: 5,400 training
and 600 validation examples), ``noise20`` (the full training part with 20% symmetric label noise on the
student's training labels; the teacher, validation and test labels are clean).

Statistics: test accuracy at the last epoch and the best epoch, mean ± std over seeds; Welch's t-test of each
method's last-epoch accuracy against KD's (scipy). The JSON has every run's summary, the chosen rates, the
α-by-group records and the total wall time. Several processes may share one ``--workdir`` (start each with its
own ``--worker i``): a run is claimed by creating its ``.claim`` file, a claim of a dead process is taken over,
and each process waits for the others' runs it needs.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
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
}

# name -> config overrides (on configs/fashion_mnist.py:<method>).
METHODS = {
    "ce": {"method": "ce"},
    "kd": {"method": "kd"},  # α = 0.9 (w_ce 0.1, w_kd 0.9): the config default
    "kd_a0.5": {"method": "kd", "kd.w_ce": 0.5, "kd.w_kd": 0.5},
    "kd_a1.0": {"method": "kd", "kd.w_ce": 0.0, "kd.w_kd": 1.0},
    "anl_kd": {"method": "anl_kd"},
    "ada_kd": {"method": "ada_kd"},
    "wls_kd": {"method": "wls_kd"},
    "rw_kd": {"method": "rw_kd"},
    "dist": {"method": "dist"},
    "tgeo": {"method": "tgeo"},
    "tgeo_intra": {"method": "tgeo", "tgeo.layout": "intra"},
    "tgeo_no_st": {"method": "tgeo", "tgeo.layout": "no_st"},
    "kd_trainval": {"method": "kd", "data.train_with_val": True},
}
DERIVED = ("kd_tgeo_mean_alpha",)

# α investigation: TGeo-KD variants (research options kept in the library).
VARIANTS = {
    "tgeo_flr1e-2": {"tgeo.fusion_lr": 1e-2},
    "tgeo_flr1e-4": {"tgeo.fusion_lr": 1e-4},
    "tgeo_init0.9": {"tgeo.alpha_init": 0.9},
    "tgeo_center0.5": {"tgeo.alpha_normalization": "center", "tgeo.alpha_init": 0.5},
    "tgeo_center0.9": {"tgeo.alpha_normalization": "center", "tgeo.alpha_init": 0.9},
    "tgeo_mi5": {"tgeo.meta_interval": 5},
    "tgeo_mi20": {"tgeo.meta_interval": 20},
    "tgeo_val32": {"val_batch_size": 32},
    "tgeo_val512": {"val_batch_size": 512},
    # The paper's outlier probe: Gaussian-noise images with random labels appended to the training part.
    "tgeo_outliers": {"data.outliers": 500},
}

LR_GRID = (0.025, 0.05, 0.1, 0.2)


def load_fashion_mnist_config(arg: str):
  return default_config.load_config_file(os.path.join(ROOT, "configs", "fashion_mnist.py"), arg)


apply_overrides = default_config.override


# ------------------------------------------------------------------------------------------------ running


class Runner:
  """Runs (or reads back) one training run per work directory, sharing the runs among worker processes."""

  def __init__(self, root: str, log):
    self.root, self.log = root, log

  def summary(self, workdir: str):
    path = os.path.join(workdir, "summary.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    path = os.path.join(workdir, "failed.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    return None

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
        check_same_config(done, config, workdir)
        return done
      check_same_config(run_identity.read_json_file(os.path.join(workdir, run_identity.IDENTITY_FILE)), config,
                        workdir)
      if self._claim(workdir):
        break
      if not wait:
        return None
      time.sleep(5)
    self.log(f"run {os.path.relpath(workdir, self.root)}")
    start = time.time()
    try:
      summary = trainer.train_and_evaluate(config, workdir)
    except (UserError, trainer.NonFiniteError) as e:
      summary = {"failed": str(e), "method": config.method, "finished": True, "seed": config.seed,
                 "config_fingerprint": run_identity.config_fingerprint(config),
                 "config": run_identity.config_record(json.loads(config.to_json_best_effort()))}
      _write_json(os.path.join(workdir, "failed.json"), summary)
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(workdir, ".claim"))
    self.log(f"  -> {_brief(summary)} ({time.time() - start:.0f} s)")
    return summary


class StudyMismatch(RuntimeError):
  """A work directory of the study holds a run of another configuration than the study asks for."""


def check_same_config(record: dict | None, config, workdir: str) -> None:
  """Runs are keyed by their config fingerprint, never by path: a summary, failure record or identity of another
  configuration (e.g. the study re-run with other --epochs) stops the study naming the differing fields."""
  if record is None:
    return
  if record.get("config_fingerprint") == run_identity.config_fingerprint(config):
    return
  current = run_identity.config_record(json.loads(config.to_json_best_effort()))
  diffs = run_identity.identity_differences({"config": record.get("config", {})}, {"config": current})
  raise StudyMismatch(f"{workdir}: holds a run of another configuration ({'; '.join(diffs) or 'no fingerprint'}); "
                      "use another --workdir for this protocol")


def _brief(summary: dict) -> str:
  if "failed" in summary:
    return "failed: " + summary["failed"].splitlines()[0][:120]
  return (f"test {summary['accuracy']:.4f} (best {summary['best_accuracy']:.4f}), "
          f"val {summary.get('val_accuracy', float('nan')):.4f}")


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
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


def aggregate(runs: dict[str, list[dict]], reference: str = "kd") -> list[dict]:
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


# TGeo-KD against the controls that separate its parts: label-only, fixed α, its own mean α, more data.
KEY_COMPARISONS = ("ce", "kd", "kd_a0.5", "kd_a1.0", "kd_tgeo_mean_alpha", "kd_trainval", "anl_kd", "rw_kd", "dist")


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
  lines = ["| method | n | test acc %, last (mean ± std) | best epoch | p vs KD (Welch) | val acc % | s/run | lr |",
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
    row = {"epoch": epoch}
    for key in ("alpha_mean", "alpha_std", *(f"alpha_{g}" for g in GROUPS), "alpha_outlier", "alpha_normal"):
      values = [r[key] for r in rs if r.get(key) is not None]
      row[key] = statistics.mean(values) if values else None
    table.append(row)
  return table


def alpha_markdown(table: list[dict]) -> str:
  from tgeo_jax.alpha_report import GROUPS
  outliers = any(r.get("alpha_outlier") is not None for r in table)
  extra = ("outlier", "normal") if outliers else ()
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/study")
  parser.add_argument("--out", default="", help="write the results JSON here")
  parser.add_argument("--settings", default="full,subset10,noise20")
  parser.add_argument("--students", default="mlp,cnn_small")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--methods", default=",".join([*METHODS, *DERIVED]))
  parser.add_argument("--variants", default="", help=f"comma-separated subset of {list(VARIANTS)}")
  parser.add_argument("--variant_settings", default="", help="settings for the variants (default: --settings)")
  parser.add_argument("--variant_students", default="", help="students for the variants (default: --students)")
  parser.add_argument("--variant_seeds", type=int, default=2)
  parser.add_argument("--lr_grid", default=",".join(map(str, LR_GRID)))
  parser.add_argument("--epochs", default="", help="override num_epochs per setting, e.g. full=3,subset10=10")
  parser.add_argument("--override", action="append", default=[],
                      help="extra config override for every student, KEY=VALUE (repeatable)")
  parser.add_argument("--figures", default="", help="write the α-by-group figures (PNG) into this directory")
  parser.add_argument("--worker", type=int, default=0,
                      help="this process's number when several share --workdir (names its log only)")
  args = parser.parse_args(argv)

  import jax
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  # Seeds and settings share compiled steps: the persistent cache skips recompiling identical programs.
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(args.workdir), ".jax_cache"))
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

  runner = Runner(root, log)
  settings = [s for s in args.settings.split(",") if s]
  students = [s for s in args.students.split(",") if s]
  methods = [m for m in args.methods.split(",") if m]
  variants = [v for v in args.variants.split(",") if v]
  for name in settings:
    if name not in SETTINGS:
      parser.error(f"--settings: unknown setting {name!r}; expected some of {list(SETTINGS)}")
  for name in methods:
    if name not in METHODS and name not in DERIVED:
      parser.error(f"--methods: unknown method {name!r}; expected some of {[*METHODS, *DERIVED]}")
  for name in variants:
    if name not in VARIANTS:
      parser.error(f"--variants: unknown variant {name!r}; expected some of {list(VARIANTS)}")
  lr_grid = sorted(float(x) for x in args.lr_grid.split(","))
  epochs = {k: int(v) for k, v in (item.split("=") for item in args.epochs.split(",") if item)}
  extra = {}
  for item in args.override:
    key, _, value = item.partition("=")
    try:
      extra[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      extra[key] = value

  # 1. The teacher (every worker needs it: the first to claim trains it, the others wait).
  teacher_dir = os.path.join(root, "teacher")
  teacher = runner.run(load_fashion_mnist_config("teacher"), teacher_dir)
  if "failed" in teacher:
    log(f"the teacher failed: {teacher['failed']}")
    return 1

  def student_config(setting, student, overrides, seed, lr):
    spec = SETTINGS[setting]
    c = load_fashion_mnist_config(overrides.get("method", "tgeo"))
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
    apply_overrides(c, spec["overrides"])
    apply_overrides(c, extra)
    apply_overrides(c, overrides)
    return c

  def job(setting, student, name, overrides, seed, lr):
    workdir = os.path.join(root, setting, student, name, f"seed{seed}")
    return (student_config(setting, student, overrides, seed, lr), workdir, lr)

  def run_all(jobs: dict) -> dict:
    """Runs every job (``key -> (config, workdir, lr)``): first each free one, then waits for the others'."""
    out = {}
    for wait in (False, True):
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

  # 3. Methods x seeds at the chosen rate; a method whose seed 0 diverges moves down the grid.
  plain = [m for m in methods if m in METHODS]
  main_runs = run_all({(setting, student, name, seed): job(setting, student, name, METHODS[name], seed,
                                                           chosen_lr[(setting, student)])
                       for setting, student in pairs for name in plain for seed in range(args.seeds)})
  runs = {(setting, student): {name: [main_runs[(setting, student, name, seed)] for seed in range(args.seeds)]
                               for name in plain} for setting, student in pairs}
  notes = {pair: {} for pair in pairs}
  for setting, student in pairs:
    for name in plain:
      if not diverged(runs[(setting, student)][name][0], setting, student):
        continue
      log(f"{setting}/{student}/{name}: diverged at learning rate {chosen_lr[(setting, student)]:g}")
      smaller = [lr for lr in sorted(lr_grid, reverse=True) if lr < chosen_lr[(setting, student)]]
      runs[(setting, student)][name], notes[(setting, student)][name] = [], "diverged at every rate of the grid"
      for lr in smaller:
        first = run_all({0: job(setting, student, f"{name}_lr{lr:g}", METHODS[name], 0, lr)})[0]
        if diverged(first, setting, student):
          log(f"{setting}/{student}/{name}: diverged at learning rate {lr:g}")
          continue
        rest = run_all({seed: job(setting, student, f"{name}_lr{lr:g}", METHODS[name], seed, lr)
                        for seed in range(1, args.seeds)})
        runs[(setting, student)][name] = [first, *(rest[s] for s in range(1, args.seeds))]
        notes[(setting, student)][name] = (f"diverged at the chosen rate {chosen_lr[(setting, student)]:g}; "
                                           f"run at {lr:g}")
        break

  def alpha_tables(run_lists: dict) -> dict:
    out = {}
    for name, rs in run_lists.items():
      records = [read_alpha_records(os.path.join(root, r["workdir"])) for r in rs if "accuracy" in r]
      records = [r for r in records if r]
      if records:
        out[name] = alpha_table(records)
    return out

  # 4. KD at the mean α TGeo-KD learned (over its epochs and seeds), per setting and student.
  if "kd_tgeo_mean_alpha" in methods:
    derived_jobs, mean_alphas = {}, {}
    for setting, student in pairs:
      table = alpha_tables({"tgeo": runs[(setting, student)].get("tgeo", [])}).get("tgeo")
      if not table:
        continue
      mean_alpha = round(statistics.mean(r["alpha_mean"] for r in table), 3)
      mean_alphas[(setting, student)] = mean_alpha
      overrides = {"method": "kd", "kd.w_kd": mean_alpha, "kd.w_ce": round(1 - mean_alpha, 3)}
      for seed in range(args.seeds):
        derived_jobs[(setting, student, seed)] = job(setting, student, f"kd_a{mean_alpha:g}", overrides, seed,
                                                     chosen_lr[(setting, student)])
    derived = run_all(derived_jobs)
    for (setting, student), mean_alpha in mean_alphas.items():
      runs[(setting, student)]["kd_tgeo_mean_alpha"] = [derived[(setting, student, seed)]
                                                        for seed in range(args.seeds)]
      notes[(setting, student)]["kd_tgeo_mean_alpha"] = (f"KD with α = {mean_alpha:g}, TGeo-KD's mean α over its "
                                                         "epochs and seeds")

  results = {}
  for setting, student in pairs:
    rs = runs[(setting, student)]
    learned = {k: v for k, v in rs.items() if k.startswith("tgeo") or k == "rw_kd"}
    results[f"{setting}/{student}"] = dict(rows=aggregate(rs), runs=rs, alpha=alpha_tables(learned),
                                           tgeo_vs=key_comparisons(rs),
                                           notes=notes[(setting, student)],
                                           learning_rate=chosen_lr[(setting, student)])

  # 5. α variants of TGeo-KD (fewer seeds).
  v_settings = [s for s in (args.variant_settings or args.settings).split(",") if s]
  v_students = [s for s in (args.variant_students or args.students).split(",") if s]
  v_pairs = [(a, b) for a in v_settings for b in v_students if (a, b) in chosen_lr] if variants else []
  variant_runs = run_all({(setting, student, name, seed): job(setting, student, name,
                                                              dict(METHODS["tgeo"], **VARIANTS[name]), seed,
                                                              chosen_lr[(setting, student)])
                          for setting, student in v_pairs for name in variants
                          for seed in range(args.variant_seeds)})
  variant_results = {}
  for setting, student in v_pairs:
    rs = {name: [variant_runs[(setting, student, name, seed)] for seed in range(args.variant_seeds)]
          for name in variants}
    if "tgeo" in runs[(setting, student)]:
      rs = {"tgeo": runs[(setting, student)]["tgeo"][:args.variant_seeds], **rs}
    variant_results[f"{setting}/{student}"] = dict(rows=aggregate(rs, reference="__none__"), runs=rs,
                                                   alpha=alpha_tables(rs))

  total = time.time() - start
  print()
  print(f"Teacher (cnn_medium, full training part): test accuracy {teacher['accuracy']:.4f}")
  for key, res in results.items():
    print(f"\n## {key} (learning rate {res['learning_rate']:g})\n")
    print(markdown_table(res["rows"]))
    for name, note in res["notes"].items():
      print(f"- {name}: {note}")
    if res["tgeo_vs"]:
      print("\nTGeo-KD minus control (test accuracy, percentage points; Welch p): " + ", ".join(
          f"{c['against']} {100 * c['difference']:+.2f} (p {_fmt(c['p'], '.3f')})" for c in res["tgeo_vs"]))
    for name, table in res["alpha"].items():
      print(f"\nα by group, {name} ({key}):\n")
      print(alpha_markdown(table))
  for key, res in variant_results.items():
    print(f"\n## α variants, {key}\n")
    print(markdown_table(res["rows"]))
    for name, table in res["alpha"].items():
      if table:
        print(f"\nα by group, {name} ({key}), last epoch: " + alpha_markdown(table[-1:]).splitlines()[-1])
  if args.figures:
    for key, res in [*results.items(), *((k + " variants", v) for k, v in variant_results.items())]:
      name = key.replace("/", "_").replace(" ", "_")
      alpha_figure(os.path.join(args.figures, f"alpha_{name}.png"), f"Fashion-MNIST {key}: mean α by group",
                   res["alpha"])
  print(f"\nworker {args.worker}: {total:.0f} s wall (finished runs are read back, not re-run)")
  if args.out:
    from tgeo_jax import report
    report.write_json(args.out, dict(
        date=datetime.date.today().isoformat(), machine=platform.platform(), processor=platform.processor(),
        cpu_count=os.cpu_count(), jax=jax.__version__, devices=[str(d) for d in jax.devices()],
        command=" ".join(["python", "bench/study.py", *(argv if argv is not None else sys.argv[1:])]),
        teacher=teacher, learning_rates=lr_search, settings={k: SETTINGS[k] for k in settings},
        epochs_override=epochs, results=results, variants=variant_results, worker_wall_seconds=total))
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except StudyMismatch as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
