"""The device-resident pipeline: for a task whose training split fits on the device(s), the stored examples live
there, and each step's batch is gathered, augmented and normalised inside the jitted step, several steps per
dispatch.

What stays on the host is per step a few integers: the example indices of the epoch's order, the augmentation's
random draws (from the same ``(seed, epoch, step)`` generator, drawing the same numbers as the host pipeline) and
the validation indices of meta steps. The batches are those of ``data.Pipeline`` bit for bit
(``tests/test_device_pipeline.py``): the normalisation of stored uint8 pixels is a lookup in a table of
``to_model``'s own outputs for the 256 values, and the crop and flip are index arithmetic on the normalised
images, padded with the host augmentation's own fill value.

Interface (the trainer's, shared with ``data.Pipeline``): ``steps_per_epoch``, ``prepare(e)``, ``epoch(e, offset)``
(here an iterator of ``Chunk``s of up to ``steps_per_dispatch`` steps, each ending at or before the epoch's end),
``evaluation(part)`` (the host pipeline's padded batches: once per epoch, not per step); and for the step:
``device_data`` (the arrays on the device) and ``make_batch(device_data, step_arrays)`` (pure, jittable: one
step's batch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tgeo_jax import parallel
from tgeo_jax.data import augment as augment_lib
from tgeo_jax.data import pipeline as host_pipeline
from tgeo_jax.data import sources
from tgeo_jax.errors import UserError

__all__ = ["Chunk", "DevicePipeline", "unsupported_reason", "device_bytes", "fits_on_device"]

# ``fits_on_device`` for a device that does not report its memory (CPU: the host's memory, where the split is
# already held once as numpy).
UNREPORTED_DEVICE_BUDGET = 4 << 30


@dataclasses.dataclass
class Chunk:
  """``steps`` consecutive training steps from ``first_step`` (within one epoch), as host arrays with a leading
  ``[steps_per_dispatch]`` axis (zero-padded past ``steps``): ``index [N, B] int32`` (training positions), with an
  augmentation ``dy, dx [N, B] int32`` and ``flip [N, B] bool`` (its draws), with a validation stream
  ``val_index [N, Bv] int32``."""

  first_step: int
  steps: int
  arrays: dict


def _pixel_table(source) -> np.ndarray | None:
  """``[256, C] float32``: ``to_model``'s output for each uint8 value and channel, when ``to_model`` is exactly that
  lookup on ``source`` (checked on a sample of its examples); None otherwise."""
  raw = source.inputs
  probe = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape((256,) + (1,) * (raw.ndim - 1)),
                          (256, *raw.shape[1:]))
  out = np.asarray(source.to_model(np.ascontiguousarray(probe)))
  if out.dtype != np.float32 or out.ndim not in (raw.ndim, raw.ndim + 1):
    return None
  if out.ndim == raw.ndim + 1 and out.shape[-1] != 1:
    return None
  channels = out.shape[-1]
  flat = out.reshape(256, -1, channels)
  table = flat[:, 0, :]
  if not np.array_equal(flat, np.broadcast_to(table[:, None, :], flat.shape)):
    return None  # depends on the position, not only the value and channel
  sample = raw[:min(len(raw), 64)]
  if not np.array_equal(_lookup(table, sample, out.ndim), np.asarray(source.to_model(sample))):
    return None
  return np.ascontiguousarray(table)


def _lookup(table, raw, out_ndim: int):
  """``table [256, C]`` looked up per pixel of ``raw [N, ...] uint8`` (a channel axis added when the model inputs
  have one more dimension); numpy or JAX arrays alike (the check on the host, the step on the device)."""
  x = raw.astype(np.int32)
  if out_ndim == raw.ndim + 1:
    x = x[..., None]
  return table[x, np.arange(table.shape[1])]


def unsupported_reason(task, *, process_count: int = 1) -> str | None:
  """Why ``task``'s batches cannot be built on the device (None: they can).

  They can in one process, when the training and validation parts are in memory (``ArraySource``) as one array
  each, stored and normalised alike, the inputs either used as stored or uint8 pixels normalised pixel-wise
  (``to_model`` a per-value, per-channel table), and the augmentation none or a crop/flip the device applies
  exactly (``augment.device_form``) to images ``[N, H, W, C]`` whose channel count its padding matches.
  """
  if process_count != 1:
    return f"{process_count} processes (the device-resident pipeline runs in one process)"
  for name, part in (("training", task.train), ("validation", task.val)):
    if not isinstance(part, sources.ArraySource):
      return f"the {name} part is not an in-memory array ({type(part).__name__})"
    if not isinstance(part.inputs, np.ndarray):
      return f"the {name} part's inputs are a {type(part.inputs).__name__} of arrays, not one array"
  source, val = task.train, task.val
  if (val.inputs.dtype, val.inputs.shape[1:], val.pixelwise) != (source.inputs.dtype, source.inputs.shape[1:],
                                                                 source.pixelwise):
    return "its validation part is stored unlike its training part"
  if source.to_model is not None:
    if not (source.pixelwise and source.inputs.dtype == np.uint8):
      return "its inputs are transformed per example (to_model on non-uint8 or non-pixel-wise inputs)"
    table = _pixel_table(source)
    if table is None:
      return "its to_model is not a per-value, per-channel table"
    if val.to_model is None or not np.array_equal(_lookup(table, val.inputs[:64], _model_ndim(source)),
                                                  np.asarray(val.to_model(val.inputs[:64]))):
      return "its validation part is normalised unlike its training part"
  elif val.to_model is not None:
    return "its validation part is normalised unlike its training part"
  if task.augment is not None:
    name = getattr(task.augment, "__name__", task.augment)
    if augment_lib.device_form(task.augment) is None:
      return f"its augmentation {name!r} runs on the host only"
    if _model_ndim(source) < 4:
      return f"its augmentation {name!r} needs images [N, H, W, C]; its inputs have {_model_ndim(source)} dimensions"
    fill, channels = augment_lib.device_form(task.augment)[2], _model_shape(source)[-1]
    if fill is not None and np.size(fill) not in (1, channels):
      return f"its augmentation {name!r} pads with {np.size(fill)} channels; its images have {channels}"
  return None


def _model_shape(source) -> tuple:
  """The shape of one of ``source``'s model inputs."""
  one = source.inputs[:1] if source.to_model is None else np.asarray(source.to_model(source.inputs[:1]))
  return tuple(one.shape[1:])


