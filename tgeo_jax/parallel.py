"""Data parallelism: one ``('data',)`` mesh over all devices, state replicated, batches sharded on axis 0.

``jax.jit`` over ``NamedSharding``s lets XLA insert the gradient all-reduce (pmap's successor). The batch is
assembled from each process's local slice with ``jax.make_array_from_process_local_data``, so the same code
runs on one CPU, eight GPUs or a multi-host TPU slice.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from tgeo_jax.errors import UserError

__all__ = ["DATA_AXIS", "is_peer_failure", "stop_after_peer_failure", "initialize_distributed", "make_mesh",
           "replicated", "batch_sharded", "check_batch_size", "replicate", "shard_batch"]

DATA_AXIS = "data"


# What JAX says when another process is gone: a collective or transfer over Gloo that lost its peer, or the
# coordination service's report of a dead task (not every UNAVAILABLE: storage can say that too).
_PEER_FAILURE_WORDS = ("Gloo", "Connection closed by peer", "Connection reset by peer", "heartbeat timeout",
                       "stopped sending heartbeats", "CoordinationService")


def is_peer_failure(e: BaseException) -> bool:
  """Whether ``e``, in a multi-process run, is a collective or transfer failing because another process is gone
  (JAX raises a ``JaxRuntimeError`` from a step, a ``ValueError`` from a host-to-device transfer; the trainer may
  have wrapped it in a ``RunFault`` of a checkpoint save)."""
  if jax.process_count() <= 1:
    return False
  text = str(e)
  return any(word in text for word in _PEER_FAILURE_WORDS)


def stop_after_peer_failure(reason: str) -> None:
  """Ends this process at once with one line (exit 1) after another process of a multi-host run stopped.

  ``os._exit``: a normal exit would wait at the distributed service's shutdown barrier for the dead process and
  then abort with a C++ stack trace. The checkpoints are atomic, so nothing is lost.
  """
  import re
  import sys
  text = " ".join(reason.split())
  task = re.search(r"[Tt]ask (\d+)", text)
  who = f"process {task.group(1)}" if task else "another process"
  text = re.sub(r"((?:[^:]{3,80}): )\1+", r"\1", text)  # XLA nests "Error dispatching computation: " per level
  # From the words that say what failed (e.g. "Gloo AllGather failed: ... Connection closed by peer"), not the
  # wrappers around them (a checkpoint save's path).
  starts = [i for i in (text.find(word) for word in _PEER_FAILURE_WORDS) if i >= 0]
  detail = re.sub(r"\s*\[type\.googleapis.*", "", text[min(starts) if starts else 0:])[:160].rstrip(" )")
  line = (f"error: distributed: {who} of {jax.process_count()} stopped or lost contact ({detail}); process "
          f"{jax.process_index()} stops too, nothing was lost: run the same command on every process to resume\n")
  sys.stdout.flush()
  sys.stderr.flush()
  # One write(2), atomic on a pipe (the line is under PIPE_BUF): print() writes the text and its newline separately
  # when PYTHONUNBUFFERED=1 (containers often set it; pytest-xdist does), and a line JAX's C++ runtime logged in
  # between ("...resumeE1207 ...") hid this line from train.py's supervising parent, which then let JAX's lines out.
  data = line.encode()
  while data:
    data = data[os.write(2, data):]
  os._exit(1)


def initialize_distributed(enabled: bool, *, init_timeout: int = 300, heartbeat_timeout: int = 100) -> None:
  """Multi-host set-up (one call per process, before any other JAX call); no-op when disabled.

  On Cloud TPU, SLURM and Open MPI, ``jax.distributed.initialize()`` finds the coordinator, the process count and
  this process's index itself. Anywhere else (processes started by hand, several processes on one machine) give
  them in every process's environment: ``JAX_COORDINATOR_ADDRESS=host:port`` (read by JAX itself; process 0's
  host), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. A failed set-up is a one-line ``UserError``.

  ``init_timeout``: seconds to wait for every process at start-up (then one line, exit 2); ``heartbeat_timeout``:
  seconds without a heartbeat after which a process counts as dead. When a process dies, the others fail at their
  next collective (a lost connection) and stop there with one line and exit status 1 (``stop_after_peer_failure``,
  in ``cli.run``). When the coordinator (process 0) dies, or peers never start, JAX's C++ client aborts the process
  itself (no Python hook in jaxlib 0.10): ``train.py`` runs multi-host training under ``tgeo_jax.supervise``, which
  turns that abort into one line, exit 1.
  """
  if not enabled:
    return
  kwargs = {"initialization_timeout": int(init_timeout), "heartbeat_timeout_seconds": int(heartbeat_timeout)}
  for name, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if os.environ.get(name):
      try:
        kwargs[arg] = int(os.environ[name])
      except ValueError:
        raise UserError(f"distributed: environment variable {name} must be an integer, got "
                        f"{os.environ[name]!r}") from None
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError, RuntimeError) as e:
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UserError(f"distributed: jax.distributed.initialize() failed ({first_line}); outside TPU/SLURM/Open "
                    "MPI set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID in every "
                    "process") from None


def make_mesh() -> jax.sharding.Mesh:
  # Auto axis types: XLA propagates shardings; Explicit (make_mesh's default) would demand explicit
  # out-shardings for every reduction over the batch axis.
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(name: str, batch_size: int, mesh) -> None:
  n = mesh.devices.size
  if batch_size <= 0 or batch_size % n:
    raise UserError(f"{name}: {batch_size} must be a positive multiple of the device count ({n})")
  if batch_size % jax.process_count():
    raise UserError(f"{name}: {batch_size} must divide by the process count ({jax.process_count()})")


def replicate(tree, mesh):
  """Puts a host/device pytree on every device (the state); every process must pass the same values."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: _replicate_across_processes(x, sharding), tree)


def _replicate_across_processes(x, sharding):
  # A committed array on one local device (e.g. a teacher restored from its checkpoint) cannot be device_put
  # onto the other processes' devices: JAX's CPU and GPU backends have no cross-host device transfer. From host
  # data instead, each process fills its own devices with its (identical) copy.
  if not isinstance(x, jax.Array) or not x.is_fully_addressable:
    return jax.device_put(x, sharding)  # host data, or already a global array
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return jax.device_put(np.asarray(x), sharding)


def shard_batch(local_batch, mesh):
  """Global arrays from this process's slice of a batch; leading axis sharded over ``'data'``."""
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    # The local batch is the global one: one device_put of the whole tree batches the transfers (about half the
    # host time of one make_array_from_process_local_data per leaf on CPU, bench/host_overhead.py).
    return jax.device_put(local_batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
