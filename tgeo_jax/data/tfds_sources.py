"""CIFAR-100 and ImageNet (ILSVRC-2012) from prepared TFDS datasets, as random-access sources.

``tfds.data_source`` reads a dataset prepared in the ``array_record`` format without TensorFlow: by
``python -m tgeo_jax.prepare`` from the published CIFAR-100 archives or class-folder trees (``tgeo_jax/prepare.py``),
or by ``tfds build NAME --file_format=array_record`` where TensorFlow is installed. Records are opened with the
image feature left encoded (``tfds.decode.SkipDecoding``): labels are read without decoding a single image, and
images are decoded here with PIL (the decoder TFDS itself uses without OpenCV), optionally at a reduced JPEG scale
(``data.jpeg_draft``).

``data.tfds_name`` points either protocol at another prepared dataset with the same features (``image``,
``label``), e.g. one built locally with ``tgeo_jax.data.tfds_build``; its class count is read from its features.

Two ways to serve images (``data.in_memory``: auto = on for CIFAR-100, off for ImageNet):

* in memory: the split is decoded once into ``[N, H, W, C] uint8`` (after the protocol's fixed transform), cached
  at ``<data.cache_dir or data dir/.tgeo_cache>/<name>_<split>_<digest>.npz`` under a sha256 of the split's
  array_record bytes (a small dataset's files hash in well under the time decoding them takes, and a content digest
  cannot mistake a re-prepared dataset for the cached one) and the sha256 of the array itself (a corrupt cache is
  rebuilt, never used); then the source is an ``ArraySource``: batch-wise fancy-index gather + normalise, and the
  augmentation can work on the uint8 pixels (``train_batches``). A cache that cannot be written warns once and the
  run continues from memory.
* per record: ``gather`` decodes the batch's records one at a time (in grain worker processes with
  ``data.workers``, see ``tgeo_jax.data.iterate``); nothing but the labels is held in memory.

Both give bit-identical batches for the same (seed, epoch, step).

Labels are read once per split and cached in ``<data.dir>/.tgeo_labels_<name>_<split>_<digest>.npy``, keyed by the
names, sizes and first/last MiB of the split's files (hashing ImageNet's 140 GB would take longer than reading the
labels again) and checked against the split's length.

CIFAR-100: images are normalised with the CIFAR-100 mean/std; the training augmentation ``crop_flip_cifar100`` pads
with the normalised value of a black pixel, i.e. exactly RepDistiller's zero padding of the raw image before
``Normalize`` (the generic ``crop_flip`` pads with zeros in normalised space: the mean colour).

Smoke tests without the data (``data.mock=True``): the splits come from ``tfds.testing.mock_data`` (the builder's
feature spec, ``USE_CODE`` policy: no download, no prepared files), ``data.mock_examples`` random examples per split
(the same examples in both), through the same protocol, augmentation and model. It is labelled as not real
everywhere: a ``warning:`` line when the data is opened, ``data.mock: true`` in the run's config (and so in
``summary.json``'s ``config`` and the fingerprint), and a data digest ``mock-<sha256>`` (``summary.json``'s
``data.digest``), so a run on mock data never shares a fingerprint with a real one, and a teacher trained on mock
data is refused as the teacher of a real-data run by the provenance check (another data digest).

ImageNet: the usual torchvision transforms, with one approximation. Training images come out of ``gather`` resized
(shorter side 256, bilinear) and centre-cropped to 256x256; the ``imagenet_crop_flip`` augmentation then takes a
random-resized crop (scale 0.08-1, ratio 3/4-4/3) of that 256x256 image to 224x224 and flips it. torchvision crops
from the full original image instead, so the crops here never reach beyond the central square. Evaluation (test
and the held-out validation part) is resize 256 + centre crop 224. With ``data.jpeg_draft`` a JPEG is decoded at the
largest DCT scale (1/2, 1/4, 1/8) whose shorter side is still >= 256 before that resize (PIL ``Image.draft``):
the pixels differ slightly from a full decode (see README, "Data pipeline"), so the field is part of a run's
fingerprint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import sys

import numpy as np
from PIL import Image

from tgeo_jax import fileio
from tgeo_jax.data import sources
from tgeo_jax.errors import UserError

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGENET_RESIZE", "IN_MEMORY_MODES",
           "open_split", "MOCK_DIGEST_PREFIX", "mock_context", "decode_image", "split_files", "files_digest",
           "read_labels", "TableNormalize", "TfdsImageSource", "cache_directory", "decode_all", "decoded_split",
           "to_memory", "cifar100", "resize_shorter", "center_crop", "imagenet_train_transform",
           "imagenet_eval_transform", "imagenet2012"]

CIFAR100_MEAN = np.array([0.5071, 0.4865, 0.4409], np.float32)
CIFAR100_STD = np.array([0.2673, 0.2564, 0.2762], np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGENET_RESIZE = 256  # shorter side before the crops (and the smallest shorter side a draft decode may give)

# How to prepare each protocol's dataset without TensorFlow (tgeo_jax/prepare.py); another name: any class tree.
_PREPARE_HINT = {
    "cifar100": "python -m tgeo_jax.prepare cifar100 --archive=cifar-100-python.tar.gz --data_dir={dir}",
    "imagenet2012": "python -m tgeo_jax.prepare imagefolder --root=ILSVRC2012_DIR --data_dir={dir}",
}
_NOT_PREPARED = ("data.dir: TFDS dataset {name!r} is not prepared in {dir}; prepare it from your files with `{hint}` "
                 "(no TensorFlow needed), then pass --config.data.dir={dir}")
IN_MEMORY_MODES = ("auto", "on", "off")


def _data_dir(data_config) -> str | None:
  return data_config.dir or None


def _setting(data_config, name: str, default):
  """``data_config.name``, or ``default`` for configs written before the field existed."""
  return data_config[name] if name in data_config else default


def open_split(name: str, split: str, data_dir: str | None, *, encoded: bool = True):
  """``tfds.data_source(name, split)`` with the image feature left encoded (``record["image"]`` is the file's
  bytes; mock data may still give arrays); a dataset that is not prepared (or not as array_record) -> UserError.
  ``encoded=False`` opens it decoded (``mock_context``: mock records cannot be encoded without TensorFlow, and the
  failed attempt prints TFDS's "Failed to import TensorFlow" banner)."""
  import tensorflow_datasets as tfds
  shown = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  from absl import logging
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # tfds warns about the missing dataset_info.json before raising
  try:
    if not encoded:
      return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                           decoders={"image": tfds.decode.SkipDecoding()})
    try:
      if len(src):
        src[0]  # a probe: does this source give records?
    except Exception:  # noqa: BLE001 - tfds.testing.mock_data cannot encode images without TensorFlow: decoded
      src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return src
  except Exception as e:  # noqa: BLE001 - tfds raises assorted types (AssertionError, NotImplementedError, ...)
    hint = _PREPARE_HINT.get(name, f"python -m tgeo_jax.prepare imagefolder --root=TREE --name={name} "
                                     "--data_dir={dir}").format(dir=shown)
    message = _NOT_PREPARED.format(name=name, dir=shown, hint=hint)
    root = os.path.join(os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or
                                           "~/tensorflow_datasets"), name)
    has_info = any("dataset_info.json" in files for _, _, files in os.walk(root))
    if has_info and "TFRECORD" in str(e):
      message = (f"data.dir: TFDS dataset {name!r} in {shown} is prepared as TFRecord, which cannot be read at "
                 f"random; prepare it as array_record with `{hint}`")
    raise UserError(message) from None
  finally:
    logging.set_verbosity(verbosity)


