"""What every benchmark records about the machine it ran on (one definition for bench/*.py)."""

from __future__ import annotations

import datetime
import os
import platform


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
