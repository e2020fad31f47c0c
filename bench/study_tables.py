"""The README's compact study tables from the JSON files ``bench/study.py --out`` wrote.

    python bench/study_tables.py bench/results/study_mlp.json bench/results/study_cnn_subset10.json ...

Prints, for every (setting, student) found: one accuracy table (rows: methods; cell: last-epoch test accuracy,
mean ± std over seeds, with † where Welch's p < 0.05 against KD), the TGeo-KD-minus-control line, and the final
epoch of each learned-α method's α-by-group table; then the α variants.
"""

from __future__ import annotations

import json
import sys

ORDER = ("ce", "kd", "kd_a0.5", "kd_a1.0", "kd_tgeo_mean_alpha", "kd_trainval", "anl_kd", "ada_kd", "wls_kd",
         "rw_kd", "dist", "tgeo", "tgeo_intra", "tgeo_no_st")
LABELS = {"kd": "kd (α = 0.9)", "kd_a0.5": "kd α = 0.5", "kd_a1.0": "kd α = 1.0",
          "kd_tgeo_mean_alpha": "kd α = TGeo-KD's mean α", "kd_trainval": "kd on train + val",
          "tgeo_intra": "tgeo, intra-only layout", "tgeo_no_st": "tgeo, without the S–T edge"}


def cell(row) -> str:
  if row is None or row["last_mean"] is None:
    return "–"
  mark = "†" if row.get("p_vs_kd") is not None and row["p_vs_kd"] < 0.05 else ""
  return f"{100 * row['last_mean']:.2f} ± {100 * (row['last_std'] or 0):.2f}{mark}"


def main(paths) -> int:
  results, variants = {}, {}
  for path in paths:
    with open(path) as f:
      d = json.load(f)
    results.update(d["results"])
    variants.update(d.get("variants", {}))
  keys = list(results)
  print("| method | " + " | ".join(keys) + " |")
  print("|---|" + "---|" * len(keys))
  for name in ORDER:
    rows = [next((r for r in results[k]["rows"] if r["method"] == name), None) for k in keys]
    if all(r is None for r in rows):
      continue
    print(f"| {LABELS.get(name, name)} | " + " | ".join(cell(r) for r in rows) + " |")
  print("| learning rate (CE, validation) | " + " | ".join(f"{results[k]['learning_rate']:g}" for k in keys) + " |")
  print("| seeds | " + " | ".join(str(max(r["n"] for r in results[k]["rows"])) for k in keys) + " |")
  print()
  for k in keys:
    comps = results[k].get("tgeo_vs") or []
    if comps:
      print(f"- {k}: TGeo-KD minus " + ", ".join(
          f"{c['against']} {100 * c['difference']:+.2f} pp (p = {c['p']:.3f})" if c["p"] is not None
          else f"{c['against']} {100 * c['difference']:+.2f} pp" for c in comps))
  print("\nα at the last epoch (seed mean): overall mean (std) | teacher correct, large / small S–T gap | "
        "teacher wrong, large / small gap\n")
  print("| run | mean α (std) | tc large | tc small | ti large | ti small | outliers / normal |")
  print("|---|---|---|---|---|---|---|")

  def alpha_row(label, table):
    last = table[-1]
    f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    out = f"{f(last.get('alpha_outlier'))} / {f(last.get('alpha_normal'))}" if last.get("alpha_outlier") else "–"
    first = table[0]
    print(f"| {label} | {f(last['alpha_mean'])} ({f(last['alpha_std'])}); epoch 1: {f(first['alpha_mean'])} | "
          f"{f(last['alpha_tc_large'])} | {f(last['alpha_tc_small'])} | {f(last['alpha_ti_large'])} | "
          f"{f(last['alpha_ti_small'])} | {out} |")

  for k in keys:
    for name, table in results[k]["alpha"].items():
      if table:
        alpha_row(f"{k} {name}", table)
  for k, res in variants.items():
    for name, table in res["alpha"].items():
      if table and name != "tgeo":
        alpha_row(f"{k} {name}", table)
  if variants:
    print("\nα variants (TGeo-KD, fewer seeds): test accuracy (validation accuracy)\n")
    vkeys = list(variants)
    names = list(dict.fromkeys(r["method"] for k in vkeys for r in variants[k]["rows"]))
    print("| variant | " + " | ".join(vkeys) + " |")
    print("|---|" + "---|" * len(vkeys))
    for name in names:
      cells = []
      for k in vkeys:
        r = next((r for r in variants[k]["rows"] if r["method"] == name), None)
        cells.append("–" if r is None or r["last_mean"] is None else
                     f"{100 * r['last_mean']:.2f} ± {100 * (r['last_std'] or 0):.2f} ({100 * r['val_mean']:.2f})")
      print(f"| {name} | " + " | ".join(cells) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