MOCK_DIGEST_PREFIX = "mock-"


def _is_mock(data_config) -> bool:
  return bool(_setting(data_config, "mock", False))


def mock_context(data_config, name: str):
  """``tfds.testing.mock_data`` for ``data.mock=True`` (with its warning line), else a no-op context.

  The sources opened inside stay usable after it exits (and pickle into worker processes): each record is generated
  from its index, the same in every process.
  """
  if not _is_mock(data_config):
    return contextlib.nullcontext()
  import tensorflow_datasets as tfds
  n = _setting(data_config, "mock_examples", 128)
  print(f"warning: data.mock=True: {name!r} is TFDS MOCK data ({n} random examples per split), NOT the real "
        "dataset: a smoke test whose accuracies mean nothing (summary.json: config data.mock, data digest mock-...)",
        file=sys.stderr, flush=True)
  return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


def _digest(data_config, *parts) -> str:
  """``content_digest`` of the per-record sources, ``mock-`` prefixed on mock data (module docstring)."""
  from tgeo_jax.data import content_digest
  digest = content_digest(*parts)
  return MOCK_DIGEST_PREFIX + digest if _is_mock(data_config) else digest


def decode_image(data, draft_size: int | None = None) -> np.ndarray:
  """A record's ``image`` (encoded bytes, or an already decoded array) as ``[H, W, 3] uint8``.

  ``draft_size``: for a JPEG, let libjpeg decode at the largest DCT scale (1/2, 1/4, 1/8) that keeps both sides
  >= ``draft_size`` (PIL picks ``min(w // s, h // s) >= 1`` for ``size=(s, s)``), so a later resize of the shorter
  side to ``draft_size`` starts from fewer pixels.
  """
  if isinstance(data, (bytes, bytearray)):
    pil = Image.open(io.BytesIO(data))
    if draft_size and pil.format == "JPEG":
      pil.draft("RGB", (draft_size, draft_size))
    image = np.asarray(pil.convert("RGB"))
  else:
    image = np.asarray(data)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  elif image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image.astype(np.uint8, copy=False)


