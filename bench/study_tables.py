"""The README's study tables from the JSON files ``bench/study.py --out`` wrote.

    python bench/study_tables.py bench/results/study2_*.json [--markdown_out FILE]

Prints, for every (setting, student) found:

1. accuracy: rows = methods, cell = last-epoch test accuracy, mean ± std over seeds (n in brackets when it is not
   the study's seed count), † where Welch's p < 0.05 against the best validation-chosen constant α (``kd_best``);
2. TGeo-KD variants against ``kd_best``: difference and p, and how many pairs each wins (p < 0.05, higher);
3. α: first → last epoch mean, spread, the paper's groups (teacher correct, large / small S–T gap) first → last,
   the teacher-wrong groups at the last epoch;
4. cost: mean wall seconds per run relative to ``kd_best``'s (two worker processes shared the 2 cores).

    python bench/study_tables.py --cost bench/results/study2_cost_full_mlp.json
    python bench/study_tables.py --cost bench/results/study3_cost_full_mlp.json --cost_reference kd_a0.3 \\
        --cost_warmup kd_a0.1

prints only the cost of each method of a study run one run after another in one process (``bench/run_study.sh``'s
cost runs): the whole run's wall time (set-up, compilation, training, evaluation) relative to its KD run's.

    python bench/study_tables.py bench/results/study3_*.json --figure F.png --pairs subset10/mlp,noise20/mlp

also draws α by group over epochs, one row per pair, one column per hypergradient variant (``--variants``).
"""

from __future__ import annotations

import argparse
import json
import sys

ORDER = ("ce", "kd_a0.1", "kd_a0.3", "kd_a0.5", "kd_a0.7", "kd_a0.9", "kd_best", "kd_tgeo_mean_alpha",
         "kd_trainval", "anl_kd", "ada_kd", "wls_kd", "rw_kd", "dist", "dkd", "tgeo", "tgeo_unroll4", "tgeo_unroll8",
         "tgeo_implicit", "tgeo_implicit_eta0.01", "tgeo_implicit_eta0.01_m5", "tgeo_head_only", "tgeo_center",
         "tgeo_outliers")
LABELS = {"kd_best": "**kd, best constant α (validation)**", "kd_tgeo_mean_alpha": "kd α = TGeo-KD's mean α",
          "kd_trainval": "kd (best α) on train + val", "tgeo": "tgeo one_step", "tgeo_unroll4": "tgeo unroll K=4",
          "tgeo_unroll8": "tgeo unroll K=8", "tgeo_implicit": "tgeo implicit (Neumann, η 0.1)",
          "tgeo_implicit_eta0.01": "tgeo implicit (Neumann, η 0.01)",
          "tgeo_implicit_eta0.01_m5": "tgeo implicit (Neumann, η 0.01, every 5th step)",
          "tgeo_head_only": "tgeo head_only", "tgeo_center": "tgeo centred on the best α",
          "tgeo_outliers": "tgeo + 500 outliers", **{f"kd_a{a}": f"kd α = {a}" for a in ("0.1", "0.3", "0.5", "0.7",
                                                                                          "0.9")}}
TGEO = ("tgeo", "tgeo_unroll4", "tgeo_unroll8", "tgeo_implicit", "tgeo_implicit_eta0.01", "tgeo_implicit_eta0.01_m5",
        "tgeo_head_only", "tgeo_center")


def _row(res, name):
  return next((r for r in res["rows"] if r["method"] == name), None)


def cell(row, seeds) -> str:
  if row is None or row["last_mean"] is None:
    return "–"
  mark = "†" if row.get("p_vs_kd") is not None and row["p_vs_kd"] < 0.05 else ""
  n = "" if row["n"] == seeds else f" ({row['n']})"
  return f"{100 * row['last_mean']:.2f} ± {100 * (row['last_std'] or 0):.2f}{mark}{n}"


def _f(v, spec=".2f"):
  return "–" if v is None else format(v, spec)


