"""The general meta-gradient path (``tgeo_jax.hypergrad`` on ``mix_inner_loss``) against the α-mix fast path
(``tgeo_jax.bilevel``) on the same TGeo-KD problem: FLOPs and wall time per call, relative to a KD step.

    python bench/general_vs_fast.py [--model cnn_small] [--batch 128] [--rounds 15] [--out FILE.json]

The setup is ``bench/step_cost.py``'s ``build()`` (a randomly initialised ``cnn_teacher``, cached teacher logits, the
config's optimizer: clip + weight decay + SGD-momentum). Pairs compiled side by side: one_step, unroll K = 4 and
implicit (Neumann, J = 5); every loop is within ``bilevel.FULL_UNROLL_MAX_TRIPS`` and fully unrolled, so XLA's FLOP
count is exact (checked: no ``while`` in the compiled HLO). Wall time: one warm-up call each, then ``--rounds``
rounds over all programs (rotated each round), median per program: the ratios come from one interleaved run.
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
import jax.numpy as jnp

from bench import step_cost
from bench.machine import machine_info
from tgeo_jax import bilevel, data, hypergrad


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="cnn_small")
  p.add_argument("--teacher", default="cnn_teacher")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--val-batch", type=int, default=128)
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)

  methods, states, batch, task = step_cost.build(args)
  method = methods[("cached", "tgeo_reuse")]
  kd = methods[("cached", "kd")]
  state, frozen = states[("cached", "tgeo")]
  kd_state, kd_frozen = states[("cached", "kd")]
  val = batch["val"]
  raws = [dict(jax.tree.map(jnp.asarray, b), val=val)
          for b in data.train_batches(task.train, batch_size=args.batch, seed=0, epoch=0)[:4]]
  step_batch = jax.jit(method.step_batch)
  sbs = [step_batch(state, frozen, b) for b in raws]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *sbs)
  per_sample, weight_fn, val_loss_fn, tx = method.per_sample_fn(frozen), method.weight_fn, method.val_loss_fn, method.tx
  inner = hypergrad.mix_inner_loss(weight_fn, per_sample)
  student = bilevel.StudentState(state["params"], state["rest"], state["opt_state"])
  meta = state["meta_params"]
  implicit_kw = dict(solver="neumann", terms=5, neumann_lr=0.01, damping=0.01, tol=1e-2)

  programs = {
      "kd step": (lambda s, f, b: kd.train_step(s, f, b), (kd_state, kd_frozen, batch)),
      "one_step fast": (lambda m, b, v, st: bilevel.one_step(weight_fn, m, per_sample, b, val_loss_fn, v, st, tx),
                        (meta, sbs[0], val, student)),
      "one_step general": (lambda m, b, v, st: hypergrad.one_step(inner, m, b, val_loss_fn, v, st, tx, path="general"),
                           (meta, sbs[0], val, student)),
      "unroll K=4 fast": (lambda m, b, v, st: bilevel.unroll(weight_fn, m, per_sample, b, val_loss_fn, v, st, tx),
                          (meta, stacked, val, student)),
      "unroll K=4 general": (lambda m, b, v, st: hypergrad.unroll(inner, m, b, val_loss_fn, v, st, tx, path="general"),
                             (meta, stacked, val, student)),
      "implicit J=5 fast": (lambda m, b, v, st: bilevel.implicit(weight_fn, m, per_sample, b, val_loss_fn, v, st,
                                                                   tx, **implicit_kw), (meta, sbs[0], val, student)),
      "implicit J=5 general": (lambda m, b, v, st: hypergrad.implicit(inner, m, b, val_loss_fn, v, st, tx,
                                                                        path="general", **implicit_kw), (meta, sbs[0], val, student)),
  }
  compiled, flops, loops = {}, {}, {}
  for name, (fn, fargs) in programs.items():
    compiled[name], seconds = step_cost.compile_fn(fn, *fargs)
    flops[name] = step_cost._flops(compiled[name])
    loops[name] = " while" in compiled[name].as_text() or "while(" in compiled[name].as_text()
    print(f"compiled {name} in {seconds:.1f} s", flush=True)

  # The general and fast meta-gradients agree (float32 here; float64 exactness is tests/test_hypergrad.py's).
  agreement = {}
  for pair in ("one_step", "unroll K=4", "implicit J=5"):
    fast = compiled[f"{pair} fast"](*programs[f"{pair} fast"][1]).meta_grad
    general = compiled[f"{pair} general"](*programs[f"{pair} general"][1]).meta_grad
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(general)))
    den = sum(float(jnp.sum(a ** 2)) for a in jax.tree.leaves(fast))
    agreement[pair] = (num / den) ** 0.5 if den else None

  times = {name: [] for name in programs}
  for name in programs:  # warm-up
    jax.block_until_ready(compiled[name](*programs[name][1]))
  names = list(programs)
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      jax.block_until_ready(compiled[name](*programs[name][1]))
      times[name].append(time.perf_counter() - t0)
  ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
  rows = []
  for name in programs:
    rows.append(dict(program=name, flops=flops[name], flops_x_kd=flops[name] / flops["kd step"], ms=ms[name],
                     wall_x_kd=ms[name] / ms["kd step"], has_loop=loops[name]))
  print("\n| program | FLOPs × KD step | wall × KD step | ms | general / fast (FLOPs, wall) |")
  print("|---|---|---|---|---|")
  for row in rows:
    ratio = ""
    if row["program"].endswith("general"):
      fast = row["program"].replace("general", "fast")
      ratio = f"{flops[row['program']] / flops[fast]:.3f}, {ms[row['program']] / ms[fast]:.2f}"
    print(f"| {row['program']} | {row['flops_x_kd']:.2f} | {row['wall_x_kd']:.2f} | {row['ms']:.1f} | {ratio} |")
  print("\nrelative L2 difference of the meta-gradients, general vs fast (float32): "
        + ", ".join(f"{k} {v:.1e}" for k, v in agreement.items()))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(machine=machine_info(), command=" ".join(["python", "bench/general_vs_fast.py", *(argv or sys.argv[1:])]),
                     rows=rows, agreement=agreement, rounds=args.rounds), f, indent=1)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
