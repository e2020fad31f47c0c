"""Whether XLA:CPU spreads a filter-gradient convolution over the cores, and what splitting the batch does.

    python bench/filter_grad_threads.py [--rounds 5] [--calls 5]

For the 3x3 stride-1 layers of resnet8x4's three stages (batch 64: 32x32x64, 16x16x128, 8x8x256), the jitted
filter gradient ``dL/dw`` of the model zoo's convolution (``tgeo_jax.models.conv.conv_general_dilated``, NHWC/HWIO;
its filter gradient is lowered as XLA:CPU's canonical-layout convolution), against the same
gradient summed over 2 and over 4 equal slices of the batch. Prints the median over ``--rounds`` rounds (the
variants interleaved) of ms per call and of the process's CPU time over wall time (2.0 = both cores of a 2-core
machine busy), and the largest relative difference of the 2-slice sum from the one-convolution result.
"""

from __future__ import annotations

import argparse
import statistics
import time

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.machine import interleaved_rounds
from tgeo_jax.models import conv as canonical

LAYERS = ((32, 64, 64), (16, 128, 128), (8, 256, 256))  # (height = width, input channels, output channels)


def conv(x, w):
  return canonical.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def filter_grad(x, dy, w):
  """``[3, 3, I, O]``: the cotangent ``dy`` pulled back to the kernel."""
  return jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]


def filter_grad_sliced(x, dy, w, slices):
  """The same, as the sum of ``slices`` filter gradients over equal slices of the batch."""
  n = x.shape[0] // slices
  return sum(filter_grad(x[i * n:(i + 1) * n], dy[i * n:(i + 1) * n], w) for i in range(slices))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--calls", type=int, default=5, help="consecutive calls per variant and round")
  p.add_argument("--batch", type=int, default=64)
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  variants = {"one": jax.jit(filter_grad),
              "2 slices": jax.jit(lambda x, dy, w: filter_grad_sliced(x, dy, w, 2)),
              "4 slices": jax.jit(lambda x, dy, w: filter_grad_sliced(x, dy, w, 4))}
  print(f"{'layer':>14}  " + "  ".join(f"{name:>20}" for name in variants) + "  (ms per call, CPU/wall)")
  for hw, ci, co in LAYERS:
    x = jnp.asarray(rng.normal(size=(args.batch, hw, hw, ci)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(args.batch, hw, hw, co)), jnp.float32)
    w = jnp.zeros((3, 3, ci, co), jnp.float32)
    for f in variants.values():
      f(x, dy, w).block_until_ready()
    cpu = {name: [] for name in variants}  # process CPU seconds per call, one per round

    def runner(name, x=x, dy=dy, w=w):
      def run(calls):
        start = time.process_time()
        for _ in range(calls):
          out = variants[name](x, dy, w)
        out.block_until_ready()
        cpu[name].append((time.process_time() - start) / calls)
      return run

    wall = interleaved_rounds({name: runner(name) for name in variants}, rounds=args.rounds, inner=args.calls)
    ref = np.asarray(variants["one"](x, dy, w))
    diff = float(np.abs(np.asarray(variants["2 slices"](x, dy, w)) - ref).max() / np.abs(ref).max())
    cells = [f"{statistics.median(wall[k]) * 1e3:8.1f} ms "
             f"{statistics.median(c / t for c, t in zip(cpu[k], wall[k])):5.2f}" for k in variants]
    print(f"{hw:>3}x{hw:<3} {ci:>3}->{co:<3}  " + "  ".join(f"{c:>20}" for c in cells) +
          f"  (2 slices: max rel. diff {diff:.1e})")


if __name__ == "__main__":
  main()
