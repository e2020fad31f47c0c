"""Whether the filter gradient's gap to PyTorch is XLA:CPU's matrix product or the data movement around it.

    OMP_WAIT_POLICY=PASSIVE python bench/filter_grad_layouts.py [--rounds 3] [--calls 5] [--out FILE]

For resnet8x4's 3x3 stride-1 layers (batch 64), the jitted filter gradient ``dW[i, j, c, o] = sum_{n, h, w}
x_pad[n, h + i, w + j, c] dy[n, h, w, o]`` computed five ways, against ``torch.nn.grad.conv2d_weight`` (NCHW,
oneDNN) and against the bare matrix product of the same size in both libraries:

* ``window``: JAX's own filter gradient (``jax.vjp`` of ``lax.conv_general_dilated``, NHWC/HWIO), the window
  convolution XLA:CPU runs on N<->C transposed operands: what the models run;
* ``im2col NN`` / ``im2col TN``: the ``kh * kw`` shifted row ranges of the padded, flattened input (the taps, as
  in ``bench/filter_grad_matmuls.py``) concatenated into one ``[9C, rows]`` (or ``[rows, 9C]``) matrix, then one
  product with the ``[rows, O]`` cotangent (or its transpose);
* ``taps xT`` / ``taps dyT``: nine products, one per tap, with the input (or the cotangent) transposed once so
  that every product is a plain row-major ``[M, K] @ [K, N]``;
* ``gemm``: ``[9C, rows] @ [rows, O]`` on ready operands, the one product all of the above reduce to (JAX's jitted
  ``matmul`` and ``torch.matmul``), i.e. the arithmetic without the data movement.

Prints the median over ``--rounds`` interleaved rounds (``bench.machine.interleaved_rounds``) of ms per call and
each variant's largest difference from ``window`` relative to its largest entry (float32 summation order).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.machine import interleaved_rounds, machine_info

LAYERS = ((32, 32, 64), (32, 64, 64), (16, 128, 128), (8, 256, 256))  # (height = width, in, out channels)
BATCH, K = 64, 3
DN = ("NHWC", "HWIO", "NHWC")


def window(x, dy):
  w = jnp.zeros((K, K, x.shape[-1], dy.shape[-1]), x.dtype)
  return jax.vjp(lambda w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN), w)[1](dy)[0]


def _rows(x, dy):
  """The padded input as ``[rows + shift, C]`` rows, the cotangent on the same grid ``[rows, O]``, tap offsets."""
  n, h, w, c = x.shape
  hq, wq = h + K - 1, w + K - 1
  rows = n * hq * wq
  xf = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(rows, c)
  xf = jnp.pad(xf, ((0, (K - 1) * wq + K - 1), (0, 0)))  # the last image's shifted windows meet zeros of dy
  dyg = jnp.pad(dy, ((0, 0), (0, K - 1), (0, K - 1), (0, 0))).reshape(rows, dy.shape[-1])
  return xf, dyg, rows, [i * wq + j for i in range(K) for j in range(K)]


def im2col_nn(x, dy):
  xf, dyg, rows, taps = _rows(x, dy)
  xt = xf.T
  cols = jnp.concatenate([lax.slice_in_dim(xt, d, d + rows, axis=1) for d in taps], axis=0)  # [9C, rows]
  return (cols @ dyg).reshape(K, K, x.shape[-1], dy.shape[-1])


def im2col_tn(x, dy):
  xf, dyg, rows, taps = _rows(x, dy)
  cols = jnp.concatenate([lax.slice_in_dim(xf, d, d + rows, axis=0) for d in taps], axis=1)  # [rows, 9C]
  return (dyg.T @ cols).reshape(dy.shape[-1], K, K, x.shape[-1]).transpose(1, 2, 3, 0)


def taps_xt(x, dy):
  xf, dyg, rows, taps = _rows(x, dy)
  xt = xf.T
  return jnp.stack([lax.slice_in_dim(xt, d, d + rows, axis=1) @ dyg for d in taps]).reshape(
      K, K, x.shape[-1], dy.shape[-1])


def taps_dyt(x, dy):
  xf, dyg, rows, taps = _rows(x, dy)
  dyt = dyg.T
  return jnp.stack([dyt @ lax.slice_in_dim(xf, d, d + rows, axis=0) for d in taps]).reshape(
      K, K, dy.shape[-1], x.shape[-1]).transpose(0, 1, 3, 2)


VARIANTS = {"window": window, "im2col NN": im2col_nn, "im2col TN": im2col_tn, "taps xT": taps_xt,
            "taps dyT": taps_dyt}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--calls", type=int, default=5, help="calls per variant per round")
  ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  ap.add_argument("--out", default="", help="also write the medians as JSON here")
  args = ap.parse_args()
  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(0)
  results = []
  print(f"{'layer':>14s} " + " ".join(f"{k:>10s}" for k in [*VARIANTS, "torch", "gemm jax", "gemm torch"]))
  for h, ci, co in LAYERS:
    x_np = rng.standard_normal((BATCH, h, h, ci), np.float32)
    dy_np = rng.standard_normal((BATCH, h, h, co), np.float32)
    x, dy = jnp.asarray(x_np), jnp.asarray(dy_np)
    fns = {k: jax.jit(f) for k, f in VARIANTS.items()}
    ref = np.asarray(fns["window"](x, dy))
    relerr = {k: float(np.abs(np.asarray(f(x, dy)) - ref).max() / np.abs(ref).max()) for k, f in fns.items()}
    xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    dyt = torch.from_numpy(dy_np).permute(0, 3, 1, 2).contiguous()
    rows = BATCH * (h + K - 1) ** 2
    a_np = rng.standard_normal((K * K * ci, rows), np.float32)
    b_np = rng.standard_normal((rows, co), np.float32)
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()

    def jax_runner(f, *ops):
      return lambda n: [jax.block_until_ready(f(*ops)) for _ in range(n)]

    runners = {k: jax_runner(f, x, dy) for k, f in fns.items()}
    runners["torch"] = lambda n: [torch.nn.grad.conv2d_weight(xt, (co, ci, K, K), dyt, 1, 1) for _ in range(n)]
    runners["gemm jax"] = jax_runner(mm, a, b)
    runners["gemm torch"] = lambda n: [torch.matmul(ta, tb) for _ in range(n)]
    for r in runners.values():
      r(1)  # warm-up
    times = interleaved_rounds(runners, rounds=args.rounds, inner=args.calls)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    name = f"{h}x{h} {ci}->{co}"
    print(f"{name:>14s} " + " ".join(f"{ms[k]:10.1f}" for k in runners))
    results.append({"layer": name, "ms": ms, "relerr_vs_window": relerr})
  print("relative differences from window:", {r["layer"]: max(r["relerr_vs_window"].values()) for r in results})
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"command": "python bench/filter_grad_layouts.py " + " ".join(sys.argv[1:]),
                 "env": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
                 "device": machine_info(torch=torch.__version__, torch_threads=torch.get_num_threads()),
                 "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