def split_files(src) -> list[tuple[str, int, int]] | None:
  """``(path, skip, take)`` of each array_record shard behind a TFDS split, or None (e.g. mock data)."""
  try:
    from tensorflow_datasets.core.data_sources import base
    instructions = base.file_instructions(src.dataset_info, src.split)
    files = [(os.fspath(fi.filename), int(fi.skip), int(fi.take)) for fi in instructions]
  except Exception:  # noqa: BLE001 - a mock or foreign source has no files
    return None
  return files if files and all(os.path.isfile(path) for path, _, _ in files) else None


def files_digest(src, *, content: bool) -> str | None:
  """sha256 naming a split's files: their whole bytes (``content``), or their names, sizes, modification times
  (ns) and first/last MiB (a file rewritten in place, even at the same size, gets a new digest)."""
  files = split_files(src)
  if files is None:
    return None
  digest = hashlib.sha256()
  for path, skip, take in files:
    size = os.path.getsize(path)
    digest.update(f"{os.path.basename(path)}:{size}:{skip}:{take};".encode())
    if not content:
      digest.update(f"mtime:{os.stat(path).st_mtime_ns};".encode())
    with open(path, "rb") as f:
      if content:
        for block in iter(lambda: f.read(1 << 22), b""):
          digest.update(block)
      else:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
  return digest.hexdigest()


def read_labels(src, cache_path: str | None = None) -> np.ndarray:
  """Every record's ``label`` ``[N] int32``, without decoding images (``open_split`` leaves them encoded).

  ``cache_path`` (``.../.tgeo_labels_NAME_SPLIT.npy``): the labels are stored as ``..._<digest>.npz`` beside it,
  with the sha256 of the label array, under ``files_digest(src, content=False)`` (names, sizes, modification times,
  first/last MiB of the files); a cache is used only when its checksum and length match, and a bad one is rebuilt
  with one warning line. Caches of other digests for the same split are removed when a new one is written.
  """
  cached = None
  if cache_path:
    digest = files_digest(src, content=False)
    if digest is not None:
      cached = f"{cache_path[:-len('.npy')]}_{digest[:16]}.npz"
      if os.path.exists(cached):
        try:
          with np.load(cached) as f:
            labels, stored = np.asarray(f["labels"]), str(f["sha256"])
          if labels.ndim == 1 and len(labels) == len(src) and _array_sha256(labels) == stored:
            return labels.astype(np.int32)
          problem = "does not match its checksum"
        except Exception as e:  # noqa: BLE001 - any damage (a bad zip CRC, garbage) means: read the labels again
          problem = f"is unreadable ({type(e).__name__})"
        _warn_once(cached, f"label cache {cached} {problem}; reading the labels again")
  labels = np.empty(len(src), np.int32)
  chunk = 1024  # __getitems__ reads a chunk of records from array_record in parallel
  for start in range(0, len(src), chunk):
    keys = list(range(start, min(start + chunk, len(src))))
    labels[start:start + len(keys)] = [int(r["label"]) for r in _get_records(src, keys)]
  if cached:
    try:
      _save_atomic(cached, lambda f: np.savez(f, labels=labels, sha256=np.str_(_array_sha256(labels))))
      prefix = os.path.basename(cache_path[:-len(".npy")]) + "_"
      for stale in os.listdir(os.path.dirname(cached)):
        if stale.startswith(prefix) and stale.endswith((".npy", ".npz")) and stale != os.path.basename(cached):
          os.remove(os.path.join(os.path.dirname(cached), stale))
    except OSError:
      pass  # a read-only data directory: the labels are read again next time
  return labels


