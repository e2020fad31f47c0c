"""Per student step cost of every hypergradient variant (``tgeo_jax.bilevel``) relative to a plain KD step.

    python bench/hypergrad_cost.py [--out FILE.json] [--model cnn_small] [--teacher cnn_teacher] [--batch 128]
                                   [--val-batch 128] [--repeats N] [--min-repeats N] [--max-seconds S]
                                   [--warmup N] [--ks 2,4,8] [--js 0,5,10] [--cg-terms 10]

The setup is ``bench/step_cost.py``'s (``build()``): the same student and initial weights, the config's optimizer
(clip + weight decay + SGD-momentum), a randomly initialised teacher, the same training and validation batch,
cached teacher logits (``teacher.cache_logits='on'``). Rows (FLOPs, temporary memory, median wall time, each per
STUDENT STEP and relative to ``KD.train_step``):

* ``kd``: the plain KD step (the baseline); ``plain``: TGeo-KD's step with alpha fixed (``bilevel.weighted_step``);
* ``one_step`` reuse / lookahead: the method's ``"meta"`` step;
* ``unroll K`` trainer path: ``((K - 1) "record" + "window_end") / K`` of the method with ``hypergrad='unroll'``;
  the recorded trajectory and batches live in the state (``window state MiB``), not in the temporaries;
* ``unroll K`` standalone: ``bilevel.unroll(remat=True|False)`` over K stacked batches, / K (the trajectory, or
  the K steps' activations, are temporaries there);
* ``implicit J``: the method's meta step with ``hypergrad='implicit'`` (Neumann, J terms; CG at J = 10);
* ``head_only``: the method's meta step with ``hypergrad='head_only'``.

The ``m=5`` columns amortise by ``meta_interval`` m = 5: ``(W + (m - 1) K P) / (m K)`` with W the cost of the
meta step (K = 1) or of the whole window (unroll: the cycle is m windows) and P the plain step.

FLOPs. XLA's cost analysis counts a while loop's body ONCE, whatever the trip count (checked at start-up on a
toy scan), so the compiled count of a ``lax.scan`` / ``fori_loop`` / ``while_loop`` program is an undercount.
Each row's FLOPs therefore say how they were obtained (column "FLOPs by"):

* ``direct``: the compiled program has no loop (checked: no ``while`` in its HLO);
* ``python loop``: unroll without remat, counted on ``bilevel.unroll_python_loop`` (fully unrolled, the same
  math; its wall time and memory are those of the real ``lax.scan`` program);
* ``scan+(K-1)body``: the looped program's count plus (K - 1) copies of its loop bodies, each compiled on its own
  (the single step ``bilevel.weighted_step`` of the forward scan, and the VJP of that step map which
  ``bilevel._reverse_sweep`` runs per step); verified against a fully unrolled program of the same sweep, which
  also drops the first step's unused state cotangent (see ``verification`` in the output);
* ``F(0)+J*dF``: Neumann, from the programs at J = 0 and J = 1 (a trip-count-1 loop, counted once = exactly), the
  per-term increment dF = F(1) - F(0) being one Hessian-vector product and two axpys; the compiled count at
  J >= 2 is printed to show it stays at F(1);
* ``cg~``: CG's while loop (data-dependent exit) counted once plus (J - 1) Neumann terms (one HVP each): the cost
  at ``maxiter`` iterations, an upper bound of what a run that converges earlier does.

Wall time and temporary memory are measured on the real (looped) programs. The trainer's steps are compiled with
the state donated, as the trainer does (``jax.jit(..., donate_argnums=0)``), and every timed call gets a fresh
copy of the same state (copied outside the timer), so all calls do identical work. Timing: one warm-up call per
program (kept as a sample when slower than ``--count-warmup-above`` seconds: the first-call overhead is then
below the noise), then rounds over all programs round-robin, rotated each round; a program leaves the rounds once
it has ``--min-repeats`` samples adding up to ``--max-seconds``, and at most ``--repeats``. The programs are
lowered one by one and compiled ``--compile-workers`` at a time (XLA compiles outside the GIL).

On XLA:CPU a while loop's body runs several times slower than the same ops in straight-line code (the
``verification`` times one reverse sweep both ways), so the looped programs' wall-time ratios are far above their
FLOPs ratios; the FLOPs are the hardware-independent cost.

Finally: head_only's meta-gradient against the exact one_step meta-gradient (cosine, norm ratio) on the same
state and batch, after a few one_step warm-up meta steps (the fusion net's output layer starts at zero, so its
hidden layers have no gradient before).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench.machine import machine_info
from bench.step_cost import _flops, _temp_bytes, add_setup_arguments, build, make_config
from tgeo_jax import bilevel, data, models
# The reverse sweep's own float-leaf helpers: the per-step VJP below is the one bilevel.unroll_from_trajectory runs.
from tgeo_jax.bilevel import _float_leaves as float_leaves, _with_float_leaves as with_float_leaves
from tgeo_jax.methods.tgeo import TGeoKD

META_INTERVAL = 5
# Targets from the issue.
TARGET_UNROLL_TEMP_X_ONE_STEP = 2.5  # unroll K = 8 with remat, temporaries / the one-step meta step's
TARGET_UNROLL_K = 8
TARGET_HEAD_ONLY_FLOPS_X_KD = 1.8  # at validation batch = training batch
_WHILE = re.compile(r"\bwhile\(")


# ---------------------------------------------------------------------------------------------- helpers

def has_loop(compiled) -> bool:
  """Whether the compiled HLO holds a while loop (whose body XLA's cost analysis counts once)."""
  return bool(_WHILE.search(compiled.as_text()))


def check_loop_counting():
  """``(flops of a 1-step scan, flops of an 8-step scan)`` of the same body: equal when XLA counts it once."""
  def prog(n):
    return lambda x: jax.lax.scan(lambda c, _: (jnp.tanh(c @ c), None), x, None, length=n)[0]
  x = jnp.ones((32, 32))
  return tuple(_flops(jax.jit(prog(n)).lower(x).compile()) for n in (1, 8))


def tree_bytes(tree) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def fresh_copy(tree):
  return jax.block_until_ready(jax.tree.map(jnp.copy, tree))


@contextlib.contextmanager
def scans_fully_unrolled():
  """Trace ``jax.lax.scan`` with ``unroll=True`` (verification only: gives a loop-free program to count)."""
  original = jax.lax.scan

  def scan(*a, **kw):
    kw["unroll"] = True
    return original(*a, **kw)

  jax.lax.scan = scan
  try:
    yield
  finally:
    jax.lax.scan = original


class Program:
  """One program: lowered at construction (in the calling thread: tracing), compiled by ``compile_all``; then
  its FLOPs as compiled, temporaries, whether it loops, and its timed calls."""

  def __init__(self, name, fn, args, *, donate: bool):
    self.name, self.args, self.donate = name, args, donate
    self.lowered = jax.jit(fn, donate_argnums=(0,) if donate else ()).lower(*args)
    self.exe, self.times = None, []

  def compile(self):
    t0 = time.perf_counter()
    self.exe = self.lowered.compile()
    self.compile_s = time.perf_counter() - t0
    self.flops, self.temp, self.loops = _flops(self.exe), _temp_bytes(self.exe), has_loop(self.exe)
    self.lowered = None
    return self

  def call(self, timed: bool = True):
    args = (fresh_copy(self.args[0]), *self.args[1:]) if self.donate else self.args
    t0 = time.perf_counter()
    out = jax.block_until_ready(self.exe(*args))
    if timed:
      self.times.append(time.perf_counter() - t0)
    return out

  @property
  def ms(self) -> float:
    return 1e3 * statistics.median(self.times)


def compile_all(programs, workers: int) -> float:
  """Compiles the lowered programs, ``workers`` at a time (XLA compiles outside the GIL), the largest first;
  returns the wall time. A program's ``compile_s`` is its own compile's wall time, concurrent ones included."""
  t0 = time.perf_counter()
  todo = sorted(programs, key=lambda p: -len(p.lowered.as_text()))
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for p in pool.map(Program.compile, todo):
      print(f"  compiled {p.name:34s} in {p.compile_s:5.1f} s: {p.flops / 1e9:8.3f} GFLOPs (compiled"
            f"{', has a loop' if p.loops else ''}), temp {p.temp / 2**20:7.2f} MiB", file=sys.stderr, flush=True)
  return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- the setup

def tgeo_method(args, task, base, **tgeo):
  """A TGeo-KD method (cached teacher logits) with ``config.tgeo`` overrides, sharing student/tx/teacher."""
  cfg = make_config("tgeo", args)
  cfg.teacher.cache_logits = "on"
  for key, value in tgeo.items():
    cfg.tgeo[key] = value
  TGeoKD.validate_config(cfg)
  return TGeoKD(cfg, task.spec, student=base.student, tx=base.tx, teacher=base.teacher, task=task)


def train_step_fn(method, kind):
  return lambda state, frozen, batch: method.train_step(state, frozen, batch, kind)


def student_of(state) -> bilevel.StudentState:
  return bilevel.StudentState(state["params"], state["rest"], state["opt_state"])


def raw_batches(task, args, count, val):
  """``count`` consecutive training batches of epoch 0 (each with the validation batch under ``"val"``)."""
  ds = data.train_batches(task.train, batch_size=args.batch, seed=0, epoch=0)
  return [dict(jax.tree.map(jnp.asarray, ds[i % len(ds)]), val=val) for i in range(count)]


# ------------------------------------------------------------------------------------------- measurement

def measure(args):
  methods, states, batch, task = build(args)
  kd, reuse, lookahead = (methods[("cached", k)] for k in ("kd", "tgeo_reuse", "tgeo_lookahead"))
  kd_state, kd_frozen = states[("cached", "kd")]
  t_state, t_frozen = states[("cached", "tgeo")]
  val = batch["val"]
  ks, js = args.ks, args.js
  k_max = max(ks) if ks else 1
  raws = raw_batches(task, args, max(k_max, args.cosine_warmup + 1), val)
  # The step batches (with the teacher's cached logits) the bilevel functions read, stacked for unroll.
  step_batch = jax.jit(reuse.step_batch)
  sbs = [step_batch(t_state, t_frozen, b) for b in raws]
  per_sample, weight_fn, val_loss_fn, tx = reuse.per_sample_fn(t_frozen), reuse.weight_fn, reuse.val_loss_fn, reuse.tx
  student, meta = student_of(t_state), t_state["meta_params"]

  progs: dict[str, Program] = {}
  flops_only: dict[str, Program] = {}

  def add(key, fn, fargs, donate=True, timed=True):
    p = Program(key, fn, fargs, donate=donate)
    (progs if timed else flops_only)[key] = p
    return p

  # --- method train steps (donated, as in the trainer)
  add("kd", train_step_fn(kd, None), (kd_state, kd_frozen, batch))
  add("plain", train_step_fn(reuse, "plain"), (t_state, t_frozen, batch))
  add("one_step_reuse", train_step_fn(reuse, "meta"), (t_state, t_frozen, batch))
  add("one_step_lookahead", train_step_fn(lookahead, "meta"), (t_state, t_frozen, batch))

  # --- the loop bodies of the unroll programs, compiled on their own (for the FLOPs of the looped programs)
  def fwd_body(st, m, b):  # the forward scan's body: one real step (bilevel._real_step)
    return bilevel.weighted_step(weight_fn, m, per_sample, b, st, tx)

  def rev_body(st, m, b, cot):  # the reverse sweep's body: the VJP of the step map (floats of state, phi)
    def step(floats, mm):
      new_state, _ = bilevel.weighted_step(weight_fn, mm, per_sample, b, with_float_leaves(st, floats), tx)
      return float_leaves(new_state)
    _, vjp = jax.vjp(step, float_leaves(st), m)
    return vjp(cot)

  cot = [jnp.full_like(x, 1e-3) for x in float_leaves(student)]  # a distinct input: nothing for XLA to CSE
  b_fwd = add("body: forward step", fwd_body, (student, meta, sbs[0]), donate=False, timed=False)
  b_rev = add("body: reverse-sweep step VJP", rev_body, (student, meta, sbs[0], cot), donate=False, timed=False)

  # --- unroll: trainer path and standalone
  unroll_info = {}
  for k in ks:
    um = tgeo_method(args, task, kd, hypergrad="unroll", unroll_steps=k)
    u_state, u_frozen = um.init(jax.random.PRNGKey(0))
    # Lowered on the empty window; after compilation the window is filled with K - 1 real recorded steps.
    add(f"unroll{k}_record", train_step_fn(um, "record"), (u_state, u_frozen, raws[k - 1]))
    add(f"unroll{k}_window_end", train_step_fn(um, "window_end"), (u_state, u_frozen, raws[k - 1]))
    unroll_info[k] = dict(window_state_bytes=tree_bytes(u_state["window"]), state=u_state, frozen=u_frozen)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *sbs[:k])
    for name, remat in (("remat", True), ("scan", False)):
      add(f"unroll{k}_standalone_{name}",
          lambda st, m, bs, v, remat=remat: bilevel.unroll(weight_fn, m, per_sample, bs, val_loss_fn, v, st, tx,
                                                           remat=remat),
          (student, meta, stacked, val), donate=False)
    add(f"unroll{k}_python_loop",
        lambda st, m, bs, v: bilevel.unroll_python_loop(weight_fn, m, per_sample, bs, val_loss_fn, v, st, tx),
        (student, meta, stacked, val), donate=False, timed=False)

  # --- implicit (Neumann J; CG at J = 10) and head_only: the method's meta step
  for j in sorted(set(js) | {0, 1}):  # J = 0 and 1 (FLOPs only unless asked for) give the per-term increment
    im = tgeo_method(args, task, kd, hypergrad="implicit", implicit_solver="neumann", implicit_terms=j)
    add(f"implicit_neumann{j}", train_step_fn(im, "meta"), (t_state, t_frozen, batch), timed=j in js)
  if args.cg_terms:
    cm = tgeo_method(args, task, kd, hypergrad="implicit", implicit_solver="cg", implicit_terms=args.cg_terms)
    add(f"implicit_cg{args.cg_terms}", train_step_fn(cm, "meta"), (t_state, t_frozen, batch))
  hm = tgeo_method(args, task, kd, hypergrad="head_only")
  add("head_only", train_step_fn(hm, "meta"), (t_state, t_frozen, batch))

  # --- verification of "scan + (K - 1) body": a reverse sweep over a recorded trajectory (the window_end's
  # bilevel.unroll_from_trajectory), looped and fully unrolled (scan traced with unroll=True: no loop left). The
  # unrolled program drops what its loop computes but never uses: the state cotangent of the first step (only
  # phi's is needed there), so expected = looped + (K - 1) body - (body - body_meta_only).
  kv = None
  if ks:
    k_src = max(ks)
    # K >= 2 sweep steps from the recorded slots 0..K-2 of the largest window (K = 1 would add no body copy).
    kv = 3 if k_src >= 4 else 2 if k_src == 3 else None

  def window_slices(window):  # slots 0..K-2 of a window_end state hold recorded steps
    return (bilevel.StudentState(**jax.tree.map(lambda x: x[:kv], window["trajectory"])),
            bilevel.StudentState(**jax.tree.map(lambda x: x[kv], window["trajectory"])),
            jax.tree.map(lambda x: x[:kv], window["batches"]))

  if kv:
    def sweep(tr, fin, m, bs, v):
      return bilevel.unroll_from_trajectory(weight_fn, m, per_sample, bs, tr, fin, val_loss_fn, v, tx)

    def rev_body_meta(st, m, b, cot):
      return rev_body(st, m, b, cot)[1]

    add("body: step VJP, phi only", rev_body_meta, (student, meta, sbs[0], cot), donate=False, timed=False)
    # Both are timed too (not table rows): the wall-time cost of XLA:CPU's loop against straight-line code.
    v_args = (*window_slices(unroll_info[k_src]["state"]["window"])[:2], meta,
              window_slices(unroll_info[k_src]["state"]["window"])[2], val)
    add("verify_sweep_scan", sweep, v_args, donate=False)
    with scans_fully_unrolled():  # traced (lowered) here, inside the context
      add("verify_sweep_unrolled", lambda *a: sweep(*a), v_args, donate=False)

  # --- compile everything, then fill the unroll windows with real recorded steps
  compile_s = compile_all([*progs.values(), *flops_only.values()], args.compile_workers)
  print(f"  compiled {len(progs) + len(flops_only)} programs in {compile_s:.0f} s ({args.compile_workers} at a time)",
        file=sys.stderr, flush=True)
  for k in ks:
    rec, end = progs[f"unroll{k}_record"], progs[f"unroll{k}_window_end"]
    s, u_frozen = unroll_info[k]["state"], unroll_info[k]["frozen"]
    for i in range(k - 1):
      s = jax.block_until_ready(rec.exe(fresh_copy(s), u_frozen, raws[i])[0])
    rec.args = end.args = (s, u_frozen, raws[k - 1])
    unroll_info[k]["state"] = s
  verification = None
  if kv:
    traj, final, batches = window_slices(unroll_info[k_src]["state"]["window"])
    looped, unrolled = progs["verify_sweep_scan"], progs["verify_sweep_unrolled"]
    looped.args = unrolled.args = (traj, final, meta, batches, val)
    b_meta = flops_only["body: step VJP, phi only"]
    derived = looped.flops + (kv - 1) * b_rev.flops
    expected = derived - (b_rev.flops - b_meta.flops)
    verification = dict(program=f"bilevel.unroll_from_trajectory, K={kv}", compiled_looped_flops=looped.flops,
                        derived_flops=derived, body_flops=b_rev.flops, body_meta_only_flops=b_meta.flops,
                        expected_fully_unrolled_flops=expected, fully_unrolled_flops=unrolled.flops,
                        fully_unrolled_has_loop=unrolled.loops, looped_has_loop=looped.loops,
                        rel_diff=(expected - unrolled.flops) / unrolled.flops)

  # --- timing: warm-up, then round-robin
  warnings.simplefilter("ignore", bilevel.HypergradSolveWarning)
  t0 = time.perf_counter()
  for p in progs.values():
    for _ in range(max(1, args.warmup)):
      p.call()
      # A call slower than --count-warmup-above seconds is kept as a sample: the first-call overhead (buffer
      # allocation, milliseconds) is below the noise of such a call.
      if p.times[-1] <= args.count_warmup_above:
        p.times.pop()
  print(f"  warm-up done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
  order = list(progs)
  for r in range(args.repeats):
    shift = r % len(order)
    # A program leaves the rounds once it has --min-repeats calls and --max-seconds of timed calls.
    due = [k for k in order[shift:] + order[:shift]
           if len(progs[k].times) < args.min_repeats or sum(progs[k].times) < args.max_seconds]
    if not due:
      break
    for key in due:
      progs[key].call()
    print(f"  timing round {r + 1}/{args.repeats} done ({len(due)} programs, {time.perf_counter() - t0:.0f} s)",
          file=sys.stderr, flush=True)
  timing_s = time.perf_counter() - t0

  if verification:
    lp, up = progs["verify_sweep_scan"], progs["verify_sweep_unrolled"]
    verification.update(looped_ms=lp.ms, fully_unrolled_ms=up.ms, looped_times_ms=[1e3 * t for t in lp.times],
                        fully_unrolled_times_ms=[1e3 * t for t in up.times],
                        looped_compile_s=lp.compile_s, fully_unrolled_compile_s=up.compile_s)

  cosine = head_only_cosine(reuse, t_state, t_frozen, raws, args.cosine_warmup)
  return dict(progs=progs, flops_only=flops_only, unroll_info=unroll_info, verification=verification,
              cosine=cosine, b_fwd=b_fwd, b_rev=b_rev, task=task, kd_state=kd_state, compile_wall_s=compile_s,
              timing_wall_s=timing_s)


def head_only_cosine(method, state, frozen, raws, warmup: int):
  """Cosine and norm ratio of head_only's meta-gradient to one_step's, after ``warmup`` one_step meta steps."""
  step = jax.jit(train_step_fn(method, "meta"))
  for i in range(warmup):
    state, _ = step(state, frozen, raws[i])
  b = raws[warmup]
  per_sample = method.per_sample_fn(frozen)

  @jax.jit
  def grads(state):
    sb = method.step_batch(state, frozen, b)
    args = (method.weight_fn, state["meta_params"], per_sample, sb, method.val_loss_fn, b["val"],
            student_of(state), method.tx)
    return bilevel.one_step(*args).meta_grad, bilevel.head_only(*args).meta_grad

  exact, head = jax.device_get(grads(state))

  def cos(a, b):
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]).astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan"), float(nb / na) if na > 0 else float("nan")

  overall = cos(exact, head)
  hidden = cos(exact["layers"], head["layers"]) if "layers" in exact else (float("nan"),) * 2
  out = cos(exact["out"], head["out"]) if "out" in exact else (float("nan"),) * 2
  return dict(warmup_meta_steps=warmup, cosine=overall[0], norm_ratio_head_over_exact=overall[1],
              cosine_hidden_layers=hidden[0], norm_ratio_hidden_layers=hidden[1], cosine_out_layer=out[0],
              exact_grad_norm=float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(exact)))))


