"""Evaluation: masked sums over every example of a part, a frozen teacher's logits computed once, and the
metrics the task declares (``TaskData.metrics``: e.g. AUC and log-loss for CTR)."""

from __future__ import annotations

import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np

from tgeo_jax import losses, parallel

__all__ = ["make_eval_step", "FixedTeacherLogits", "evaluate", "prefetched"]


def make_eval_step(method, metrics=()):
  """``eval_step(state, frozen, batch) -> sums`` over a masked batch: loss, correct, count (+ teacher metrics, +
  the per-example positive-class probabilities when ``metrics`` asks for ``auc`` / ``log_loss``)."""

  def eval_step(state, frozen, batch):
    mask = batch["mask"]
    logits = method.predict(state, frozen, batch["inputs"])
    sums = {
        "loss": jnp.sum(losses.cross_entropy(logits, batch["labels"]) * mask),
        "correct": jnp.sum(losses.accuracy(logits, batch["labels"]) * mask),
        "count": jnp.sum(mask),
    }
    teacher_logits = batch.get("teacher_logits")  # precomputed by FixedTeacherLogits for a frozen teacher
    if teacher_logits is None:
      teacher_logits = method.teacher_logits(state, frozen, batch["inputs"])
    if teacher_logits is not None:
      sums["teacher_correct"] = jnp.sum(losses.accuracy(teacher_logits, batch["labels"]) * mask)
      sums["agreement"] = jnp.sum((jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)) * mask)
      sums["teacher_kl"] = jnp.sum(losses.kl_divergence(logits, teacher_logits, temperature=1.0) * mask)
    if "auc" in metrics or "log_loss" in metrics:
      # Binary tasks (CTR): per-example positive-class probabilities; evaluate() turns them into AUC / log-loss.
      sums["per_example"] = {"positive_prob": jax.nn.softmax(logits.astype(jnp.float32), -1)[:, 1],
                             "labels": batch["labels"], "mask": mask}
    return sums

  return eval_step


class FixedTeacherLogits:
  """A frozen teacher's logits on the evaluation batches, computed at the first evaluation and reused after:
  they cannot change, and recomputing them cost a teacher forward over the whole test set every epoch."""

  def __init__(self, method, frozen):
    self._fn = jax.jit(lambda f, x: method.teacher_logits(None, f, x))  # teacher_logits_fixed: reads frozen only
    self._frozen = frozen
    self._cache = []

  def __call__(self, index: int, inputs):
    if index == len(self._cache):
      self._cache.append(self._fn(self._frozen, inputs))
    return self._cache[index]


def evaluate(eval_step, state, batches, *, mesh, teacher_logits=None) -> dict:
  """Test metrics over ``batches`` (every example of a part once, padded and masked: ``Pipeline.evaluation``);
  ``eval_step(state, batch) -> sums``.

  ``teacher_logits(i, inputs)`` (a ``FixedTeacherLogits``), when given, supplies batch ``i``'s teacher logits.
  """
  totals, per_example = None, []
  for i, batch in enumerate(prefetched(batches)):
    batch = parallel.shard_batch(batch, mesh)
    if teacher_logits is not None:
      batch["teacher_logits"] = teacher_logits(i, batch["inputs"])
    sums = dict(eval_step(state, batch))
    if "per_example" in sums:  # concatenated, not summed
      per_example.append(sums.pop("per_example"))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  out = {"accuracy": float(totals.pop("correct")) / count, "loss": float(totals.pop("loss")) / count}
  if "teacher_correct" in totals:
    out["teacher_accuracy"] = float(totals["teacher_correct"]) / count
    out["agreement"] = float(totals["agreement"]) / count
    out["teacher_kl"] = float(totals["teacher_kl"]) / count
  if per_example:
    from jax.experimental import multihost_utils
    from tgeo_jax import metrics as binary_metrics
    fetch = (jax.device_get if jax.process_count() == 1
             else lambda x: multihost_utils.process_allgather(x, tiled=True))
    cols = {k: np.concatenate([np.asarray(fetch(b[k])) for b in per_example]) for k in per_example[0]}
    keep = cols["mask"] > 0
    out["auc"] = binary_metrics.roc_auc(cols["labels"][keep], cols["positive_prob"][keep])
    out["log_loss"] = binary_metrics.log_loss(cols["labels"][keep], cols["positive_prob"][keep])
  return out


_DONE = object()


def prefetched(iterable, depth: int = 2):
  """The items of ``iterable``, produced up to ``depth`` ahead by one background thread, in order.

  Evaluation batches are gathered (and, for a decoding source, decoded) there while the device evaluates the
  previous ones; numpy gathers and PIL decoding release the GIL for most of their work. An exception of the
  producer is re-raised here; leaving the loop early stops the producer at its next item.
  """
  items: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def produce():
    try:
      for item in iterable:
        while not stop.is_set():
          try:
            items.put((item, None), timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      items.put((_DONE, None))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      items.put((_DONE, e))

  thread = threading.Thread(target=produce, name="eval-prefetch", daemon=True)
  thread.start()
  try:
    while True:
      item, error = items.get()
      if item is _DONE:
        if error is not None:
          raise error
        return
      yield item
  finally:
    stop.set()
