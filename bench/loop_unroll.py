"""Loops of convolutions on XLA:CPU: the hypergradient programs as loops, fully unrolled, and as loops with
canonical-layout convolutions.

    python bench/loop_unroll.py [--rounds 7] [--ks 4,8] [--js 5] [--cg 10] [--model cnn_small] [--batch 128]
                                [--out bench/results/loop_unroll_cpu.json]

Each program is compiled three ways, in one process, on the setup of ``bench/hypergrad_cost.py`` (cached teacher
logits, the config's optimizer):

* ``loop``: the loops kept (``bilevel.FULL_UNROLL_MAX_TRIPS = 0``) with lax's convolution
  (``tgeo_jax.models.conv.ENABLED = False``): the backward convolutions in the loop body leave XLA:CPU's fast path;
* ``unrolled``: loops of up to 16 trips fully unrolled (``FULL_UNROLL_MAX_TRIPS = 16``), lax's convolution (the
  workaround of 2026-12-07; CG's ``while_loop`` cannot be unrolled, so it has no such side);
* ``canonical loop``: the loops kept, with ``tgeo_jax.models.conv``'s canonical-layout gradient convolutions.

Both settings act at trace time. The programs are the unroll window's hypergradient (``bilevel.unroll``, remat) and
the implicit hypergradient (``bilevel.implicit``: Neumann with J terms, CG with J iterations, the config's
``implicit_lr``, damping and tolerance), called directly; the reference is a plain KD step (``kd.train_step``),
compiled with each convolution to show that a loop-free program is unchanged. They are timed in interleaved
rounds (one call of each per round, so every side sees the same machine load). Reported: median ms per call, per
student step relative to the KD step of the same rounds, time relative to the reference side (``unrolled``, or
``loop`` for CG), compile seconds, and the meta-gradient's max relative difference to the reference side.

``--out`` writes the table as JSON; each row has ``wall_over_flops``: its per-student-step time relative to the KD
step divided by its FLOP ratio to the KD step, read from ``bench/results/hypergrad_cost_cpu.json`` (the same
programs' FLOPs, loop bodies counted per trip: ``bench/hypergrad_cost.py``; CG at all its iterations, an upper
bound). 1.0 runs at its FLOPs' speed; the issue's target is <= 1.5.
"""

from __future__ import annotations

import argparse
import json
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
from tgeo_jax.models import conv


def _ints(text):
  return [int(x) for x in text.split(",") if x.strip()]


def compiled(fn, args, unroll_max: int, canonical: bool):
  """``fn`` jitted and compiled with ``bilevel.FULL_UNROLL_MAX_TRIPS = unroll_max`` and ``conv.ENABLED =
  canonical`` at trace time; ``(program, compile s)``."""
  saved = bilevel.FULL_UNROLL_MAX_TRIPS, conv.ENABLED
  bilevel.FULL_UNROLL_MAX_TRIPS, conv.ENABLED = unroll_max, canonical
  try:
    start = time.perf_counter()
    # A fresh function object: jit caches traces by function, and both settings act at trace time.
    program = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    return program, time.perf_counter() - start
  finally:
    bilevel.FULL_UNROLL_MAX_TRIPS, conv.ENABLED = saved


def hlo_report(program) -> str:
  text = program.as_text()
  slow = sum("convolution(" in line and "outer_dimension_partitions" in line for line in text.splitlines())
  return f"while loop: {' while(' in text}, convolutions: {text.count('convolution(')}, on the slow path: {slow}"


# side -> (FULL_UNROLL_MAX_TRIPS, canonical convolutions); 16 was the library's default while unrolling was the
# workaround (2026-12-07).
SIDES = {"loop": (0, False), "unrolled": (16, False), "canonical loop": (0, True)}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


FLOPS_FILE = "bench/results/hypergrad_cost_cpu.json"


