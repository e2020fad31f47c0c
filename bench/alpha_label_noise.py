"""Does TGeo-KD's learned α single out the mislabelled training examples? (the study's ``noise20`` setting)

    python bench/alpha_label_noise.py --workdir runs/study [--setting noise20] [--methods tgeo,rw_kd]
                                      [--students mlp] [--out FILE.json]
    python bench/alpha_label_noise.py --archive bench/results/study3_runs ...   (the rows the study archived)

For every finished learned-α run of the setting (``<workdir>/<setting>/<student>/<tgeo*|rw_kd>/seed*``), restores
the final checkpoint, computes α for every training example with the final student and fusion net (as the run's
``epoch_report`` does, in chunks of 1,000), and compares the examples whose training label was flipped by
``data.label_noise`` with the clean ones: mean α of each, and the AUC of α as a detector of a flipped label
(0.5 = no information; 1 = every flipped example has a larger α than every clean one). The flipped examples are
known exactly: the same data config with ``label_noise = 0`` gives the clean labels in the same order.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import ml_collections
import numpy as np

from tgeo_jax import checkpoint, data, metrics, trainer


def alpha_over_train(workdir: str):
  """``(alpha [N], flipped [N] bool, teacher_correct_on_given_label [N] bool, teacher's probability of the given
  label [N])`` from the run's final checkpoint."""
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.steps()[-1]
  config = ml_collections.ConfigDict(ckpt.read_meta(step)["config"])
  task = data.load(config.data, seed=config.seed)
  method = trainer.build_method(config, task, data.steps_per_epoch(len(task.train), config.batch_size))
  state, frozen = method.init(jax.random.PRNGKey(config.seed))
  _, state, _ = ckpt.restore_latest(state)
  ckpt.close()

  clean_config = ml_collections.ConfigDict(config.data.to_dict())
  clean_config.label_noise = 0.0
  clean_labels = data.load(clean_config, seed=config.seed).train.labels

  @jax.jit
  def alpha_fn(state, inputs, labels, index):
    logits = method.predict(state, frozen, inputs)
    teacher_logits = method.teacher_logits(state, frozen, inputs)
    batch = {"inputs": inputs, "labels": labels, "index": index}
    alpha = method.alpha(state["meta_params"], frozen, batch, logits, teacher_logits)
    teacher_p = jax.nn.softmax(teacher_logits.astype(jax.numpy.float32), -1)
    p_label = jax.numpy.take_along_axis(teacher_p, labels[:, None], -1)[:, 0]
    return alpha, jax.numpy.argmax(teacher_logits, -1) == labels, p_label

  source = task.train
  parts = []
  for start in range(0, len(source), 1000):
    idx = np.arange(start, min(start + 1000, len(source)))
    parts.append(jax.device_get(alpha_fn(state, source.gather(idx), source.labels[idx], idx.astype(np.int32))))
  alpha, teacher_correct, teacher_p_label = (np.concatenate(x) for x in zip(*parts))
  return alpha, source.labels != clean_labels, teacher_correct, teacher_p_label


def flipped_label_row(workdir: str) -> dict:
  """The run's flipped-label detection: sizes, mean α of the flipped and clean examples, the AUC of α and of the
  trivial detector 1 - p_T(label), and how often the teacher disagrees with each kind of label."""
  alpha, flipped, teacher_correct, teacher_p_label = alpha_over_train(workdir)
  return dict(n=int(len(alpha)), flipped=int(flipped.sum()),
              alpha_flipped=float(alpha[flipped].mean()), alpha_clean=float(alpha[~flipped].mean()),
              auc_flipped=metrics.roc_auc(flipped.astype(np.int32), alpha),
              # The trivial detector: how little the teacher believes the given label (1 - p_T(y)).
              auc_teacher=metrics.roc_auc(flipped.astype(np.int32), 1.0 - teacher_p_label),
              # What the teacher alone tells: its disagreement with the given label as a flipped-label detector.
              teacher_disagrees_on_flipped=float((~teacher_correct[flipped]).mean()),
              teacher_disagrees_on_clean=float((~teacher_correct[~flipped]).mean()),
              alpha_clean_teacher_agrees=float(alpha[~flipped & teacher_correct].mean()),
              alpha_clean_teacher_disagrees=float(alpha[~flipped & ~teacher_correct].mean()))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/study")
  parser.add_argument("--archive", default="",
                      help="read the rows from this study archive (bench/study.py --archive) instead of the work "
                           "directory's checkpoints")
  parser.add_argument("--setting", default="noise20")
  parser.add_argument("--methods", default="", help="comma-separated run names to analyse (default: every tgeo*, rw_kd)")
  parser.add_argument("--students", default="", help="comma-separated students (default: all)")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)

  rows = []
  base = args.archive or args.workdir
  # An archive's records are seed<i>.json (a temporary file a killed writer left behind is not one).
  pattern = "seed*.json" if args.archive else "seed*"
  for workdir in sorted(glob.glob(os.path.join(base, args.setting, "*", "*", pattern))):
    name = os.path.relpath(workdir, os.path.join(base, args.setting)).removesuffix(".json")
    student, method = name.split(os.sep)[:2]
    if not (method.startswith("tgeo") or method == "rw_kd"):
      continue
    if args.methods and method not in args.methods.split(","):
      continue
    if args.students and student not in args.students.split(","):
      continue
    if args.archive:
      with open(workdir) as f:
        found = json.load(f).get("label_noise")
      if found is None:
        continue
      row = dict(run=name, **found)
    else:
      if not os.path.exists(os.path.join(workdir, "summary.json")):
        continue
      row = dict(run=name, **flipped_label_row(workdir))
    rows.append(row)
    print(json.dumps(row), flush=True)

  groups = {}
  for r in rows:
    groups.setdefault(os.path.dirname(r["run"]), []).append(r)
  summary = []
  print("\n| run | seeds | mean α, flipped labels | mean α, clean labels | AUC of α for a flipped label | "
        "AUC of 1 - p_T(label) |")
  print("|---|---|---|---|---|---|")
  for key, rs in groups.items():
    mean = {k: statistics.mean(r[k] for r in rs)
            for k in ("alpha_flipped", "alpha_clean", "auc_flipped", "auc_teacher")}
    summary.append(dict(run=key, seeds=len(rs), **mean))
    print(f"| {key} | {len(rs)} | {mean['alpha_flipped']:.3f} | {mean['alpha_clean']:.3f} | "
          f"{mean['auc_flipped']:.3f} | {mean['auc_teacher']:.3f} |")
  if args.out:
    from tgeo_jax import report
    report.write_json(args.out, dict(setting=args.setting, runs=rows, summary=summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
