"""The whole training loop, host pipeline against device-resident pipeline, in one process, interleaved.

    python bench/device_loop.py [--out FILE.json] [--rounds 3] [--rows probe,probe_val,kd,tgeo,resnet8x4_kd]
                                [--steps-per-dispatch 8]

Each row builds two runs of ``trainer.setup`` that differ only in ``device_pipeline.mode`` (off: grain batches
built on the host, one dispatch per step; on: the split on the device, the batch gathered, augmented and
normalised inside the step, ``--steps-per-dispatch`` steps per dispatch) and times ``trainer.train`` (the loop as
training runs it) over spans of steps inside the first epoch, the two sides alternating in rotated rounds after
a warm-up span that compiles. Rows:

* ``probe`` / ``probe_val``: ``bench/host_overhead.py``'s trivial step (with a validation batch per step for
  ``probe_val``), ``mlp_tiny``, Fashion-MNIST, batch 128: the loop's host time per step;
* ``kd`` / ``tgeo``: cnn_small KD and TGeo-KD (the fashion_mnist config: one-step meta-gradient every step;
  teacher cnn_teacher, random weights, logits cached), Fashion-MNIST, batch 128; ``tgeo_m4`` (a meta step every 4
  steps: kinds meta and plain) and ``tgeo_unroll4`` (4-step unroll windows: kinds record and window_end), the
  rows whose chunk switches between step kinds;
* ``resnet8x4_kd``: resnet8x4 KD with a live resnet32x4 teacher (random weights) on CIFAR-100-shaped data (TFDS
  mock data, uint8 in memory, RepDistiller's crop + flip), batch 64.

``--data synthetic`` (a machine without Debian's Fashion-MNIST or TFDS, e.g. ``bench/gpu_check.sh``): random
Fashion-MNIST IDX files read by the real loader, and for ``resnet8x4_kd`` the synthetic task (float32 32x32x3,
100 classes, crop + flip with zero padding).

After the rounds both sides have taken the same steps from the same start: ``bit_identical`` says whether their
states are equal bit for bit. The JSON has per row and side the median ms per step and steps/s, and
``device_over_host`` (steps/s ratio, > 1: the device pipeline is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import host_overhead  # noqa: E402 (also registers the probe methods)
from bench.machine import machine_info  # noqa: E402
from configs import cifar100, fashion_mnist  # noqa: E402
from tgeo_jax import data, models, trainer  # noqa: E402
from tgeo_jax.data import sources  # noqa: E402
from tgeo_jax.default_config import base_config  # noqa: E402
from tgeo_jax.teacher import Teacher  # noqa: E402

ROWS = ("probe", "probe_val", "kd", "tgeo", "tgeo_m4", "tgeo_unroll4", "resnet8x4_kd")
# Rows that run several step kinds: one lax.switch branch each in the device pipeline's chunk.
TGEO_VARIANTS = {"tgeo_m4": {"meta_interval": 4}, "tgeo_unroll4": {"hypergrad": "unroll", "unroll_steps": 4}}


def fake_fashion_mnist(directory: str, n_train: int = 60000, n_test: int = 10000) -> str:
  """Fashion-MNIST-shaped IDX files of random pixels in ``directory`` (``--data synthetic``: a machine without the
  Debian package), read by the real loader."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  for split, n in (("train", n_train), ("t10k", n_test)):
    sources.write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, 28, 28)))
    sources.write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), np.arange(n) % 10)
  return directory