def tables(results: dict, seeds: int) -> str:
  keys = list(results)
  out = ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name in ORDER:
    rows = [_row(results[k], name) for k in keys]
    if all(r is None for r in rows):
      continue
    out.append(f"| {LABELS.get(name, name)} | " + " | ".join(cell(r, seeds) for r in rows) + " |")
  out.append("| best constant α (validation) | " + " | ".join(
      _f((results[k].get("best_alpha") or {}).get("alpha"), "g") for k in keys) + " |")
  out.append("| learning rate (CE, validation) | " + " | ".join(f"{results[k]['learning_rate']:g}" for k in keys)
             + " |")

  out += ["", "TGeo-KD variants minus the best constant α (last-epoch test accuracy, pp; Welch p):", "",
          "| variant | " + " | ".join(keys) + " | pairs won (p < 0.05) |", "|---|" + "---|" * (len(keys) + 1)]
  for name in TGEO:
    cells, won, ran = [], 0, 0
    for k in keys:
      comp = next((c for c in results[k].get("tgeo_vs", {}).get(name, []) if c["against"] == "kd_best"), None)
      if comp is None:
        cells.append("–")
        continue
      ran += 1
      win = comp["p"] is not None and comp["p"] < 0.05 and comp["difference"] > 0
      won += win
      cells.append(f"{100 * comp['difference']:+.2f} (p {_f(comp['p'], '.3f')})")
    if ran:
      out.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + f" | {won} of {ran} |")

  out += ["", "α (seed means; after the first epoch → after the last): mean, spread (std over examples) at the last epoch, the paper's "
          "groups (teacher correct / wrong (tc / tw), large / small S–T gap), outliers when injected:", "",
          "| pair | variant | mean α | std α (last) | tc, large gap | tc, small gap | large − small | tw, large / small "
          "gap (last) | outliers / normal |", "|---|---|---|---|---|---|---|---|---|"]
  for k in keys:
    for name, table in results[k].get("alpha", {}).items():
      if not table:
        continue
      first, last = table[0], table[-1]
      outl = (f"{_f(last.get('alpha_outlier'))} / {_f(last.get('alpha_normal'))}"
              if last.get("alpha_outlier") is not None else "–")
      s = results[k]["alpha_summary"][name]
      out.append(f"| {k} | {LABELS.get(name, name)} | {_f(first['alpha_mean'])} → {_f(last['alpha_mean'])} | "
                 f"{_f(last['alpha_std'])} | {_f(first['alpha_tc_large'])} → {_f(last['alpha_tc_large'])} | "
                 f"{_f(first['alpha_tc_small'])} → {_f(last['alpha_tc_small'])} | "
                 f"{_f(s.get('tc_large_minus_tc_small_first'), '+.2f')} → "
                 f"{_f(s.get('tc_large_minus_tc_small_last'), '+.2f')} | "
                 f"{_f(last.get('alpha_ti_large'))} / {_f(last.get('alpha_ti_small'))} | {outl} |")

  out += ["", "Wall seconds per run, mean over seeds, and relative to KD at the best constant α (same pair; two "
          "worker processes shared the 2 cores):", "",
          "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name in ("kd_best", "dist", "dkd", "rw_kd", *TGEO):
    cells = []
    for k in keys:
      r, ref = _row(results[k], name), _row(results[k], "kd_best")
      if r is None or r["seconds"] is None or ref is None or not ref["seconds"]:
        cells.append("–")
      else:
        cells.append(f"{r['seconds']:.0f} s ({r['seconds'] / ref['seconds']:.1f}×)")
    if any(c != "–" for c in cells):
      out.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def cost_table(results: dict, reference: str = "", warmup: str = "") -> str:
  """Per pair: each method's wall seconds (one seed) relative to the pair's KD run: ``reference`` when given, else
  ``kd_best`` or its one ``kd_a*`` run. ``warmup``: a run made first only to pay the process's one-time costs
  (the first teacher run computes the teacher-logit table when the cache lacks it, or loads it): reported on its
  own line, not as a method."""
  out = []
  for key, res in results.items():
    rows = [r for r in res["rows"] if r["method"] != warmup]
    if reference:
      kd = [r for r in rows if r["method"] == reference]
    else:
      kd = [r for r in rows if r["method"] == "kd_best"] or [r for r in rows if r["method"].startswith("kd_a")]
    if len(kd) != 1 or not kd[0]["seconds"]:
      raise SystemExit(f"{key}: expected one KD run ({reference or 'kd_best or a single kd_a*'}) as the cost "
                       f"reference; have {[r['method'] for r in rows]}")
    ref = kd[0]
    out += [f"{key}, one run after another in one process (reference: {ref['method']}):", ""]
    first = next((r for r in res["rows"] if warmup and r["method"] == warmup), None)
    if first:
      out += [f"(warm-up, the process's first teacher run, which may compute the teacher-logit table; not a "
              f"method's cost: {LABELS.get(warmup, warmup)}, {first['seconds']:.0f} s = "
              f"{first['seconds'] / ref['seconds']:.2f}× KD)", ""]
    out += ["| method | wall s | × KD |", "|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["seconds"] or 0):
      if r["seconds"]:
        out.append(f"| {LABELS.get(r['method'], r['method'])} | {r['seconds']:.0f} | {r['seconds'] / ref['seconds']:.2f} |")
    out.append("")
  return "\n".join(out).rstrip()


def pick_variant(alpha: dict, choice: str) -> str | None:
  """The first of ``choice``'s ``|``-separated variants with α records in ``alpha``, or None."""
  return next((n for n in choice.split("|") if alpha.get(n)), None)


def variant_figure(path: str, results: dict, variants: list[str], pairs: list[str]) -> None:
  """α by group over epochs: one row per pair, one column per variant (``"a|b"``: the first of them the pair ran,
  e.g. the implicit variant that fits each student), seed-averaged; a panel the pair did not run says so."""
  import math

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from tgeo_jax.alpha_report import GROUP_LABELS, GROUPS
  fig, axes = plt.subplots(len(pairs), len(variants), figsize=(3.3 * len(variants), 2.5 * len(pairs)),
                           squeeze=False, sharey=True)
  for i, pair in enumerate(pairs):
    alpha = results.get(pair, {}).get("alpha", {})
    for j, choice in enumerate(variants):
      ax = axes[i, j]
      name = pick_variant(alpha, choice)
      shown = name or choice.split("|")[0]
      ax.set(ylim=(0, 1), title=f"{pair}: {LABELS.get(shown, shown)}")
      ax.title.set_fontsize(7)
      if name is None:
        ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.set_xticks([])
        continue
      table = alpha[name]
      epochs = [r["epoch"] for r in table]
      for group in GROUPS:
        ax.plot(epochs, [math.nan if r.get(f"alpha_{group}") is None else r[f"alpha_{group}"] for r in table],
                marker="o", markersize=2.5, label=GROUP_LABELS[group])
      ax.plot(epochs, [r["alpha_mean"] for r in table], color="0.4", linestyle="--", label="all examples")
      if i == len(pairs) - 1:
        ax.set_xlabel("epoch")
    axes[i, 0].set_ylabel("mean α")
  handles, labels = [], []
  for ax in axes.flat:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      if lab not in labels:
        handles.append(h)
        labels.append(lab)
  fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
  fig.tight_layout(rect=(0, 0.35 / len(pairs), 1, 1))
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("paths", nargs="+")
  parser.add_argument("--markdown_out", default="")
  parser.add_argument("--cost", action="store_true", help="only the cost table of each pair (the cost runs)")
  parser.add_argument("--cost_reference", default="", help="--cost: the KD run the others are relative to")
  parser.add_argument("--cost_warmup", default="", help="--cost: a run made only to warm the process up (left out)")
  parser.add_argument("--figure", default="", help="write the α-by-group figure of --variants x --pairs here (PNG)")
  parser.add_argument("--variants", default="tgeo,tgeo_unroll4,tgeo_implicit_eta0.01_m5|tgeo_implicit",
                      help="the figure's columns; A|B takes the first the pair ran")
  parser.add_argument("--pairs", default="", help="the figure's rows, e.g. subset10/mlp,noise20/mlp (default: all)")
  args = parser.parse_args(argv)
  results, seeds = {}, 0
  for path in args.paths:
    with open(path) as f:
      d = json.load(f)
    for key, res in d["results"].items():  # one pair in several files (e.g. a probe beside the main runs): merged
      if key not in results:
        results[key] = res
        continue
      have = {r["method"] for r in results[key]["rows"]}
      results[key]["rows"] = results[key]["rows"] + [r for r in res["rows"] if r["method"] not in have]
      for part in ("alpha", "alpha_summary", "tgeo_vs"):
        results[key][part] = {**res.get(part, {}), **results[key].get(part, {})}
      results[key]["best_alpha"] = results[key].get("best_alpha") or res.get("best_alpha")
    seeds = max(seeds, d.get("seeds", 0))
  text = cost_table(results, args.cost_reference, args.cost_warmup) if args.cost else tables(results, seeds)
  if args.figure:
    pairs = [p for p in args.pairs.split(",") if p] or list(results)
    unknown = [p for p in pairs if p not in results]
    if unknown:
      parser.error(f"--pairs: {unknown} not in the results; expected some of {list(results)}")
    variant_figure(args.figure, results, [v for v in args.variants.split(",") if v], pairs)
  print(text)
  if args.markdown_out:
    with open(args.markdown_out, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
