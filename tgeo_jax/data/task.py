"""The task: what the examples are. Loading a dataset by name, the held-out validation split, the training
subset, label noise and outlier probes, the content digests that identify the data, and the per-task facts a
model needs (``TaskSpec``).

How batches of it reach a training step is ``tgeo_jax.data.pipeline``'s job.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from typing import Any

import numpy as np

from tgeo_jax import run_identity
from tgeo_jax.data import augment as augment_lib
from tgeo_jax.data import sources
from tgeo_jax.errors import UserError

__all__ = ["TaskData", "TaskSpec", "stratified_split", "RawTask", "TEST_ID_OFFSET", "LOADERS", "load",
           "content_digest", "check_finite", "symmetric_label_noise", "with_label_noise", "inject_outliers",
           "steps_per_epoch"]


@dataclasses.dataclass
class TaskData:
  """The three disjoint parts a run uses.

  ``train``: the student's training part (after the validation hold-out and the optional subset);
  ``val``: the held-out validation part (never augmented, never in a student gradient);
  ``test``: evaluation.
  """

  name: str
  train: sources.Source
  val: sources.Source
  test: sources.Source
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
  augment = augment_lib.get(data_config.augment)
  fill_channels = np.size(augment.raw_fill()) if hasattr(augment, "raw_fill") else None
  # e.g. CIFAR-100's crop (3-channel padding) on Fashion-MNIST
  if fill_channels is not None and fill_channels not in (1, input_shape[-1]):
    raise UserError(f"data.augment: {data_config.augment!r} pads with {fill_channels} channels; the {name} "
                    f"images have {input_shape[-1]}")
  return TaskData(name, train, val, test, num_classes, input_shape, augment, outlier_mask, dict(raw.model_kwargs),
                  membership, identity, tuple(metrics))


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


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch: the remainder that does not fill a batch is dropped (a different one each epoch)."""
  return num_examples // batch_size