def _model_ndim(source) -> int:
  """The number of dimensions of ``source``'s model inputs (``[N, ...]``)."""
  return 1 + len(_model_shape(source))


def device_bytes(task, *, with_validation: bool = True) -> int:
  """Bytes the device pipeline places on each device for ``task``: the training inputs and labels, and the
  validation part's with a validation stream."""
  parts = (task.train, task.val) if with_validation else (task.train,)
  return sum(part.inputs.nbytes + part.labels.nbytes for part in parts)


def fits_on_device(task, *, with_validation: bool = True) -> bool:
  """Whether ``task``'s stored examples take at most a quarter of a local device's memory; for devices that do
  not report it (CPU devices, which share the host's memory), whether their copies together take at most
  ``UNREPORTED_DEVICE_BUDGET``. ``device_pipeline.mode=auto`` asks."""
  devices = jax.local_devices()
  try:
    stats = devices[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 - a backend without memory statistics
    stats = {}
  size = device_bytes(task, with_validation=with_validation)
  if "bytes_limit" in stats:
    return size <= stats["bytes_limit"] // 4
  return size * len(devices) <= UNREPORTED_DEVICE_BUDGET


class DevicePipeline:
  """One run's batches built on the device(s): the host ``Pipeline``'s batches, gathered inside the step.

  ``device_data`` (replicated on ``mesh``): ``train [N, ...]`` stored inputs, ``labels [N] int32``, ``table [256, C]
  float32`` (the normalisation, when there is one), and ``val``, ``val_labels`` for a validation stream.
  ``epoch(e, offset)`` yields ``Chunk``s; ``chunk_arrays(chunk)`` puts one on the device (indices sharded over the
  batch axis), and ``make_batch(device_data, step_arrays)`` builds, inside the jitted step, the batch of one step
  (the slice ``[i]`` of those arrays) exactly as ``Pipeline.epoch`` would have yielded it.

  Example::

    pipeline = DevicePipeline(task, batch_size=128, seed=0, steps_per_dispatch=8, mesh=mesh)
    for chunk in pipeline.epoch(0):
      arrays = pipeline.chunk_arrays(chunk)
      ...  # a jitted lax.scan over arrays' leading axis calling pipeline.make_batch(pipeline.device_data, a_i)
  """

  def __init__(self, task, *, batch_size: int, seed: int, mesh, steps_per_dispatch: int,
               val_batch_size: int | None = None, eval_batch_size: int | None = None):
    reason = unsupported_reason(task, process_count=jax.process_count())
    if reason is not None:
      raise UserError(f"device_pipeline.mode: the {task.name} task cannot be held on the device: {reason} (set "
                      "device_pipeline.mode=off or auto)")
    if isinstance(steps_per_dispatch, bool) or not isinstance(steps_per_dispatch, int) or steps_per_dispatch < 1:
      raise UserError(f"device_pipeline.steps_per_dispatch: expected an integer >= 1, got {steps_per_dispatch!r}")
    self.task, self.batch_size, self.seed, self.mesh = task, batch_size, seed, mesh
    self.steps_per_dispatch, self.val_batch_size = steps_per_dispatch, val_batch_size
    self.host = host_pipeline.Pipeline(task, batch_size=batch_size, seed=seed, eval_batch_size=eval_batch_size,
                                       devices=mesh.size)
    self.steps_per_epoch = self.host.steps_per_epoch
    source = task.train
    self.table = _pixel_table(source) if source.to_model is not None else None
    self.padding, self.draws, self.fill = (augment_lib.device_form(task.augment) if task.augment is not None
                                           else (0, None, None))
    self.model_ndim = _model_ndim(source)
    if val_batch_size is not None and val_batch_size > len(task.val):
      raise UserError(f"validation batch size {val_batch_size} exceeds the {len(task.val)} held-out validation "
                      "examples (raise data.val_fraction or lower the validation batch size)")
    arrays = {"train": source.inputs, "labels": source.labels}
    if self.table is not None:
      arrays["table"] = self.table
    if val_batch_size is not None:
      arrays.update(val=task.val.inputs, val_labels=task.val.labels)
    self._replicated = parallel.replicated(mesh)
    self.device_data = jax.device_put(arrays, self._replicated)
    # [steps, batch] arrays: the batch axis sharded like a batch's leading axis.
    self._batch_axis = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))

  # ---- the host side: a few integers per step
  def prepare(self, epoch: int) -> None:
    self.host.prepare(epoch)

  def evaluation(self, part):
    return self.host.evaluation(part)

  def step_draws(self, epoch: int, step: int) -> dict:
    """Step ``step`` of epoch ``epoch``'s index and augmentation draws (host numpy), as ``Pipeline`` makes them."""
    epoch_seed = host_pipeline.epoch_shuffle_seed(self.seed, epoch)
    n, b = len(self.task.train), self.batch_size
    order = host_pipeline.epoch_order(n, epoch_seed, self.steps_per_epoch * b)
    out = {"index": order[step * b:(step + 1) * b].astype(np.int32)}
    if self.draws is not None:
      dy, dx, flipped = self.draws(np.random.default_rng([epoch_seed, step]), b)
      out.update(dy=dy.astype(np.int32), dx=dx.astype(np.int32), flip=flipped)
    if self.val_batch_size is not None:
      global_step = epoch * self.steps_per_epoch + step
      out["val_index"] = host_pipeline.validation_indices(len(self.task.val), batch_size=self.val_batch_size,
                                                          seed=self.seed, step=global_step).astype(np.int32)
    return out

  def epoch(self, epoch: int, offset: int = 0, *, until=None):
    """Epoch ``epoch``'s steps from ``offset`` on, in ``Chunk``s of at most ``steps_per_dispatch`` steps.

    ``until(step) -> int``: the epoch step a chunk starting at ``step`` must end at or before (the loop's next
    log point, checkpoint or stop), so the loop regains control exactly where it would step by step."""
    n = self.steps_per_dispatch
    first = offset
    while first < self.steps_per_epoch:
      end = min(first + n, self.steps_per_epoch, until(first) if until is not None else self.steps_per_epoch)
      steps = max(1, end - first)
      per_step = [self.step_draws(epoch, s) for s in range(first, first + steps)]
      arrays = {k: np.stack([d[k] for d in per_step] + [np.zeros_like(per_step[0][k])] * (n - steps))
                for k in per_step[0]}
      yield Chunk(first_step=first, steps=steps, arrays=arrays)
      first += steps

  def chunk_arrays(self, chunk: Chunk, **extra) -> dict:
    """``chunk``'s arrays and ``extra`` ones (``[N]``, e.g. the step kinds) on the device, in one transfer:
    per-example ones ``[N, B]`` sharded over the batch axis, the others replicated."""
    arrays = dict(chunk.arrays, **extra)
    return jax.device_put(arrays, {k: self._batch_axis if v.ndim == 2 else self._replicated
                                   for k, v in arrays.items()})

  def step_shapes(self) -> dict:
    """The shapes and dtypes of one step's slice of ``chunk_arrays`` (what ``make_batch`` takes)."""
    b = self.batch_size
    shapes = {"index": ((b,), np.int32)}
    if self.draws is not None:
      shapes.update(dy=((b,), np.int32), dx=((b,), np.int32), flip=((b,), np.bool_))
    if self.val_batch_size is not None:
      shapes["val_index"] = ((self.val_batch_size,), np.int32)
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}

  # ---- the device side: inside the jitted step
  def make_batch(self, device_data: dict, step: dict) -> dict:
    """One step's batch from the device's stored examples and that step's arrays (``chunk_arrays(...)[k][i]``):
    ``{"inputs": [B, ...], "labels": [B] int32, "index": [B] int32}`` plus ``"val"`` with a validation stream."""
    index = step["index"]
    inputs = self._to_model(device_data, device_data["train"][index])
    if self.draws is not None:
      inputs = _crop_flip(inputs, step["dy"], step["dx"], step["flip"], self.padding, self.fill)
    batch = {"inputs": inputs, "labels": device_data["labels"][index], "index": index}
    if self.val_batch_size is not None:
      val_index = step["val_index"]
      batch["val"] = {"inputs": self._to_model(device_data, device_data["val"][val_index]),
                      "labels": device_data["val_labels"][val_index]}
    return batch

  def _to_model(self, device_data, raw):
    return raw if self.table is None else _lookup(device_data["table"], raw, self.model_ndim)


def _crop_flip(x, dy, dx, flip, padding: int, fill):
  """``augment.crop_flip`` (or ``flip``: ``padding`` 0) on the device: each example's ``[H, W]`` window at
  ``(dy, dx)`` of its image padded with ``fill`` (per channel), mirrored where ``flip``; ``x [B, H, W, ...]``,
  ``dy, dx, flip [B]``. Index arithmetic only: the same values as the host's, bit for bit."""
  b, h, w = x.shape[:3]
  if padding:
    padded = jnp.broadcast_to(jnp.asarray(fill, x.dtype), (b, h + 2 * padding, w + 2 * padding, *x.shape[3:]))
    x = padded.at[:, padding:padding + h, padding:padding + w].set(x)
  rows = dy[:, None] + jnp.arange(h)[None, :]  # [B, H]
  cols = dx[:, None] + jnp.where(flip[:, None], w - 1 - jnp.arange(w)[None, :], jnp.arange(w)[None, :])  # [B, W]
  return x[jnp.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
