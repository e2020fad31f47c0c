"""Host-side data path throughput: in-memory vs per-record small images, and the JPEG (ImageNet-style) path.

  python bench/data_paths.py --workdir=/tmp/tgeo_bench --out=bench/results/data_paths.json [--quick]

(a) small images: a local TFDS dataset of 32x32x3 PNGs (10,000 train; tgeo_jax.data.tfds_build) read through the
    cifar100 protocol (``data.tfds_name``), ``crop_flip_cifar100``, batch 128, the real ``train_batches`` iterated
    with ``data.iterate``: images/s in memory (``data.in_memory='on'``) and per record ('off'), plus the one-time
    decode and the cache load.
(b) JPEG: a local dataset of 50,000 JPEGs of ImageNet-like sizes (tfds_build.IMAGENET_LIKE_SIZES) read through the
    imagenet2012 protocol: the time to read every label (no image decoded), and training images/s (decode, resize
    256, centre crop 256, random-resized crop 224 + flip, normalise) with 0, 1 and 2 worker processes, with and
    without ``data.jpeg_draft``; worker start-up is timed separately. The pixel difference of draft decoding is
    measured on the natural photos found on the machine (matplotlib's sample image and others) and on the dataset.

The datasets are built once into --workdir and reused. ``--quick``: small datasets and few batches (a smoke test).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tgeo_jax import data as data_lib
from tgeo_jax.data import tfds_build, tfds_sources
from tgeo_jax.default_config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO_GLOBS = ("**/matplotlib/mpl-data/sample_data/*.jpg", "/usr/share/**/*.jpg", "/root/.rustup/**/f3.jpg")


def _dataset(workdir: str, name: str, splits: dict, **kw) -> float:
  """Builds ``name`` in ``workdir`` unless it is there; returns the build time (0 when reused)."""
  if glob.glob(os.path.join(workdir, name, "*", "dataset_info.json")):
    return 0.0
  start = time.perf_counter()
  tfds_build.build_image_dataset(workdir, name, splits, **kw)
  return time.perf_counter() - start


def _rate(batches, workers: int, count: int) -> dict:
  """Images/s over ``count`` batches after the first and after the ones the workers had ready by then (the first
  batch's wait = start-up, reported apart)."""
  start = time.perf_counter()
  it = data_lib.iterate(batches, workers=workers)
  first = next(it)
  startup = time.perf_counter() - start
  for _, _ in zip(range(2 * workers), it):
    pass
  start, images = time.perf_counter(), 0
  for _, batch in zip(range(count), it):
    images += len(batch["labels"])
  elapsed = time.perf_counter() - start
  it.close()
  return {"workers": workers, "images_per_s": images / elapsed, "images": images, "seconds": elapsed,
          "first_batch_s": startup, "batch_size": len(first["labels"])}


def small_path(workdir: str, quick: bool) -> dict:
  n_train, n_test = (1000, 200) if quick else (10000, 1000)
  name = f"tgeo_bench_png32_{n_train}"
  build = _dataset(workdir, name, {
      "train": tfds_build.fashion_mnist_images(n_train, sizes=((32, 32),), encoding_format="png", processes=2),
      "test": tfds_build.fashion_mnist_images(n_test, sizes=((32, 32),), encoding_format="png", offset=n_train)},
      num_classes=10, encoding_format="png", shape=(32, 32, 3))
  out = {"dataset": name, "train_examples": n_train, "build_s": build, "batch_size": 128,
         "augment": "crop_flip_cifar100"}
  for mode in ("on", "off"):
    c = load_config_file(os.path.join(ROOT, "configs", "cifar100.py"), "teacher:resnet8")
    c.data.dir, c.data.tfds_name, c.data.in_memory = workdir, name, mode
    c.data.cache_dir = os.path.join(workdir, ".tgeo_cache")
    if mode == "on":  # the one-time decode, then a load from the verified cache
      for f in glob.glob(os.path.join(c.data.cache_dir, f"{name}_*")):
        os.remove(f)
    start = time.perf_counter()
    task = data_lib.load(c.data, seed=0)
    load_s = time.perf_counter() - start
    if mode == "on":
      start = time.perf_counter()
      data_lib.load(c.data, seed=0)
      out["in_memory_cache_load_s"] = time.perf_counter() - start
      out["in_memory_first_load_s"] = load_s
    batches = data_lib.train_batches(task.train, batch_size=128, seed=0, epoch=0, augment=task.augment)
    count = len(batches) - 1 if mode == "on" else min(len(batches) - 1, 10 if quick else 30)
    out["in_memory" if mode == "on" else "per_record"] = _rate(batches, 0, count)
  out["speedup"] = out["in_memory"]["images_per_s"] / out["per_record"]["images_per_s"]
  return out


def _photos() -> list[str]:
  found = []
  for pattern in PHOTO_GLOBS:
    found += glob.glob(pattern if pattern.startswith("/") else os.path.join(sys.prefix, "lib", pattern),
                       recursive=True)
  return sorted(set(found))[:8]


def draft_difference(paths: list[str], encoded: list[bytes], repeats: int) -> dict:
  """Pixel difference and speed of draft vs full decode + ``imagenet_train_transform`` (uint8 256x256 output)."""
  rows = []
  items = [(os.path.basename(p), open(p, "rb").read()) for p in paths] + \
      [(f"dataset[{i}]", b) for i, b in enumerate(encoded)]
  for label, data in items:
    full = tfds_sources.imagenet_train_transform(tfds_sources.decode_image(data)).astype(np.int16)
    draft = tfds_sources.imagenet_train_transform(tfds_sources.decode_image(data, 256)).astype(np.int16)
    timings = {}
    for key, size in (("full", None), ("draft", 256)):
      start = time.perf_counter()
      for _ in range(repeats):
        tfds_sources.imagenet_train_transform(tfds_sources.decode_image(data, size))
      timings[key] = (time.perf_counter() - start) / repeats
    from PIL import Image
    import io
    w, h = Image.open(io.BytesIO(data)).size
    diff = np.abs(full - draft)
    rows.append({"image": label, "size": [h, w], "mean_abs_diff": float(diff.mean()), "max_abs_diff": int(diff.max()),
                 "p99_abs_diff": float(np.percentile(diff, 99)), "full_ms": 1e3 * timings["full"],
                 "draft_ms": 1e3 * timings["draft"], "speedup": timings["full"] / timings["draft"]})
  return {"rows": rows, "note": "uint8 256x256 outputs of decode + resize-256 + centre-crop-256; 0-255 scale"}


def jpeg_path(workdir: str, quick: bool, workers: list[int]) -> dict:
  n_train = 2000 if quick else 50000
  name = "tgeo_bench_jpeg" if not quick else "tgeo_bench_jpeg_quick"
  build = _dataset(workdir, name, {
      "train": tfds_build.fashion_mnist_images(n_train, seed=0, processes=2),
      "validation": tfds_build.fashion_mnist_images(1000 if not quick else 100, seed=0, offset=n_train,
                                                   processes=2)}, num_classes=10)
  src = tfds_sources.open_split(name, "train", workdir)
  start = time.perf_counter()
  labels = tfds_sources.read_labels(src)  # no cache: every record's label read
  labels_s = time.perf_counter() - start
  out = {"dataset": name, "train_examples": len(src), "build_s": build, "labels_read_s": labels_s,
         "labels_read_records": len(labels), "batch_size": 64, "runs": []}
  sizes = [os.path.getsize(p) for p, _, _ in tfds_sources.split_files(src)]
  out["mean_record_kb"] = sum(sizes) / len(src) / 1e3
  count = 3 if quick else 15
  for draft in (False, True):
    c = load_config_file(os.path.join(ROOT, "configs", "imagenet.py"), "teacher")
    c.data.dir, c.data.tfds_name, c.data.jpeg_draft = workdir, name, draft
    task = data_lib.load(c.data, seed=0)
    batches = data_lib.train_batches(task.train, batch_size=64, seed=0, epoch=0, augment=task.augment)
    for w in workers:
      row = _rate(batches, w, count)
      row.update(jpeg_draft=draft, per_process_images_per_s=row["images_per_s"] / max(w, 1))
      out["runs"].append(row)
      print(f"  jpeg draft={draft} workers={w}: {row['images_per_s']:.0f} images/s "
            f"(first batch {row['first_batch_s']:.1f} s)", flush=True)
  encoded = [src[i]["image"] for i in range(len(tfds_build.IMAGENET_LIKE_SIZES))]
  out["draft_difference"] = draft_difference(_photos(), encoded, 3 if quick else 20)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/tgeo_bench", help="where the datasets are built (and reused)")
  parser.add_argument("--out", default="bench/results/data_paths.json")
  parser.add_argument("--quick", action="store_true", help="small datasets, few batches (a smoke test)")
  parser.add_argument("--workers", default="0,1,2", help="worker counts for the JPEG path")
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_average_start": os.getloadavg()}, "quick": args.quick,
            "command": " ".join(["python", "bench/data_paths.py", *(argv if argv is not None else sys.argv[1:])])}
  print("small images (32x32x3, crop_flip_cifar100, batch 128) ...", flush=True)
  result["small"] = small_path(args.workdir, args.quick)
  s = result["small"]
  print(f"  in memory {s['in_memory']['images_per_s']:.0f} images/s, per record "
        f"{s['per_record']['images_per_s']:.0f} images/s", flush=True)
  print("JPEG (ImageNet-like sizes, imagenet_crop_flip, batch 64) ...", flush=True)
  result["jpeg"] = jpeg_path(args.workdir, args.quick, [int(w) for w in args.workers.split(",")])
  print(f"  labels of {result['jpeg']['labels_read_records']} records in {result['jpeg']['labels_read_s']:.1f} s",
        flush=True)
  result["machine"]["load_average_end"] = os.getloadavg()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