# ----------------------------------------------------------------------------------------------- rows

def make_rows(res, args):
  progs, fo, ui = res["progs"], res["flops_only"], res["unroll_info"]
  allp = {**progs, **fo}
  kd, plain = progs["kd"], progs["plain"]
  m = META_INTERVAL
  rows = []

  def row(key, label, k, flops_window, flops_by, compiled_flops, temp, ms_window, window_bytes=0, programs=(),
          note="", amortise=True):
    """``flops_window`` / ``ms_window``: the cost of the K steps (K = 1: one step)."""
    am_flops = (flops_window + (m - 1) * k * plain.flops) / (m * k) if amortise else None
    am_ms = (ms_window + (m - 1) * k * plain.ms) / (m * k) if amortise else None
    fps, ms = flops_window / k, ms_window / k
    rows.append(dict(
        variant=key, label=label, steps=k, flops_per_step=fps, gflops_per_step=fps / 1e9, flops_x_kd=fps / kd.flops,
        flops_by=flops_by, compiled_flops_per_step=compiled_flops / k, temp_bytes=temp, temp_mib=temp / 2**20,
        temp_x_kd=temp / kd.temp if kd.temp else float("nan"), window_state_bytes=window_bytes,
        window_state_mib=window_bytes / 2**20, median_ms_per_step=ms, ms_x_kd=ms / kd.ms,
        amortised_meta_interval=m, amortised_flops_x_kd=None if am_flops is None else am_flops / kd.flops,
        amortised_ms_x_kd=None if am_ms is None else am_ms / kd.ms,
        programs=list(programs), times_ms={p: [1e3 * t for t in progs[p].times] for p in programs if p in progs},
        compile_s={p: allp[p].compile_s for p in programs}, note=note))

  def direct(p):
    if p.loops:
      raise RuntimeError(f"{p.name}: expected a loop-free program")
    return p.flops

  for key, label in (("kd", "kd (plain KD step)"), ("plain", "tgeo plain step (alpha fixed)"),
                     ("one_step_reuse", "one_step reuse (meta)"), ("one_step_lookahead", "one_step lookahead (meta)")):
    p = progs[key]
    row(key, label, 1, direct(p), "direct", p.flops, p.temp, p.ms, programs=[key], amortise=key.startswith("one"))

  b_fwd, b_rev = res["b_fwd"].flops, res["b_rev"].flops
  for k in args.ks:
    rec, end = progs[f"unroll{k}_record"], progs[f"unroll{k}_window_end"]
    end_flops = end.flops + (k - 1) * b_rev if end.loops else end.flops
    row(f"unroll{k}_trainer", f"unroll K={k} trainer ((K-1) record + window_end)/K", k,
        (k - 1) * direct(rec) + end_flops, "scan+(K-1)body", (k - 1) * rec.flops + end.flops, max(rec.temp, end.temp),
        (k - 1) * rec.ms + end.ms, ui[k]["window_state_bytes"],
        programs=[f"unroll{k}_record", f"unroll{k}_window_end"],
        note=f"record temp {rec.temp / 2**20:.2f} MiB, window_end temp {end.temp / 2**20:.2f} MiB; record "
             f"{rec.ms:.1f} ms, window_end {end.ms:.1f} ms")
    r = progs[f"unroll{k}_standalone_remat"]
    row(f"unroll{k}_remat", f"unroll K={k} standalone, remat=True (/K)", k,
        r.flops + (k - 1) * (b_fwd + b_rev) if r.loops else r.flops, "scan+(K-1)body", r.flops, r.temp, r.ms,
        programs=[f"unroll{k}_standalone_remat"])
    s, py = progs[f"unroll{k}_standalone_scan"], fo[f"unroll{k}_python_loop"]
    row(f"unroll{k}_noremat", f"unroll K={k} standalone, remat=False (/K)", k, direct(py), "python loop", s.flops,
        s.temp, s.ms, programs=[f"unroll{k}_standalone_scan", f"unroll{k}_python_loop"],
        note=f"unroll_python_loop temp {py.temp / 2**20:.2f} MiB (not the timed program)")

  f0, f1 = direct(allp["implicit_neumann0"]), allp["implicit_neumann1"].flops
  d_term = f1 - f0
  for j in args.js:
    p = progs[f"implicit_neumann{j}"]
    exact = f0 + j * d_term
    by = "direct" if j == 0 else "F(0)+J*dF"
    row(f"implicit_neumann{j}", f"implicit neumann J={j} (meta)", 1, exact, by, p.flops, p.temp, p.ms,
        programs=[f"implicit_neumann{j}"], note=f"compiled count {p.flops / 1e9:.3f} GFLOPs (loop body once)")
  if args.cg_terms:
    p = progs[f"implicit_cg{args.cg_terms}"]
    row(f"implicit_cg{args.cg_terms}", f"implicit cg J={args.cg_terms} (meta)", 1,
        p.flops + (args.cg_terms - 1) * d_term, "cg~", p.flops, p.temp, p.ms, programs=[f"implicit_cg{args.cg_terms}"],
        note="FLOPs at maxiter (upper bound); per iteration one Neumann term's dF")
  p = progs["head_only"]
  row("head_only", "head_only (meta)", 1, direct(p), "direct", p.flops, p.temp, p.ms, programs=["head_only"])
  return rows, dict(neumann_f0=f0, neumann_f1=f1, neumann_term=d_term,
                    neumann_compiled={j: allp[f"implicit_neumann{j}"].flops for j in sorted(set(args.js) | {0, 1})},
                    body_forward_step=b_fwd, body_reverse_step_vjp=b_rev)


