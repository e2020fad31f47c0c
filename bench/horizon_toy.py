"""Short-horizon bias of meta-gradients on the noisy-quadratic distillation toy (docs/horizon_toy.md).

    python bench/horizon_toy.py [--steps 40000] [--replicas 16] [--out bench/results/horizon_toy.json]
                                [--figure bench/results/horizon_toy.png]

Meta-learns alpha = sigmoid(phi) online with the library's hypergradients (``bilevel.one_step``,
``bilevel.unroll`` over K real steps, ``bilevel.implicit`` with J Neumann terms) and compares the settled alpha
(mean over the last half of the run, over replicas; standard error from the replica spread) with the closed
forms: alpha_greedy, alpha_K, alpha*. The implicit runs do not settle (their fixed point is alpha = 0): the table
gives their final-quarter mean next to the noise-free mean-field prediction of the same window. Writes the JSON and
the figure (matplotlib, only here) and prints a markdown table. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from tgeo_jax import horizon_toy as ht

HORIZONS = (1, 2, 4, 8, 16, 32)
TERMS = (0, 1, 3, 10, 30)
META_LR = 0.2
ALPHA0 = 0.2


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=40_000, help="real SGD steps per run")
  parser.add_argument("--replicas", type=int, default=16, help="independent chains per run")
  parser.add_argument("--implicit-steps", type=int, default=20_000, help="steps per implicit run (sequential)")
  parser.add_argument("--implicit-replicas", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="bench/results/horizon_toy.json")
  parser.add_argument("--figure", default="bench/results/horizon_toy.png", help="'' for none")
  args = parser.parse_args(argv)

  toy = ht.Toy()
  phi0 = math.log(ALPHA0 / (1 - ALPHA0))
  closed = {"alpha_star": ht.long_run_alpha(toy), "alpha_greedy": ht.greedy_alpha(toy),
            "c_inf": ht.horizon_c(math.inf, toy), "c_greedy": ht.horizon_c(1, toy)}
  runs = [("one_step", {}, "one_step (K=1)")]
  runs += [("unroll", {"horizon": k}, f"unroll K={k}") for k in HORIZONS]
  runs += [("implicit", {"terms": j}, f"implicit J={j}") for j in TERMS]

  rows, curves = [], {}
  for method, kw, label in runs:
    implicit = method == "implicit"
    steps = args.implicit_steps if implicit else args.steps
    replicas = args.implicit_replicas if implicit else args.replicas
    start = time.perf_counter()
    res = ht.simulate(toy, method, steps=steps, meta_lr=META_LR, replicas=replicas, phi0=phi0, seed=args.seed,
                      **kw)
    seconds = time.perf_counter() - start
    field = ht.mean_field_alpha(toy, method, steps=steps, meta_lr=META_LR, alpha0=ALPHA0, **kw)
    tail = 0.25 if implicit else 0.5
    mean, se = ht.settled_alpha(res, tail=tail)
    start_w = int(round((1 - tail) * field.size))
    row = {"method": method, **kw, "label": label, "steps": steps, "replicas": replicas, "window": res.window,
           "tail_fraction": tail, "alpha_settled": mean, "alpha_settled_se": se,
           "alpha_mean_field_tail": float(field[start_w:].mean()), "seconds": round(seconds, 2)}
    if implicit:
      row["alpha_fixed_point"] = 0.0
      row["neumann_scale"] = ht.neumann_scale(kw["terms"], toy)
    else:
      k = kw.get("horizon", 1)
      row["alpha_fixed_point"] = ht.unrolled_alpha(k, toy)
      row["c_K"] = ht.horizon_c(k, toy)
    rows.append(row)
    curves[label] = (res.step, res.alpha.mean(axis=0), field, row["alpha_fixed_point"])
    print(f"{label}: {mean:.4f} +- {se:.4f} (closed form {row['alpha_fixed_point']:.4f}) in {seconds:.1f} s",
          file=sys.stderr)

  out = {"toy": toy._asdict(), "meta_lr_per_step": META_LR, "alpha0": ALPHA0, "seed": args.seed,
         "validation_loss": "exact 1/2 |theta|^2", "closed_forms": closed, "runs": rows,
         "command": "python bench/horizon_toy.py " + " ".join(argv if argv is not None else sys.argv[1:])}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")

  print(f"alpha* = {closed['alpha_star']:.4f}, alpha_greedy = {closed['alpha_greedy']:.4f}\n")
  print("| hypergradient | settled alpha (± s.e.) | closed form | noise-free mean field |")
  print("|---|---|---|---|")
  for r in rows:
    closed_form = "→ 0" if r["method"] == "implicit" else f"{r['alpha_fixed_point']:.4f}"
    settled = f"{r['alpha_settled']:.4f} ± {r['alpha_settled_se']:.4f}"
    if r["method"] == "implicit":
      settled += " (last quarter)"
    print(f"| {r['label']} | {settled} | {closed_form} | {r['alpha_mean_field_tail']:.4f} |")

  if args.figure:
    plot(curves, closed, args.figure)
  return 0


def plot(curves, closed, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  cmap = plt.get_cmap("viridis")
  for ax, prefix, title in ((axes[0], ("one_step", "unroll"), "one-step and K-step unrolled hypergradients"),
                            (axes[1], ("implicit",), "implicit (IFT, Neumann with J terms)")):
    labels = [lab for lab in curves if lab.startswith(prefix)]
    for i, label in enumerate(labels):
      step, alpha, field, fixed = curves[label]
      color = cmap(i / max(1, len(labels) - 1))
      done = step + (step[1] - step[0])  # real steps completed after each window
      ax.plot(done, alpha, color=color, lw=1.2, label=label)
      ax.plot(done, field, color=color, lw=0.8, ls=":")
      if not label.startswith("implicit") and not label.startswith("one_step"):
        ax.axhline(fixed, color=color, lw=0.8, ls="--")
    ax.axhline(closed["alpha_greedy"], color="tab:red", lw=1.2, ls="-.", label="α_greedy (closed form)")
    ax.axhline(closed["alpha_star"], color="black", lw=1.5, label="α* (closed form)")
    ax.set_xscale("log")
    ax.set_xlabel("real SGD step")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right" if prefix != ("implicit",) else "upper right")
  axes[0].set_ylabel("α = sigmoid(φ) (mean over replicas)")
  fig.suptitle("Online meta-learned α; dashed: closed-form α_K, dotted: noise-free mean field", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"\nfigure: {path}", file=sys.stderr)


if __name__ == "__main__":
  sys.exit(main())
