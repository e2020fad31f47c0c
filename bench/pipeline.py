"""Input pipeline throughput against training-step throughput: does the loader keep the step fed?

    python bench/pipeline.py [--out FILE.json] [--model cnn_small] [--batch 128] [--val-batch 128] [--rounds 5]
                             [--loader-batches 0] [--steps 30] [--augment none,crop_flip] [--no-profile]

Fashion-MNIST with the default data config (``default_config.base_config().data``: the full 54,000-example
training part, the 6,000-example validation part; ``data.dir`` from ``--data-dir``), batch 128. All in one process,
measured in interleaved rounds (the order rotates each round, so background load hits every row alike):

* **loader**: batches per second of ``data.train_batches(...).to_iter_dataset()`` (grain, its default read options)
  with each batch put on the device as the trainer does it (``parallel.shard_batch`` on the ``('data',)`` mesh,
  ``block_until_ready`` per batch). ``+ val``: the TGeo-KD loader, which also fetches ``validation_batches(...)[step]``
  per step, as the trainer does for methods that learn on the validation part. One round = one pass of
  ``--loader-batches`` batches (default: a whole epoch, iterator start-up included, as each epoch of the trainer).
* **step**: steps per second of the trainer's own jitted step (``trainer.build_method`` + ``trainer.make_guarded_step``,
  ``jax.jit(..., donate_argnums=(0,), static_argnums=(3,))``) for KD and TGeo-KD (reuse ordering, meta step every
  step) with the ``cnn_small`` student, fed one device-resident batch (no loading at all). The teacher is a randomly
  initialised ``teacher.model`` whose logits are cached over the training part (``teacher.cache_logits='auto'`` with
  ``data.augment='none'``, the default: the step looks them up), so its weights do not change the cost.
* **loop**: the trainer's loop body (grain iterator -> ``shard_batch`` -> step, no per-step sync), steps per second:
  what training actually gets; ``loop / step`` below 1 is time the step waited for data or lost to the loader's CPU use.

Then, in the same run (``--sections``, default all; each also writes its own JSON beside ``--out``):

* ``host_overhead`` (bench/host_overhead.py): the real ``trainer.train`` loop with a trivial jitted step, ms per
  step (data, sharding, dispatch, bookkeeping) with and without a validation batch, and its parts;
* ``data_paths`` (bench/data_paths.py, datasets built once in ``--data-paths-workdir``): 32x32x3 crop+flip images/s
  in memory vs per record; the JPEG path: labels read time, images/s at 0, 1, 2 workers, with and without draft.

Ratio = loader batches/s over step steps/s (target >= 5: the loader never starves the step). The optional profile
(single-threaded, per batch, synchronous) splits the loader's work: grain's shuffled index batch, the uint8 gather,
``to_model`` (normalisation to float32 NHWC), the validation batch, and ``shard_batch``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.machine import machine_info  # noqa: E402
from tgeo_jax import data, models, parallel, trainer  # noqa: E402
from tgeo_jax.data import augment as augment_lib  # noqa: E402
from tgeo_jax.default_config import base_config  # noqa: E402
from tgeo_jax.teacher import Teacher  # noqa: E402

TARGET_RATIO = 5.0


def make_config(method: str, args):
  c = base_config()
  c.method = method
  c.model.name = args.model
  c.batch_size = args.batch
  c.val_batch_size = args.val_batch
  c.data.dir = args.data_dir
  c.tgeo.analysis_examples = 0
  return c


def build_steps(args, task, mesh):
  """``{name: (jitted guarded step, state, frozen, kind_fn, uses_val)}`` for KD and TGeo-KD, as the trainer has them."""
  spec = task.spec
  steps_per_epoch = data.steps_per_epoch(len(task.train), args.batch)
  kd_config = make_config("kd", args)
  tfn = models.split(models.create(kd_config.teacher.model, num_classes=spec.num_classes,
                                   input_shape=spec.input_shape, seed=kd_config.seed + 100))
  teacher = Teacher(kd_config.teacher.model, tfn.graphdef, {"params": tfn.params, "rest": tfn.rest})
  out, table = {}, None
  for name in ("kd", "tgeo"):
    config = make_config(name, args)
    method = trainer.build_method(config, task, steps_per_epoch, teacher=teacher)
    if table is not None:  # the same frozen teacher: compute its logit table over the training part once
      method.teacher_logits_over_train = lambda frozen, table=table: table
    t0 = time.perf_counter()
    state, frozen = method.init(jax.random.PRNGKey(config.seed))
    init_s = time.perf_counter() - t0
    table = frozen.get("teacher_logits_table", table)
    state, frozen = parallel.replicate((state, frozen), mesh)
    guarded, _ = trainer.make_guarded_step(method, skip_nonfinite=config.nonfinite == "skip")
    step = jax.jit(guarded, donate_argnums=(0,), static_argnums=(3,))
    out[name] = dict(step=step, state=state, frozen=frozen, method=method, config=config, init_s=init_s,
                     health=parallel.replicate(trainer.initial_health(0), mesh))
    print(f"  built {name}: init {init_s:.1f} s (teacher logit table {'computed' if name == 'kd' else 'reused'}, "
          f"cached logits: {'teacher_logits_table' in frozen})", file=sys.stderr, flush=True)
  return out


def loader_pass(task, args, mesh, *, epoch, num_batches, with_val, augment):
  """Batches/s of one grain pass (fresh iterator), each batch sharded onto the mesh and ready."""
  ds = data.train_batches(task.train, batch_size=args.batch, seed=0, epoch=epoch, augment=augment)
  ds = ds[:num_batches] if num_batches else ds
  val = data.validation_batches(task.val, batch_size=args.val_batch, seed=0) if with_val else None
  n = 0
  t0 = time.perf_counter()
  for batch in ds.to_iter_dataset():
    if val is not None:
      batch["val"] = val[epoch * 1000 + n]
    jax.block_until_ready(parallel.shard_batch(batch, mesh))
    n += 1
  return n / (time.perf_counter() - t0), n


def step_pass(entry, batch, num_steps):
  """Steps/s of the trainer's jitted step on one device-resident batch."""
  step, method = entry["step"], entry["method"]
  state, health = entry["state"], entry["health"]
  k0 = int(jax.device_get(health["step"]))
  t0 = time.perf_counter()
  for i in range(num_steps):
    state, metrics, health = step(state, entry["frozen"], batch, method.step_kind(k0 + i), health)
  jax.block_until_ready((state, metrics, health))
  rate = num_steps / (time.perf_counter() - t0)
  entry["state"], entry["health"] = state, health
  return rate


