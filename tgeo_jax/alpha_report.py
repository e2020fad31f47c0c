"""α analytics for learned fusion ratios (TGeo-KD, RW-KD): the paper's Table 4 / Figure 3 groups and outliers.

Each epoch, α is computed for (up to ``analysis_examples`` of) the training examples with the current student and
fusion net, and summarised by group:

* teacher correct / incorrect (top-1 on the example's training label), crossed with
* student–teacher discrepancy ``‖t − s‖²`` (probabilities at τ = 1) in the top / bottom 20% of all examples;

plus the injected outliers against the normal examples when ``data.outliers`` > 0, and, with the study's wrong
teacher on (``study_wrong_teacher``), α on its set S against the rest with two detection AUCs: α's own
(``auc_alpha_wrong_teacher``: a low α ranks an example of S first) and the trivial detector's, the teacher's
disbelief in the training label ``1 - p_T(y)`` (``auc_disbelief_wrong_teacher``). Records go to
``WORKDIR/alpha.jsonl``; ``alpha_hist.png`` (the distribution by group, this epoch) and ``alpha_groups.png``
(group means over epochs) are redrawn each epoch.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tgeo_jax import fileio

__all__ = ["GROUPS", "GROUP_LABELS", "group_masks", "summarize", "write"]

GROUPS = ("tc_large", "tc_small", "ti_large", "ti_small")
GROUP_LABELS = {
    "tc_large": "teacher correct, large S-T gap (top 20%)",
    "tc_small": "teacher correct, small S-T gap (bottom 20%)",
    "ti_large": "teacher wrong, large S-T gap (top 20%)",
    "ti_small": "teacher wrong, small S-T gap (bottom 20%)",
}


def group_masks(teacher_correct: np.ndarray, discrepancy: np.ndarray, quantile: float = 0.2) -> dict:
  """Boolean masks ``[N]`` of the four groups; the thresholds are quantiles over all examples."""
  hi, lo = np.quantile(discrepancy, 1 - quantile), np.quantile(discrepancy, quantile)
  large, small = discrepancy >= hi, discrepancy <= lo
  return {"tc_large": teacher_correct & large, "tc_small": teacher_correct & small,
          "ti_large": ~teacher_correct & large, "ti_small": ~teacher_correct & small}


def summarize(alpha: np.ndarray, teacher_correct: np.ndarray, discrepancy: np.ndarray,
              outlier_mask: np.ndarray | None = None, wrong_teacher_mask: np.ndarray | None = None,
              teacher_label_prob: np.ndarray | None = None) -> dict:
  """Mean α overall, per group (None for an empty group), for outliers vs normal examples and, given
  ``wrong_teacher_mask`` (and ``teacher_label_prob`` ``p_T(y)``), on the study's set S vs the rest with the AUCs."""
  out = {"alpha_mean": float(alpha.mean()), "alpha_std": float(alpha.std())}
  for name, mask in group_masks(teacher_correct, discrepancy).items():
    out[f"alpha_{name}"] = float(alpha[mask].mean()) if mask.any() else None  # JSON null: an empty group
    out[f"count_{name}"] = int(mask.sum())
  if outlier_mask is not None and outlier_mask.any():
    out["alpha_outlier"] = float(alpha[outlier_mask].mean())
    out["alpha_normal"] = float(alpha[~outlier_mask].mean())
  if wrong_teacher_mask is not None and wrong_teacher_mask.any() and not wrong_teacher_mask.all():
    from tgeo_jax import metrics
    out["alpha_wrong_teacher"] = float(alpha[wrong_teacher_mask].mean())
    out["alpha_right_teacher"] = float(alpha[~wrong_teacher_mask].mean())
    out["auc_alpha_wrong_teacher"] = metrics.roc_auc(wrong_teacher_mask.astype(np.int32), -alpha)
    if teacher_label_prob is not None:
      out["auc_disbelief_wrong_teacher"] = metrics.roc_auc(wrong_teacher_mask.astype(np.int32),
                                                           1.0 - teacher_label_prob)
  return out


def write(workdir: str, epoch: int, step: int, alpha: np.ndarray, teacher_correct: np.ndarray,
          discrepancy: np.ndarray, outlier_mask: np.ndarray | None = None,
          wrong_teacher_mask: np.ndarray | None = None, teacher_label_prob: np.ndarray | None = None) -> dict:
  """Appends the epoch's summary to alpha.jsonl and redraws the figures; returns the summary."""
  summary = dict(epoch=epoch, step=step, **summarize(alpha, teacher_correct, discrepancy, outlier_mask,
                                                     wrong_teacher_mask, teacher_label_prob))
  path = os.path.join(workdir, "alpha.jsonl")
  records = []
  if os.path.exists(path):
    with open(path) as f:
      records = [r for r in (json.loads(line) for line in f if line.strip()) if r["epoch"] < epoch]
  records.append(summary)
  fileio.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
  _plot(workdir, epoch, records, alpha, group_masks(teacher_correct, discrepancy), outlier_mask)
  return summary


def _plot(workdir, epoch, records, alpha, masks, outlier_mask):
  # matplotlib's object API: no pyplot, so no global figure registry to leak into or close (the report may run
  # in a notebook's or a test's process). Fixed margins and legend places: tight_layout and loc="best" lay the
  # text out again on every epoch's redraw.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  bins = np.linspace(0, 1, 41)
  ax.hist(alpha, bins=bins, color="0.8", label="all training examples", density=True)
  for name, mask in masks.items():
    if mask.sum() > 1:
      ax.hist(alpha[mask], bins=bins, histtype="step", density=True, label=GROUP_LABELS[name])
  if outlier_mask is not None and outlier_mask.any():
    ax.hist(alpha[outlier_mask], bins=bins, histtype="step", density=True, color="k", linestyle="--",
            label="injected outliers")
  ax.set(xlabel="α (weight of the teacher term)", ylabel="density", title=f"α distribution, epoch {epoch}")
  ax.legend(fontsize=7, loc="upper left")
  fig.subplots_adjust(left=0.09, right=0.98, bottom=0.12, top=0.92)
  fig.savefig(os.path.join(workdir, "alpha_hist.png"), dpi=100)

  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  epochs = [r["epoch"] for r in records]
  for name in GROUPS:
    ax.plot(epochs, [np.nan if r[f"alpha_{name}"] is None else r[f"alpha_{name}"] for r in records], marker="o",
            label=GROUP_LABELS[name])
  if "alpha_outlier" in records[-1]:
    ax.plot(epochs, [r.get("alpha_outlier", np.nan) for r in records], "k--", marker="x", label="outliers")
    ax.plot(epochs, [r.get("alpha_normal", np.nan) for r in records], "k:", label="normal examples")
  ax.set(xlabel="epoch", ylabel="mean α", ylim=(0, 1), title="mean α by group")
  ax.legend(fontsize=7, loc="lower left")
  fig.subplots_adjust(left=0.09, right=0.98, bottom=0.12, top=0.92)
  fig.savefig(os.path.join(workdir, "alpha_groups.png"), dpi=100)
