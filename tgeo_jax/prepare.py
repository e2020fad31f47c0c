"""Prepare datasets from the files a PyTorch user already has, without TensorFlow.

    python -m tgeo_jax.prepare cifar100 --archive=cifar-100-python.tar.gz --data_dir=DIR   # or cifar-100-binary.tar.gz
    python -m tgeo_jax.prepare imagefolder --root=TREE --data_dir=DIR [--name=imagenet2012]

Both write the array_record TFDS layout (``DIR/NAME/VERSION/``, ``tgeo_jax/data/tfds_build.py``) that
``tfds.data_source`` reads, so training then needs only ``--config.data.dir=DIR``:

* ``cifar100``: the official python archive (torchvision's ``cifar-100-python.tar.gz``) or binary archive
  (``cifar-100-binary.tar.gz``), as ``cifar100`` version 3.0.2 with TFDS's features (``image`` PNG, ``label`` the
  fine label, ``coarse_label``, ``id``), records in the archive's order. The python archive is a pickle: it is read
  with a restricted unpickler that admits only the three numpy callables a CIFAR pickle holds (rebuilding an
  ``ndarray``); anything else in the file is refused, so no code from the file runs. The counts (50,000 / 10,000),
  the 100 classes and the published archive's md5 are checked; a file that is not the published one is accepted
  with a warning when its structure is right. CIFAR-10, a truncated file or anything else is one line, exit 2, and
  nothing is written.
* ``imagefolder``: ``TREE/train/CLASS/*`` and ``TREE/val/CLASS/*`` as torchvision's ``ImageFolder`` reads them
  (classes sorted by name, so indices match ``class_to_idx`` and an imported torchvision teacher's outputs; files
  with torchvision's image extensions, sorted; others skipped and counted). The encoded files are stored unchanged
  (no re-encoding) as splits ``train`` and ``validation``: the ``imagenet2012`` protocol's. An empty class, an
  unreadable image, or the ILSVRC-2012 validation archive's flat layout is one line naming it.

A dataset is written into a staging directory and moved into place only when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import pickle
import shutil
import sys
import tarfile

import numpy as np

from tgeo_jax.errors import UserError

__all__ = ["CIFAR100_MD5", "CIFAR100_COUNTS", "IMG_EXTENSIONS", "read_cifar100", "prepare_cifar100",
           "find_image_folder", "prepare_image_folder", "main"]

# The published archives' md5 (https://www.cs.toronto.edu/~kriz/cifar.html; torchvision checks the same value).
CIFAR100_MD5 = {"python": "eb9058c3a382ffc7106e4002c42a8d85", "binary": "03b5dce01913d631647c71ecec9e9cb8"}
CIFAR100_COUNTS = {"train": 50000, "test": 10000}
CIFAR100_VERSION = "3.0.2"  # TFDS's cifar100, so its registered builder reads the prepared files
IMAGENET_VERSION = "5.1.0"  # TFDS's imagenet2012
# torchvision.datasets.folder.IMG_EXTENSIONS, compared lower-case as torchvision does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_PY, _BIN = "cifar-100-python/", "cifar-100-binary/"
_RECORD = 2 + 32 * 32 * 3  # binary archive: coarse label, fine label, 3072 pixel bytes (R, G, B planes)


# ------------------------------------------------------------------------------------------------------ CIFAR-100
_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's multiarray._reconstruct, whatever its module path


class _CifarUnpickler(pickle.Unpickler):
  """Admits only what a CIFAR pickle holds: numpy's ``_reconstruct``, ``ndarray`` and ``dtype``."""

  def __init__(self, file, where: str):
    super().__init__(file, encoding="latin1")  # the archive was pickled by Python 2 (torchvision reads it so)
    self.where = where

  def find_class(self, module, name):
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
      return _RECONSTRUCT
    if module == "numpy" and name in ("ndarray", "dtype"):
      return getattr(np, name)
    raise UserError(f"--archive: {self.where} asks for {module}.{name} while unpickling; a CIFAR archive holds only "
                    "numpy arrays and lists, so it is refused (no code from a data file is run)")


def _md5(path: str) -> str:
  digest = hashlib.md5(usedforsecurity=False)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def _read_member(tar: tarfile.TarFile, name: str, archive: str) -> bytes:
  try:
    f = tar.extractfile(name)
    if f is None:
      raise KeyError(name)
    return f.read()
  except KeyError:
    raise UserError(f"--archive: {archive} has no {name}; expected the official CIFAR-100 layout") from None
  except (tarfile.TarError, EOFError, OSError) as e:
    raise UserError(f"--archive: {archive} is truncated or damaged while reading {name} ({e})") from None


