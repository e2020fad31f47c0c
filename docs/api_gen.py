"""Writes docs/api.md, the reference page of the loss math, from the docstrings (so it cannot drift from the code).

    python docs/api_gen.py            # rewrite docs/api.md
    python docs/api_gen.py --check    # exit 1 if docs/api.md is not what the docstrings give (the test suite runs it)

``make api`` runs the first. Each function's docstring carries its math, shapes, dtypes and an example; the
examples are doctests (``tests/test_api_docs.py`` runs them).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "docs", "api.md")

# (module, the functions documented here, in order). The loss math of the library: pure functions of arrays.
PAGES = [
    ("tgeo_jax.losses", ["cross_entropy", "kl_divergence", "kd_loss", "fused_kd_ce", "convex_mix", "accuracy",
                         "masked_log_softmax_terms"]),
    ("tgeo_jax.methods.kd", ["hinton_loss"]),
    ("tgeo_jax.methods.dkd", ["dkd_terms", "dkd_loss", "warmup_weight"]),
    ("tgeo_jax.methods.dist", ["pearson", "inter_class_relation", "intra_class_relation", "dist_loss"]),
    ("tgeo_jax.methods.simkd", ["feature_mse"]),
    ("tgeo_jax.methods.reweight", ["anl_alpha", "ada_alpha", "wls_alpha"]),
    ("tgeo_jax.geometry", ["feature_dim", "class_mean_teacher", "relation_features"]),
]

HEADER = """# API reference: the loss math

Generated from the docstrings by `python docs/api_gen.py` (`make api`); `tests/test_api_docs.py` fails when this
page and the code disagree, and runs every example below as a doctest. Everything here is a pure function of
arrays: jit-, vmap- and grad-able.

`import tgeo_jax` exposes the modules (`tgeo_jax.losses`, `tgeo_jax.geometry`, `tgeo_jax.methods.dkd`, ...; each
declares its public names in `__all__`).

## The contract every loss keeps

- **dtype.** Computed in `promote_types(input dtype, float32)`: bfloat16 / float16 in, float32 out; float32 stays
  float32; float64 (under `jax_enable_x64` or `with jax.enable_x64(True)`) stays float64, so
  `jax.test_util.check_grads` works in float64.
- **Masked classes.** A logit of `-inf` is a class of probability 0; its terms contribute exactly 0 to the value and
  the gradient (`where`-masking before any product, never NaN clean-up after). Masking a class on both sides equals
  removing it. A student `-inf` on a class the teacher gives mass is an infinite KL, as the math says.
- **Precision.** In float32 each loss with an official counterpart is as precise as the official PyTorch formula,
  both against float64 (`python bench/loss_precision.py`; table in docs/benchmarks.md).
- **Checks.** Static arguments are checked at trace time and raise a one-line `ValueError` naming the function and
  the argument; data-dependent checks run with `validate=True` (below). An out-of-range label gives NaN, never a
  finite wrong number.
"""


def _signature(fn) -> str:
  return f"{fn.__name__}{inspect.signature(fn)}".replace("'", "")


def _render_docstring(doc: str) -> str:
  """The summary paragraphs as markdown, the sections (Args/Returns/Example) in one fenced block."""
  lines = inspect.cleandoc(doc).split("\n")
  sections = ("Args:", "Returns:", "Example:", "Examples:")
  split = next((i for i, line in enumerate(lines) if line.strip() in sections), len(lines))
  text = "\n".join(lines[:split]).strip()
  out = [text] if text else []
  rest = "\n".join(lines[split:]).strip()
  if rest:
    out.append("```text\n" + rest + "\n```")
  return "\n\n".join(out)


def render() -> str:
  from tgeo_jax import argchecks
  parts = [HEADER, "## Checks (`tgeo_jax.argchecks`)\n", inspect.cleandoc(argchecks.__doc__).split("\n", 1)[1].strip(),
           ""]
  for module_name, names in PAGES:
    module = importlib.import_module(module_name)
    short = module_name.replace("tgeo_jax.", "")
    summary = inspect.cleandoc(module.__doc__).split("\n")[0]
    parts.append(f"## `{short}`\n\n{summary}\n")
    for name in names:
      fn = getattr(module, name)
      parts.append(f"### `{short}.{_signature(fn)}`\n\n{_render_docstring(fn.__doc__)}\n")
  return "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help="compare with docs/api.md instead of writing it")
  args = parser.parse_args(argv)
  text = render()
  if args.check:
    with open(OUT, encoding="utf-8") as f:
      if f.read() != text:
        print("docs/api.md is out of date: run `python docs/api_gen.py` (make api)", file=sys.stderr)
        return 1
    return 0
  with open(OUT, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {OUT}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
