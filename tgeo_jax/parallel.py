"""Data parallelism: one ``('data',)`` mesh over all devices, state replicated, batches sharded on axis 0.

``jax.jit`` over ``NamedSharding``s lets XLA insert the gradient all-reduce (pmap's successor). The batch is
assembled from each process's local slice with ``jax.make_array_from_process_local_data``, so the same code
runs on one CPU, eight GPUs or a multi-host TPU slice.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from tgeo_jax.errors import UserError

DATA_AXIS = "data"


def initialize_distributed(enabled: bool) -> None:
  """Multi-host set-up (one call per process, before any other JAX call); no-op when disabled."""
  if enabled:
    jax.distributed.initialize()


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
  """Puts a host/device pytree on every device (the state)."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(local_batch, mesh):
  """Global arrays from this process's slice of a batch; leading axis sharded over ``'data'``."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
