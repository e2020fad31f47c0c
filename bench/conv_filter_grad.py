"""Filter gradient of one conv layer per resnet8x4 shape, batch 64: XLA's window convolution (``jax.vjp`` of
``lax.conv_general_dilated``) vs ``filter_grad_matmuls.filter_grad`` (k*k matrix products, a measured prototype
that the models do not use: docs/benchmarks.md) vs ``torch.nn.grad.conv2d_weight``.

    OMP_WAIT_POLICY=PASSIVE python bench/conv_filter_grad.py

Medians of 7 interleaved rounds (ms); relerr = max |new - xla| / max |xla| in float32.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tgeo_jax
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/

import jax
import jax.numpy as jnp
import numpy as np
import torch
from filter_grad_matmuls import filter_grad
from jax import lax

DN = ("NHWC", "HWIO", "NHWC")
# (H, W, C_in, C_out, kernel, stride): resnet8x4's layer shapes
CASES = [(32, 32, 3, 32, 3, 1), (32, 32, 32, 64, 3, 1), (32, 32, 64, 64, 3, 1), (32, 32, 64, 128, 3, 2),
         (32, 32, 64, 128, 1, 2), (16, 16, 128, 128, 3, 1), (16, 16, 128, 256, 3, 2), (8, 8, 256, 256, 3, 1)]


def fg_xla(x, dy, ws, s, p):
  _, vjp = jax.vjp(lambda w: lax.conv_general_dilated(x, w, (s, s), p, dimension_numbers=DN), jnp.zeros(ws, x.dtype))
  return vjp(dy)[0]


def fg_new(x, dy, ws, s, p):
  return filter_grad(x, dy, ws[:2], (s, s), p)


def main():
  torch.set_num_threads(2)
  rng = np.random.default_rng(0)
  total = {}
  for h, w, ci, co, k, s in CASES:
    n, p = 64, ((k // 2, k // 2),) * 2
    x = jnp.asarray(rng.standard_normal((n, h, w, ci), np.float32))
    ws, ho = (k, k, ci, co), (h + 2 * (k // 2) - k) // s + 1
    dy = jnp.asarray(rng.standard_normal((n, ho, ho, co), np.float32))
    fx, fn = jax.jit(fg_xla, static_argnums=(2, 3, 4)), jax.jit(fg_new, static_argnums=(2, 3, 4))
    ref, new = fx(x, dy, ws, s, p), fn(x, dy, ws, s, p)
    err = float(jnp.max(jnp.abs(ref - new)) / jnp.max(jnp.abs(ref)))
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    tdy = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy())
    runs = {"xla": lambda: jax.block_until_ready(fx(x, dy, ws, s, p)),
            "new": lambda: jax.block_until_ready(fn(x, dy, ws, s, p)),
            "torch": lambda: torch.nn.grad.conv2d_weight(tx, (co, ci, k, k), tdy, stride=s, padding=k // 2)}
    for f in runs.values():
      f()
    times = {name: [] for name in runs}
    for _ in range(7):
      for name, f in runs.items():
        t0 = time.perf_counter()
        f()
        times[name].append(time.perf_counter() - t0)
    med = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    for name, v in med.items():
      total[name] = total.get(name, 0) + v
    print((h, w, ci, co, k, s), f"relerr={err:.1e}", " ".join(f"{name}={v:.1f}" for name, v in med.items()),
          f"new/xla={med['new'] / med['xla']:.2f} new/torch={med['new'] / med['torch']:.2f}", flush=True)
  print("total", {name: round(v, 1) for name, v in total.items()})


if __name__ == "__main__":
  main()
