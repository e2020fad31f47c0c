"""The TFDS image path on real array_record files built locally (tgeo_jax.data.tfds_build, no TensorFlow).

Two small datasets are built once per module: JPEGs of ImageNet-like sizes (the imagenet2012 protocol through
``data.tfds_name``) and 32x32 PNGs (the cifar100 protocol). They exercise what mock data cannot: labels read without
decoding, the verified decoded cache, in-memory vs per-record batches, grain worker processes, JPEG draft decoding,
and a training run with workers that stops and resumes.
"""

import contextlib
import io
import json
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from tgeo_jax import data as data_lib  # noqa: E402
from tgeo_jax.data import tfds_build, tfds_sources  # noqa: E402
from tgeo_jax.default_config import load_config_file  # noqa: E402

from conftest import ROOT  # noqa: E402

JPEG, PNG = "tgeo_test_jpeg", "tgeo_test_png32"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  tfds_build.build_image_dataset(root, JPEG, {
      "train": tfds_build.fashion_mnist_images(60, seed=1),
      "validation": tfds_build.fashion_mnist_images(16, seed=1, offset=60)}, num_classes=10)
  tfds_build.build_image_dataset(root, PNG, {
      "train": tfds_build.fashion_mnist_images(120, sizes=((32, 32),), seed=2, encoding_format="png"),
      "test": tfds_build.fashion_mnist_images(40, sizes=((32, 32),), seed=2, encoding_format="png", offset=120)},
      num_classes=10, encoding_format="png", shape=(32, 32, 3))
  return root


def _imagenet_config(data_dir, **data):
  c = load_config_file(os.path.join(ROOT, "configs", "imagenet.py"), "teacher")
  c.data.dir, c.data.tfds_name, c.data.val_fraction = data_dir, JPEG, 0.15
  c.data.update(data)
  return c


def _cifar_config(data_dir, **data):
  c = load_config_file(os.path.join(ROOT, "configs", "cifar100.py"), "teacher:resnet8")
  c.data.dir, c.data.tfds_name = data_dir, PNG
  c.data.update(data)
  return c


def _batches(task, epoch, batch_size=16):
  ds = data_lib.train_batches(task.train, batch_size=batch_size, seed=3, epoch=epoch, augment=task.augment)
  return [ds[s] for s in range(len(ds))]


def test_in_memory_batches_equal_per_record_batches(data_dir):
  per_record = data_lib.load(_cifar_config(data_dir, in_memory="off").data, seed=0)
  in_memory = data_lib.load(_cifar_config(data_dir, in_memory="auto").data, seed=0)
  assert isinstance(in_memory.train, data_lib.sources.ArraySource)
  assert isinstance(per_record.train, data_lib.sources.SubsetSource)
  assert data_lib.pipeline._raw_augment(in_memory.train, in_memory.augment) is not None  # augments the uint8 pixels
  assert in_memory.identity == per_record.identity and in_memory.num_classes == 10
  for epoch in (0, 1):
    for a, b in zip(_batches(per_record, epoch), _batches(in_memory, epoch), strict=True):
      for key in ("inputs", "labels", "index"):
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), (epoch, key)
  np.testing.assert_array_equal(per_record.test.gather(np.arange(40)), in_memory.test.gather(np.arange(40)))


def test_decoded_cache_is_verified_and_optional(data_dir, tmp_path, monkeypatch, capsys):
  config = _cifar_config(data_dir, cache_dir=str(tmp_path / "cache"))
  expected = data_lib.load(config.data, seed=0).train.inputs
  cached = sorted(os.listdir(tmp_path / "cache"))
  assert len(cached) == 2 and all(n.startswith(f"{PNG}_") and n.endswith(".npz") for n in cached), cached
  decode_all = tfds_sources.decode_all
  calls = []
  monkeypatch.setattr(tfds_sources, "decode_all", lambda s: calls.append(1) or decode_all(s))
  np.testing.assert_array_equal(data_lib.load(config.data, seed=0).train.inputs, expected)
  assert calls == []  # both splits came from the cache
  path = tmp_path / "cache" / next(n for n in cached if "_train_" in n)
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0xFF  # a flipped pixel byte (zip's CRC or the stored sha256 catch it)
  path.write_bytes(bytes(raw))
  capsys.readouterr()
  np.testing.assert_array_equal(data_lib.load(config.data, seed=0).train.inputs, expected)
  assert calls == [1] and f"warning: data cache {path}" in capsys.readouterr().err
  # A cache directory that cannot be created: one warning line, and the run goes on in memory.
  (tmp_path / "file").write_text("")
  config.data.cache_dir = str(tmp_path / "file" / "cache")
  for _ in range(2):
    np.testing.assert_array_equal(data_lib.load(config.data, seed=0).train.inputs, expected)
  warnings = [line for line in capsys.readouterr().err.splitlines() if "cannot write" in line]
  assert len(warnings) == 1 and warnings[0].startswith("warning: data cache: cannot write"), warnings