def _get_records(src, keys: list[int]) -> list:
  """``[src[k] for k in keys]``, through ``__getitems__`` (array_record reads a batch of records in parallel)."""
  getitems = getattr(src, "__getitems__", None)
  if getitems is not None:
    try:
      return list(getitems(keys))
    except TypeError:  # tfds.testing.mock_data's source has a broken __getitems__
      pass
  return [src[k] for k in keys]


_save_atomic = fileio.atomic_write


def _normalize(images_uint8: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  return ((images_uint8.astype(np.float32) * (1.0 / 255.0) - mean) / std).astype(np.float32)


class TableNormalize:
  """``_normalize`` of uint8 pixels by a per-channel lookup table: ``[..., C] uint8 -> [..., C] float32``.

  Bit-identical to ``_normalize`` (each table entry is ``_normalize`` of that byte) and about 2-3x faster, which
  matters for in-memory batches (~1 ms of a 128x32x32x3 batch instead of ~3). Other dtypes fall back to it.
  """

  def __init__(self, mean: np.ndarray, std: np.ndarray):
    self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    byte = np.arange(256, dtype=np.uint8)[:, None]
    self.table = np.ascontiguousarray(_normalize(byte, self.mean, self.std).T)  # [C, 256]

  def __call__(self, images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim == 0 or images.shape[-1] != len(self.table):
      return _normalize(images, self.mean, self.std)
    out = np.empty(images.shape, np.float32)
    for c, table in enumerate(self.table):
      out[..., c] = table.take(images[..., c])
    return out


class TfdsImageSource:
  """A TFDS random-access split: ``labels`` read once, ``gather`` decodes, transforms and normalises records.

  ``transform(image uint8 HWC) -> uint8 HWC`` of a fixed output shape (identity for CIFAR); ``draft_size``: see
  ``decode_image``. ``gather(indices [B]) -> [B, H, W, C] float32``; ``gather_raw`` stops before normalising.
  """

  decodes_per_record = True  # what data.workers='auto' looks for

  def __init__(self, src, labels, mean, std, transform=None, draft_size: int | None = None):
    self.src, self.labels = src, np.asarray(labels, np.int32)
    self.mean, self.std, self.transform, self.draft_size = mean, std, transform, draft_size

  def __len__(self) -> int:
    return len(self.labels)

  def with_transform(self, transform) -> "TfdsImageSource":
    return TfdsImageSource(self.src, self.labels, self.mean, self.std, transform, self.draft_size)

  def gather_raw(self, indices) -> np.ndarray:
    keys = [int(i) for i in np.asarray(indices).reshape(-1)]
    images = []
    for record in _get_records(self.src, keys):
      image = decode_image(record["image"], self.draft_size)
      images.append(self.transform(image) if self.transform is not None else image)
    return np.stack(images)

  def gather(self, indices) -> np.ndarray:
    return _normalize(self.gather_raw(indices), self.mean, self.std)

  def to_model(self, images_uint8: np.ndarray) -> np.ndarray:
    return _normalize(images_uint8, self.mean, self.std)


def _labels_cache(data_config, name: str, split: str) -> str | None:
  if not data_config.dir:
    return None
  return os.path.join(data_config.dir, f".tgeo_labels_{name}_{split}.npy")


# ------------------------------------------------------------------------------------------ decoded in memory

_WARNED: set = set()


def _warn_once(key: str, message: str) -> None:
  if key not in _WARNED:
    _WARNED.add(key)
    print(f"warning: {message}", file=sys.stderr)


def cache_directory(data_config) -> str:
  """Where decoded splits are cached: ``data.cache_dir``, else ``.tgeo_cache`` in the TFDS data directory."""
  explicit = _setting(data_config, "cache_dir", "")
  if explicit:
    return explicit
  root = data_config.dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.join(os.path.expanduser(root), ".tgeo_cache")


def _array_sha256(images: np.ndarray) -> str:
  digest = hashlib.sha256(f"{images.dtype}{images.shape}".encode())
  digest.update(np.ascontiguousarray(images).data)
  return digest.hexdigest()


def decode_all(source: TfdsImageSource, chunk: int = 1024) -> np.ndarray:
  """Every record of ``source`` decoded and transformed: ``[N, H, W, C] uint8``."""
  first = source.gather_raw(np.arange(min(chunk, len(source))))
  out = np.empty((len(source), *first.shape[1:]), np.uint8)
  out[:len(first)] = first
  for start in range(len(first), len(source), chunk):
    stop = min(start + chunk, len(source))
    out[start:stop] = source.gather_raw(np.arange(start, stop))
  return out


def decoded_split(source: TfdsImageSource, *, cache_dir: str | None, tag: str) -> np.ndarray:
  """``decode_all(source)``, through a verified on-disk cache ``<cache_dir>/<tag>_<digest16>.npz`` when the
  source has files (``tag`` names the dataset, split and transform)."""
  digest = files_digest(source.src, content=True) if cache_dir else None
  if digest is None:
    return decode_all(source)
  path = os.path.join(cache_dir, f"{tag}_{digest[:16]}.npz")
  if os.path.exists(path):
    try:
      with np.load(path) as cache:
        images, stored, source_digest = cache["images"], str(cache["sha256"]), str(cache["source_sha256"])
      if len(images) == len(source) and source_digest == digest and _array_sha256(images) == stored:
        return images
      problem = "does not match its checksum"
    except Exception as e:  # noqa: BLE001 - any damage (a bad zip CRC, a truncated array) means: decode again
      problem = f"is unreadable ({type(e).__name__})"
    _warn_once(path, f"data cache {path} {problem}; decoding the split again")
  images = decode_all(source)
  try:
    os.makedirs(cache_dir, exist_ok=True)
    _save_atomic(path, lambda f: np.savez(f, images=images, sha256=np.str_(_array_sha256(images)),
                                          source_sha256=np.str_(digest)))
  except OSError as e:
    _warn_once(cache_dir, f"data cache: cannot write {path} ({e.strerror or e}); keeping the decoded split in "
                          "memory only")
  return images


def _in_memory(data_config, default: bool) -> bool:
  mode = _setting(data_config, "in_memory", "auto")
  if mode not in IN_MEMORY_MODES and not isinstance(mode, bool):
    raise UserError(f"data.in_memory: expected 'auto', 'on' or 'off', got {mode!r}")
  return default if mode == "auto" else mode in ("on", True)


def to_memory(source: TfdsImageSource, data_config, tag: str) -> sources.ArraySource:
  """``source`` decoded once into an ``ArraySource`` (uint8 pixels, ``to_model`` = the same normalisation)."""
  images = decoded_split(source, cache_dir=cache_directory(data_config), tag=tag)
  return sources.ArraySource(images, source.labels, TableNormalize(source.mean, source.std), pixelwise=True)


def _tfds_name(data_config, default: str) -> str:
  return _setting(data_config, "tfds_name", "") or default


def _num_classes(src, default: int) -> int:
  try:
    return int(src.dataset_info.features["label"].num_classes)
  except Exception:  # noqa: BLE001 - mock data: the protocol's count
    return default


def cifar100(data_config):
  """CIFAR-100 (50k train / 10k test, 32x32x3, 100 fine labels; another dataset with ``data.tfds_name``)."""
  from tgeo_jax.data import RawTask
  name = _tfds_name(data_config, "cifar100")
  splits = {}
  with mock_context(data_config, name):
    for split in ("train", "test"):
      src = open_split(name, split, _data_dir(data_config), encoded=not _is_mock(data_config))
      splits[split] = TfdsImageSource(src, read_labels(src, _labels_cache(data_config, name, split)),
                                      CIFAR100_MEAN, CIFAR100_STD)
  num_classes = _num_classes(splits["train"].src, 100)
  shape = splits["train"].gather_raw(np.arange(1)).shape[1:]
  # The digest of the per-record sources (labels and sizes), so that data.in_memory never changes a fingerprint.
  digest = _digest(data_config, splits["train"], splits["test"])
  if _in_memory(data_config, True):
    splits = {split: to_memory(s, data_config, f"{name}_{split}") for split, s in splits.items()}
  return RawTask(splits["train"], splits["test"], num_classes, tuple(shape), digest=digest)


# --------------------------------------------------------------------------------------------------- ImageNet

def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
  return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def imagenet_train_transform(image: np.ndarray) -> np.ndarray:
  """Resize 256 + centre crop 256 (the random-resized crop to 224 follows in ``imagenet_crop_flip``)."""
  return center_crop(resize_shorter(image, 256), 256)


def imagenet_eval_transform(image: np.ndarray) -> np.ndarray:
  """Resize 256 + centre crop 224."""
  return center_crop(resize_shorter(image, 256), 224)


def imagenet2012(data_config):
  """ILSVRC-2012 (1.28M train / 50k validation used as test, 1000 classes), 224x224x3 model inputs; another
  dataset with the same protocol through ``data.tfds_name`` (splits ``train`` and ``validation``).

  Training requires ``data.augment='imagenet_crop_flip'`` (it makes the 224 crops); the held-out validation part is
  re-pointed to the evaluation transform in ``finalize``.
  """
  from tgeo_jax.data import RawTask
  if data_config.augment != "imagenet_crop_flip":
    raise UserError("data.augment: imagenet2012 needs 'imagenet_crop_flip' (training images come out of the source "
                    f"at 256x256 and the augmentation crops them to 224), got {data_config.augment!r}")
  name = _tfds_name(data_config, "imagenet2012")
  draft = _setting(data_config, "jpeg_draft", False)
  if not isinstance(draft, bool):
    raise UserError(f"data.jpeg_draft: expected True or False, got {draft!r}")
  draft_size = IMAGENET_RESIZE if draft else None
  data_dir = _data_dir(data_config)
  with mock_context(data_config, name):
    train_src = open_split(name, "train", data_dir, encoded=not _is_mock(data_config))
    test_src = open_split(name, "validation", data_dir, encoded=not _is_mock(data_config))
  train = TfdsImageSource(train_src, read_labels(train_src, _labels_cache(data_config, name, "train")),
                          IMAGENET_MEAN, IMAGENET_STD, imagenet_train_transform, draft_size)
  test = TfdsImageSource(test_src, read_labels(test_src, _labels_cache(data_config, name, "validation")),
                         IMAGENET_MEAN, IMAGENET_STD, imagenet_eval_transform, draft_size)
  digest = _digest(data_config, train, test)
  in_memory = _in_memory(data_config, False)
  if in_memory:
    tag = f"{name}_{{split}}{'_draft' if draft else ''}"
    train = to_memory(train, data_config, tag.format(split="train"))
    test = to_memory(test, data_config, tag.format(split="validation"))

  def finalize(train_part, val_part, test_part):
    if isinstance(val_part, sources.SubsetSource) and isinstance(val_part.base, TfdsImageSource):
      val_part = sources.SubsetSource(val_part.base.with_transform(imagenet_eval_transform), val_part.indices)
    elif isinstance(val_part, sources.ArraySource):
      # In memory the training split holds the 256x256 centre crops; the evaluation transform's 224 centre crop
      # of the resized image is exactly the 224 centre crop of that 256 crop.
      val_part = sources.ArraySource(val_part.inputs, val_part.labels,
                                     functools.partial(_center_crop_normalize, size=224))
    return train_part, val_part, test_part

  return RawTask(train, test, _num_classes(train_src, 1000), (224, 224, 3), finalize=finalize, digest=digest)


def _center_crop_normalize(images_uint8: np.ndarray, size: int) -> np.ndarray:
  """``[B, H, W, C] uint8`` -> the ``size`` centre crops, ImageNet-normalised ``float32``."""
  h, w = images_uint8.shape[1:3]
  top, left = (h - size) // 2, (w - size) // 2
  return _normalize(images_uint8[:, top:top + size, left:left + size], IMAGENET_MEAN, IMAGENET_STD)
