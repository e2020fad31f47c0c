"""Task data: sources, the held-out validation split, and the grain pipelines.

Batches are dicts of host numpy arrays:
``{"inputs": [B, ...], "labels": [B] int32, "index": [B] int32}`` for training (``index`` is the example's
position in the student's training split, used by per-sample methods such as RW-KD), and additionally
``"mask": [B] float32`` for evaluation, where the last batch is padded to a fixed shape and the padding masked out
so that every test example counts exactly once.

Iterating: ``iterate(train_batches(...)[offset:], workers=resolve_workers(config.data, task.train))`` gives the
batches in order, decoded in worker processes when the source decodes per record (TFDS JPEG datasets) and in this
process when it is in memory (Fashion-MNIST, CIFAR-100 decoded once; see ``tfds_sources``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import threading
from typing import Any

import grain
import numpy as np

from tgeo_jax.data import augment as augment_lib
from tgeo_jax import run_identity
from tgeo_jax.data import sources
from tgeo_jax.errors import UserError

__all__ = ["TaskData", "TaskSpec", "stratified_split", "RawTask", "TEST_ID_OFFSET", "LOADERS", "load",
           "content_digest", "check_finite", "symmetric_label_noise", "with_label_noise", "inject_outliers",
           "steps_per_epoch", "epoch_order", "prepare_epoch", "train_batches", "resolve_workers",
           "decodes_per_record", "iterate", "validation_batches", "eval_batches"]


@dataclasses.dataclass
class TaskData:
  """The three disjoint parts a run uses.

  ``train``: the student's training part (after the validation hold-out and the optional subset);
  ``val``: the held-out validation part (never augmented, never in a student gradient);
  ``test``: evaluation.
  """

  name: str
  train: Any
  val: Any
  test: Any
  num_classes: int
  input_shape: tuple[int, ...]
  augment: Any = None
  # [len(train)] bool: the examples injected by the outlier probe (None without it).
  outlier_mask: np.ndarray | None = None
  # Extra constructor arguments the task imposes on every model (e.g. vocabulary sizes).
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  # Which examples of the dataset each part holds: {"train"|"val"|"test": sorted unique int64 example ids} (ids
  # name raw examples of the dataset, see ``RawTask``; the outlier probe's generated examples have none).
  membership: dict = dataclasses.field(default_factory=dict)
  # The dataset's identity: {"name", "digest" (of its raw content), "sizes", "membership" (sha256 per part)};
  # part of a run's fingerprint and of a teacher's provenance.
  identity: dict = dataclasses.field(default_factory=dict)
  # Evaluation metrics beyond accuracy and loss that this task reports (e.g. ("auc", "log_loss") for CTR).
  metrics: tuple = ()

  @property
  def spec(self) -> "TaskSpec":
    return TaskSpec(self.name, self.num_classes, self.input_shape, len(self.train), self.model_kwargs)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What a method needs to know about the task to build its state."""

  name: str
  num_classes: int
  input_shape: Any
  train_size: int
  model_kwargs: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices into (kept, held_out) with ``round(fraction * n_c)`` of each class held out.

  A class with at least two examples keeps at least one and holds out at least one. Both index arrays are sorted.
  """
  rng = np.random.default_rng(seed)
  held = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    n_out = int(round(fraction * len(idx)))
    if len(idx) >= 2:
      n_out = min(max(n_out, 1), len(idx) - 1)
    held.append(rng.permutation(idx)[:n_out])
  held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  kept = np.setdiff1d(np.arange(len(labels)), held)
  return kept, held


@dataclasses.dataclass
class RawTask:
  """What a dataset loader returns, before the validation hold-out.

  ``finalize(train, val, test) -> (train, val, test)`` runs after the split: preprocessing fitted on the student's
  training part only (MinMax scalers, vocabularies, oversampling) goes there, so validation and test never leak
  into it. ``model_kwargs`` reach ``models.create`` (e.g. Wide&Deep's vocabulary sizes).

  Identity (for run fingerprints and teacher provenance): ``train_ids`` / ``test_ids`` ``[N] int64`` name each
  example of ``train`` / ``test`` among the dataset's raw examples (default: its position in the train split, and
  ``TEST_ID_OFFSET +`` its position in the test split; a loader that carves its test split out of one file passes
  the file's row numbers, so that a teacher split with other fields is compared by row). ``digest`` identifies the
  raw content (default: sha256 of the in-memory arrays); ``describe(id)`` names an example for error messages
  (e.g. ``file.csv line 17``).
  """

  train: Any
  test: Any
  num_classes: int
  input_shape: Any
  finalize: Any = None
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  train_ids: np.ndarray | None = None
  test_ids: np.ndarray | None = None
  digest: str | None = None
  describe: Any = None
  # Set by a ``finalize`` that resamples the training part (oversampling): row r of the finalized training part is
  # row ``train_rows[r]`` of the part it received.
  train_rows: np.ndarray | None = None
  # Extra evaluation metrics (``TaskData.metrics``); None: AUC and log-loss for two-class tasks, else none.
  metrics: tuple | None = None


# Default ids of the test split's examples: after every train-split id of any dataset we read.
TEST_ID_OFFSET = 1 << 40


def _fashion_mnist(data_config) -> RawTask:
  splits = sources.fashion_mnist(data_config.dir or sources.FASHION_MNIST_DIR)
  return RawTask(splits["train"], splits["test"], 10, (28, 28, 1))


def _synthetic(data_config) -> RawTask:
  c = data_config.synthetic
  splits = sources.synthetic(num_train=c.num_train, num_test=c.num_test, input_shape=tuple(c.input_shape),
                             num_classes=c.num_classes, seed=c.seed)
  return RawTask(splits["train"], splits["test"], c.num_classes, tuple(c.input_shape))


# data.name -> loader(data_config) -> RawTask; "module:function" entries are imported on first use.
LOADERS: dict[str, Any] = {
    "fashion_mnist": _fashion_mnist,
    "synthetic": _synthetic,
    "attack": "tgeo_jax.data.tabular:attack",
    "criteo": "tgeo_jax.data.tabular:criteo",
    "cifar100": "tgeo_jax.data.tfds_sources:cifar100",
    "imagenet2012": "tgeo_jax.data.tfds_sources:imagenet2012",
}


def _loader(name: str):
  if name not in LOADERS:
    raise UserError(f"data.name: unknown dataset {name!r}; expected one of {sorted(LOADERS)}")
  loader = LOADERS[name]
  if isinstance(loader, str):
    import importlib
    module, fn = loader.split(":")
    loader = getattr(importlib.import_module(module), fn)
  return loader


def load(data_config, *, seed: int) -> TaskData:
  """Builds the task named by ``data_config.name`` with its validation split and optional training subset."""
  name = data_config.name
  raw = _loader(name)(data_config)
  splits, num_classes, input_shape = {"train": raw.train, "test": raw.test}, raw.num_classes, raw.input_shape

  full_train, test = splits["train"], splits["test"]
  for split_name, src in (("train", full_train), ("test", test)):
    if len(src) == 0:
      raise UserError(f"data: the {split_name} split of {name!r} is empty")
    if src.labels.min() < 0 or src.labels.max() >= num_classes:
      raise UserError(f"data: {split_name} labels must be in [0, {num_classes}), found "
                      f"[{src.labels.min()}, {src.labels.max()}]")
  # The split depends on data.split_seed only (not the run seed), so every method and seed sees the same
  # validation examples.
  train_ids = (np.arange(len(full_train), dtype=np.int64) if raw.train_ids is None
               else np.asarray(raw.train_ids, np.int64))
  test_ids = (TEST_ID_OFFSET + np.arange(len(test), dtype=np.int64) if raw.test_ids is None
              else np.asarray(raw.test_ids, np.int64))
  digest = raw.digest or content_digest(full_train, test)
  kept, held = stratified_split(full_train.labels, data_config.val_fraction, data_config.split_seed)
  train, val = sources.subset(full_train, kept), sources.subset(full_train, held)
  ids = {"train": train_ids[kept], "val": train_ids[held], "test": test_ids}
  if data_config.train_subset:
    if data_config.train_subset > len(train):
      raise UserError(f"data.train_subset: {data_config.train_subset} exceeds the {len(train)} training examples")
    keep_fraction = data_config.train_subset / len(train)
    if keep_fraction < 1.0:
      _, chosen = stratified_split(train.labels, keep_fraction, data_config.split_seed + 1)
      train = sources.subset(train, chosen)
      ids["train"] = ids["train"][chosen]
  val_subset = data_config.val_subset
  if val_subset:
    if val_subset > len(val):
      raise UserError(f"data.val_subset: {val_subset} exceeds the {len(val)} validation examples")
    if val_subset < len(val):
      _, chosen = stratified_split(val.labels, val_subset / len(val), data_config.split_seed + 2)
      val = sources.subset(val, chosen)
      ids["val"] = ids["val"][chosen]
  if data_config.label_noise:
    train = with_label_noise(train, data_config.label_noise, num_classes, seed=data_config.split_seed)
  if raw.finalize is not None:
    train, val, test = raw.finalize(train, val, test)
  train_row_ids = ids["train"] if raw.train_rows is None else ids["train"][raw.train_rows]
  for part_name, part, part_ids in (("training", train, train_row_ids), ("validation", val, ids["val"]),
                                    ("test", test, ids["test"])):
    check_finite(part, part_name, part_ids, raw.describe)
  if data_config.train_with_val:
    train = sources.concatenate(train, val)
    ids["train"] = np.concatenate([ids["train"], ids["val"]])
  outlier_mask = None
  if data_config.outliers:
    train, outlier_mask = inject_outliers(train, data_config.outliers, num_classes, seed=data_config.split_seed)
  membership = {k: np.unique(v) for k, v in ids.items()}
  identity = {
      "name": name,
      "digest": digest,
      "sizes": {"train": len(train), "val": len(val), "test": len(test)},
      "membership": {k: run_identity.ids_digest(v) for k, v in membership.items()},
  }
  metrics = raw.metrics if raw.metrics is not None else (("auc", "log_loss") if num_classes == 2 else ())
  return TaskData(name, train, val, test, num_classes, input_shape, augment_lib.get(data_config.augment),
                  outlier_mask, dict(raw.model_kwargs), membership, identity, tuple(metrics))


def content_digest(*parts) -> str:
  """sha256 of the raw splits' labels and, for in-memory sources, their inputs (a TFDS source: labels and sizes
  only; its loader may pass a better ``RawTask.digest``)."""
  digest = hashlib.sha256()
  for part in parts:
    digest.update(f"{len(part)}:".encode())
    leaves = [np.asarray(part.labels)]
    inputs = getattr(part, "inputs", None)
    if inputs is not None:
      leaves += [inputs[k] for k in sorted(inputs)] if isinstance(inputs, dict) else [inputs]
    for leaf in leaves:
      leaf = np.ascontiguousarray(leaf)
      digest.update(f"{leaf.dtype}{leaf.shape}".encode())
      digest.update(leaf.tobytes() if leaf.dtype != object else repr(leaf.tolist()).encode())
  return digest.hexdigest()


def check_finite(source, part_name: str, ids: np.ndarray, describe=None) -> None:
  """Refuses non-finite model inputs (raw, or produced by preprocessing such as MinMax scaling of a column whose
  range overflows) in an in-memory part, naming the example and the column."""
  inputs = getattr(source, "inputs", None)
  if inputs is None:
    return
  for key, leaf in (sorted(inputs.items()) if isinstance(inputs, dict) else [(None, inputs)]):
    leaf = np.asarray(leaf)
    if not np.issubdtype(leaf.dtype, np.floating):
      continue
    finite = np.isfinite(leaf)
    if finite.all():
      continue
    row = int(np.flatnonzero(~finite.reshape(len(leaf), -1).all(axis=1))[0])
    column = int(np.flatnonzero(~finite.reshape(len(leaf), -1)[row])[0])
    where = describe(int(ids[row])) if describe is not None and row < len(ids) else f"example {row}"
    field = f"{key!r} " if key is not None else ""
    raise UserError(f"data: {where}, {field}column {column + 1}: the {part_name} input is "
                    f"{leaf.reshape(len(leaf), -1)[row, column]} after preprocessing (expected a finite number; "
                    "a column whose range overflows cannot be MinMax-scaled)")


def symmetric_label_noise(labels: np.ndarray, fraction: float, num_classes: int, *, seed: int) -> np.ndarray:
  """``labels [N]`` with exactly ``round(fraction * N)`` of them (a random choice) replaced by a label drawn
  uniformly from the *other* ``num_classes - 1`` classes (so every chosen label is wrong)."""
  rng = np.random.default_rng([seed, 15485863])
  labels = np.asarray(labels)
  chosen = rng.permutation(len(labels))[:int(round(fraction * len(labels)))]
  noisy = labels.copy()
  # An offset in [1, K) added modulo K: uniform over the other classes.
  noisy[chosen] = (labels[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
  return noisy.astype(labels.dtype)


def with_label_noise(source, fraction: float, num_classes: int, *, seed: int):
  """A shallow copy of ``source`` whose labels carry ``symmetric_label_noise`` (the inputs are shared)."""
  noisy = copy.copy(source)
  noisy.labels = symmetric_label_noise(source.labels, fraction, num_classes, seed=seed)
  return noisy


def inject_outliers(source, count: int, num_classes: int, *, seed: int):
  """Appends ``count`` Gaussian-noise examples with uniformly random labels (the paper's outlier probe).

  Pixel-valued (uint8) sources get N(127.5, 64²) noise clipped to [0, 255]; float sources N(0, 1) in their own
  space. Returns the extended source and the ``[len]`` boolean mask of the injected examples.
  """
  if not isinstance(source, sources.ArraySource) or isinstance(source.inputs, dict):
    raise UserError("data.outliers: the outlier probe needs an in-memory image dataset")
  rng = np.random.default_rng([seed, 104729])
  shape = (count, *source.inputs.shape[1:])
  if source.inputs.dtype == np.uint8:
    noise = np.clip(rng.normal(127.5, 64.0, size=shape), 0, 255).astype(np.uint8)
  else:
    noise = rng.normal(size=shape).astype(source.inputs.dtype)
  labels = rng.integers(0, num_classes, size=count)
  extended = sources.ArraySource(np.concatenate([source.inputs, noise]), np.concatenate([source.labels, labels]),
                                 source.to_model, source.pixelwise)
  mask = np.zeros(len(extended), bool)
  mask[len(source):] = True
  return extended, mask


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return num_examples // batch_size


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
  threading.Thread(target=epoch_order, args=(n, _epoch_seed(seed, epoch), count), name=f"epoch-order-{epoch}").start()


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
  epoch_seed = _epoch_seed(seed, epoch)
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
  per_pass = n // batch_size
  local = batch_size // process_count

  def make_batch(t):
    k, j = divmod(int(t), per_pass)
    perm = np.random.default_rng([seed, 7919, k]).permutation(n)
    indices = perm[j * batch_size:(j + 1) * batch_size][process_index * local:(process_index + 1) * local]
    return {"inputs": source.gather(indices), "labels": source.labels[indices]}

  return grain.MapDataset.range(2**62).map(make_batch)


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
