"""CIFAR-100 archives written in the official formats (a helper for tests/test_prepare.py and bench/prepare_speed.py).

* python (``cifar-100-python.tar.gz``): ``cifar-100-python/{train,test,meta}``, dictionaries pickled with protocol 2
  the way the archive's Python 2 ``cPickle`` wrote them: byte strings as ``BINSTRING``/``SHORT_BINSTRING`` opcodes
  (Python 3's pickler would call ``_codecs.encode`` for them), numpy arrays through ``_reconstruct``;
  keys ``data`` ``[N, 3072] uint8`` (R, G, B planes), ``fine_labels``, ``coarse_labels``, ``filenames``,
  ``batch_label``; ``meta`` holds ``fine_label_names`` and ``coarse_label_names``.
* binary (``cifar-100-binary.tar.gz``): ``cifar-100-binary/{train,test}.bin``, records of 1 coarse-label byte,
  1 fine-label byte and 3072 pixel bytes; ``fine_label_names.txt``, ``coarse_label_names.txt``.
"""

import io
import pickle
import struct
import tarfile

import numpy as np

FINE = [f"fine_{i:02d}" for i in range(100)]
COARSE = [f"coarse_{i:02d}" for i in range(20)]


class _Py2Pickler(pickle._Pickler):
  dispatch = dict(pickle._Pickler.dispatch)

  def save_py2_str(self, obj):
    n = len(obj)
    self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj)
    self.memoize(obj)

  def save_str_as_py2(self, obj):
    self.save_py2_str(obj.encode("latin1"))

  dispatch[bytes] = save_py2_str
  dispatch[str] = save_str_as_py2

  def save_global(self, obj, name=None):
    if getattr(obj, "__name__", None) == "_reconstruct":  # numpy 1.x's path, as in the 2009 archive
      self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
      self.memoize(obj)
      return
    super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
  buf = io.BytesIO()
  _Py2Pickler(buf, protocol=2).dump(obj)
  return buf.getvalue()


def make_arrays(counts: dict, seed: int = 0) -> dict:
  """``{split: (images [N, 32, 32, 3] uint8, fine [N], coarse [N])}``, every fine class present in each split."""
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in counts.items():
    fine = np.concatenate([np.arange(100), rng.integers(0, 100, n - 100)])[:n]
    rng.shuffle(fine)
    out[split] = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), fine.astype(np.int64), fine // 5)
  return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_python_archive(path: str, arrays: dict) -> None:
  with tarfile.open(path, "w:gz") as tar:
    _add(tar, "cifar-100-python/meta", py2_pickle({"fine_label_names": FINE, "coarse_label_names": COARSE}))
    for split, (images, fine, coarse) in arrays.items():
      data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
      _add(tar, f"cifar-100-python/{split}", py2_pickle({
          "filenames": [f"img_{i}.png" for i in range(len(images))], "batch_label": f"{split} batch",
          "fine_labels": fine.tolist(), "coarse_labels": coarse.tolist(), "data": data}))


def write_binary_archive(path: str, arrays: dict) -> None:
  with tarfile.open(path, "w:gz") as tar:
    _add(tar, "cifar-100-binary/fine_label_names.txt", ("\n".join(FINE) + "\n").encode())
    _add(tar, "cifar-100-binary/coarse_label_names.txt", ("\n".join(COARSE) + "\n").encode())
    for split, (images, fine, coarse) in arrays.items():
      rows = np.concatenate([coarse[:, None].astype(np.uint8), fine[:, None].astype(np.uint8),
                             images.transpose(0, 3, 1, 2).reshape(len(images), 3072)], axis=1)
      _add(tar, f"cifar-100-binary/{split}.bin", rows.tobytes())