def make_config(row: str, args):
  """``(config, teacher model name or None, span steps)`` of a row."""
  if row in ("probe", "probe_val"):
    c = base_config()
    c.method = "host_overhead_probe" if row == "probe" else "host_overhead_probe_val"
    c.model.name = "mlp_tiny"
    c.batch_size = c.val_batch_size = 128
    teacher, span = None, args.probe_span
  elif row in ("kd", "tgeo", *TGEO_VARIANTS):
    c = fashion_mnist.get_config("tgeo" if row in TGEO_VARIANTS else row)
    c.tgeo.update(TGEO_VARIANTS.get(row, {}))
    c.batch_size = c.val_batch_size = 128
    c.data.train_subset = 0  # the full training part: 421 steps per epoch
    c.tgeo.analysis_examples = 0
    teacher, span = c.teacher.model, args.span
  else:
    c = cifar100.get_config("resnet32x4_resnet8x4:kd")
    c.batch_size = 64
    if args.data == "synthetic":  # float32 32x32x3 inputs, crop + flip with zero padding
      c.data.name, c.data.augment = "synthetic", "crop_flip"
      c.data.synthetic.update(num_train=max(3000, c.batch_size * (args.rounds + 1) * args.resnet_span * 10 // 9 + 64),
                              num_test=1000, input_shape=(32, 32, 3), num_classes=100)
    else:
      c.data.mock, c.data.mock_examples = True, 3000
    teacher, span = c.teacher.model, args.resnet_span
  if args.fashion_mnist_dir and row != "resnet8x4_kd":
    c.data.dir = args.fashion_mnist_dir
  c.num_epochs = 2
  c.log.progress = False
  c.log.every_steps = 64
  c.checkpoint.every_steps = 0
  # Cached teacher logits where the inputs are not augmented; with the crop + flip the teacher runs every step.
  c.teacher.cache_logits = "on" if c.data.augment == "none" else "off"
  c.device_pipeline.steps_per_dispatch = args.steps_per_dispatch
  return c, teacher, span


def bench_row(row: str, args, tmp: str) -> dict:
  runs = {}
  for side, mode in (("host", "off"), ("device", "on")):
    config, teacher_model, span = make_config(row, args)
    config.device_pipeline.mode = mode
    teacher = None
    if teacher_model is not None:
      task = data.load(config.data, seed=config.seed)
      tfn = models.split(models.create(teacher_model, num_classes=task.num_classes, input_shape=task.input_shape,
                                       seed=config.seed + 100))
      teacher = Teacher(teacher_model, tfn.graphdef, {"params": tfn.params, "rest": tfn.rest})
    runs[side] = trainer.setup(config, os.path.join(tmp, f"{row}_{side}"), teacher=teacher)
  times = {side: [] for side in runs}
  try:
    for run in runs.values():  # warm-up: compiles
      host_overhead.span_ms(run, span)
    order = list(runs)
    for r in range(args.rounds):
      for side in order[r % 2:] + order[:r % 2]:
        times[side].append(host_overhead.span_ms(runs[side], span))
    steps = {side: run.step for side, run in runs.items()}
    if max(steps.values()) > runs["host"].steps_per_epoch:
      raise SystemExit(f"{row}: the spans crossed the epoch end: lower --rounds or the span")
    a, b = (jax.device_get(runs[side].state) for side in ("host", "device"))
    identical = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  finally:
    for run in runs.values():
      run.close()
  out = {"span_steps": span, "steps": steps["host"], "bit_identical": bool(identical)}
  for side in runs:
    ms = statistics.median(times[side])
    out[side] = {"ms_per_step": ms, "steps_per_second": 1e3 / ms, "spans_ms": times[side]}
  out["device_over_host"] = out["device"]["steps_per_second"] / out["host"]["steps_per_second"]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="")
  p.add_argument("--rows", default=",".join(ROWS))
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps-per-dispatch", type=int, default=8)
  p.add_argument("--probe-span", type=int, default=96)
  p.add_argument("--span", type=int, default=48)
  p.add_argument("--resnet-span", type=int, default=8)
  p.add_argument("--data", choices=("real", "synthetic"), default="real",
                 help="synthetic: random Fashion-MNIST IDX files and a float32 CIFAR-shaped synthetic task (for a "
                      "machine without the Fashion-MNIST package or TFDS, e.g. the GPU check)")
  args = p.parse_args(argv)
  t_start = time.perf_counter()
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    args.fashion_mnist_dir = (fake_fashion_mnist(os.path.join(tmp, "fashion_mnist")) if args.data == "synthetic"
                              else "")
    for row in args.rows.split(","):
      results[row] = r = bench_row(row, args, tmp)
      print(f"{row}: host {r['host']['ms_per_step']:.3f} ms/step, device {r['device']['ms_per_step']:.3f} ms/step "
            f"({r['device_over_host']:.2f}x steps/s); bit-identical states: {r['bit_identical']}", flush=True)
      write(args, results, time.perf_counter() - t_start)  # after every row: a run cut short keeps its rows
  print(f"\n| row | host pipeline ms/step | device pipeline ms/step ({args.steps_per_dispatch} steps/dispatch) | "
        "steps/s device / host | states bit-identical |")
  print("|---|---:|---:|---:|---|")
  for row, r in results.items():
    print(f"| {row} | {r['host']['ms_per_step']:.3f} | {r['device']['ms_per_step']:.3f} | "
          f"{r['device_over_host']:.2f} | {'yes' if r['bit_identical'] else 'no'} |")
  total = time.perf_counter() - t_start
  print(f"\ntotal benchmark time: {total:.1f} s")
  if args.out:
    write(args, results, total)
    print(f"wrote {args.out}")
  return results


def write(args, results: dict, seconds: float) -> None:
  if not args.out:
    return
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(device=machine_info(), settings=vars(args), rows=results, total_seconds=seconds), f, indent=1)


if __name__ == "__main__":
  main()
