"""Sources, the stratified split, and the pipeline's determinism and coverage."""

import os

import chex
import numpy as np
import pytest

from configs import fashion_mnist as fmnist_config
from tgeo_jax import data
from tgeo_jax.data import augment, sources
from tgeo_jax.errors import UserError


def fake_fashion_mnist(directory, n_train=200, n_test=50, gz=True):
  """Writes IDX files laid out like Debian's dataset-fashion-mnist package."""
  rng = np.random.default_rng(0)
  suffix = ".gz" if gz else ""
  for split, n in (("train", n_train), ("t10k", n_test)):
    sources.write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte{suffix}"),
                      rng.integers(0, 256, size=(n, 28, 28)))
    sources.write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte{suffix}"), np.arange(n) % 10)


def data_config(**kw):
  c = fmnist_config.base_config().data
  c.update(kw)
  return c


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reader(tmp_path, gz):
  fake_fashion_mnist(str(tmp_path), gz=gz)
  splits = sources.fashion_mnist(str(tmp_path))
  assert len(splits["train"]) == 200 and len(splits["test"]) == 50
  raw = sources.read_idx(str(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))))
  x = splits["train"].gather(np.array([3, 7]))
  chex.assert_shape(x, (2, 28, 28, 1))
  want = (raw[[3, 7]].astype(np.float32) / 255.0 - sources.FASHION_MNIST_MEAN) / sources.FASHION_MNIST_STD
  np.testing.assert_allclose(x[..., 0], want, rtol=1e-6)
  np.testing.assert_array_equal(splits["train"].labels[:12], np.arange(12) % 10)


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
  with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist.*data.dir"):
    sources.fashion_mnist(str(tmp_path / "nowhere"))


def test_corrupt_idx(tmp_path):
  path = str(tmp_path / "bad")
  with open(path, "wb") as f:
    f.write(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")  # header says 9 bytes, payload has 3
  with pytest.raises(UserError, match="payload has 3 bytes"):
    sources.read_idx(path)


def test_stratified_split():
  labels = np.repeat(np.arange(5), [10, 20, 30, 1, 40])
  kept, held = data.stratified_split(labels, 0.1, seed=0)
  assert len(np.intersect1d(kept, held)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(len(labels)))
  np.testing.assert_array_equal(np.bincount(labels[held], minlength=5), [1, 2, 3, 0, 4])
  kept2, held2 = data.stratified_split(labels, 0.1, seed=0)
  np.testing.assert_array_equal(held, held2)


def test_load_applies_split_and_subset(tmp_path):
  fake_fashion_mnist(str(tmp_path), n_train=1000)
  task = data.load(data_config(dir=str(tmp_path), val_fraction=0.2, train_subset=400), seed=0)
  assert len(task.val) == 200 and len(task.train) == 400 and len(task.test) == 50
  np.testing.assert_array_equal(np.bincount(task.train.labels), [40] * 10)
  with pytest.raises(UserError, match="data.train_subset"):
    data.load(data_config(dir=str(tmp_path), train_subset=10**6), seed=0)


def test_train_batches_pure_function_of_seed_and_epoch():
  src = sources.ArraySource(np.arange(100, dtype=np.float32)[:, None], np.arange(100) % 10)
  a = data.train_batches(src, batch_size=16, seed=3, epoch=1)
  b = data.train_batches(src, batch_size=16, seed=3, epoch=1)
  c = data.train_batches(src, batch_size=16, seed=3, epoch=2)
  assert len(a) == 6
  for step in (0, 5):
    np.testing.assert_array_equal(a[step]["index"], b[step]["index"])
  assert not np.array_equal(a[0]["index"], c[0]["index"])
  seen = np.concatenate([a[i]["index"] for i in range(len(a))])
  assert len(np.unique(seen)) == 96  # no example twice within an epoch
  np.testing.assert_array_equal(a[2]["inputs"][:, 0], a[2]["index"])  # inputs match their indices
  # Resuming mid-epoch: a slice of the same dataset yields the same batches.
  resumed = list(a[4:])
  np.testing.assert_array_equal(resumed[0]["index"], a[4]["index"])
  # Two processes each take their half of the same global batch.
  halves = [data.train_batches(src, batch_size=16, seed=3, epoch=1, process_index=i, process_count=2)[5]["index"]
            for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), a[5]["index"])


def test_augmentation_is_reproducible_per_step():
  rng = np.random.default_rng(0)
  src = sources.ArraySource(rng.normal(size=(64, 8, 8, 1)).astype(np.float32), np.zeros(64))
  a = data.train_batches(src, batch_size=8, seed=0, epoch=0, augment=augment.crop_flip)
  b = data.train_batches(src, batch_size=8, seed=0, epoch=0, augment=augment.crop_flip)
  np.testing.assert_array_equal(a[3]["inputs"], b[3]["inputs"])
  chex.assert_shape(a[3]["inputs"], (8, 8, 8, 1))
  assert not np.array_equal(a[3]["inputs"], src.gather(a[3]["index"]))


