"""How the training loop dispatches the method's steps: one batch per dispatch (the host pipeline) or a chunk of
up to N steps per dispatch (the device-resident pipeline). It knows no method; the trainer asks either for the
next unit of its pipeline's ``epoch``.

Both wrap the method's step in the non-finite guard (``health.make_guarded_step``) and add each step's metrics to
running sums on the device (no per-step host sync), with the state and the sums donated:

* ``BatchSteps``: ``(state, frozen, batch, kind, health, sums)`` per batch; ``kind`` = ``method.step_kind(step)``
  is static (one program per kind).
* ``ChunkSteps``: one program, ``lax.scan`` over a chunk's steps; each step builds its batch on the device
  (``DevicePipeline.make_batch``) and runs its kind through ``lax.switch`` over every kind the run uses, plus a
  skip branch for the chunk's padding past its last step (also for a run of one kind: in a branch the step
  compiles as ``BatchSteps``' does, and the two pipelines train bit-identically on CPU). A chunk ends where the
  loop acts (a log point, a checkpoint, the epoch end, the ``steps_per_run`` budget, a profiled range's ends);
  the program's length stays ``steps_per_dispatch``, which the trainer caps at the shortest of those cadences.
  Per step as before: the guard, the metric sums, the unroll windows and α statistics (they live in the state).

``steps(run, unit) -> number of steps taken`` updates ``run.state``, ``run.health`` and ``run.log``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tgeo_jax import parallel
from tgeo_jax.health import make_guarded_step

__all__ = ["BatchSteps", "ChunkSteps", "MetricZeros", "build_train_step", "run_kinds"]


def build_train_step(method, mesh, *, skip_nonfinite: bool):
  """The loop's jitted step ``(state, frozen, batch, kind, health, running sums) -> (state, health, running sums)``
  (state and sums donated), the zeros of its sums, and the names of the quantities its guard checks."""
  guarded_step, quantity_names = make_guarded_step(method, skip_nonfinite=skip_nonfinite)
  # A jit of its own, nested in the loop step: JAX keeps a jit's trace per argument types, so the method's step is
  # traced once per step kind, for the metric zeros (``MetricZeros``) and the loop step alike (an unrolled
  # hypergradient's trace takes seconds). The nested call is inlined when XLA compiles the loop step.
  guarded_step = jax.jit(guarded_step, static_argnums=(3,))

  def loop_step(state, frozen, batch, kind, health, running):
    # The running metric sums are added inside the step: one jnp.add per metric and step on the host costs
    # ~40 us of dispatch each (bench/host_overhead.py), several times the dispatch of the step itself.
    state, metrics, health = guarded_step(state, frozen, batch, kind, health)
    return state, health, jax.tree.map(jnp.add, running, metrics)

  train_step = jax.jit(loop_step, donate_argnums=(0, 5), static_argnums=(3,))
  return train_step, MetricZeros(guarded_step, mesh), quantity_names


class MetricZeros:
  """Fresh zeros of the step's metrics (the running sums a step adds to after each log point; donated to it).
  The metrics' structure, shapes and dtypes come from the jitted guarded step's trace, once per step kind (no
  compilation; the loop step that nests that jit reuses the trace)."""

  def __init__(self, guarded_step, mesh):
    self.guarded_step, self.mesh, self.shapes = guarded_step, mesh, {}

  def __call__(self, state, frozen, batch, kind, health):
    if kind not in self.shapes:
      self.shapes[kind] = self.guarded_step.eval_shape(state, frozen, batch, kind, health)[1]
    # Replicated like the sums the step returns: zeros placed otherwise are another input signature, and the
    # step would be compiled a second time.
    return parallel.replicate(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), self.shapes[kind]), self.mesh)


class BatchSteps:
  """One host batch, one dispatch: ``train_step`` (``build_train_step``) on the sharded batch."""

  def __init__(self, method, mesh, *, skip_nonfinite: bool):
    self.method, self.mesh = method, mesh
    self.train_step, self.metric_zeros, self.quantity_names = build_train_step(method, mesh,
                                                                               skip_nonfinite=skip_nonfinite)

  def __call__(self, run, batch) -> int:
    batch, kind = parallel.shard_batch(batch, self.mesh), self.method.step_kind(run.step)
    sums = run.log.running if run.log.running is not None else self.metric_zeros(
        run.state, run.frozen, batch, kind, run.health)
    run.state, run.health, running = self.train_step(run.state, run.frozen, batch, kind, run.health, sums)
    run.log.add(running)
    return 1


class ChunkSteps:
  """A device pipeline's ``Chunk`` of up to ``steps_per_dispatch`` steps, one dispatch: a ``lax.scan`` whose step
  gathers its batch on the device and runs the step kind the host chose for it (``kinds``: every kind of the run,
  in a fixed order; a ``lax.switch`` branch each, plus the skip branch of the chunk's padding)."""

  def __init__(self, method, mesh, pipeline, *, kinds, skip_nonfinite: bool):
    self.method, self.mesh, self.pipeline, self.kinds = method, mesh, pipeline, list(kinds)
    guarded_step, self.quantity_names = make_guarded_step(method, skip_nonfinite=skip_nonfinite)
    guarded_step = jax.jit(guarded_step, static_argnums=(3,))
    self._zeros, self._batch_shapes = MetricZeros(guarded_step, mesh), None
    make_batch, kinds = pipeline.make_batch, self.kinds

    def chunk_step(state, frozen, device_data, arrays, health, running):
      def one_step(carry, step_arrays):
        def run_kind(kind):
          def branch(state, health, running):
            batch = make_batch(device_data, step_arrays)  # in the branch: a padding step gathers nothing
            state, metrics, health = guarded_step(state, frozen, batch, kind, health)
            return state, health, jax.tree.map(jnp.add, running, metrics)
          return branch

        # A conditional also for one kind: in its branch the step compiles as the host pipeline's step does, so
        # the two pipelines train bit-identically. Without it (a step computed on every padding step and dropped
        # by a select) the step fused with the loop around it: the states differed in the last bits from the
        # first step on, the demo's digits moved, and the whole run took 10-18% longer (cnn_small CE, 780 steps).
        skip = lambda state, health, running: (state, health, running)  # noqa: E731
        return jax.lax.switch(step_arrays["branch"], [run_kind(k) for k in kinds] + [skip], *carry), None

      carry, _ = jax.lax.scan(one_step, (state, health, running), arrays)
      return carry

    self.chunk_step = jax.jit(chunk_step, donate_argnums=(0, 5))

  def metric_zeros(self, state, frozen, health):
    if self._batch_shapes is None:
      # One step's batch as the chunk step sees it: make_batch's shapes, sharded over the batch axis like the
      # indices it gathers with (another sharding is another trace of the method's step).
      sharding = parallel.batch_sharded(self.mesh)
      shapes = jax.eval_shape(self.pipeline.make_batch, self.pipeline.device_data, self.pipeline.step_shapes())
      self._batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
    return self._zeros(state, frozen, self._batch_shapes, self.kinds[0], health)

  def branches(self, first_step: int, steps: int) -> np.ndarray:
    """``[steps_per_dispatch] int32``: each step's kind (its position in ``kinds``), then the skip branch."""
    out = np.full(self.pipeline.steps_per_dispatch, len(self.kinds), np.int32)
    out[:steps] = [self.kinds.index(self.method.step_kind(s)) for s in range(first_step, first_step + steps)]
    return out

  def __call__(self, run, chunk) -> int:
    assert run.step % run.steps_per_epoch == chunk.first_step, (run.step, chunk.first_step)
    arrays = self.pipeline.chunk_arrays(chunk, branch=self.branches(run.step, chunk.steps))
    sums = run.log.running if run.log.running is not None else self.metric_zeros(run.state, run.frozen, run.health)
    run.state, run.health, running = self.chunk_step(run.state, run.frozen, self.pipeline.device_data, arrays,
                                                     run.health, sums)
    run.log.add(running, steps=chunk.steps)
    return chunk.steps


def run_kinds(method, total_steps: int) -> list:
  """Every ``method.step_kind`` of a run's steps, in order of first use."""
  kinds = []
  for step in range(total_steps):
    kind = method.step_kind(step)
    if kind not in kinds:
      kinds.append(kind)
  return kinds
