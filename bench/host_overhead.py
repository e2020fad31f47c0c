"""Host overhead of the training loop: the real ``trainer.train`` with a trivial jitted step.

    python bench/host_overhead.py [--out FILE.json] [--batch 128] [--spans 3] [--span-steps 120]

What an accelerator step of 1 ms would wait for is whatever the host spends per step outside the step itself:
taking the next batch out of the input pipeline, putting it on the device (``parallel.shard_batch``), dispatching
the jitted step, and the loop's bookkeeping (the running metric sums, the cadence checks, a host sync and a
``kind: train`` record every ``log.every_steps``). This benchmark runs ``trainer.setup`` + ``trainer.train`` (the
loop exactly as training runs it) on Fashion-MNIST held in memory (uint8, normalised per batch) with a probe
method whose jitted step does almost nothing (it reads the batch and returns the state), so the loop's wall time
per step is that host overhead. Target: <= 0.3 ms per step on the 2-core CPU machine, so that a 1 ms accelerator
step stays >= 75% busy (0.3 / (1 + 0.3) = 23% idle at worst, less where the pipeline's threads overlap the step).

Rows: ``loop`` (the probe as a plain method) and ``loop + val`` (the probe taking a validation batch each step, as
TGeo-KD's meta steps do); then the parts measured alone on the main thread, to say what dominates: ``pipeline``
(next batch out of ``data.iterate``, prefetched by grain's threads), ``validation batch`` (one
``validation_batches(...)[t]``: a permutation and a gather; in the loop it is built in grain's threads),
``shard_batch`` and ``dispatch`` (the jitted probe step on a device-resident batch, no sync). Each loop row is the
median of ``--spans`` spans of ``--span-steps`` steps inside one epoch (so no epoch-end save or evaluation is in
it), after a warm-up span that compiles the step.
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
import jax.numpy as jnp  # noqa: E402

from bench.machine import machine_info  # noqa: E402
from tgeo_jax import data, methods, parallel, trainer  # noqa: E402
from tgeo_jax.default_config import base_config  # noqa: E402
from tgeo_jax.methods.ce import CE  # noqa: E402

TARGET_MS = 0.3


class HostOverheadProbe(CE):
  """CE's state and interface with a step that does (almost) nothing: it reads one value of the batch (so the
  batch is a real input of the program) and returns the state unchanged."""

  name = "host_overhead_probe"

  def train_step(self, state, frozen, batch, kind):
    del frozen, kind
    touch = batch["inputs"].reshape(batch["inputs"].shape[0], -1)[0, 0]
    if "val" in batch:
      touch = touch + batch["val"]["inputs"].reshape(batch["val"]["inputs"].shape[0], -1)[0, 0]
    return state, {"loss": touch * 0.0, "accuracy": jnp.float32(0.0)}


class HostOverheadProbeWithVal(HostOverheadProbe):
  name = "host_overhead_probe_val"
  uses_validation_batch = True


methods.register("host_overhead_probe", "bench.host_overhead:HostOverheadProbe")
methods.register("host_overhead_probe_val", "bench.host_overhead:HostOverheadProbeWithVal")


def make_config(method: str, args):
  c = base_config()
  c.method = method
  c.model.name = "mlp_tiny"
  c.batch_size = c.val_batch_size = args.batch
  c.num_epochs = 2
  c.data.dir = args.data_dir
  c.log.progress = False
  c.log.every_steps = args.log_every
  c.checkpoint.every_steps = 0
  c.device_pipeline.mode = "off"  # the host pipeline's overhead (bench/device_loop.py compares the device one)
  return c


class _NoStop:
  signum = None


def span_ms(run, steps: int) -> float:
  """Milliseconds per step of the next ``steps`` steps of ``trainer.train`` on ``run`` (the state ready at the
  end; the run's ``steps_per_run`` budget stops it)."""
  run.config.steps_per_run = steps
  t0 = time.perf_counter()
  try:
    trainer.train(run, _NoStop())
  except trainer.StopTraining:
    pass
  jax.block_until_ready(run.state)
  return 1e3 * (time.perf_counter() - t0) / steps


def loop_spans(method: str, args, workdir: str) -> list[float]:
  """Milliseconds per step of ``trainer.train`` over ``args.spans`` spans of ``args.span_steps`` steps (one epoch,
  after a warm-up span)."""
  config = make_config(method, args)
  run = trainer.setup(config, workdir)
  spans = []
  try:
    span_ms(run, args.warmup_steps)
    spans = [span_ms(run, args.span_steps) for _ in range(args.spans)]
    if run.step >= run.steps_per_epoch:
      raise SystemExit(f"the spans reached the epoch end ({run.step} >= {run.steps_per_epoch} steps): lower "
                       "--spans / --span-steps")
  finally:
    run.close()
  return spans


def part_times(args, workdir: str) -> dict:
  """Median microseconds per batch of each part of the loop, measured alone on the main thread."""
  config = make_config("host_overhead_probe_val", args)
  run = trainer.setup(config, workdir)
  n = args.span_steps
  try:
    out = {}
    batches = data.iterate(run.pipeline.epoch_batches(0), workers=0)
    next(batches)
    t0 = time.perf_counter()
    host_batches = [next(batches) for _ in range(n)]
    out["pipeline (next batch incl. val, prefetched)"] = 1e6 * (time.perf_counter() - t0) / n
    val_times = []
    for t in range(n):
      t0 = time.perf_counter()
      run.pipeline.val_stream[1000 + t]
      val_times.append(time.perf_counter() - t0)
    out["validation batch (built alone)"] = 1e6 * statistics.median(val_times)
    shard_times, device_batches = [], []
    for b in host_batches:
      t0 = time.perf_counter()
      device_batches.append(parallel.shard_batch(b, run.mesh))
      shard_times.append(time.perf_counter() - t0)
    out["shard_batch"] = 1e6 * statistics.median(shard_times)
    kind = run.method.step_kind(0)
    sums = run.steps.metric_zeros(run.state, run.frozen, device_batches[0], kind, run.health)
    run.state, run.health, sums = run.steps.train_step(run.state, run.frozen, device_batches[0], kind, run.health, sums)
    jax.block_until_ready(run.state)
    t0 = time.perf_counter()
    for b in device_batches:
      run.state, run.health, sums = run.steps.train_step(run.state, run.frozen, b, kind, run.health, sums)
    dispatch = time.perf_counter() - t0
    jax.block_until_ready(run.state)
    out["dispatch (jitted probe step, no sync)"] = 1e6 * dispatch / n
  finally:
    run.close()
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--data-dir", default="", help="Fashion-MNIST IDX directory ('' = the Debian package's)")
  p.add_argument("--spans", type=int, default=3)
  p.add_argument("--span-steps", type=int, default=120)
  p.add_argument("--warmup-steps", type=int, default=20)
  p.add_argument("--log-every", type=int, default=50, help="log.every_steps (the loop's host sync)")
  args = p.parse_args(argv)
  t_start = time.perf_counter()
  info = machine_info()
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, method in (("loop", "host_overhead_probe"), ("loop + val", "host_overhead_probe_val")):
      spans = loop_spans(method, args, os.path.join(tmp, name.replace(" ", "_").replace("+", "val")))
      results[name] = dict(ms_per_step=statistics.median(spans), spans_ms=spans)
      print(f"{name}: {results[name]['ms_per_step']:.3f} ms per step (spans {', '.join(f'{s:.3f}' for s in spans)})",
            flush=True)
    parts = part_times(args, os.path.join(tmp, "parts"))
  print()
  print(f"| host time per step, batch {args.batch} | ms |")
  print("|---|---:|")
  for name, r in results.items():
    met = "met" if r["ms_per_step"] <= TARGET_MS else "NOT met"
    print(f"| {name} (target <= {TARGET_MS}) | {r['ms_per_step']:.3f} ({met}) |")
  for name, us in parts.items():
    print(f"| part: {name} | {us / 1e3:.3f} |")
  total = time.perf_counter() - t_start
  print(f"\ntotal benchmark time: {total:.1f} s")
  payload = dict(device=info, settings=vars(args), loop=results, parts_us=parts, target_ms=TARGET_MS,
                 total_seconds=total)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(payload, f, indent=1)
    print(f"wrote {args.out}")
  return payload


if __name__ == "__main__":
  main()