def test_crop_flip_hand_example():
  img = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  out = augment.crop_flip(img, np.random.default_rng(0), padding=0)  # no padding: only the flip can act
  assert np.array_equal(out, img) or np.array_equal(out, img[:, :, ::-1])


def test_eval_batches_cover_every_example_once():
  src = sources.ArraySource(np.arange(103, dtype=np.float32)[:, None], np.arange(103) % 10)
  batches = list(data.eval_batches(src, batch_size=25))
  assert len(batches) == 5 and all(len(b["mask"]) == 25 for b in batches)
  values = np.concatenate([b["inputs"][b["mask"] > 0, 0] for b in batches])
  np.testing.assert_array_equal(values, np.arange(103))


def test_validation_stream():
  src = sources.ArraySource(np.arange(50, dtype=np.float32)[:, None], np.arange(50) % 5)
  ds = data.validation_batches(src, batch_size=20, seed=0)
  first_pass = np.concatenate([ds[0]["inputs"][:, 0], ds[1]["inputs"][:, 0]])
  assert len(np.unique(first_pass)) == 40
  np.testing.assert_array_equal(ds[7]["labels"], data.validation_batches(src, batch_size=20, seed=0)[7]["labels"])
  with pytest.raises(UserError, match="validation batch size"):
    data.validation_batches(src, batch_size=64, seed=0)


def test_synthetic_task_and_mismatched_lengths():
  c = data_config(name="synthetic")
  task = data.load(c, seed=0)
  assert task.num_classes == 10
  with pytest.raises(UserError, match="3 inputs but 4 labels"):
    sources.ArraySource(np.zeros((3, 2)), np.array([0, 1, 2, 3]))


def test_symmetric_label_noise_flips_exactly_the_fraction():
  labels = np.repeat(np.arange(10), 100)
  noisy = data.symmetric_label_noise(labels, 0.2, 10, seed=3)
  wrong = noisy != labels
  assert wrong.sum() == 200  # exactly round(0.2 * 1000), every chosen label changed
  # New labels are spread over the other nine classes: offsets (new - old) mod 10 cover 1..9, never 0.
  offsets = np.bincount((noisy[wrong] - labels[wrong]) % 10, minlength=10)
  assert offsets[0] == 0 and offsets[1:].min() >= 8  # ~22 expected each
  np.testing.assert_array_equal(noisy, data.symmetric_label_noise(labels, 0.2, 10, seed=3))
  assert not np.array_equal(noisy, data.symmetric_label_noise(labels, 0.2, 10, seed=4))


def test_label_noise_touches_only_the_students_training_labels(tmp_path):
  fake_fashion_mnist(str(tmp_path), n_train=1000)
  clean = data.load(data_config(dir=str(tmp_path), val_fraction=0.2), seed=0)
  noisy = data.load(data_config(dir=str(tmp_path), val_fraction=0.2, label_noise=0.25), seed=0)
  assert int(np.sum(noisy.train.labels != clean.train.labels)) == 200  # 0.25 * 800
  np.testing.assert_array_equal(noisy.val.labels, clean.val.labels)
  np.testing.assert_array_equal(noisy.test.labels, clean.test.labels)
  idx = np.arange(0, 800, 7)
  np.testing.assert_array_equal(noisy.train.gather(idx), clean.train.gather(idx))  # same images
  # The pipeline serves the noisy labels.
  batch = data.train_batches(noisy.train, batch_size=100, seed=0, epoch=0)[0]
  np.testing.assert_array_equal(batch["labels"], noisy.train.labels[batch["index"]])


def test_val_subset_and_train_with_val(tmp_path):
  fake_fashion_mnist(str(tmp_path), n_train=1000)
  task = data.load(data_config(dir=str(tmp_path), val_fraction=0.2, train_subset=400, val_subset=50), seed=0)
  assert len(task.train) == 400 and len(task.val) == 50
  np.testing.assert_array_equal(np.bincount(task.val.labels), [5] * 10)
  both = data.load(data_config(dir=str(tmp_path), val_fraction=0.2, train_subset=400, val_subset=50,
                               train_with_val=True), seed=0)
  assert len(both.train) == 450 and len(both.val) == 50
  idx = np.array([449, 0, 400, 3])
  want = np.concatenate([task.val.gather([49]), task.train.gather([0]), task.val.gather([0]),
                         task.train.gather([3])])
  np.testing.assert_array_equal(both.train.gather(idx), want)
  np.testing.assert_array_equal(both.train.labels[idx], [task.val.labels[49], task.train.labels[0],
                                                         task.val.labels[0], task.train.labels[3]])
  with pytest.raises(UserError, match="data.val_subset"):
    data.load(data_config(dir=str(tmp_path), val_fraction=0.2, val_subset=201), seed=0)


@pytest.mark.parametrize("field,value", [("label_noise", 1.0), ("label_noise", -0.1), ("val_subset", -1)])
def test_new_data_fields_are_validated(field, value):
  from tgeo_jax import methods
  c = fmnist_config.get_config("kd")
  c.data[field] = value
  with pytest.raises(UserError, match=f"data.{field}: expected"):
    methods.validate_config(c)
