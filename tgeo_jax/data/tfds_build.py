"""Prepare a TFDS-format (array_record) image dataset from your own images, without TensorFlow.

``build_image_dataset`` writes what ``tfds build NAME --file_format=array_record`` would: ``DIR/NAME/VERSION/`` with
``dataset_info.json``, ``features.json`` and one array_record file per split, features ``image``
(``tfds.features.Image``, PNG or JPEG bytes) and ``label`` (``ClassLabel``), records in the order given. ``tfds.data_source(NAME,
data_dir=DIR)`` then reads it like any prepared dataset, so a local dataset goes through exactly the loader a
published one does (``data.name='imagenet2012'`` or ``'cifar100'`` with ``data.tfds_name=NAME``).

The tests and ``bench/data_paths.py`` use it with ``fashion_mnist_images``: Fashion-MNIST pictures (or generated
ones when the IDX files are absent) resized to ImageNet-like or CIFAR-like sizes, so labels, JPEG decoding, crops
and resume run on real encoded files.
"""

from __future__ import annotations

import io
import os
import types
from typing import Callable, Iterable

import numpy as np
from PIL import Image

__all__ = ["IMAGENET_LIKE_SIZES", "encode", "build_image_dataset", "fashion_mnist_images"]

# ImageNet-like (height, width) sizes: landscape, portrait and a few large images (the ones ``data.jpeg_draft``
# decodes at a reduced DCT scale; ImageNet's median is about 500x375, and about a quarter are larger).
IMAGENET_LIKE_SIZES = ((300, 400), (375, 500), (400, 300), (333, 500), (560, 750), (600, 800))


def encode(image: np.ndarray, encoding_format: str, quality: int = 90) -> bytes:
  """``[H, W, C] uint8 -> PNG/JPEG bytes`` (PIL)."""
  buf = io.BytesIO()
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if encoding_format == "jpeg":
    pil.save(buf, format="JPEG", quality=quality)
  else:
    pil.save(buf, format="PNG")
  return buf.getvalue()


def build_image_dataset(data_dir: str, name: str, splits: dict[str, Callable[[], Iterable[tuple[bytes, int]]]], *,
                        num_classes: int, encoding_format: str = "jpeg", shape=(None, None, 3),
                        version: str = "1.0.0", label_names: list[str] | None = None, extra_features=None,
                        progress: bool = True) -> str:
  """Prepares ``data_dir/name/version`` from ``{split: () -> iterable of (encoded image bytes, label)}``.

  With ``extra_features`` (``{name: tfds feature}``) the iterables give ``(bytes, label, {name: value})``: e.g.
  CIFAR-100's ``coarse_label`` and ``id``, so that TFDS's registered builder of that name reads every field.
  ``label_names`` names the classes (``ClassLabel(names=...)``). Nothing is registered in TFDS's builder registry
  (the builder class is made with ``skip_registration``), so reading goes through the prepared files, as for a
  dataset built elsewhere. Returns the dataset's directory; an already prepared one is kept as it is.
  """
  import tensorflow_datasets as tfds
  if not progress:
    tfds.disable_progress_bar()
  label = (tfds.features.ClassLabel(names=label_names) if label_names
           else tfds.features.ClassLabel(num_classes=num_classes))

  def body(ns):
    ns["VERSION"] = tfds.core.Version(version)
    ns["name"] = name

    def _info(self):
      # disable_shuffling: records in the order given (TFDS would order them by a hash of their key).
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=shape, encoding_format=encoding_format), "label": label,
          **(extra_features or {})}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(make) for split, make in splits.items()}

    def _generate_examples(self, make):
      for i, (image_bytes, label, *extra) in enumerate(make()):
        # Encoded bytes pass through TFDS unchanged (an array would need TensorFlow to encode).
        yield i, {"image": io.BytesIO(image_bytes), "label": int(label), **(extra[0] if extra else {})}

    ns.update(_info=_info, _split_generators=_split_generators, _generate_examples=_generate_examples)

  cls = types.new_class("".join(p.title() for p in name.split("_")), (tfds.core.GeneratorBasedBuilder,),
                        {"skip_registration": True}, body)
  from tensorflow_datasets.core import shuffle
  builder = cls(data_dir=data_dir)
  # TFDS's writer spills examples beyond 1 GB to temporary files through tf.io.gfile, i.e. TensorFlow; keep them in
  # memory instead (a dataset built this way must fit in RAM once while it is written).
  limit = shuffle.MAX_MEM_BUFFER_SIZE
  shuffle.MAX_MEM_BUFFER_SIZE = max(limit, 1 << 40)
  try:
    builder.download_and_prepare(file_format="array_record")
  finally:
    shuffle.MAX_MEM_BUFFER_SIZE = limit
  return os.path.join(data_dir, name, version)


def _source_images(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST training images ``[60000, 28, 28] uint8`` and labels, or generated class patterns without it."""
  from tgeo_jax.data import sources
  try:
    split = sources.fashion_mnist()["train"]
    return split.inputs, split.labels
  except Exception:  # noqa: BLE001 - any missing/unreadable file: generated patterns serve as well
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, 2000).astype(np.int32)
    yy, xx = np.mgrid[0:28, 0:28]
    patterns = np.stack([(127 + 120 * np.sin((yy * (c + 1) + xx * (9 - c)) / 6.0)) for c in range(10)])
    noise = rng.normal(0, 20, (2000, 28, 28))
    return np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8), labels


# What ``_render`` draws from, set before the (forked) worker pool starts so jobs travel as indices only.
_RENDER: dict = {}


def _render(i: int) -> tuple[bytes, int]:
  r = _RENDER
  j = (r["offset"] + i) % len(r["images"])
  h, w = r["sizes"][i % len(r["sizes"])]
  label = int(r["labels"][j])
  gray = np.asarray(Image.fromarray(r["images"][j]).resize((w, h), Image.BILINEAR), np.float32)
  rgb = gray[..., None] * r["tints"][label % 10] + r["noises"][i % len(r["noises"]), :h, :w, None]
  return encode(np.clip(rgb, 0, 255).astype(np.uint8), r["encoding_format"]), label


def fashion_mnist_images(count: int, *, sizes=IMAGENET_LIKE_SIZES, seed: int = 0, encoding_format: str = "jpeg",
                         offset: int = 0, processes: int = 1):
  """``() -> iterator of (encoded bytes, label)``: ``count`` Fashion-MNIST pictures (from ``offset``), each tinted
  by its class, resized (bilinear) to ``sizes[i % len(sizes)]`` with mild noise (so JPEG files have a photo-like
  size) and encoded, in ``processes`` forked worker processes when > 1 (the order is the same)."""
  def make():
    images, labels = _source_images(seed)
    max_h, max_w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    _RENDER.update(
        images=images, labels=labels, sizes=tuple(sizes), offset=offset, encoding_format=encoding_format,
        tints=np.random.default_rng(seed).uniform(0.4, 1.0, (10, 3)).astype(np.float32),
        # A few fixed noise fields: cheaper than fresh noise per image and as good for realistic file sizes.
        noises=np.random.default_rng([seed, offset]).normal(0, 6, (4, max_h, max_w)).astype(np.float32))
    if processes <= 1:
      yield from map(_render, range(count))
      return
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(processes) as pool:
      yield from pool.imap(_render, range(count), chunksize=64)
  return make