def loop_pass(entry, task, args, mesh, *, epoch, num_steps, read_options=None):
  """Steps/s of the trainer's loop body: grain iterator -> (val batch) -> shard_batch -> step; one sync at the end."""
  step, method = entry["step"], entry["method"]
  state, health = entry["state"], entry["health"]
  k0 = int(jax.device_get(health["step"]))
  ds = data.train_batches(task.train, batch_size=args.batch, seed=0, epoch=epoch, augment=task.augment)[:num_steps]
  val = (data.validation_batches(task.val, batch_size=args.val_batch, seed=0)
         if method.uses_validation_batch else None)
  t0 = time.perf_counter()
  i = 0
  for batch in ds.to_iter_dataset(read_options):
    if val is not None:
      batch["val"] = val[k0 + i]
    state, metrics, health = step(state, entry["frozen"], parallel.shard_batch(batch, mesh),
                                  method.step_kind(k0 + i), health)
    i += 1
  jax.block_until_ready((state, metrics, health))
  rate = i / (time.perf_counter() - t0)
  entry["state"], entry["health"] = state, health
  return rate


def profile_loader(task, args, mesh, num=200):
  """Median microseconds per batch of each part of the loader, single-threaded and synchronous."""
  src = task.train
  epoch_seed = data.pipeline.epoch_shuffle_seed(0, 0)
  import grain
  batches = grain.MapDataset.range(len(src)).shuffle(seed=epoch_seed).batch(args.batch, drop_remainder=True)
  full = data.train_batches(src, batch_size=args.batch, seed=0, epoch=0)
  val = data.validation_batches(task.val, batch_size=args.val_batch, seed=0)
  num = min(num, len(batches))
  parts = {k: [] for k in ("grain index batch", "gather uint8", "to_model (normalise)", "labels + index",
                           "whole train batch, ds[step] (grain map, no prefetch)", "validation batch val[step]",
                           "shard_batch + block (host -> device)", "crop_flip augmentation (if used)")}
  crop_flip = augment_lib.get("crop_flip")
  has_raw = isinstance(src, data.sources.ArraySource) and not isinstance(src.inputs, dict)

  def timed(key, fn):
    t0 = time.perf_counter()
    out = fn()
    parts[key].append(time.perf_counter() - t0)
    return out

  for s in range(num):
    idx = timed("grain index batch", lambda: np.asarray(batches[s]))
    if has_raw:
      raw = timed("gather uint8", lambda: src.inputs[idx])
      x = timed("to_model (normalise)", lambda: src.to_model(raw) if src.to_model else raw)
    else:
      x = timed("gather uint8", lambda: src.gather(idx))
    timed("labels + index", lambda: (src.labels[idx], idx.astype(np.int32)))
    timed("crop_flip augmentation (if used)", lambda: crop_flip(x, np.random.default_rng([epoch_seed, s])))
    b = timed("whole train batch, ds[step] (grain map, no prefetch)", lambda: full[s])
    timed("validation batch val[step]", lambda: val[s])
    timed("shard_batch + block (host -> device)", lambda: jax.block_until_ready(parallel.shard_batch(b, mesh)))
  return {k: 1e6 * statistics.median(v) for k, v in parts.items() if v}