def _flops_x_kd(program: str):
  """The FLOP ratio to a KD step of ``program`` ("unroll K=4", "implicit neumann J=5", ...) from ``FLOPS_FILE``;
  None when that file has no such row."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), FLOPS_FILE)
  if not os.path.exists(path):
    return None
  kind, _, terms = program.rpartition("=")
  variant = {"unroll K": f"unroll{terms}_remat", "implicit neumann J": f"implicit_neumann{terms}",
             "implicit cg J": f"implicit_cg{terms}"}.get(kind)
  with open(path) as f:
    rows = {r["variant"]: r for r in json.load(f)["rows"]}
  return rows[variant]["flops_x_kd"] if variant in rows else None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_setup_arguments(p)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--ks", type=_ints, default=[4, 8], help="unroll window lengths K")
  p.add_argument("--js", type=_ints, default=[5], help="Neumann terms J")
  p.add_argument("--cg", type=_ints, default=[10], help="CG iterations")
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
  raws = raw_batches(task, args, max(args.ks + [1]), batch["val"])
  step_batch = jax.jit(reuse.step_batch)
  sbs = [step_batch(t_state, t_frozen, b) for b in raws]
  per_sample, weight_fn, val_loss_fn, tx = reuse.per_sample_fn(t_frozen), reuse.weight_fn, reuse.val_loss_fn, reuse.tx
  student, meta = student_of(t_state), t_state["meta_params"]

  programs = {}  # name -> (program, args, steps per call)
  groups = []  # (program, [side names], reference side)
  for side, canonical in (("kd", True), ("kd lax", False)):
    prog, seconds = compiled(lambda s, f, b: kd.train_step(s, f, b, None), (kd_state, kd_frozen, batch), 16,
                             canonical)
    programs[side] = (prog, (kd_state, kd_frozen, batch), 1)
    print(f"compiled {side} in {seconds:.1f} s ({hlo_report(prog)})", flush=True)
  compile_s = {}

  def add(base, fn, fargs, steps, sides, reference):
    for side in sides:
      prog, seconds = compiled(fn, fargs, *SIDES[side])
      programs[f"{base} {side}"] = (prog, fargs, steps)
      compile_s[f"{base} {side}"] = seconds
      print(f"compiled {base} {side} in {seconds:.1f} s ({hlo_report(prog)})", flush=True)
    groups.append((base, sides, reference))

  for k in args.ks:
    bs = jax.tree.map(lambda *x: jax.numpy.stack(x), *sbs[:k])

    def unroll_fn(st, m, b, v):
      return bilevel.unroll(weight_fn, m, per_sample, b, val_loss_fn, v, st, tx, remat=True)

    add(f"unroll K={k}", unroll_fn, (student, meta, bs, batch["val"]), k, list(SIDES), "unrolled")
  for solver, terms_list in (("neumann", args.js), ("cg", args.cg)):
    for j in terms_list:
      method = tgeo_method(args, task, reuse, hypergrad="implicit", implicit_solver=solver, implicit_terms=j)

      def implicit_fn(st, m, b, v, h=method.hypergrad):
        return h(weight_fn, m, per_sample, b, val_loss_fn, v, st, tx)

      sides = list(SIDES) if solver == "neumann" else ["loop", "canonical loop"]
      add(f"implicit {solver} J={j}", implicit_fn, (student, meta, sbs[0], batch["val"]), 1, sides,
          "unrolled" if solver == "neumann" else "loop")

  times = {name: [] for name in programs}
  outputs = {}
  for name, (prog, fargs, _) in programs.items():  # warm-up call; its result gives the agreement below
    outputs[name] = jax.block_until_ready(prog(*fargs))
  # Agreement: the meta-gradient of every side against the reference side.
  rel_diff = {}
  for base, sides, reference in groups:
    ref = _flat(outputs[f"{base} {reference}"].meta_grad)
    for side in sides:
      got = _flat(outputs[f"{base} {side}"].meta_grad)
      rel_diff[f"{base} {side}"] = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
  del outputs
  for r in range(args.rounds):
    for name, (prog, fargs, _) in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(prog(*fargs))
      times[name].append(time.perf_counter() - start)
    print(f"round {r + 1}/{args.rounds} done", flush=True)
  median = {name: statistics.median(t) for name, t in times.items()}
  kd_ms = 1e3 * median["kd"]
  print(f"\nmedian of {args.rounds} interleaved rounds; KD step {kd_ms:.1f} ms (with lax's convolution: "
        f"{1e3 * median['kd lax']:.1f} ms)")
  print("| program | side | ms per call | per student step / KD step | ÷ reference side | compile s | "
        "meta-grad max rel diff to reference |")
  print("|---|---|---:|---:|---:|---:|---:|")
  rows = []
  for base, sides, reference in groups:
    for side in sides:
      name = f"{base} {side}"
      ms, steps = 1e3 * median[name], programs[name][2]
      ratio = median[name] / median[f"{base} {reference}"]
      print(f"| {base} | {side} | {ms:.1f} | {ms / steps / kd_ms:.1f}× | {ratio:.2f}× | {compile_s[name]:.1f} | "
            f"{'(reference)' if side == reference else f'{rel_diff[name]:.1e}'} |", flush=True)
      flops_x_kd = _flops_x_kd(base)
      rows.append(dict(program=base, side=side, ms_per_call=ms, per_step_x_kd=ms / steps / kd_ms,
                       x_reference_side=ratio, reference_side=reference, compile_s=compile_s[name],
                       meta_grad_max_rel_diff=None if side == reference else rel_diff[name], flops_x_kd=flops_x_kd,
                       wall_over_flops=None if flops_x_kd is None else ms / steps / kd_ms / flops_x_kd))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(command=" ".join(["python", "bench/loop_unroll.py", *(argv if argv is not None else sys.argv[1:])]),
                     device=info, rounds=args.rounds, kd_ms=kd_ms, kd_lax_ms=1e3 * median["kd lax"],
                     flops_source=FLOPS_FILE, rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
