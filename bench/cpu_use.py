"""How much of the machine's cores the jitted KD step of ``bench/torch_peer.py`` keeps busy.

    python bench/cpu_use.py [--model resnet8x4] [--mode cached] [--steps 6] [--spans 3]

Builds the same tgeo_jax step as ``bench/torch_peer.py`` (the trainer's loop step around ``KD.train_step``, batch
64, float32), warms it up, then times ``--spans`` spans of ``--steps`` steps: ms per step and the process's CPU
time over wall time (2.0 = both cores of a 2-core machine busy for the whole span). Runs no torch step, but
``bench/torch_peer.py`` imports torch: install the ``test`` extra.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="resnet8x4")
  p.add_argument("--mode", default="cached", choices=("cached", "live"))
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--spans", type=int, default=3)
  args = p.parse_args(argv)
  import torch_peer  # after the path insert: bench/ is not a package
  run = torch_peer.build_jax(args.model, args.mode, args)[0]
  run(3)  # compile and warm up
  for span in range(args.spans):
    wall, cpu = time.perf_counter(), time.process_time()
    run(args.steps)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"span {span + 1}: {wall / args.steps * 1e3:.0f} ms/step, CPU time / wall time {cpu / wall:.2f}")


if __name__ == "__main__":
  main()