def test_labels_are_read_without_decoding_and_cached_by_digest(data_dir, monkeypatch):
  src = tfds_sources.open_split(JPEG, "train", data_dir)
  expected = np.array([label for _, label in tfds_build.fashion_mnist_images(60, seed=1)()], np.int32)
  monkeypatch.setattr(tfds_sources, "decode_image", lambda *a: pytest.fail("decoded an image"))
  cache = os.path.join(str(data_dir), ".tgeo_labels_x_train.npy")
  np.testing.assert_array_equal(tfds_sources.read_labels(src, cache), expected)
  written = [n for n in os.listdir(data_dir) if n.startswith(".tgeo_labels_x_train_")]
  assert len(written) == 1 and written[0].endswith(".npz"), written
  path = os.path.join(data_dir, written[0])
  with np.load(path) as f:
    stored = str(f["sha256"])
  # Garbled labels (the checksum of the good ones kept), another length, a garbage file: each is rebuilt with one
  # warning line and never trained on.
  garbled = (expected + 1) % 10
  for damage in (lambda: np.savez(path, labels=garbled, sha256=np.str_(stored)),
                 lambda: np.savez(path, labels=expected[:5], sha256=np.str_(stored)),
                 lambda: open(path, "wb").write(b"not a zip")):
    damage()
    tfds_sources._WARNED.clear()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      np.testing.assert_array_equal(tfds_sources.read_labels(src, cache), expected)
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith(f"warning: label cache {path} "), err.getvalue()
    with np.load(path) as f:
      np.testing.assert_array_equal(f["labels"], expected)


def test_batch_order_does_not_depend_on_the_worker_count(data_dir):
  task = data_lib.load(_imagenet_config(data_dir).data, seed=0)
  spare = min(16, os.cpu_count() - 1)
  assert data_lib.resolve_workers(_imagenet_config(data_dir).data, task.train) == (spare if spare >= 2 else 0)
  assert data_lib.resolve_workers(_imagenet_config(data_dir, workers=3).data, task.train) == 3
  assert data_lib.resolve_workers(_cifar_config(data_dir).data, data_lib.sources.ArraySource(np.zeros(1), [0])) == 0
  ds = data_lib.train_batches(task.train, batch_size=8, seed=3, epoch=1, augment=task.augment)
  runs = {w: list(data_lib.iterate(ds[1:5], workers=w)) for w in (0, 1, 2)}
  assert len(runs[0]) == 4 and runs[0][0]["inputs"].shape == (8, 224, 224, 3)
  for w in (1, 2):
    for a, b in zip(runs[0], runs[w], strict=True):
      assert all(np.array_equal(a[k], b[k]) for k in ("inputs", "labels", "index")), w


def test_jpeg_draft_decodes_large_images_smaller_and_close(data_dir):
  src = tfds_sources.open_split(JPEG, "train", data_dir)
  sizes = tfds_build.IMAGENET_LIKE_SIZES
  for i, (h, w) in enumerate(sizes):
    encoded = src[i]["image"]
    full, draft = tfds_sources.decode_image(encoded), tfds_sources.decode_image(encoded, 256)
    assert full.shape == (h, w, 3)
    scale = 2 if min(h, w) >= 512 else 1  # the largest DCT scale keeping the shorter side >= 256
    assert draft.shape == (-(-h // scale), -(-w // scale), 3), (h, w, draft.shape)
    a = tfds_sources.imagenet_train_transform(full).astype(np.float32)
    b = tfds_sources.imagenet_train_transform(draft).astype(np.float32)
    if scale == 1:
      assert np.array_equal(a, b)
    else:
      assert 0 < np.abs(a - b).mean() < 3.0, np.abs(a - b).mean()


def test_imagenet_protocol_end_to_end_with_workers_and_resume(data_dir, tmp_path):
  from tgeo_jax import cli

  def config(**data):
    c = _imagenet_config(data_dir, **data)
    c.model.name, c.num_epochs, c.batch_size, c.val_batch_size, c.eval_batch_size = "cnn_tiny", 1, 8, 8, 8
    c.optimizer.decay_epochs, c.optimizer.schedule = (), "constant"
    c.log.progress, c.log.every_steps = False, 2
    return c

  whole = str(tmp_path / "whole")
  assert cli.run(config(workers=2, jpeg_draft=True), whole) == 0
  split = str(tmp_path / "split")
  first = config(workers=0, jpeg_draft=True)
  first.steps_per_run = 3
  assert cli.run(first, split) == 0
  assert not os.path.exists(os.path.join(split, "summary.json"))
  assert cli.run(config(workers=1, jpeg_draft=True), split) == 0  # data.workers may change on resume
  summaries = [json.load(open(os.path.join(d, "summary.json"))) for d in (whole, split)]
  for key in ("accuracy", "loss", "val_loss"):
    assert summaries[0][key] == summaries[1][key], key
