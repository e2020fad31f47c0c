"""Random-access data sources.

A source is what the pipeline indexes: ``len(source)``, ``source.labels`` (``[N]`` int32, needed for stratified
splits and the class-mean teacher without decoding inputs) and ``source.gather(indices [B]) -> inputs [B, ...]``.
In-memory arrays (Fashion-MNIST, tabular tasks, CIFAR-100 decoded once) implement ``gather`` with fancy indexing; a
TFDS ``data_source`` implements it by decoding records one at a time, so it slots in without changing the pipeline.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Any, Callable, Protocol

import numpy as np

from tgeo_jax.errors import UserError

__all__ = ["Source", "ArraySource", "SubsetSource", "subset", "ConcatSource", "concatenate", "FASHION_MNIST_DIR",
           "FASHION_MNIST_FILES", "read_idx", "normalize_fashion_mnist", "fashion_mnist", "write_idx", "synthetic"]


class Source(Protocol):
  """What every part of a task is: ``len`` examples, their ``labels`` ``[N]`` int, and ``gather(indices)``, the
  model inputs of those examples (``[B, ...]`` or a dict of such arrays)."""

  labels: np.ndarray

  def __len__(self) -> int: ...

  def gather(self, indices: np.ndarray) -> Any: ...


@dataclasses.dataclass
class ArraySource:
  """In-memory examples. ``inputs`` is an array ``[N, ...]`` (or a dict of them); ``to_model`` maps a gathered
  raw batch (e.g. uint8 pixels) to model inputs (e.g. normalised float32), so memory holds the compact form.

  ``pixelwise``: ``to_model`` maps each pixel on its own (e.g. a per-channel normalisation, possibly adding a channel
  axis), so crops and flips commute with it and the pipeline may augment the raw pixels (``gather_raw``) first.
  """

  inputs: Any
  labels: np.ndarray
  to_model: Callable[[Any], Any] | None = None
  pixelwise: bool = False

  def __post_init__(self):
    self.labels = np.asarray(self.labels, dtype=np.int32)
    n = len(self.labels)
    for leaf in (self.inputs.values() if isinstance(self.inputs, dict) else [self.inputs]):
      if len(leaf) != n:
        raise UserError(f"data: {len(leaf)} inputs but {n} labels")

  def __len__(self) -> int:
    return len(self.labels)

  def gather(self, indices: np.ndarray) -> Any:
    if isinstance(self.inputs, dict):
      raw = {k: v[indices] for k, v in self.inputs.items()}
    else:
      raw = self.inputs[indices]
    return self.to_model(raw) if self.to_model is not None else raw

  def gather_raw(self, indices: np.ndarray) -> Any:
    """The stored form of ``indices`` (before ``to_model``)."""
    return {k: v[indices] for k, v in self.inputs.items()} if isinstance(self.inputs, dict) else self.inputs[indices]

  def subset(self, indices: np.ndarray) -> "ArraySource":
    indices = np.asarray(indices)
    inputs = ({k: v[indices] for k, v in self.inputs.items()} if isinstance(self.inputs, dict)
              else self.inputs[indices])
    return ArraySource(inputs, self.labels[indices], self.to_model, self.pixelwise)


@dataclasses.dataclass
class SubsetSource:
  """A view of ``base`` restricted to ``indices`` (for sources that cannot be copied, e.g. TFDS)."""

  base: Any
  indices: np.ndarray

  def __post_init__(self):
    self.indices = np.asarray(self.indices, dtype=np.int64)
    self.labels = np.asarray(self.base.labels)[self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def gather(self, indices: np.ndarray) -> Any:
    return self.base.gather(self.indices[np.asarray(indices)])


def subset(source, indices):
  return source.subset(indices) if hasattr(source, "subset") else SubsetSource(source, indices)


@dataclasses.dataclass
class ConcatSource:
  """``first`` followed by ``second`` (same example structure and model transform), without copying either."""

  first: Any
  second: Any

  def __post_init__(self):
    self.labels = np.concatenate([np.asarray(self.first.labels), np.asarray(self.second.labels)]).astype(np.int32)
    self._n1 = len(self.first.labels)

  def __len__(self) -> int:
    return len(self.labels)

  def gather(self, indices: np.ndarray) -> Any:
    indices = np.asarray(indices)
    in_first = indices < self._n1
    parts = [self.first.gather(indices[in_first]), self.second.gather(indices[~in_first] - self._n1)]
    # Re-interleave into the requested order.
    order = np.argsort(np.concatenate([np.flatnonzero(in_first), np.flatnonzero(~in_first)]), kind="stable")
    if isinstance(parts[0], dict):
      return {k: np.concatenate([parts[0][k], parts[1][k]])[order] for k in parts[0]}
    return np.concatenate(parts)[order]


def concatenate(first, second):
  """The examples of ``first`` then ``second`` (e.g. the training and validation parts)."""
  return ConcatSource(first, second)


# ----------------------------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MISSING_FMNIST = ("data.dir: Fashion-MNIST IDX files not found in {dir!r} (expected {file}[.gz]); install them with "
                   "'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu) or set --config.data.dir=DIR")


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzip-compressed): big-endian magic (0, 0, dtype, ndim), dims, then data."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise UserError(f"{path}: cannot read IDX file ({e})") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise UserError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise UserError(f"{path}: truncated IDX header")
  dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  expected = int(np.prod(dims)) if dims else 0
  if len(data) - header != expected:
    raise UserError(f"{path}: IDX payload has {len(data) - header} bytes, header says {expected}")
  return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_file(directory: str, name: str) -> tuple[np.ndarray, str]:
  """``name`` or ``name.gz`` in ``directory``, read; when both exist they must hold the same array (a stale
  uncompressed copy beside a newer .gz is refused rather than silently preferred)."""
  found = [os.path.join(directory, c) for c in (name, name + ".gz") if os.path.exists(os.path.join(directory, c))]
  if not found:
    raise UserError(_MISSING_FMNIST.format(dir=directory, file=name))
  arrays = [read_idx(path) for path in found]
  if len(arrays) == 2 and (arrays[0].shape != arrays[1].shape or not np.array_equal(arrays[0], arrays[1])):
    raise UserError(f"{found[0]}: differs from {found[1]} beside it (a stale copy?); remove the one that is wrong")
  return arrays[0], found[0]


def normalize_fashion_mnist(images_uint8: np.ndarray) -> np.ndarray:
  """``[B, 28, 28] uint8 -> [B, 28, 28, 1] float32``, standardised with the training set's mean/std."""
  x = images_uint8.astype(np.float32) * (1.0 / 255.0)
  return ((x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)[..., None]


def fashion_mnist(directory: str = FASHION_MNIST_DIR) -> dict[str, ArraySource]:
  """The Fashion-MNIST train (60k) and test (10k) splits from IDX files, as uint8 kept in memory."""
  if not os.path.isdir(directory):
    raise UserError(_MISSING_FMNIST.format(dir=directory, file=FASHION_MNIST_FILES["train"][0]))
  splits = {}
  for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
    images, _ = _read_idx_file(directory, image_file)
    labels, _ = _read_idx_file(directory, label_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
      raise UserError(f"{image_file}: expected images of shape [N, 28, 28], got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
      raise UserError(f"{label_file}: expected {len(images)} labels, got shape {labels.shape}")
    if labels.max(initial=0) >= 10:
      raise UserError(f"{label_file}: labels must be in [0, 10), found {int(labels.max())}")
    splits[split] = ArraySource(images, labels, normalize_fashion_mnist, pixelwise=True)
  return splits


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 IDX file (gzip when ``path`` ends in .gz); used by tests to fake the Debian package."""
  array = np.asarray(array, dtype=np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())


# ----------------------------------------------------------------------------------------------- synthetic

def synthetic(*, num_train: int, num_test: int, input_shape=(28, 28, 1), num_classes: int = 10, seed: int = 0,
              noise: float = 1.0) -> dict[str, ArraySource]:
  """A learnable generated task: each class is a fixed random prototype plus Gaussian noise (float32)."""
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(num_classes, *input_shape)).astype(np.float32)

  def make(n):
    labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    inputs = prototypes[labels] + noise * rng.normal(size=(n, *input_shape)).astype(np.float32)
    return ArraySource(inputs, labels)

  return {"train": make(num_train), "test": make(num_test)}
