"""CIFAR-100 and ImageNet (ILSVRC-2012) from prepared TFDS datasets, as random-access sources.

``tfds.data_source`` reads a dataset prepared in the ``array_record`` format (``tfds build NAME
--data_dir=DIR --file_format=array_record``) without TensorFlow. Records are decoded one at a time in ``gather``, so
nothing but the labels is held in memory.

CIFAR-100: images are normalised with the CIFAR-100 mean/std in ``gather``; the training augmentation
``crop_flip_cifar100`` pads with the normalised value of a black pixel, i.e. exactly RepDistiller's zero padding of
the raw image before ``Normalize`` (the generic ``crop_flip`` pads with zeros in normalised space: the mean colour).

ImageNet: the usual torchvision transforms, with one approximation. Training images come out of ``gather`` resized
(shorter side 256, bilinear) and centre-cropped to 256x256; the ``imagenet_crop_flip`` augmentation then takes a
random-resized crop (scale 0.08-1, ratio 3/4-4/3) of that 256x256 image to 224x224 and flips it. torchvision crops
from the full original image instead, so the crops here never reach beyond the central square. Evaluation (test
and the held-out validation part) is resize 256 + centre crop 224.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from tgeo_jax.data import sources
from tgeo_jax.errors import UserError

CIFAR100_MEAN = np.array([0.5071, 0.4865, 0.4409], np.float32)
CIFAR100_STD = np.array([0.2673, 0.2564, 0.2762], np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

_NOT_PREPARED = ("data.dir: TFDS dataset {name!r} is not prepared in {dir}; download and prepare it with "
                 "`tfds build {name} --data_dir={dir} --file_format=array_record` (or set TFDS_DATA_DIR), then pass "
                 "--config.data.dir={dir}")


def _data_dir(data_config) -> str | None:
  return data_config.dir or None


def open_split(name: str, split: str, data_dir: str | None):
  """``tfds.data_source(name, split)``; a dataset that is not prepared (or not as array_record) -> UserError."""
  import tensorflow_datasets as tfds
  shown = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  from absl import logging
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # tfds warns about the missing dataset_info.json before raising
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # noqa: BLE001 - tfds raises assorted types (AssertionError, NotImplementedError, ...)
    message = _NOT_PREPARED.format(name=name, dir=shown)
    root = os.path.join(os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or
                                           "~/tensorflow_datasets"), name)
    has_info = any("dataset_info.json" in files for _, _, files in os.walk(root))
    if has_info and "TFRECORD" in str(e):
      message = (f"data.dir: TFDS dataset {name!r} in {shown} is prepared as TFRecord, which cannot be read at "
                 f"random; rebuild it with `tfds build {name} --data_dir={shown} --file_format=array_record`")
    raise UserError(message) from None
  finally:
    logging.set_verbosity(verbosity)


def _image(record) -> np.ndarray:
  image = record["image"]
  if isinstance(image, (bytes, bytearray)):
    import io
    image = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  elif image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image.astype(np.uint8)


def read_labels(src, cache_path: str | None = None) -> np.ndarray:
  """Every record's ``label`` (decodes each record once; cached to ``cache_path`` when given and writable)."""
  if cache_path and os.path.exists(cache_path):
    labels = np.load(cache_path)
    if len(labels) == len(src):
      return labels.astype(np.int32)
  labels = np.array([int(src[i]["label"]) for i in range(len(src))], np.int32)
  if cache_path:
    try:
      np.save(cache_path, labels)
    except OSError:
      pass
  return labels


def _normalize(images_uint8: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  return ((images_uint8.astype(np.float32) * (1.0 / 255.0) - mean) / std).astype(np.float32)


class TfdsImageSource:
  """A TFDS random-access split: ``labels`` read once, ``gather`` decodes, transforms and normalises records.

  ``transform(image uint8 HWC) -> uint8 HWC`` of a fixed output shape (identity for CIFAR).
  """

  def __init__(self, src, labels, mean, std, transform=None):
    self.src, self.labels = src, np.asarray(labels, np.int32)
    self.mean, self.std, self.transform = mean, std, transform

  def __len__(self) -> int:
    return len(self.labels)

  def with_transform(self, transform) -> "TfdsImageSource":
    return TfdsImageSource(self.src, self.labels, self.mean, self.std, transform)

  def gather(self, indices) -> np.ndarray:
    images = []
    for i in np.asarray(indices).reshape(-1):
      image = _image(self.src[int(i)])
      images.append(self.transform(image) if self.transform is not None else image)
    return _normalize(np.stack(images), self.mean, self.std)


def _labels_cache(data_config, name: str, split: str) -> str | None:
  if not data_config.dir:
    return None
  return os.path.join(data_config.dir, f".tgeo_labels_{name}_{split}.npy")


def cifar100(data_config):
  """CIFAR-100 (50k train / 10k test, 32x32x3, 100 fine labels)."""
  from tgeo_jax.data import RawTask
  splits = {}
  for split in ("train", "test"):
    src = open_split("cifar100", split, _data_dir(data_config))
    splits[split] = TfdsImageSource(src, read_labels(src, _labels_cache(data_config, "cifar100", split)),
                                    CIFAR100_MEAN, CIFAR100_STD)
  return RawTask(splits["train"], splits["test"], 100, (32, 32, 3))


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
  """ILSVRC-2012 (1.28M train / 50k validation used as test, 1000 classes), 224x224x3 model inputs.

  Training requires ``data.augment='imagenet_crop_flip'`` (it makes the 224 crops); the held-out validation part is
  re-pointed to the evaluation transform in ``finalize``.
  """
  from tgeo_jax.data import RawTask
  if data_config.augment != "imagenet_crop_flip":
    raise UserError("data.augment: imagenet2012 needs 'imagenet_crop_flip' (training images come out of the source "
                    f"at 256x256 and the augmentation crops them to 224), got {data_config.augment!r}")
  data_dir = _data_dir(data_config)
  train_src = open_split("imagenet2012", "train", data_dir)
  test_src = open_split("imagenet2012", "validation", data_dir)
  train = TfdsImageSource(train_src, read_labels(train_src, _labels_cache(data_config, "imagenet2012", "train")),
                          IMAGENET_MEAN, IMAGENET_STD, imagenet_train_transform)
  test = TfdsImageSource(test_src, read_labels(test_src, _labels_cache(data_config, "imagenet2012", "validation")),
                         IMAGENET_MEAN, IMAGENET_STD, imagenet_eval_transform)

  def finalize(train_part, val_part, test_part):
    if isinstance(val_part, sources.SubsetSource) and isinstance(val_part.base, TfdsImageSource):
      val_part = sources.SubsetSource(val_part.base.with_transform(imagenet_eval_transform), val_part.indices)
    return train_part, val_part, test_part

  return RawTask(train, test, 1000, (224, 224, 3), finalize=finalize)
