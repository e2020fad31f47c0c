"""The input pipeline: how a task's examples reach the step. The epoch's order (a pure function of seed and
epoch, so a resumed run sees the same batches), augmentation, decoding workers, the endless validation stream of
bilevel methods, and the padded evaluation batches.

Batches are dicts of host numpy arrays:
``{"inputs": [B, ...], "labels": [B] int32, "index": [B] int32}`` for training (``index`` is the example's
position in the student's training split, used by per-sample methods such as RW-KD), plus ``"val"`` (a validation
batch) for methods that take one, and ``"mask": [B] float32`` for evaluation, where the last batch is padded to a
fixed shape and the padding masked out so that every test example counts exactly once.

The trainer builds one ``Pipeline`` per run and asks it for batches; the functions below are its parts (and what
benchmarks and tests use directly).
"""

from __future__ import annotations

import functools
import os
import threading

import grain
import numpy as np

from tgeo_jax.data import sources
from tgeo_jax.errors import UserError

__all__ = ["Pipeline", "epoch_order", "prepare_epoch", "train_batches", "resolve_workers", "decodes_per_record",
           "iterate", "validation_batches", "validation_indices", "eval_batches", "epoch_shuffle_seed"]


class Pipeline:
  """One run's batches: built once by the trainer from the task and the batch sizes, then asked for them.

  * ``epoch(e, offset)``: an iterator over epoch ``e``'s training batches from step ``offset`` of the epoch on
    (``steps_per_epoch`` in all), each ``{"inputs", "labels", "index"}`` plus ``"val"`` (that step's validation
    batch) when ``val_batch_size`` is given; built in prefetch threads or ``workers`` processes. ``close()`` it
    when stopping early.
  * ``prepare(e)``: starts computing epoch ``e``'s order in the background (the next epoch while this one trains).
  * ``evaluation(part)``: every example of ``part`` (e.g. ``task.test``) once, in padded, masked batches of
    ``eval_batch_size`` (clamped to the part's size rounded up to ``devices``: a larger batch would only pad).

  Every batch is a pure function of ``(seed, epoch, step)``: a resumed run gets the batches an uninterrupted one
  would. With several processes each builds its ``1 / process_count`` slice of every global batch.

  Example::

    pipeline = Pipeline(task, batch_size=128, seed=0)
    for batch in pipeline.epoch(0):
      ...
  """

  def __init__(self, task, *, batch_size: int, seed: int, val_batch_size: int | None = None,
               eval_batch_size: int | None = None, devices: int = 1, workers: int = 0, process_index: int = 0,
               process_count: int = 1):
    self.task, self.batch_size, self.seed = task, batch_size, seed
    self.eval_batch_size, self.devices = eval_batch_size or batch_size, devices
    self.workers, self.process_index, self.process_count = workers, process_index, process_count
    self.steps_per_epoch = len(task.train) // batch_size
    self.val_stream = (validation_batches(task.val, batch_size=val_batch_size, seed=seed, process_index=process_index,
                                          process_count=process_count)
                       if val_batch_size is not None else None)

  def prepare(self, epoch: int) -> None:
    prepare_epoch(self.task.train, batch_size=self.batch_size, seed=self.seed, epoch=epoch)

  def epoch_batches(self, epoch: int) -> grain.MapDataset:
    """Epoch ``epoch``'s batches as a random-access grain dataset (``[step]``); the validation batch of global step
    ``epoch * steps_per_epoch + step`` is composed in, so it is prepared off the training thread too."""
    batches = train_batches(self.task.train, batch_size=self.batch_size, seed=self.seed, epoch=epoch,
                            augment=self.task.augment, process_index=self.process_index,
                            process_count=self.process_count)
    if self.val_stream is None:
      return batches
    first_step, val_stream = epoch * self.steps_per_epoch, self.val_stream
    return batches.map_with_index(lambda i, batch: dict(batch, val=val_stream[first_step + i]))

  def epoch(self, epoch: int, offset: int = 0, *, until=None):
    """Epoch ``epoch``'s batches from step ``offset`` on, one per step (``until``, the device pipeline's chunk
    limit, has nothing to limit here)."""
    del until
    return iterate(self.epoch_batches(epoch)[offset:], workers=self.workers)

  def evaluation(self, part):
    batch_size = min(self.eval_batch_size, -(-len(part) // self.devices) * self.devices)
    return eval_batches(part, batch_size=batch_size, process_index=self.process_index,
                        process_count=self.process_count)


def epoch_shuffle_seed(seed: int, epoch: int) -> int:
  """The seed of epoch ``epoch``'s shuffle and of its steps' augmentation generators (``[seed, step]``)."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _raw_augment(source, augment):
  """``augment.on_raw`` when it is exact for ``source`` (a pixel-wise uint8 ``ArraySource`` whose ``to_model(0)``
  is the augmentation's padding value), else None."""
  on_raw = getattr(augment, "on_raw", None)
  if (on_raw is None or not isinstance(source, sources.ArraySource) or not source.pixelwise
      or source.to_model is None or not isinstance(source.inputs, np.ndarray) or source.inputs.dtype != np.uint8):
    return None
  fill = getattr(augment, "raw_fill", None)
  if fill is not None:
    zero = np.asarray(source.to_model(np.zeros((1, *source.inputs.shape[1:]), np.uint8)))
    if not np.array_equal(zero, np.broadcast_to(np.asarray(fill(), zero.dtype), zero.shape)):
      return None
  return on_raw


_ORDERS: dict = {}  # (n, seed, count) -> the computed order; the few most recent epochs
_ORDERS_LOCK = threading.Lock()
_ORDER_LOCKS: dict = {}


def epoch_order(n: int, seed: int, count: int) -> np.ndarray:
  """The first ``count`` indices of grain's shuffle of ``range(n)`` with ``seed`` (``[count] int64``), computed once
  per process and kept for the few most recent epochs: grain's index shuffle costs ~5-20 us per index (about a
  second for 54,000 examples), which ``prepare_epoch`` moves off the critical path."""
  key = (n, seed, count)
  with _ORDERS_LOCK:
    if key in _ORDERS:
      return _ORDERS[key]
    lock = _ORDER_LOCKS.setdefault(key, threading.Lock())
  with lock:  # one computation per key, however many threads ask
    with _ORDERS_LOCK:
      if key in _ORDERS:
        return _ORDERS[key]
    shuffled = grain.MapDataset.range(n).shuffle(seed=seed)
    order = np.fromiter((shuffled[i] for i in range(count)), np.int64, count)
    with _ORDERS_LOCK:
      _ORDERS[key] = order
      for old in list(_ORDERS)[:-4]:
        del _ORDERS[old]
        _ORDER_LOCKS.pop(old, None)
    return order


def prepare_epoch(source, *, batch_size: int, seed: int, epoch: int) -> None:
  """Starts computing epoch ``epoch``'s order of an in-memory ``source`` in a background thread (the trainer calls
  it for the next epoch while the current one trains, and for the first epoch while the step compiles), so the
  epoch's first batch does not wait for it. Other sources look their order up per batch: nothing to do."""
  if not isinstance(source, sources.ArraySource):
    return
  n = len(source)
  count = (n // batch_size) * batch_size
  # Not a daemon: the interpreter lets it finish (under a second) at exit instead of killing it inside grain's C++.
  threading.Thread(target=epoch_order, args=(n, epoch_shuffle_seed(seed, epoch), count), name=f"epoch-order-{epoch}").start()


class _EpochOrder:
  """``epoch_order(n, seed, count)``, looked up on first use (in whichever process builds the batches)."""

  def __init__(self, n: int, seed: int, count: int):
    self.n, self.seed, self.count = n, seed, count

  def get(self) -> np.ndarray:
    return epoch_order(self.n, self.seed, self.count)


def train_batches(source, *, batch_size: int, seed: int, epoch: int, augment=None, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """The ``epoch``-th pass over ``source`` as a random-access grain dataset of batches.

  The order (and the augmentation) is a pure function of ``(seed, epoch, step)``: ``ds[step]`` is the same batch in
  a fresh and in a resumed run. The remainder that does not fill a global batch is dropped (each epoch a different
  one). With several processes each gets its contiguous ``batch_size / process_count`` slice of the global batch.
  Iterate it with ``iterate`` (worker processes for decoding sources).

  In-memory sources (``ArraySource``) take two shortcuts that change no bit of any batch: the epoch's permutation
  is computed once (grain's shuffle costs ~20 us per index, ~1 ms of a 128-batch) and a pixel-wise uint8 source is
  augmented on its raw pixels before ``to_model`` (``augment.on_raw``, checked by ``_raw_augment``).
  """
  epoch_seed = epoch_shuffle_seed(seed, epoch)
  local = batch_size // process_count
  batches = grain.MapDataset.range(len(source)).shuffle(seed=epoch_seed).batch(batch_size, drop_remainder=True)
  in_memory = isinstance(source, sources.ArraySource)
  raw_augment = _raw_augment(source, augment) if augment is not None else None
  order = _EpochOrder(len(source), epoch_seed, len(batches) * batch_size) if in_memory else None

  def indices_of(step):
    if order is None:
      return np.asarray(batches[step])
    return order.get()[step * batch_size:(step + 1) * batch_size]

  def make_batch(step):
    step = int(step)
    indices = indices_of(step)[process_index * local:(process_index + 1) * local]
    rng = np.random.default_rng([epoch_seed, step])
    if raw_augment is not None:
      inputs = source.to_model(raw_augment(source.gather_raw(indices), rng))
    else:
      inputs = source.gather(indices)
      if augment is not None:
        inputs = augment(inputs, rng)
    return {"inputs": inputs, "labels": source.labels[indices], "index": indices.astype(np.int32)}

  return grain.MapDataset.range(len(batches)).map(make_batch)


def resolve_workers(data_config, source) -> int:
  """The number of decoding worker processes for ``source`` (``data.workers``).

  None (auto): 0 for a source that is in memory; for a decoding source ``min(16, os.cpu_count() - 1)`` when that
  leaves a core to the training loop (dispatch, host-to-device copies) and more than one to decode, else 0 (on 2
  cores the in-process prefetch threads decode as fast as 2 workers, 1 worker only half as fast: README, "Data
  pipeline"); past ~16 workers the host's memory bandwidth rather than the decoder is the limit. An integer >= 0
  is used as given.
  """
  workers = data_config.workers if "workers" in data_config else None
  if workers is not None and workers != "auto":
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
      raise UserError(f"data.workers: expected 'auto' or an integer >= 0, got {workers!r}")
    return workers
  spare = min(16, (os.cpu_count() or 1) - 1)
  return spare if decodes_per_record(source) and spare >= 2 else 0


def decodes_per_record(source) -> bool:
  """Whether ``gather`` decodes records (a TFDS source, or a view or concatenation containing one)."""
  if getattr(source, "decodes_per_record", False):
    return True
  parts = [getattr(source, name) for name in ("base", "first", "second") if hasattr(source, name)]
  return any(decodes_per_record(part) for part in parts)


def iterate(batches: grain.MapDataset, *, workers: int = 0, threads: int | None = None):
  """An iterator over ``batches`` (e.g. ``train_batches(...)[offset:]``): batch dicts in the dataset's order.

  ``workers == 0``: built in this process by ``threads`` prefetch threads (default ``min(4, os.cpu_count())``; numpy
  and PIL release the GIL for most of a batch), each at most one batch ahead. ``workers > 0``: that many spawned
  processes (grain's ``mp_prefetch``), each with ``threads`` threads (default 1), build every ``workers``-th batch
  and hand it back through shared memory; grain reads them round-robin, so the order does not depend on the worker
  count. Each worker holds at most 2 finished batches (grain's own default, 500 elements ahead, would hold
  hundreds of ImageNet batches). Workers start when the first batch is requested (a fresh Python process each:
  ~3 s of imports, mostly grain's import of jax, plus unpickling the dataset: an in-memory source would be copied,
  which is why ``resolve_workers`` gives those 0) and stop when the iterator is exhausted, closed, or
  garbage-collected; ``close()`` it when stopping early.
  """
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
    raise UserError(f"data.workers: expected an integer >= 0, got {workers!r}")
  threads = threads or (1 if workers else max(1, min(4, os.cpu_count() or 1)))
  ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
  if workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags when it starts workers; the CLI parses its own FlagValues, not absl's global one.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1))
  return _closing(iter(ds))


def _closing(iterator):
  try:
    yield from iterator
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


def validation_batches(source, *, batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> grain.MapDataset:
  """An endless random-access stream of un-augmented validation batches: ``ds[t]`` for meta step ``t``.

  Pass ``k`` over the validation part uses the permutation of ``(seed, k)``; a batch never straddles passes.
  """
  n = len(source)
  if batch_size > n:
    raise UserError(f"validation batch size {batch_size} exceeds the {n} held-out validation examples "
                    "(raise data.val_fraction or lower the validation batch size)")
  local = batch_size // process_count

  def make_batch(t):
    indices = validation_indices(n, batch_size=batch_size, seed=seed, step=t)[
        process_index * local:(process_index + 1) * local]
    return {"inputs": source.gather(indices), "labels": source.labels[indices]}

  return grain.MapDataset.range(2**62).map(make_batch)


def validation_indices(n: int, *, batch_size: int, seed: int, step: int) -> np.ndarray:
  """The validation part's positions in meta step ``step``'s batch (``[batch_size] int64``, global batch)."""
  k, j = divmod(int(step), n // batch_size)
  return _validation_pass(n, seed, k)[j * batch_size:(j + 1) * batch_size]


@functools.lru_cache(maxsize=4)
def _validation_pass(n: int, seed: int, k: int) -> np.ndarray:
  # Pass k's permutation, computed once (not once per batch); read-only, as the batches only slice it.
  perm = np.random.default_rng([seed, 7919, k]).permutation(n)
  perm.flags.writeable = False
  return perm


def eval_batches(source, *, batch_size: int, process_index: int = 0, process_count: int = 1):
  """Every example of ``source`` once, in order, in fixed-shape batches; the last is zero-padded and masked."""
  n = len(source)
  local = batch_size // process_count
  for start in range(0, n, batch_size):
    indices = np.arange(start, min(start + batch_size, n))
    mask = np.zeros(batch_size, np.float32)
    mask[: len(indices)] = 1.0
    padded = np.concatenate([indices, np.zeros(batch_size - len(indices), np.int64)])
    sl = slice(process_index * local, (process_index + 1) * local)
    padded, mask = padded[sl], mask[sl]
    yield {"inputs": source.gather(padded), "labels": source.labels[padded], "mask": mask}