def check_targets(rows, args):
  by = {r["variant"]: r for r in rows}
  one = by["one_step_reuse"]
  checks = []
  k = TARGET_UNROLL_K if TARGET_UNROLL_K in args.ks else (max(args.ks) if args.ks else None)
  if k is not None:
    lim = TARGET_UNROLL_TEMP_X_ONE_STEP
    cases = [(f"unroll K={k} remat, standalone bilevel.unroll(remat=True): temp",
              by[f"unroll{k}_remat"]["temp_bytes"]),
             (f"unroll K={k} trainer window_end step: temp", by[f"unroll{k}_trainer"]["temp_bytes"]),
             (f"unroll K={k} trainer window_end step: temp + window state",
              by[f"unroll{k}_trainer"]["temp_bytes"] + by[f"unroll{k}_trainer"]["window_state_bytes"])]
    for label, value in cases:
      ratio = value / one["temp_bytes"]
      checks.append(dict(label=label, ratio=ratio, baseline="one_step reuse meta step temp", target=lim,
                         met=ratio <= lim, informative="window state" in label))
  h = by["head_only"]
  checks.append(dict(label="head_only meta step: FLOPs", ratio=h["flops_x_kd"], baseline="KD step FLOPs",
                     target=TARGET_HEAD_ONLY_FLOPS_X_KD, met=h["flops_x_kd"] <= TARGET_HEAD_ONLY_FLOPS_X_KD,
                     informative=False))
  return checks


