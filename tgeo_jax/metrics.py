"""Binary-classification metrics on host arrays (numpy only): ROC AUC and log-loss (CTR protocol, docs/methods.md §6)."""

from __future__ import annotations

import numpy as np

__all__ = ["LOG_LOSS_EPS", "average_ranks", "roc_auc", "log_loss"]

# Log-loss clips probabilities to [eps, 1 - eps]: float32 softmax outputs reach exactly 0 and 1.
LOG_LOSS_EPS = 1e-7


def average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks of ``values [N]`` with ties given the mean of the ranks they span (``[N]`` float64)."""
  values = np.asarray(values)
  order = np.argsort(values, kind="mergesort")
  sorted_values = values[order]
  # Start of each run of equal values in sorted order.
  starts = np.flatnonzero(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]]))
  ends = np.concatenate([starts[1:], [len(values)]])  # exclusive
  run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
  ranks = np.empty(len(values), np.float64)
  ranks[order] = np.repeat(run_rank, ends - starts)
  return ranks


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve by the rank (Mann-Whitney) formula, ties counting one half.

  ``AUC = (Σ_{i positive} rank_i − P(P + 1)/2) / (P · N)`` with average ranks of ``scores``; NaN when ``labels``
  (0/1, ``[N]``) hold a single class.
  """
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  if labels.shape != scores.shape or labels.ndim != 1:
    raise ValueError(f"roc_auc: labels {labels.shape} and scores {scores.shape} must be equal 1-D shapes")
  num_pos = int(labels.sum())
  num_neg = len(labels) - num_pos
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  ranks = average_ranks(scores)
  return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, *, eps: float = LOG_LOSS_EPS) -> float:
  """Mean binary cross-entropy ``−[y log p + (1 − y) log(1 − p)]`` of the positive-class probabilities ``probs``
  (clipped to ``[eps, 1 − eps]``); NaN on empty input."""
  labels = np.asarray(labels, np.float64)
  probs = np.clip(np.asarray(probs, np.float64), eps, 1.0 - eps)
  if labels.shape != probs.shape or labels.ndim != 1:
    raise ValueError(f"log_loss: labels {labels.shape} and probs {probs.shape} must be equal 1-D shapes")
  if len(labels) == 0:
    return float("nan")
  return float(-np.mean(labels * np.log(probs) + (1.0 - labels) * np.log1p(-probs)))