def _check_split(split: str, images: np.ndarray, fine: np.ndarray, coarse: np.ndarray, archive: str) -> None:
  want = CIFAR100_COUNTS[split]
  if len(images) != want or len(fine) != want:
    raise UserError(f"--archive: {archive}: the {split} split has {len(images)} images and {len(fine)} labels; "
                    f"CIFAR-100 has {want} (a truncated or different archive)")
  if fine.min() < 0 or fine.max() > 99 or len(np.unique(fine)) != 100:
    raise UserError(f"--archive: {archive}: the {split} split's fine labels span {len(np.unique(fine))} values in "
                    f"[{fine.min()}, {fine.max()}]; CIFAR-100 has the 100 classes 0..99")
  if len(coarse) != want or coarse.min() < 0 or coarse.max() > 19:
    span = f" in [{coarse.min()}, {coarse.max()}]" if len(coarse) else ""
    raise UserError(f"--archive: {archive}: the {split} split has {len(coarse)} coarse labels{span}; CIFAR-100 has "
                    "one per image in 0..19")


def read_cifar100(archive: str) -> dict:
  """The arrays of a CIFAR-100 archive (python or binary format), checked.

  Returns ``{"format": "python"|"binary", "fine_names": [100], "coarse_names": [20], "train": (images, fine,
  coarse), "test": (...)}`` with ``images [N, 32, 32, 3] uint8`` and labels ``[N] int64``, in the archive's
  order. Raises ``UserError`` (one line) for anything that is not a complete CIFAR-100 archive.
  """
  if not os.path.isfile(archive):
    raise UserError(f"--archive: no such file {archive}")
  try:
    tar = tarfile.open(archive, "r:*")
    names = tar.getnames()
  except (tarfile.TarError, EOFError, OSError) as e:
    raise UserError(f"--archive: {archive} is not a readable tar archive (truncated or another format: {e})") from None
  with tar:
    if any(n.startswith(("cifar-10-batches-py", "cifar-10-batches-bin")) for n in names):
      raise UserError(f"--archive: {archive} is CIFAR-10 (cifar-10-batches-*); expected cifar-100-python.tar.gz or "
                      "cifar-100-binary.tar.gz")
    if _PY + "train" in names:
      fmt = "python"
      meta = _unpickle(_read_member(tar, _PY + "meta", archive), _PY + "meta")
      try:
        out = {"fine_names": [str(n) for n in meta["fine_label_names"]],
               "coarse_names": [str(n) for n in meta["coarse_label_names"]]}
      except (KeyError, TypeError) as e:
        raise UserError(f"--archive: {archive}: {_PY}meta holds no list {e!s} of class names; expected "
                        "fine_label_names and coarse_label_names") from None
      for split in CIFAR100_COUNTS:
        batch = _unpickle(_read_member(tar, _PY + split, archive), _PY + split)
        try:
          data = np.asarray(batch["data"], np.uint8)
          fine, coarse = np.asarray(batch["fine_labels"], np.int64), np.asarray(batch["coarse_labels"], np.int64)
          images = data.reshape(len(data), 3, 32, 32).transpose(0, 2, 3, 1)
        except (KeyError, TypeError, ValueError) as e:
          raise UserError(f"--archive: {archive}: {_PY + split} is not a CIFAR-100 batch ({e!r})") from None
        _check_split(split, images, fine, coarse, archive)
        out[split] = (np.ascontiguousarray(images), fine, coarse)
    elif _BIN + "train.bin" in names:
      fmt = "binary"
      out = {"fine_names": _names(tar, _BIN + "fine_label_names.txt", archive),
             "coarse_names": _names(tar, _BIN + "coarse_label_names.txt", archive)}
      for split in CIFAR100_COUNTS:
        raw = np.frombuffer(_read_member(tar, f"{_BIN}{split}.bin", archive), np.uint8)
        if raw.size % _RECORD:
          raise UserError(f"--archive: {archive}: {_BIN}{split}.bin is {raw.size} bytes, not a whole number of "
                          f"{_RECORD}-byte CIFAR-100 records (truncated?)")
        rows = raw.reshape(-1, _RECORD)
        images = rows[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        fine, coarse = rows[:, 1].astype(np.int64), rows[:, 0].astype(np.int64)
        _check_split(split, images, fine, coarse, archive)
        out[split] = (np.ascontiguousarray(images), fine, coarse)
    else:
      raise UserError(f"--archive: {archive} holds neither cifar-100-python/ nor cifar-100-binary/; expected the "
                      "official CIFAR-100 archive (python or binary version)")
  if len(out["fine_names"]) != 100 or len(out["coarse_names"]) != 20:
    raise UserError(f"--archive: {archive}: {len(out['fine_names'])} fine / {len(out['coarse_names'])} coarse class "
                    "names; CIFAR-100 has 100 / 20")
  out["format"] = fmt
  return out


def _unpickle(data: bytes, where: str) -> dict:
  try:
    obj = _CifarUnpickler(io.BytesIO(data), where).load()
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - any malformed pickle: one line
    raise UserError(f"--archive: {where} is not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
  if not isinstance(obj, dict):
    raise UserError(f"--archive: {where} holds a {type(obj).__name__}, not a CIFAR dictionary")
  return obj


def _names(tar, member: str, archive: str) -> list[str]:
  try:
    text = _read_member(tar, member, archive).decode()
  except UnicodeDecodeError:
    raise UserError(f"--archive: {archive}: {member} is not text (expected one class name per line)") from None
  return [line.strip() for line in text.splitlines() if line.strip()]


def _png(image: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def prepare_cifar100(archive: str, data_dir: str, *, overwrite: bool = False, log=print, warn=None) -> str:
  """Reads and checks ``archive`` (``read_cifar100``), then writes ``data_dir/cifar100/3.0.2``; returns that path."""
  warn = warn or (lambda m: print(m, file=sys.stderr))
  target = os.path.join(data_dir, "cifar100", CIFAR100_VERSION)
  _refuse_existing(target, overwrite)
  arrays = read_cifar100(archive)
  md5 = _md5(archive)
  published = CIFAR100_MD5[arrays["format"]]
  if md5 != published:
    warn(f"warning: --archive: {archive} is not the published cifar-100-{arrays['format']}.tar.gz (md5 {md5}, "
         f"published {published}); its structure is that of CIFAR-100, so it is prepared")
  import tensorflow_datasets as tfds

  def split_records(split):
    images, fine, coarse = arrays[split]

    def make():
      for i in range(len(images)):
        yield _png(images[i]), int(fine[i]), {"coarse_label": int(coarse[i]), "id": f"{split}_{i:05d}"}
    return make

  extra = {"coarse_label": tfds.features.ClassLabel(names=arrays["coarse_names"]), "id": tfds.features.Text()}
  _build_into(target, "cifar100", CIFAR100_VERSION, {s: split_records(s) for s in CIFAR100_COUNTS},
              num_classes=100, encoding_format="png", shape=(32, 32, 3), label_names=arrays["fine_names"],
              extra_features=extra)
  log(f"prepared cifar100 from {archive} ({arrays['format']} format, md5 {md5}): "
      f"{len(arrays['train'][0])} train / {len(arrays['test'][0])} test images in {target}")
  return target


def _refuse_existing(target: str, overwrite: bool) -> None:
  if os.path.exists(target) and not overwrite:
    raise UserError(f"--data_dir: {target} is already prepared; pass --overwrite to replace it")


def _build_into(target: str, name: str, version: str, splits, **kwargs) -> None:
  """``tfds_build.build_image_dataset`` into a staging directory beside ``target``, then one rename."""
  from tgeo_jax.data import tfds_build
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f".prepare-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  try:
    # TFDS prints "Downloading and preparing dataset ..." though nothing is downloaded: our own line says what
    # was prepared instead.
    with contextlib.redirect_stdout(io.StringIO()):
      built = tfds_build.build_image_dataset(staging, name, splits, version=version, progress=False, **kwargs)
    if os.path.exists(target):
      shutil.rmtree(target)
    os.replace(built, target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- class folders
def _is_image(filename: str) -> bool:
  return filename.lower().endswith(IMG_EXTENSIONS)


def find_image_folder(directory: str, *, where: str) -> tuple[list[str], list[tuple[str, int]], list[str]]:
  """torchvision ``ImageFolder``'s reading of ``directory``: ``(classes, [(path, class index)], skipped files)``.

  Classes are the sub-directories sorted by name; each class's files are walked (following links) in sorted
  order and kept when their extension is one of ``IMG_EXTENSIONS`` (lower-cased), as
  ``torchvision.datasets.folder.make_dataset`` does.
  """
  if not os.path.isdir(directory):
    raise UserError(f"{where}: no such directory {directory}")
  entries = list(os.scandir(directory))
  classes = sorted(e.name for e in entries if e.is_dir())
  loose = sorted(e.name for e in entries if e.is_file() and _is_image(e.name))
  if loose and not classes:
    raise UserError(f"{where}: {directory} holds {len(loose)} images directly (e.g. {loose[0]}) and no class "
                    "folders: the ILSVRC-2012 validation archive's flat layout; sort the images into one folder per "
                    "class first (e.g. with the widely used valprep.sh of soumith/imagenetloader.torch), as "
                    "torchvision's ImageFolder also requires")
  if not classes:
    raise UserError(f"{where}: {directory} has no class folders; expected {directory}/CLASS/IMAGE files")
  samples, skipped = [], []
  for index, name in enumerate(classes):
    found = 0
    for root, _, files in sorted(os.walk(os.path.join(directory, name), followlinks=True)):
      for fname in sorted(files):
        path = os.path.join(root, fname)
        if _is_image(fname):
          samples.append((path, index))
          found += 1
        else:
          skipped.append(path)
    if not found:
      raise UserError(f"{where}: class folder {os.path.join(directory, name)} has no image files "
                      f"({', '.join(IMG_EXTENSIONS)}); torchvision's ImageFolder refuses an empty class too")
  return classes, samples, skipped


def _check_readable(path: str) -> bytes:
  """The file's bytes, once PIL has decoded the whole image: a truncated or corrupt file is named here, in one line,
  not half-way through a training run. JPEGs decode at 1/8 scale (``draft``): every byte is still read and checked,
  at a fraction of a full decode's cost."""
  from PIL import Image, UnidentifiedImageError
  try:
    with open(path, "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as image:
      if image.format not in ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP", "MPO"):
        raise UnidentifiedImageError(f"format {image.format}")
      if image.format in ("JPEG", "MPO"):
        image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
      image.load()
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
    raise UserError(f"--root: {path} is not a readable image ({e})") from None
  return data


def prepare_image_folder(root: str, data_dir: str, *, name: str = "imagenet2012", train: str = "train",
                         val: str = "val", overwrite: bool = False, log=print) -> str:
  """Writes ``data_dir/name/VERSION`` from ``root/train/CLASS/*`` and ``root/val/CLASS/*``; returns that path.

  The two splits must have the same classes (``ImageFolder`` indexes each folder's classes on its own, so a class
  missing from one would shift every later index).
  """
  target = os.path.join(data_dir, name, IMAGENET_VERSION if name == "imagenet2012" else "1.0.0")
  _refuse_existing(target, overwrite)
  found = {}
  for split, sub in (("train", train), ("validation", val)):
    found[split] = find_image_folder(os.path.join(root, sub), where=f"--root: {sub}")
  classes = found["train"][0]
  if found["validation"][0] != classes:
    only_train = sorted(set(classes) - set(found["validation"][0]))
    only_val = sorted(set(found["validation"][0]) - set(classes))
    raise UserError(f"--root: {train}/ and {val}/ have different classes (only in {train}: {only_train[:3]}, only in "
                    f"{val}: {only_val[:3]}); their indices would not line up")
  skipped = found["train"][2] + found["validation"][2]
  if skipped:
    log(f"skipped {len(skipped)} files without an image extension (e.g. {os.path.relpath(skipped[0], root)})")
  import tensorflow_datasets as tfds

  def split_records(samples):
    def make():
      for path, label in samples:
        yield _check_readable(path), label, {"file_name": os.path.basename(path)}
    return make

  _build_into(target, name, os.path.basename(target), {s: split_records(found[s][1]) for s in found},
              num_classes=len(classes), encoding_format="jpeg", shape=(None, None, 3), label_names=classes,
              extra_features={"file_name": tfds.features.Text()})
  log(f"prepared {name} from {root}: {len(classes)} classes, {len(found['train'][1])} train / "
      f"{len(found['validation'][1])} validation images in {target}")
  return target


# ----------------------------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one ``UserError`` line (argparse prints its usage too, and exits itself)."""

  def error(self, message):
    raise UserError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m tgeo_jax.prepare", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="what", metavar="cifar100|imagefolder", required=True, parser_class=_Parser)
  cifar = sub.add_parser("cifar100", help="CIFAR-100 from cifar-100-python.tar.gz or cifar-100-binary.tar.gz")
  cifar.add_argument("--archive", required=True, help="the official archive (python or binary version)")
  folder = sub.add_parser("imagefolder", help="ImageNet (or any) train/CLASS/* + val/CLASS/* trees")
  folder.add_argument("--root", required=True, help="the directory holding train/ and val/")
  folder.add_argument("--name", default="imagenet2012",
                      help="dataset name (default imagenet2012; another name: pass --config.data.tfds_name=NAME)")
  folder.add_argument("--train", default="train", help="the training tree under --root")
  folder.add_argument("--val", default="val", help="the validation tree under --root")
  for p in (cifar, folder):
    p.add_argument("--data_dir", required=True, help="where to write (then --config.data.dir=DATA_DIR)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already prepared there")
  return parser


def main(argv: list[str] | None = None) -> int:
  try:
    args = _parser().parse_args(argv)
    if args.what == "cifar100":
      prepare_cifar100(args.archive, args.data_dir, overwrite=args.overwrite)
    else:
      prepare_image_folder(args.root, args.data_dir, name=args.name, train=args.train, val=args.val,
                           overwrite=args.overwrite)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # writing DATA_DIR: permissions, a full disk -- nothing is left half-written (staging dir)
    where = f"{e.filename}: " if e.filename else ""
    print(f"error: --data_dir: {where}{e.strerror or e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
