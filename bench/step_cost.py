"""Per-step cost of TGeo-KD relative to plain KD: XLA FLOPs, temporary memory and wall time, in one run.

    python bench/step_cost.py [--out FILE.json] [--model cnn_small] [--teacher cnn_teacher] [--batch 128]
                              [--val-batch 128] [--repeats N] [--no-breakdown]

Every variant uses the same student (same initial weights), the same optimizer (the config's SGD + clipping +
weight decay), the same training and validation batch and the same randomly initialised teacher (built in
process: no checkpoint, no dataset files; the synthetic data source). Rows:

* ``kd``: plain KD step (``KD.train_step``);
* ``tgeo lookahead (meta)``: TGeo-KD meta step, Meta-Weight-Net ordering (lookahead, phi update, real step);
* ``tgeo reuse (meta)``: TGeo-KD meta step, the lookahead step is the real step (fast ``bilevel.one_step``);
* ``tgeo plain (alpha fixed)``: TGeo-KD's non-meta step (``train_step(..., "plain")``);
* ``tgeo reuse, meta_interval 5``: amortised, ``(1 meta + 4 plain) / 5`` of the two rows above (memory: max);
* ``tgeo reuse (meta), autodiff ref``: the reuse meta step with ``bilevel.one_step_autodiff`` (nested
  ``jax.grad``) as the method's ``hypergrad`` while the step is traced.

Two teacher settings: ``cached`` (``teacher.cache_logits='on'``: the teacher's logits over the training part are
computed once and looked up per batch, the library's default without augmentation) and ``online``
(``cache_logits='off'``: the step runs the frozen teacher's forward). The autodiff row sets the method's
``hypergrad`` injection point; nothing is patched.

Columns: FLOPs from ``compiled.cost_analysis()``, temporary memory from ``compiled.memory_analysis()``, median
wall time of the compiled step over ``--repeats`` timed calls (after warm-up; timing rounds interleave all
variants round-robin so background load hits all alike). The state is not donated: every call starts from the
same state, so all timed calls do identical work.

A breakdown of the cached-teacher meta step into its pieces (train forward, transpose, JVP, validation
forward/backward, optimizer VJP, fusion net), each as compiled FLOPs, follows the table unless ``--no-breakdown``.
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
import numpy as np

from bench.machine import machine_info
from configs import fashion_mnist
from tgeo_jax import bilevel, data, models, optim
from tgeo_jax.teacher import Teacher
from tgeo_jax.methods.kd import KD
from tgeo_jax.methods.tgeo import TGeoKD

# Targets from the issue (cached teacher logits).
TARGET_FLOPS_RATIO = 2.3
TARGET_TEMP_RATIO = 2.0
META_INTERVAL = 5


# ------------------------------------------------------------------------------------------ compiled stats

def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per computation
    return float(sum(float(c.get("flops", 0.0)) for c in ca if c))
  return float((ca or {}).get("flops", 0.0))


def _temp_bytes(compiled) -> int:
  ma = compiled.memory_analysis()
  if isinstance(ma, (list, tuple)):
    ma = ma[0]
  return int(getattr(ma, "temp_size_in_bytes", 0)) if ma is not None else 0


def compile_fn(fn, *args):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- the setup

def make_config(method: str, args):
  config = fashion_mnist.get_config(method)
  config.data.name = "synthetic"
  config.data.train_subset = 0
  # The held-out validation part is val_fraction of num_train; it must hold a validation batch.
  num_train = max(2048, int(np.ceil(1.25 * args.val_batch / config.data.val_fraction)), 2 * args.batch)
  config.data.synthetic.num_train = num_train
  config.data.synthetic.num_test = 256
  config.data.synthetic.input_shape = (28, 28, 1)
  config.data.synthetic.num_classes = args.num_classes
  config.model.name = args.model
  config.teacher.model = args.teacher
  config.batch_size = args.batch
  config.val_batch_size = args.val_batch
  return config


def build(args):
  """``{(setting, key): method}`` (KD, TGeo reuse, TGeo lookahead, TGeo reuse with the autodiff hypergradient)
  sharing student, optimizer and teacher; ``{(setting, state key): (state, frozen)}``; the batch."""
  kd_config = make_config("kd", args)
  task = data.load(kd_config.data, seed=kd_config.seed)
  spec = task.spec
  steps_per_epoch = data.steps_per_epoch(len(task.train), args.batch)
  student = models.split(models.create(args.model, num_classes=spec.num_classes, input_shape=spec.input_shape,
                                       seed=kd_config.seed))
  teacher_fn = models.split(models.create(args.teacher, num_classes=spec.num_classes,
                                          input_shape=spec.input_shape, seed=kd_config.seed + 100))
  teacher = Teacher(args.teacher, teacher_fn.graphdef, {"params": teacher_fn.params, "rest": teacher_fn.rest})
  tx = optim.make_optimizer(kd_config.optimizer, steps_per_epoch=steps_per_epoch, num_epochs=kd_config.num_epochs)

  methods, states = {}, {}
  rng = jax.random.PRNGKey(0)
  for setting in ("cached", "online"):
    cfg = make_config("kd", args)
    cfg.teacher.cache_logits = "on" if setting == "cached" else "off"
    methods[(setting, "kd")] = KD(cfg, spec, student=student, tx=tx, teacher=teacher, task=task)
    for ordering in ("reuse", "lookahead"):
      cfg = make_config("tgeo", args)
      cfg.tgeo.ordering = ordering
      cfg.teacher.cache_logits = "on" if setting == "cached" else "off"
      methods[(setting, f"tgeo_{ordering}")] = TGeoKD(cfg, spec, student=student, tx=tx, teacher=teacher, task=task)
    autodiff = TGeoKD(cfg.copy_and_resolve_references(), spec, student=student, tx=tx, teacher=teacher, task=task)
    autodiff.cfg.ordering = "reuse"
    autodiff.hypergrad = bilevel.one_step_autodiff  # the injection point: the nested-grad reference
    methods[(setting, "tgeo_autodiff")] = autodiff
    states[(setting, "kd")] = methods[(setting, "kd")].init(rng)
    states[(setting, "tgeo")] = methods[(setting, "tgeo_reuse")].init(rng)  # the orderings share the layout

  batch = data.train_batches(task.train, batch_size=args.batch, seed=0, epoch=0)[0]
  batch["val"] = data.validation_batches(task.val, batch_size=args.val_batch, seed=0)[0]
  batch = jax.tree.map(jnp.asarray, batch)
  return methods, states, batch, task


def make_step(method, kind):
  """``step(state, frozen, batch) -> (state, metrics)``: ``method.train_step`` of variant ``kind``."""
  return lambda state, frozen, batch: method.train_step(state, frozen, batch, kind)


# ------------------------------------------------------------------------------------------- the variants

VARIANTS = [
    # (key, label, method key, state key, kind, autodiff)
    ("kd", "kd (plain KD step)", "kd", "kd", None, False),
    ("lookahead", "tgeo lookahead (meta)", "tgeo_lookahead", "tgeo", "meta", False),
    ("reuse", "tgeo reuse (meta)", "tgeo_reuse", "tgeo", "meta", False),
    ("plain", "tgeo plain step (alpha fixed)", "tgeo_reuse", "tgeo", "plain", False),
    ("reuse_autodiff", "tgeo reuse (meta), autodiff ref", "tgeo_autodiff", "tgeo", "meta", True),
]


def run_variants(methods, states, batch, repeats: int, warmup: int):
  compiled = {}
  for setting in ("cached", "online"):
    for key, label, mkey, skey, kind, _ in VARIANTS:
      fn = make_step(methods[(setting, mkey)], kind)
      state, frozen = states[(setting, skey)]
      exe, compile_s = compile_fn(fn, state, frozen, batch)
      compiled[(setting, key)] = dict(exe=exe, args=(state, frozen, batch), compile_s=compile_s,
                                      flops=_flops(exe), temp=_temp_bytes(exe), times=[])
      print(f"  compiled {setting:6s} {label:34s} in {compile_s:5.2f} s", file=sys.stderr, flush=True)

  for entry in compiled.values():  # warm-up
    for _ in range(max(1, warmup)):
      entry["out"] = jax.block_until_ready(entry["exe"](*entry["args"]))
  # Sanity: the cached-logits step computes the same step as the online one.
  for key, label, *_ in VARIANTS:
    a, b = compiled[("cached", key)]["out"], compiled[("online", key)]["out"]
    la, lb = float(a[1]["loss"]), float(b[1]["loss"])
    dp = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a[0]["params"]),
                                                            jax.tree.leaves(b[0]["params"])))
    ok = abs(la - lb) <= 1e-5 * max(1.0, abs(lb)) and dp <= 1e-5
    print(f"  check cached == online: {label:34s} loss {la:.6f} vs {lb:.6f}, max |d params| {dp:.1e}"
          f"{'' if ok else '  <-- MISMATCH'}", file=sys.stderr, flush=True)
    compiled[("cached", key)]["matches_online"] = ok
  for entry in compiled.values():
    entry.pop("out")
  order = list(compiled)
  for r in range(repeats):  # round-robin, rotated each round so no variant always follows the same one
    shift = r % len(order)
    for k in order[shift:] + order[:shift]:
      entry = compiled[k]
      t0 = time.perf_counter()
      jax.block_until_ready(entry["exe"](*entry["args"]))
      entry["times"].append(time.perf_counter() - t0)
  return compiled


def make_rows(compiled):
  rows = []
  for setting in ("cached", "online"):
    base_entry = compiled[(setting, "kd")]
    kd_flops, kd_temp, kd_ms = base_entry["flops"], base_entry["temp"], 1e3 * statistics.median(base_entry["times"])

    def row(key, label, flops, temp, ms, note=""):
      return dict(variant=key, label=label, teacher=setting, flops=flops, gflops=flops / 1e9,
                  flops_x_kd=flops / kd_flops, temp_bytes=temp, temp_mib=temp / 2**20,
                  temp_x_kd=temp / kd_temp if kd_temp else float("nan"), median_ms=ms, ms_x_kd=ms / kd_ms,
                  note=note)

    for key, label, *_ in VARIANTS:
      e = compiled[(setting, key)]
      ms = 1e3 * statistics.median(e["times"])
      note = ("bilevel.one_step_autodiff (nested jax.grad) as method.hypergrad" if key == "reuse_autodiff"
              else "bilevel.one_step (fast explicit form)" if key in ("reuse", "lookahead") else "")
      r = row(key, label, e["flops"], e["temp"], ms, note)
      r.update(compile_s=e["compile_s"], times_ms=[1e3 * t for t in e["times"]])
      if "matches_online" in e:
        r["matches_online"] = e["matches_online"]
      rows.append(r)
      if key == "plain":
        meta, plain = compiled[(setting, "reuse")], e
        k = META_INTERVAL
        am_flops = (meta["flops"] + (k - 1) * plain["flops"]) / k
        am_ms = (1e3 * statistics.median(meta["times"]) + (k - 1) * ms) / k
        rows.append(row(f"reuse_interval{k}", f"tgeo reuse, meta_interval {k} (amortised)", am_flops,
                        max(meta["temp"], plain["temp"]), am_ms,
                        f"(1 reuse meta + {k - 1} plain)/{k} of the measured rows; temp = max of the two"))
  return rows


# -------------------------------------------------------------------------------------------- breakdown

def breakdown(methods, states, batch):
  """Compiled FLOPs of the pieces of the cached-teacher reuse meta step (student only)."""
  method = methods[("cached", "tgeo_reuse")]
  state, frozen = states[("cached", "tgeo")]
  online_method, online_frozen = methods[("online", "tgeo_reuse")], states[("online", "tgeo")][1]
  tl = frozen["teacher_logits_table"][batch["index"]]
  tx = method.tx

  def pieces(st, b):
    sb = dict(b, teacher_logits=tl)
    per_sample = lambda p, r: method.per_sample_fn(frozen)(p, r, sb)  # noqa: E731
    val_loss = lambda p, r: method.val_loss_fn(p, r, b["val"])  # noqa: E731
    return per_sample, val_loss, method.weight_fn, sb

  def f_train_fwd(st, b):
    per_sample, *_ = pieces(st, b)
    (soft, hard), (new_rest, context) = per_sample(st["params"], st["rest"])
    return soft, hard, new_rest, context["student_logits"]

  def f_train_fwd_bwd(st, b):  # the plain step's gradient (alpha fixed at 0.5)
    per_sample, *_ = pieces(st, b)

    def obj(p):
      (soft, hard), (new_rest, _) = per_sample(p, st["rest"])
      return bilevel.train_loss(0.5, soft, hard), new_rest

    return jax.value_and_grad(obj, has_aux=True)(st["params"])

  def f_linearize_transpose(st, b, with_jvp=False):
    per_sample, *_ = pieces(st, b)
    (soft, hard), lin, _ = jax.linearize(lambda p: per_sample(p, st["rest"]), st["params"], has_aux=True)
    n = soft.shape[0]
    (grads,) = jax.linear_transpose(lin, st["params"])((jnp.full_like(soft, 0.5 / n), jnp.full_like(hard, 0.5 / n)))
    if with_jvp:
      return grads, lin(grads)
    return grads

  def f_jvp_only(st, b):  # the JVP as jax.jvp of a fresh forward (primal + tangent)
    per_sample, *_ = pieces(st, b)
    # A tangent that is not the primal itself: with tangent == params, XLA would CSE conv(x, dW) with conv(x, W).
    tangent = jax.tree.map(jnp.sin, st["params"])
    return jax.jvp(lambda p: per_sample(p, st["rest"])[0], (st["params"],), (tangent,))

  def f_val_fwd(st, b):
    _, val_loss, *_ = pieces(st, b)
    return val_loss(st["params"], st["rest"])

  def f_val_fwd_bwd(st, b):
    _, val_loss, *_ = pieces(st, b)
    return jax.value_and_grad(val_loss)(st["params"], st["rest"])

  def f_opt_vjp(st, b):
    del b
    g = st["params"]
    new_params, vjp, new_opt = jax.vjp(lambda g: bilevel.optimizer_step(tx, g, st["opt_state"], st["params"]), g,
                                       has_aux=True)
    return new_params, new_opt, vjp(new_params)

  def f_alpha_vjp(st, b):
    per_sample, _, weight_fn, _ = pieces(st, b)
    _, (_, context) = per_sample(st["params"], st["rest"])
    context = jax.lax.stop_gradient(context)
    alpha, vjp = jax.vjp(lambda m: weight_fn(m, context), st["meta_params"])
    return alpha, vjp(alpha)

  def f_teacher_fwd(st, b):
    return online_method.teacher_logits(st, online_frozen, b["inputs"])

  def f_kd_step(st, b):
    kd_state, kd_frozen = states[("cached", "kd")]
    return make_step(methods[("cached", "kd")], None)(kd_state, kd_frozen, b)

  def f_reuse_meta(st, b):
    return make_step(method, "meta")(st, frozen, b)

  items = [
      ("train forward (student, train mode, soft+hard)", f_train_fwd),
      ("train forward + backward (value_and_grad)", f_train_fwd_bwd),
      ("train linearize + transpose (grad)", f_linearize_transpose),
      ("train linearize + transpose + JVP lin(g)", lambda s, b: f_linearize_transpose(s, b, True)),
      ("jax.jvp of train forward (primal + tangent)", f_jvp_only),
      ("val forward", f_val_fwd),
      ("val forward + backward", f_val_fwd_bwd),
      ("optimizer step + its VJP", f_opt_vjp),
      ("features + fusion net + VJP", f_alpha_vjp),
      ("teacher forward (online setting only)", f_teacher_fwd),
      ("= full KD step (cached)", f_kd_step),
      ("= full reuse meta step (cached)", f_reuse_meta),
  ]
  out = []
  for name, fn in items:
    exe, _ = compile_fn(fn, state, batch)
    out.append(dict(piece=name, flops=_flops(exe), temp_bytes=_temp_bytes(exe)))
  fwd = out[0]["flops"]
  for o in out:
    o["x_train_fwd"] = o["flops"] / fwd
  return out


# ----------------------------------------------------------------------------------------------- output

def teacher_params(methods):
  return methods[("cached", "kd")].teacher.variables["params"]


def device_info():
  return machine_info()


def markdown_table(rows):
  lines = ["| variant | teacher | GFLOPs | x KD | temp MiB | x KD | median ms | x KD |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['label']} | {r['teacher']} | {r['gflops']:.3f} | {r['flops_x_kd']:.2f} | "
                 f"{r['temp_mib']:.2f} | {r['temp_x_kd']:.2f} | {r['median_ms']:.2f} | {r['ms_x_kd']:.2f} |")
  return "\n".join(lines)


def check_targets(rows):
  cached = {r["variant"]: r for r in rows if r["teacher"] == "cached"}
  checks = []
  for key in ("reuse", "lookahead", "reuse_autodiff", f"reuse_interval{META_INTERVAL}"):
    r = cached[key]
    checks.append(dict(variant=key, label=r["label"], metric="flops", ratio=r["flops_x_kd"],
                       target=TARGET_FLOPS_RATIO, met=r["flops_x_kd"] <= TARGET_FLOPS_RATIO))
    checks.append(dict(variant=key, label=r["label"], metric="temp", ratio=r["temp_x_kd"],
                       target=TARGET_TEMP_RATIO, met=r["temp_x_kd"] <= TARGET_TEMP_RATIO))
  return checks


def add_setup_arguments(p: argparse.ArgumentParser) -> None:
  """The flags of ``build()``'s setup (shared with bench/hypergrad_cost.py)."""
  p.add_argument("--out", default="", help="write the results as JSON to this file")
  p.add_argument("--model", default="cnn_small", help="student model (default cnn_small)")
  p.add_argument("--teacher", default="cnn_teacher", help="teacher model, random weights (default cnn_teacher)")
  p.add_argument("--batch", type=int, default=128, help="training batch size (default 128)")
  p.add_argument("--val-batch", type=int, default=128, help="validation batch size (default 128)")
  p.add_argument("--num-classes", type=int, default=10)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_setup_arguments(p)
  p.add_argument("--repeats", type=int, default=20, help="timed calls per variant (default 20)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first (default 2)")
  p.add_argument("--no-breakdown", action="store_true", help="skip the FLOPs breakdown of the meta step")
  args = p.parse_args(argv)

  t_start = time.perf_counter()
  info = device_info()
  print(f"device: {info['device_kind']} ({info['platform']}, {info['device_count']} device(s)); jax "
        f"{info['jax']}; CPUs: {info['cpu_count']} (affinity {info['cpu_affinity']})", flush=True)
  methods, states, batch, task = build(args)
  print(f"student {args.model} ({models.num_params(states[('cached', 'kd')][0]['params'])} params), teacher "
        f"{args.teacher} (random weights, {models.num_params(teacher_params(methods))} params), batch "
        f"{args.batch}, val batch {args.val_batch}, K={task.num_classes}, input {task.input_shape}; optimizer "
        f"SGD(momentum 0.9) + clip 1.0 + wd 5e-4; {args.repeats} timed repeats (round-robin) after "
        f"{args.warmup} warm-up calls", flush=True)

  compiled = run_variants(methods, states, batch, args.repeats, args.warmup)
  rows = make_rows(compiled)
  print()
  print(markdown_table(rows))
  print()
  checks = check_targets(rows)
  print(f"Targets (cached teacher logits): meta step FLOPs <= {TARGET_FLOPS_RATIO}x plain KD; temporary memory "
        f"<= {TARGET_TEMP_RATIO}x plain KD.")
  for c in checks:
    print(f"  {c['label']:44s} {c['metric']:5s} {c['ratio']:.2f}x  (target <= {c['target']}x): "
          f"{'MET' if c['met'] else 'NOT MET'}")

  pieces = None
  if not args.no_breakdown:
    pieces = breakdown(methods, states, batch)
    print()
    print("FLOPs breakdown (cached teacher; each piece compiled on its own; 'x fwd' = / student train forward):")
    print("| piece | GFLOPs | x fwd | temp MiB |")
    print("|---|---:|---:|---:|")
    for o in pieces:
      print(f"| {o['piece']} | {o['flops'] / 1e9:.3f} | {o['x_train_fwd']:.2f} | {o['temp_bytes'] / 2**20:.2f} |")

  total_s = time.perf_counter() - t_start
  print(f"\ntotal benchmark time: {total_s:.1f} s")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = dict(
        device=info,
        settings=dict(model=args.model, teacher=args.teacher, teacher_weights="random (no checkpoint)",
                      batch=args.batch, val_batch=args.val_batch, num_classes=task.num_classes,
                      input_shape=list(task.input_shape), repeats=args.repeats, warmup=args.warmup,
                      meta_interval_amortised=META_INTERVAL, donation=False,
                      optimizer="config default: clip_by_global_norm(1.0) -> add_decayed_weights(5e-4) -> "
                                "sgd(cosine schedule, momentum 0.9)",
                      cached_teacher="method.teacher_logits overridden while tracing to return "
                                     "batch['teacher_logits']",
                      autodiff_variant="method.hypergrad = "
                                       "bilevel.one_step_autodiff (reuse ordering)"),
        rows=rows, targets=checks, breakdown=pieces, total_seconds=total_s)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
