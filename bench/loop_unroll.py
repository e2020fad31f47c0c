"""Loops of convolutions on XLA:CPU: the hypergradient programs with their loops kept vs fully unrolled.

    python bench/loop_unroll.py [--rounds 7] [--ks 4,8] [--js 5] [--model cnn_small] [--batch 128]

``bilevel.FULL_UNROLL_MAX_TRIPS`` decides at trace time whether a loop of up to that many trips (the unroll
window's forward record and reverse sweep, the Neumann series) is traced as a loop or unrolled. Each program is
compiled both ways (``FULL_UNROLL_MAX_TRIPS = 0`` vs the default) on the setup of ``bench/hypergrad_cost.py``
(cached teacher logits, the config's optimizer), and the programs are timed in interleaved rounds: one call of each
per round, so both sides see the same machine load. Reported: median ms per call, per student step relative to the
KD step of the same round, and the loop/unrolled ratio; the two sides' meta-gradients are compared (max relative
difference). Compile times are printed too: unrolling trades compile time for run time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from bench.hypergrad_cost import raw_batches, student_of, tgeo_method
from bench.machine import machine_info
from bench.step_cost import add_setup_arguments, build
from tgeo_jax import bilevel


def _ints(text):
  return [int(x) for x in text.split(",") if x.strip()]


def compiled(fn, args, unroll_max: int):
  """``fn`` jitted and compiled with ``bilevel.FULL_UNROLL_MAX_TRIPS = unroll_max`` at trace time; compile s."""
  saved = bilevel.FULL_UNROLL_MAX_TRIPS
  bilevel.FULL_UNROLL_MAX_TRIPS = unroll_max
  try:
    start = time.perf_counter()
    program = jax.jit(fn).lower(*args).compile()
    return program, time.perf_counter() - start
  finally:
    bilevel.FULL_UNROLL_MAX_TRIPS = saved


def has_while(program) -> bool:
  return "while" in program.as_text()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_setup_arguments(p)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--ks", type=_ints, default=[4, 8], help="unroll window lengths K")
  p.add_argument("--js", type=_ints, default=[5], help="Neumann terms J")
  p.add_argument("--cosine-warmup", type=int, default=0)
  args = p.parse_args(argv)
  info = machine_info()
  print(f"device: {info['device_kind']}; jax {info['jax']}; CPUs {info['cpu_count']}; model {args.model}, batch "
        f"{args.batch}, validation batch {args.val_batch}", flush=True)

  methods, states, batch, task = build(args)
  kd = methods[("cached", "kd")]
  reuse = methods[("cached", "tgeo_reuse")]
  kd_state, kd_frozen = states[("cached", "kd")]
  t_state, t_frozen = states[("cached", "tgeo")]
  raws = raw_batches(task, args, max(args.ks), batch["val"])
  step_batch = jax.jit(reuse.step_batch)
  sbs = [step_batch(t_state, t_frozen, b) for b in raws]
  per_sample, weight_fn, val_loss_fn, tx = reuse.per_sample_fn(t_frozen), reuse.weight_fn, reuse.val_loss_fn, reuse.tx
  student, meta = student_of(t_state), t_state["meta_params"]

  programs = {}  # name -> (program, args, steps per call, unroll setting)
  kd_prog, kd_compile = compiled(lambda s, f, b: kd.train_step(s, f, b, None), (kd_state, kd_frozen, batch), 16)
  programs["kd"] = (kd_prog, (kd_state, kd_frozen, batch), 1)
  print(f"compiled kd in {kd_compile:.1f} s", flush=True)
  results = {}
  for k in args.ks:
    bs = jax.tree.map(lambda *x: jax.numpy.stack(x), *sbs[:k])

    def unroll_fn(st, m, b, v):
      return bilevel.unroll(weight_fn, m, per_sample, b, val_loss_fn, v, st, tx, remat=True)

    for side, setting in (("loop", 0), ("unrolled", bilevel.FULL_UNROLL_MAX_TRIPS)):
      # A fresh function object per side: jit caches traces by function, and the setting acts at trace time.
      prog, seconds = compiled(lambda *a, f=unroll_fn: f(*a), (student, meta, bs, batch["val"]), setting)
      programs[f"unroll K={k} {side}"] = (prog, (student, meta, bs, batch["val"]), k)
      print(f"compiled unroll K={k} {side} in {seconds:.1f} s (while loop in HLO: {has_while(prog)})", flush=True)
      results[f"unroll K={k} {side}"] = {"compile_s": seconds}
  for j in args.js:
    method = tgeo_method(args, task, reuse, hypergrad="implicit", implicit_terms=j)
    for side, setting in (("loop", 0), ("unrolled", bilevel.FULL_UNROLL_MAX_TRIPS)):
      prog, seconds = compiled(lambda s, f, b, m=method: m.train_step(s, f, b, "meta"), (t_state, t_frozen, batch),
                               setting)
      programs[f"implicit J={j} {side}"] = (prog, (t_state, t_frozen, batch), 1)
      print(f"compiled implicit J={j} {side} in {seconds:.1f} s (while loop in HLO: {has_while(prog)})", flush=True)
      results[f"implicit J={j} {side}"] = {"compile_s": seconds}

  # Agreement: the same meta-gradient either way.
  for name in list(programs):
    if name.endswith(" loop"):
      a = programs[name][0](*programs[name][1])
      b = programs[name.replace(" loop", " unrolled")][0](*programs[name.replace(" loop", " unrolled")][1])
      ga = a.meta_grad if hasattr(a, "meta_grad") else a[0]["meta_params"]
      gb = b.meta_grad if hasattr(b, "meta_grad") else b[0]["meta_params"]
      la, lb = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (ga, gb))
      diff = float(np.max(np.abs(la - lb)) / max(np.max(np.abs(la)), 1e-30))
      results[name.replace(" loop", "")] = {"meta_grad_max_rel_diff": diff}

  times = {name: [] for name in programs}
  for prog, fargs, _ in programs.values():  # warm-up call
    jax.block_until_ready(prog(*fargs))
  for _ in range(args.rounds):
    for name, (prog, fargs, _) in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(prog(*fargs))
      times[name].append(time.perf_counter() - start)
  kd_ms = 1e3 * statistics.median(times["kd"])
  print(f"\nmedian of {args.rounds} interleaved rounds; KD step {kd_ms:.1f} ms")
  print("| program | ms per call | per student step / KD step | loop ÷ unrolled | compile s | meta-grad max rel diff |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, (_, _, steps) in programs.items():
    if name == "kd":
      continue
    ms = 1e3 * statistics.median(times[name])
    base = name.rsplit(" ", 1)[0]
    other = f"{base} unrolled" if name.endswith(" loop") else None
    speed = (f"{statistics.median(times[name]) / statistics.median(times[other]):.2f}×" if other else "")
    diff = results.get(base, {}).get("meta_grad_max_rel_diff")
    print(f"| {name} | {ms:.1f} | {ms / steps / kd_ms:.1f}× | {speed} | {results[name]['compile_s']:.1f} | "
          f"{'' if diff is None or not name.endswith(' loop') else f'{diff:.1e}'} |")


if __name__ == "__main__":
  main()
