"""How long ``python -m tgeo_jax.prepare`` takes, and whether reading a class tree directly would be faster.

    python bench/prepare_speed.py [--tree-images 10000] [--workdir /tmp/prepare_speed]

1. A full-size CIFAR-100 archive (50,000 + 10,000 random images) in each official format (tests/cifar_archives.py),
   prepared end to end (read, check, md5, PNG-encode, write).
2. A class-folder tree of ``--tree-images`` ImageNet-like JPEGs (Fashion-MNIST pictures resized to 300x400 ...
   800x600, ``tfds_build.fashion_mnist_images``), 100 classes, 90% train / 10% val, prepared end to end.
3. Reading the same JPEGs back and decoding them (PIL, RGB), one process: from the tree's files
   (``open`` + ``read`` + decode: what a loader reading the tree directly would do) and from the prepared
   array_record records (what the loader does), interleaved in rounds, images/s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import cifar_archives  # noqa: E402
from tgeo_jax import prepare  # noqa: E402
from tgeo_jax.data import tfds_build  # noqa: E402


def _quiet(*_):
  pass


def cifar(workdir: str) -> dict:
  arrays = cifar_archives.make_arrays(prepare.CIFAR100_COUNTS, seed=0)
  out = {}
  for fmt in ("python", "binary"):
    archive = os.path.join(workdir, f"cifar-100-{fmt}.tar.gz")
    getattr(cifar_archives, f"write_{fmt}_archive")(archive, arrays)
    data_dir = os.path.join(workdir, f"data_{fmt}")
    shutil.rmtree(data_dir, ignore_errors=True)
    start = time.perf_counter()
    prepare.prepare_cifar100(archive, data_dir, log=_quiet, warn=_quiet)
    out[fmt] = {"seconds": time.perf_counter() - start, "archive_mb": os.path.getsize(archive) / 1e6}
    print(f"cifar100 {fmt}: {out[fmt]['seconds']:.1f} s ({out[fmt]['archive_mb']:.0f} MB archive)", flush=True)
  return out


def tree(workdir: str, count: int) -> tuple[dict, str, str]:
  root = os.path.join(workdir, "tree")
  shutil.rmtree(root, ignore_errors=True)
  start = time.perf_counter()
  for i, (jpeg, label) in enumerate(tfds_build.fashion_mnist_images(count, processes=2)()):
    split = "val" if i % 10 == 9 else "train"
    directory = os.path.join(root, split, f"n{(i // 10) % 100:08d}")  # 100 classes, in both splits
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"img_{i:06d}_{label}.JPEG"), "wb") as f:
      f.write(jpeg)
  generated = time.perf_counter() - start
  data_dir = os.path.join(workdir, "data_tree")
  shutil.rmtree(data_dir, ignore_errors=True)
  start = time.perf_counter()
  prepare.prepare_image_folder(root, data_dir, name="speed_tree", log=_quiet)
  seconds = time.perf_counter() - start
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs) / 1e6
  print(f"tree: {count} JPEGs ({size:.0f} MB) prepared in {seconds:.1f} s = {count / seconds:.0f} images/s "
        f"(generating them took {generated:.0f} s)", flush=True)
  return {"images": count, "mb": size, "seconds": seconds, "images_per_s": count / seconds}, root, data_dir


def decode_rates(root: str, data_dir: str, n: int = 600, rounds: int = 3) -> dict:
  import tensorflow_datasets as tfds
  from PIL import Image
  _, samples, _ = prepare.find_image_folder(os.path.join(root, "train"), where="train")
  paths = [p for p, _ in samples[:n]]
  src = tfds.data_source("speed_tree", split="train", data_dir=data_dir, download=False,
                         decoders={"image": tfds.decode.SkipDecoding()})

  def from_files():
    for p in paths:
      with open(p, "rb") as f:
        np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))

  def from_records():
    for record in src.__getitems__(list(range(len(paths)))):
      np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"))

  times = {"tree files": [], "array_record": []}
  for _ in range(rounds):
    for name, fn in (("tree files", from_files), ("array_record", from_records)):
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  rates = {name: len(paths) / float(np.median(t)) for name, t in times.items()}
  print("decode, one process, median of", rounds, "rounds:",
        ", ".join(f"{k} {v:.0f} images/s" for k, v in rates.items()), flush=True)
  return rates


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tree-images", type=int, default=10000)
  parser.add_argument("--workdir", default="/tmp/prepare_speed")
  parser.add_argument("--out", default=None, help="write the figures as JSON")
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  result = {"cifar100": cifar(args.workdir)}
  result["tree"], root, data_dir = tree(args.workdir, args.tree_images)
  result["decode_images_per_s"] = decode_rates(root, data_dir)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