def device_info():
  import grain
  return machine_info(grain=getattr(grain, "__version__", None))


def run_sections(args) -> dict:
  """The host-overhead and data-path benchmarks, run from here so that one command reports every host-side figure;
  returns their JSON payloads."""
  out = {}
  base = os.path.splitext(args.out)[0] if args.out else os.path.join("/tmp", "pipeline")
  names = [n for n in args.sections.split(",") if n]
  if "host_overhead" in names:
    from bench import host_overhead
    print("\n== host overhead (bench/host_overhead.py)", flush=True)
    out["host_overhead"] = host_overhead.main(
        ["--out", f"{base}_host_overhead.json", "--batch", str(args.batch), "--data-dir", args.data_dir,
         *(["--spans", "2", "--span-steps", "40"] if args.quick else [])])
  if "data_paths" in names:
    from bench import data_paths
    print("\n== data paths (bench/data_paths.py)", flush=True)
    path = f"{base}_data_paths.json"
    data_paths.main(["--workdir", args.data_paths_workdir, "--out", path, *(["--quick"] if args.quick else [])])
    with open(path) as f:
      out["data_paths"] = json.load(f)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="", help="write the results as JSON to this file")
  p.add_argument("--model", default="cnn_small", help="student (default cnn_small)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--val-batch", type=int, default=128)
  p.add_argument("--data-dir", default="", help="Fashion-MNIST IDX directory ('' = the Debian package's)")
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
  p.add_argument("--loader-batches", type=int, default=0, help="batches per loader pass (0: a whole epoch)")
  p.add_argument("--steps", type=int, default=30, help="steps per step/loop measurement (default 30)")
  p.add_argument("--augment", default="none,crop_flip",
                 help="loader rows: data.augment values (the steps always use the default 'none')")
  p.add_argument("--no-profile", action="store_true", help="skip the per-part loader profile")
  p.add_argument("--loop-threads", default="1",
                 help="extra loop rows with grain.ReadOptions(num_threads=N, prefetch_buffer_size=--loop-prefetch) "
                      "instead of grain's default (16 threads, 500 batches), comma-separated ('' for none)")
  p.add_argument("--loop-prefetch", type=int, default=8)
  p.add_argument("--sections", default="host_overhead,data_paths",
                 help="extra sections after the loader/step table: host_overhead, data_paths ('' for none)")
  p.add_argument("--data-paths-workdir", default="/tmp/tgeo_bench", help="where bench/data_paths.py builds its data")
  p.add_argument("--quick", action="store_true", help="the extra sections in their quick (smoke-test) modes")
  args = p.parse_args(argv)

  t_start = time.perf_counter()
  info = device_info()
  print(f"{info['date']}: jax {info['jax']}, grain {info['grain']}, on {info['device_kind']} ({info['platform']}, "
        f"{info['device_count']} device(s)); CPUs {info['cpu_count']} (affinity {info['cpu_affinity']}), load "
        f"{info['loadavg_start']}", flush=True)
  mesh = parallel.make_mesh()
  config = make_config("kd", args)
  task = data.load(config.data, seed=config.seed)
  steps_per_epoch = data.steps_per_epoch(len(task.train), args.batch)
  print(f"data {task.name}: {len(task.train)} train / {len(task.val)} val examples, batch {args.batch} "
        f"({steps_per_epoch} steps per epoch), val batch {args.val_batch}; student {args.model}, teacher "
        f"{config.teacher.model} (random weights, cached logits)", flush=True)
  entries = build_steps(args, task, mesh)
  step_batch = data.train_batches(task.train, batch_size=args.batch, seed=0, epoch=0)[0]
  step_batch["val"] = data.validation_batches(task.val, batch_size=args.val_batch, seed=0)[0]
  step_batch = parallel.shard_batch(step_batch, mesh)
  kd_batch = {k: v for k, v in step_batch.items() if k != "val"}
  for name, entry in entries.items():  # compile + warm up
    t0 = time.perf_counter()
    step_pass(entry, step_batch if name == "tgeo" else kd_batch, 2)
    entry["compile_s"] = time.perf_counter() - t0

  augments = [a for a in args.augment.split(",") if a]
  rows = {}
  for a in augments:
    rows[f"loader ({a})"] = dict(kind="loader", augment=a, with_val=False)
    rows[f"loader ({a}) + val"] = dict(kind="loader", augment=a, with_val=True)
  import grain
  for name in entries:
    rows[f"step {name}"] = dict(kind="step", method=name)
    rows[f"loop {name}"] = dict(kind="loop", method=name, read_options=None)
    for n in [int(t) for t in args.loop_threads.split(",") if t]:
      rows[f"loop {name}, grain {n} thread(s)"] = dict(
          kind="loop", method=name,
          read_options=grain.ReadOptions(num_threads=n, prefetch_buffer_size=args.loop_prefetch))
  rates = {k: [] for k in rows}
  num_batches = args.loader_batches or steps_per_epoch
  for _name, r in rows.items():  # warm-up of every row (grain threads, first device_puts)
    if r["kind"] == "loader":
      loader_pass(task, args, mesh, epoch=99, num_batches=8, with_val=r["with_val"],
                  augment=augment_lib.get(r["augment"]))
  order = list(rows)
  for rnd in range(args.rounds):
    shift = rnd % len(order)
    for name in order[shift:] + order[:shift]:
      r = rows[name]
      if r["kind"] == "loader":
        rate, n = loader_pass(task, args, mesh, epoch=rnd + 1, num_batches=num_batches, with_val=r["with_val"],
                              augment=augment_lib.get(r["augment"]))
      elif r["kind"] == "step":
        rate = step_pass(entries[r["method"]], step_batch if r["method"] == "tgeo" else kd_batch, args.steps)
      else:
        rate = loop_pass(entries[r["method"]], task, args, mesh, epoch=rnd + 1, num_steps=args.steps,
                         read_options=r["read_options"])
      rates[name].append(rate)
    print(f"  round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in rates.items()),
          file=sys.stderr, flush=True)
  med = {k: statistics.median(v) for k, v in rates.items()}

  print()
  print("| what | per second (median) | ms each |")
  print("|---|---:|---:|")
  for k, v in med.items():
    print(f"| {k} | {v:.1f} | {1e3 / v:.2f} |")
  ratios = []
  for name in entries:
    loader_key = "loader (none) + val" if entries[name]["method"].uses_validation_batch else "loader (none)"
    if loader_key not in med:
      continue
    ratio = med[loader_key] / med[f"step {name}"]
    ratios.append(dict(method=name, loader=loader_key, loader_per_s=med[loader_key], step_per_s=med[f"step {name}"],
                       loop_per_s=med[f"loop {name}"], ratio=ratio, loop_over_step=med[f"loop {name}"] /
                       med[f"step {name}"], target=TARGET_RATIO, met=ratio >= TARGET_RATIO))
  print()
  print(f"| method | loader batches/s | step steps/s | loader / step (target >= {TARGET_RATIO:g}) | loop steps/s | "
        "loop / step |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in ratios:
    print(f"| {r['method']} ({r['loader']}) | {r['loader_per_s']:.1f} | {r['step_per_s']:.1f} | {r['ratio']:.1f}x "
          f"{'(met)' if r['met'] else '(NOT met)'} | {r['loop_per_s']:.1f} | {r['loop_over_step']:.2f} |")

  profile = None
  if not args.no_profile:
    profile = profile_loader(task, args, mesh)
    print()
    print("Loader profile (single-threaded, synchronous, median µs per batch):")
    print("| part | µs |")
    print("|---|---:|")
    for k, v in profile.items():
      print(f"| {k} | {v:.0f} |")

  sections = run_sections(args)
  total = time.perf_counter() - t_start
  print(f"\ntotal benchmark time: {total:.1f} s")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    settings = dict(vars(args), train_examples=len(task.train), val_examples=len(task.val),
                    steps_per_epoch=steps_per_epoch, loader_batches_per_pass=num_batches,
                    teacher=config.teacher.model + " (random weights, cached logits)",
                    grain_read_options=str(__import__("grain").ReadOptions()),
                    compile_s={k: e["compile_s"] for k, e in entries.items()},
                    init_s={k: e["init_s"] for k, e in entries.items()})
    with open(args.out, "w") as f:
      json.dump(dict(device=info, settings=settings, median_per_s=med, rates_per_s=rates, ratios=ratios,
                     loader_profile_us=profile, sections=sections, total_seconds=total), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
