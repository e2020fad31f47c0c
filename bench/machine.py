"""What every benchmark records about the machine it ran on (one definition for bench/*.py)."""

from __future__ import annotations

import datetime
import os
import platform
import time


def machine_info(**extra) -> dict:
  """Date, JAX device, versions, CPU count/affinity and load average at the start; ``extra`` entries appended."""
  import jax
  import jaxlib
  d = jax.devices()[0]
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = None
  return dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), platform=d.platform,
              device_kind=d.device_kind, device_count=jax.device_count(), jax=jax.__version__,
              jaxlib=jaxlib.__version__, cpu_count=os.cpu_count(), cpu_affinity=affinity,
              python=platform.python_version(), machine=platform.machine(), processor=platform.processor() or None,
              loadavg_start=os.getloadavg() if hasattr(os, "getloadavg") else None, **extra)


def interleaved_rounds(runners: dict, *, rounds: int, inner: int, on_round=None) -> dict:
  """Times every ``runners[name](n)`` (which runs ``n`` steps) in ``rounds`` rounds, each calling every runner once
  for ``inner`` steps, the order rotated by one each round, so background load hits all alike; returns
  ``{name: [seconds per step, one per round]}``. ``on_round(r, times)`` is called after each round."""
  times = {k: [] for k in runners}
  order = list(runners)
  for r in range(rounds):
    shift = r % len(order)
    for k in order[shift:] + order[:shift]:
      t0 = time.perf_counter()
      runners[k](inner)
      times[k].append((time.perf_counter() - t0) / inner)
    if on_round is not None:
      on_round(r, times)
  return times
