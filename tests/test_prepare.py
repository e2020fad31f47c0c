"""python -m tgeo_jax.prepare: CIFAR-100 from archives in the official formats and class-folder trees as torchvision's
ImageFolder reads them, prepared without TensorFlow and read back through data.load bit for bit; every refusal one
line with nothing written."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

import cifar_archives
from conftest import ROOT
from tgeo_jax import data as data_lib
from tgeo_jax import prepare
from tgeo_jax.data import tfds_build, tfds_sources
from tgeo_jax.default_config import load_config_file

COUNTS = {"train": 300, "test": 100}  # every class present; the full counts are checked by their own test


@pytest.fixture
def small_counts(monkeypatch):
  monkeypatch.setattr(prepare, "CIFAR100_COUNTS", dict(COUNTS))


@pytest.fixture(scope="module")
def arrays():
  return cifar_archives.make_arrays(COUNTS, seed=3)


def run(argv, capsys):
  rc = prepare.main(argv)
  out, err = capsys.readouterr()
  return rc, out, err


def cifar_config(data_dir, in_memory):
  c = load_config_file(os.path.join(ROOT, "configs", "cifar100.py"), "teacher:resnet8")
  c.data.dir, c.data.in_memory = data_dir, in_memory
  return c


def rows(images, labels):
  """The multiset of (pixels, label) rows, order-free: a split's rows must all be the archive's."""
  return sorted(np.asarray(images, np.uint8).reshape(len(images), -1).tobytes()[i * 3072:(i + 1) * 3072] +
                bytes([int(y)]) for i, y in enumerate(labels))


@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_official_archive_prepares_and_loads_bit_for_bit(fmt, arrays, small_counts, tmp_path, capsys):
  archive = str(tmp_path / f"cifar-100-{fmt}.tar.gz")
  getattr(cifar_archives, f"write_{fmt}_archive")(archive, arrays)
  data_dir = str(tmp_path / "data")
  rc, out, err = run(["cifar100", f"--archive={archive}", f"--data_dir={data_dir}"], capsys)
  assert rc == 0, err
  # A generated archive is not the published file: accepted, with one warning line naming both checksums.
  assert err.count("\n") == 1 and f"is not the published cifar-100-{fmt}.tar.gz" in err
  assert prepare.CIFAR100_MD5[fmt] in err
  assert f"prepared cifar100 from {archive} ({fmt} format" in out
  assert sorted(os.listdir(data_dir)) == ["cifar100"] and os.listdir(os.path.join(data_dir, "cifar100")) == ["3.0.2"]

  # The loader's source: every record in the archive's order, with the fine labels.
  raw = tfds_sources.cifar100(cifar_config(data_dir, "off").data)
  for split, part in (("train", raw.train), ("test", raw.test)):
    images, fine, _ = arrays[split]
    np.testing.assert_array_equal(part.gather_raw(np.arange(len(images))), images)
    np.testing.assert_array_equal(part.labels, fine)
  # data.load, per record and in memory: the test part is the archive's test split in order, train + validation
  # hold exactly the archive's training rows.
  for in_memory in ("off", "on"):
    task = data_lib.load(cifar_config(data_dir, in_memory).data, seed=0)
    test_images = task.test.inputs if in_memory == "on" else task.test.gather_raw(np.arange(len(task.test)))
    np.testing.assert_array_equal(test_images, arrays["test"][0])
    np.testing.assert_array_equal(task.test.labels, arrays["test"][1])
    parts = []
    for part in (task.train, task.val):
      if in_memory == "on":
        parts.append((part.inputs, part.labels))
      else:
        parts.append((part.base.gather_raw(part.indices), part.labels))
    got = rows(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    assert got == rows(*arrays["train"][:2]), in_memory
  # The registered TFDS cifar100 reads every field, the coarse labels included.
  import tensorflow_datasets as tfds
  src = tfds.data_source("cifar100", split="test", data_dir=data_dir, download=False)
  assert int(src[7]["coarse_label"]) == arrays["test"][2][7] and src[7]["id"] in (b"test_00007", "test_00007")


def test_full_counts_are_required(arrays, tmp_path, capsys):
  archive = str(tmp_path / "cifar-100-python.tar.gz")
  cifar_archives.write_python_archive(archive, arrays)
  rc, _, err = run(["cifar100", f"--archive={archive}", f"--data_dir={tmp_path / 'data'}"], capsys)
  assert rc == 2
  assert err == (f"error: --archive: {archive}: the train split has 300 images and 300 labels; CIFAR-100 has 50000 "
                 "(a truncated or different archive)\n")
  assert not os.path.exists(tmp_path / "data" / "cifar100")


def _tar(path, members):
  with tarfile.open(path, "w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_cifar10_truncated_foreign_and_malicious_archives_are_refused(arrays, small_counts, tmp_path, capsys):
  data_dir = tmp_path / "data"
  cifar10 = str(tmp_path / "cifar-10-python.tar.gz")
  _tar(cifar10, {"cifar-10-batches-py/data_batch_1": b"x", "cifar-10-batches-py/batches.meta": b"x"})
  good = str(tmp_path / "good.tar.gz")
  cifar_archives.write_python_archive(good, arrays)
  truncated = str(tmp_path / "truncated.tar.gz")
  with open(good, "rb") as f, open(truncated, "wb") as g:
    g.write(f.read()[: os.path.getsize(good) // 2])
  foreign = str(tmp_path / "foreign.tar.gz")
  _tar(foreign, {"images/0.png": b"x"})
  # A pickle that would run a command when loaded by a plain unpickler.
  marker = tmp_path / "ran"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  malicious = str(tmp_path / "malicious.tar.gz")
  _tar(malicious, {"cifar-100-python/train": pickle.dumps(Evil(), protocol=2),
                   "cifar-100-python/meta": cifar_archives.py2_pickle({"fine_label_names": cifar_archives.FINE,
                                                                      "coarse_label_names": cifar_archives.COARSE})})
  expected = {
      cifar10: f"error: --archive: {cifar10} is CIFAR-10 (cifar-10-batches-*); expected cifar-100-python.tar.gz or "
               "cifar-100-binary.tar.gz",
      truncated: f"error: --archive: {truncated} is not a readable tar archive (truncated or another format",
      foreign: f"error: --archive: {foreign} holds neither cifar-100-python/ nor cifar-100-binary/",
      malicious: "error: --archive: cifar-100-python/train asks for posix.system while unpickling; a CIFAR archive "
                 "holds only numpy arrays and lists, so it is refused (no code from a data file is run)",
      str(tmp_path / "missing.tar.gz"): f"error: --archive: no such file {tmp_path / 'missing.tar.gz'}",
  }
  for archive, message in expected.items():
    rc, out, err = run(["cifar100", f"--archive={archive}", f"--data_dir={data_dir}"], capsys)
    assert rc == 2 and err.startswith(message) and err.count("\n") == 1, (archive, err)
    assert not data_dir.exists() or os.listdir(data_dir) in ([], ["cifar100"]) and not os.listdir(
        data_dir / "cifar100"), os.listdir(data_dir)
  assert not marker.exists()


def test_a_prepared_dataset_is_kept_unless_overwrite(arrays, small_counts, tmp_path, capsys):
  archive = str(tmp_path / "cifar-100-binary.tar.gz")
  cifar_archives.write_binary_archive(archive, arrays)
  argv = ["cifar100", f"--archive={archive}", f"--data_dir={tmp_path}"]
  assert run(argv, capsys)[0] == 0
  rc, _, err = run(argv, capsys)
  assert rc == 2 and err == (f"error: --data_dir: {tmp_path / 'cifar100' / '3.0.2'} is already prepared; pass "
                             "--overwrite to replace it\n")
  assert run([*argv, "--overwrite"], capsys)[0] == 0


# ----------------------------------------------------------------------------------------------- class folders
def write_tree(root, classes=("n02_b", "N01_upper", "n01_a"), per_class=3, seed=0):
  """``root/{train,val}/CLASS/`` JPEGs and a PNG, a nested folder, and a non-image file in each split."""
  rng = np.random.default_rng(seed)
  files = {}
  for split in ("train", "val"):
    for c in classes:
      for i in range(per_class):
        sub = os.path.join(root, split, c, "nested" if i == 2 else "")
        os.makedirs(sub, exist_ok=True)
        image = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
        name = f"img{i}.JPEG" if i != 1 else f"img{i}.png"
        path = os.path.join(sub, name)
        with open(path, "wb") as f:
          f.write(tfds_build.encode(image, "jpeg" if name.endswith("JPEG") else "png"))
        files[path] = c
    with open(os.path.join(root, split, classes[0], "notes.txt"), "w") as f:
      f.write("not an image")
  return files


def test_image_folder_matches_torchvision_and_stores_the_files_unchanged(tmp_path, capsys):
  root = str(tmp_path / "tree")
  write_tree(root)
  classes, samples, skipped = prepare.find_image_folder(os.path.join(root, "train"), where="train")
  assert classes == ["N01_upper", "n01_a", "n02_b"] and len(skipped) == 1
  try:
    from torchvision.datasets import ImageFolder
  except Exception:  # noqa: BLE001 - torchvision absent or broken beside this torch: the order is still checked
    ImageFolder = None
  if ImageFolder is not None:
    reference = ImageFolder(os.path.join(root, "train"))
    assert reference.class_to_idx == {c: i for i, c in enumerate(classes)}
    assert reference.samples == samples
  data_dir = str(tmp_path / "data")
  rc, out, err = run(["imagefolder", f"--root={root}", f"--data_dir={data_dir}", "--name=tree_test"], capsys)
  assert rc == 0, err
  assert out.splitlines() == [
      f"skipped 2 files without an image extension (e.g. {os.path.join('train', 'n02_b', 'notes.txt')})",
      f"prepared tree_test from {root}: 3 classes, 9 train / 9 validation images in "
      f"{os.path.join(data_dir, 'tree_test', '1.0.0')}"]
  import tensorflow_datasets as tfds
  for split, sub in (("train", "train"), ("validation", "val")):
    src = tfds.data_source("tree_test", split=split, data_dir=data_dir, download=False,
                           decoders={"image": tfds.decode.SkipDecoding()})
    _, want, _ = prepare.find_image_folder(os.path.join(root, sub), where=sub)
    assert len(src) == len(want)
    for i, (path, label) in enumerate(want):
      with open(path, "rb") as f:
        assert src[i]["image"] == f.read() and int(src[i]["label"]) == label
  # Through the ImageNet protocol, by name.
  c = load_config_file(os.path.join(ROOT, "configs", "imagenet.py"), "teacher")
  c.data.dir, c.data.tfds_name, c.data.val_fraction = data_dir, "tree_test", 0.3
  task = data_lib.load(c.data, seed=0)
  assert task.num_classes == 3 and len(task.test) == 9
  np.testing.assert_array_equal(task.test.labels, [label for _, label in want])


@pytest.mark.parametrize("fault", ["empty_class", "unreadable", "truncated", "flat_val", "class_mismatch"])
def test_image_folder_faults_are_one_line(fault, tmp_path, capsys):
  root = str(tmp_path / "tree")
  files = write_tree(root, per_class=2)
  expected = None
  if fault == "empty_class":
    os.makedirs(os.path.join(root, "val", "n01_a", "empty"))
    for path, c in files.items():
      if c == "n01_a" and f"{os.sep}val{os.sep}" in path:
        os.remove(path)
    expected = (f"error: --root: val: class folder {os.path.join(root, 'val', 'n01_a')} has no image files (.jpg, "
                ".jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp); torchvision's ImageFolder refuses an empty class "
                "too")
  elif fault == "unreadable":
    bad = os.path.join(root, "train", "n01_a", "broken.jpg")
    with open(bad, "wb") as f:
      f.write(b"\xff\xd8 not really a jpeg")
    expected = f"error: --root: {bad} is not a readable image ("
  elif fault == "truncated":  # a valid header and half the data: PIL opens it, decoding fails part-way
    bad = next(p for p in sorted(files) if p.endswith(".JPEG"))
    with open(bad, "rb") as f:
      data = f.read()
    with open(bad, "wb") as f:
      f.write(data[: len(data) // 2])
    expected = f"error: --root: {bad} is not a readable image ("
  elif fault == "flat_val":
    val = os.path.join(root, "val")
    for path in list(files):
      if f"{os.sep}val{os.sep}" in path:
        os.replace(path, os.path.join(val, f"ILSVRC2012_val_{abs(hash(path)) % 10**8:08d}.JPEG"))
    for entry in os.scandir(val):
      if entry.is_dir():
        import shutil
        shutil.rmtree(entry.path)
    expected = (f"error: --root: val: {val} holds 6 images directly (e.g. ILSVRC2012_val_")
  else:
    os.rename(os.path.join(root, "val", "n02_b"), os.path.join(root, "val", "n03_c"))
    expected = ("error: --root: train/ and val/ have different classes (only in train: ['n02_b'], only in val: "
                "['n03_c']); their indices would not line up")
  data_dir = tmp_path / "data"
  rc, _, err = run(["imagefolder", f"--root={root}", f"--data_dir={data_dir}"], capsys)
  assert rc == 2 and err.startswith(expected) and err.count("\n") == 1, err
  if fault == "flat_val":
    assert "valprep.sh" in err
  assert not data_dir.exists() or not os.listdir(data_dir / "imagenet2012")


def test_usage_errors_are_one_line(capsys):
  assert run([], capsys)[2] == ("error: python -m tgeo_jax.prepare: the following arguments are required: "
                                "cifar100|imagefolder\n")
  assert run(["cifar100"], capsys)[2] == ("error: python -m tgeo_jax.prepare cifar100: the following arguments are "
                                          "required: --archive, --data_dir\n")