def markdown_table(rows):
  lines = ["| variant | FLOPs by | GFLOPs/step | × KD | temp MiB | × KD | window state MiB | ms/step | × KD | "
           "m=5 FLOPs × KD | m=5 ms × KD |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    ws = f"{r['window_state_mib']:.2f}" if r["window_state_bytes"] else ""
    am = ("", "") if r["amortised_flops_x_kd"] is None else (f"{r['amortised_flops_x_kd']:.2f}",
                                                             f"{r['amortised_ms_x_kd']:.2f}")
    lines.append(f"| {r['label']} | {r['flops_by']} | {r['gflops_per_step']:.3f} | {r['flops_x_kd']:.2f} | "
                 f"{r['temp_mib']:.2f} | {r['temp_x_kd']:.2f} | {ws} | {r['median_ms_per_step']:.1f} | "
                 f"{r['ms_x_kd']:.2f} | {am[0]} | {am[1]} |")
  return "\n".join(lines)


def _ints(text):
  return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_setup_arguments(p)
  p.add_argument("--repeats", type=int, default=7, help="timed calls per program at most (default 7)")
  p.add_argument("--min-repeats", type=int, default=2, help="timed calls per program at least (default 2)")
  p.add_argument("--max-seconds", type=float, default=10.0,
                 help="a program stops being timed once it has --min-repeats calls and this many timed seconds")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls per program first (default 1)")
  p.add_argument("--count-warmup-above", type=float, default=2.0,
                 help="warm-up calls slower than this many seconds are kept as timed samples (default 2)")
  p.add_argument("--ks", type=_ints, default=[2, 4, 8], help="unroll window lengths K (default 2,4,8)")
  p.add_argument("--js", type=_ints, default=[0, 5, 10], help="Neumann terms J (default 0,5,10)")
  p.add_argument("--cg-terms", type=int, default=10, help="CG iterations of the cg row (0: no cg row)")
  p.add_argument("--compile-workers", type=int, default=os.cpu_count() or 1,
                 help="programs compiled concurrently (default: the CPU count)")
  p.add_argument("--cosine-warmup", type=int, default=5, help="one_step meta steps before the head_only cosine")
  args = p.parse_args(argv)
  args.ks, args.js = sorted(set(args.ks)), sorted(set(args.js))

  t_start = time.perf_counter()
  info = machine_info()
  print(f"device: {info['device_kind']} ({info['platform']}, {info['device_count']} device(s)); jax "
        f"{info['jax']}; CPUs: {info['cpu_count']} (affinity {info['cpu_affinity']})", flush=True)
  one, eight = check_loop_counting()
  print(f"XLA cost analysis of a scan of the same body, 1 vs 8 steps: {one:.0f} vs {eight:.0f} FLOPs"
        f" -> {'the loop body is counted once' if abs(eight - one) < 0.01 * one else 'trip count counted'}",
        flush=True)

  res = measure(args)
  rows, derivation = make_rows(res, args)
  task = res["task"]
  print(f"\nstudent {args.model} ({models.num_params(res['kd_state']['params'])} params), teacher {args.teacher} "
        f"(random weights), batch {args.batch}, val batch {args.val_batch}, K={task.num_classes} classes, cached "
        f"teacher logits; {args.min_repeats}-{args.repeats} timed calls per program (round-robin, up to "
        f"{args.max_seconds:g} s each) after {args.warmup} warm-up call(s); "
        f"meta_interval amortised: {META_INTERVAL}\n")
  print(markdown_table(rows))
  print("\nFLOPs by: direct = loop-free program; python loop = bilevel.unroll_python_loop; scan+(K-1)body = looped "
        "program + (K-1) x its separately compiled loop bodies; F(0)+J*dF = Neumann from J=0 and J=1; cg~ = CG "
        "loop counted once + (J-1) Neumann terms (at maxiter).")
  print(f"loop bodies: forward step {derivation['body_forward_step'] / 1e9:.3f} GFLOPs, reverse-sweep step VJP "
        f"{derivation['body_reverse_step_vjp'] / 1e9:.3f} GFLOPs; Neumann term dF = "
        f"{derivation['neumann_term'] / 1e9:.3f} GFLOPs; compiled Neumann counts by J: "
        + ", ".join(f"J={j}: {f / 1e9:.3f}" for j, f in derivation["neumann_compiled"].items()))
  v = res["verification"]
  if v:
    print(f"verification ({v['program']}): looped program {v['compiled_looped_flops'] / 1e9:.4f} GFLOPs as "
          f"compiled, derived scan+(K-1)body {v['derived_flops'] / 1e9:.4f}; the fully unrolled program (loop "
          f"left: {v['fully_unrolled_has_loop']}) skips the first step's unused state cotangent, expected "
          f"derived - body + body_phi_only = {v['expected_fully_unrolled_flops'] / 1e9:.4f}, counted "
          f"{v['fully_unrolled_flops'] / 1e9:.4f}: relative difference {100 * v['rel_diff']:+.3f}%")
    print(f"wall time of that sweep: looped (lax.scan) {v['looped_ms']:.1f} ms, fully unrolled "
          f"{v['fully_unrolled_ms']:.1f} ms: {v['looped_ms'] / v['fully_unrolled_ms']:.1f}x the straight-line "
          f"program's wall time, for {v['derived_flops'] / v['fully_unrolled_flops']:.2f}x its FLOPs")
  checks = check_targets(rows, args)
  print("\nTargets:")
  for c in checks:
    tag = "MET" if c["met"] else "NOT MET"
    print(f"  {c['label']:64s} {c['ratio']:.2f}x {c['baseline']} (target <= {c['target']}x): {tag}"
          f"{'  (informative)' if c['informative'] else ''}")
  c = res["cosine"]
  print(f"\nhead_only vs exact one_step meta-gradient after {c['warmup_meta_steps']} one_step meta steps: cosine "
        f"{c['cosine']:.4f}, norm ratio {c['norm_ratio_head_over_exact']:.3f} (hidden layers: cosine "
        f"{c['cosine_hidden_layers']:.4f}, norm ratio {c['norm_ratio_hidden_layers']:.3f}; output layer: cosine "
        f"{c['cosine_out_layer']:.4f})")

  total_s = time.perf_counter() - t_start
  print(f"\ntotal benchmark time: {total_s:.1f} s")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = dict(
        device=info,
        settings=dict(model=args.model, teacher=args.teacher, teacher_weights="random (no checkpoint)",
                      batch=args.batch, val_batch=args.val_batch, num_classes=task.num_classes,
                      input_shape=list(task.input_shape), repeats=args.repeats, min_repeats=args.min_repeats,
                      max_seconds=args.max_seconds, count_warmup_above_s=args.count_warmup_above,
                      compile_workers=args.compile_workers, warmup=args.warmup, ks=args.ks,
                      js=args.js, cg_terms=args.cg_terms, meta_interval_amortised=META_INTERVAL,
                      cached_teacher="teacher.cache_logits='on'", donation="trainer steps: state donated, a fresh "
                      "copy per call; standalone bilevel programs: none",
                      optimizer="config default: clip_by_global_norm(1.0) -> add_decayed_weights(5e-4) -> "
                                "sgd(cosine schedule, momentum 0.9)"),
        loop_counting_check=dict(scan_1_step_flops=one, scan_8_step_flops=eight),
        flops_methods={"direct": "compiled program without a loop",
                       "python loop": "bilevel.unroll_python_loop, fully unrolled (FLOPs only)",
                       "scan+(K-1)body": "looped program as compiled + (K-1) x its loop bodies compiled alone",
                       "F(0)+J*dF": "Neumann: F(J=0) + J (F(J=1) - F(J=0))",
                       "cg~": "CG while loop counted once + (J-1) Neumann terms: the cost at maxiter"},
        rows=rows, derivation=derivation, verification=v, targets=checks, head_only_cosine=c,
        total_seconds=total_s, compile_wall_seconds=res["compile_wall_s"], timing_wall_seconds=res["timing_wall_s"],
        loadavg_end=os.getloadavg() if hasattr(os, "getloadavg") else None)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
