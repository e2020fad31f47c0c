"""The generic training loop: init, step, evaluate, log, checkpoint, resume. It knows no method.

Everything method-specific happens behind ``method.init / train_step / predict / teacher_logits``. The loop:
one jitted ``train_step`` over a replicated state and a ``('data',)``-sharded batch; evaluation each epoch over
every test example; a checkpoint at each epoch end (and every ``checkpoint.every_steps``) and on SIGTERM/SIGINT;
automatic, exact resume from the latest checkpoint in ``workdir``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from tgeo_jax import checkpoint as checkpoint_lib
from tgeo_jax import config_checks, data, losses, methods, models, optim, parallel, report
from tgeo_jax import teacher as teacher_lib
from tgeo_jax.errors import UserError

# Fields that must agree between a work directory's checkpoint and the config resuming it.
RESUME_FIELDS = ("method", "model.name", "data.name", "teacher.model", "batch_size", "seed")


class NonFiniteError(RuntimeError):
  """A loss or gradient became NaN/Inf; the run stops before checkpointing it."""


def _get(config_dict: dict, dotted: str):
  node = config_dict
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def build_method(config, task: data.TaskData, steps_per_epoch: int):
  method_cls = methods.get_class(config.method)
  spec = task.spec
  try:
    student_model = models.create(config.model.name, num_classes=spec.num_classes, input_shape=spec.input_shape,
                                  seed=config.seed, **spec.model_kwargs)
  except KeyError as e:
    raise UserError(f"model.name: {e.args[0]}") from None
  tx = optim.make_optimizer(config.optimizer, steps_per_epoch=steps_per_epoch, num_epochs=config.num_epochs)
  teacher = teacher_lib.load_teacher(config, spec) if method_cls.uses_teacher else None
  return method_cls(config, spec, student=models.split(student_model), tx=tx, teacher=teacher, task=task)


def make_eval_step(method):
  """``eval_step(state, batch) -> sums`` over a masked batch: loss, correct, count (+ teacher metrics)."""

  def eval_step(state, batch):
    mask = batch["mask"]
    logits = method.predict(state, batch["inputs"])
    sums = {
        "loss": jnp.sum(losses.cross_entropy(logits, batch["labels"]) * mask),
        "correct": jnp.sum(losses.accuracy(logits, batch["labels"]) * mask),
        "count": jnp.sum(mask),
    }
    teacher_logits = method.teacher_logits(state, batch["inputs"])
    if teacher_logits is not None:
      sums["teacher_correct"] = jnp.sum(losses.accuracy(teacher_logits, batch["labels"]) * mask)
      sums["agreement"] = jnp.sum((jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)) * mask)
      sums["teacher_kl"] = jnp.sum(losses.kl_divergence(logits, teacher_logits, temperature=1.0) * mask)
    return sums

  return eval_step


def evaluate(eval_step, state, source, *, batch_size: int, mesh) -> dict:
  """Test metrics over every example of ``source``; ``eval_step(state, batch) -> sums``."""
  totals = None
  for batch in data.eval_batches(source, batch_size=batch_size, process_index=jax.process_index(),
                                 process_count=jax.process_count()):
    sums = eval_step(state, parallel.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  out = {"accuracy": float(totals.pop("correct")) / count, "loss": float(totals.pop("loss")) / count}
  if "teacher_correct" in totals:
    out["teacher_accuracy"] = float(totals["teacher_correct"]) / count
    out["agreement"] = float(totals["agreement"]) / count
    out["teacher_kl"] = float(totals["teacher_kl"]) / count
  return out


class _StopRequest:
  """SIGTERM/SIGINT: finish the current step, save a checkpoint, exit."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. called from a notebook worker): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config.method`` in ``workdir`` (resuming when it holds a checkpoint); returns the summary."""
  start_time = time.time()
  config_checks.validate(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh()
  parallel.check_batch_size("batch_size", config.batch_size, mesh)
  parallel.check_batch_size("eval_batch_size", config.eval_batch_size, mesh)

  task = data.load(config.data, seed=config.seed)
  steps_per_epoch = data.steps_per_epoch(len(task.train), config.batch_size)
  if steps_per_epoch == 0:
    raise UserError(f"batch_size: {config.batch_size} exceeds the {len(task.train)} training examples")
  total_steps = steps_per_epoch * config.num_epochs
  method = build_method(config, task, steps_per_epoch)
  if method.uses_validation_batch:
    parallel.check_batch_size("val_batch_size", config.val_batch_size, mesh)

  state = parallel.replicate(method.init(jax.random.PRNGKey(config.seed)), mesh)
  frozen = state.pop("frozen")
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep)
  config_dict = json.loads(config.to_json_best_effort())
  meta = {"epoch": 0, "best_accuracy": 0.0, "seconds": 0.0}

  existing = ckpt.steps()
  if existing:
    _check_resume_compatible(ckpt.read_meta(existing[-1]).get("config", {}), config_dict, workdir)
    restored = ckpt.restore_latest(state)
    if restored is None:
      raise UserError(f"workdir: no readable checkpoint among steps {existing} in {workdir!r}")
    step0, state, meta = restored
    _check_resume_compatible(meta.get("config", {}), config_dict, workdir)
    state = parallel.replicate(state, mesh)
    _log(f"Resuming {config.method} in {workdir} from step {step0} of {total_steps} (epoch {meta['epoch']}).")
  else:
    step0 = 0
    _log(f"Training {config.method} ({config.model.name}) in {workdir}: {config.num_epochs} epochs x "
         f"{steps_per_epoch} steps, {len(task.train)} train / {len(task.val)} val / {len(task.test)} test "
         f"examples, {jax.device_count()} device(s).")

  writer = report.MetricWriter(workdir, resume_step=step0 if existing else None, tensorboard=config.log.tensorboard)
  train_step = jax.jit(lambda s, f, b, kind: _split_frozen(method.train_step(dict(s, frozen=f), b, kind)),
                       donate_argnums=(0,), static_argnums=(3,))
  eval_fn = jax.jit(lambda s, f, b: make_eval_step(method)(dict(s, frozen=f), b))
  eval_step = lambda s, b: eval_fn(s, frozen, b)  # noqa: E731
  val_stream = (data.validation_batches(task.val, batch_size=config.val_batch_size, seed=config.seed,
                                        process_index=jax.process_index(), process_count=jax.process_count())
                if method.uses_validation_batch else None)

  def save(step, epoch, finished=False):
    host_meta = dict(meta, epoch=epoch, step=step, total_steps=total_steps, finished=finished,
                     method=config.method, num_classes=task.num_classes, config=config_dict,
                     seconds=meta["seconds"] + time.time() - start_time)
    ckpt.save(step, state, host_meta)

  step = step0
  with _StopRequest() as stop:
    while step < total_steps:
      epoch, offset = divmod(step, steps_per_epoch)
      batches = data.train_batches(task.train, batch_size=config.batch_size, seed=config.seed, epoch=epoch,
                                   augment=task.augment, process_index=jax.process_index(),
                                   process_count=jax.process_count())[offset:]
      bar = tqdm.tqdm(total=steps_per_epoch, initial=offset, desc=f"epoch {epoch + 1}/{config.num_epochs}",
                      disable=not config.log.progress or jax.process_index() != 0, leave=False, dynamic_ncols=True)
      running, num_running = None, 0
      for batch in batches.to_iter_dataset():
        if val_stream is not None:
          batch["val"] = val_stream[step]
        state, metrics = train_step(state, frozen, parallel.shard_batch(batch, mesh), method.step_kind(step))
        running = metrics if running is None else jax.tree.map(jnp.add, running, metrics)
        num_running += 1
        step += 1
        bar.update(1)
        if step % config.log.every_steps == 0 or step % steps_per_epoch == 0:
          # The only host sync in the loop: averaged training metrics every log.every_steps.
          host = {k: float(v) / num_running for k, v in jax.device_get(running).items()}
          _check_finite(host, step)
          bar.set_postfix(loss=f"{host['loss']:.4f}", acc=f"{host.get('accuracy', float('nan')):.3f}")
          last_train = {f"train_{k}": v for k, v in host.items()}
          running, num_running = None, 0
        if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0 and step % steps_per_epoch:
          save(step, epoch)
        if stop.signum is not None:
          save(step, epoch)
          bar.close()
          _log(f"Received signal {stop.signum}: saved a checkpoint at step {step}; run the same command to resume.")
          ckpt.close()
          sys.exit(128 + stop.signum)
        if config.steps_per_run and step - step0 >= config.steps_per_run and step % steps_per_epoch:
          save(step, epoch)
          bar.close()
          _log(f"Stopping after {config.steps_per_run} steps (steps_per_run) at step {step} of {total_steps}; "
               "run the same command to continue.")
          writer.close()
          ckpt.close()
          return {"method": config.method, "finished": False, "num_steps": step}
      bar.close()
      epoch += 1
      results = evaluate(eval_step, state, task.test, batch_size=config.eval_batch_size, mesh=mesh)
      meta["best_accuracy"] = max(meta["best_accuracy"], results["accuracy"])
      if jax.process_index() == 0:
        results.update(method.epoch_report(dict(state, frozen=frozen), workdir, epoch))
      record = dict(step=step, epoch=epoch, **results, **last_train,
                    seconds=meta["seconds"] + time.time() - start_time)
      if jax.process_index() == 0:
        writer.write(record)
      _log(f"epoch {epoch}/{config.num_epochs} step {step}: test accuracy {results['accuracy']:.4f} "
           f"loss {results['loss']:.4f}" + (f" (teacher {results['teacher_accuracy']:.4f}, agreement "
                                           f"{results['agreement']:.4f})" if "teacher_accuracy" in results else ""))
      save(step, epoch, finished=step >= total_steps)
      if config.steps_per_run and step - step0 >= config.steps_per_run and step < total_steps:
        _log(f"Stopping after {step - step0} steps (steps_per_run) at step {step} of {total_steps}; "
             "run the same command to continue.")
        writer.close()
        ckpt.close()
        return {"method": config.method, "finished": False, "num_steps": step}

  if step0 >= total_steps:
    _log(f"{workdir} already finished ({total_steps} steps); re-evaluating the final checkpoint.")
  final = evaluate(eval_step, state, task.test, batch_size=config.eval_batch_size, mesh=mesh)
  seconds = meta["seconds"] + (time.time() - start_time if step0 < total_steps else 0.0)
  summary = {
      "method": config.method,
      "model": config.model.name,
      "accuracy": final["accuracy"],
      "best_accuracy": max(meta["best_accuracy"], final["accuracy"]),
      "loss": final["loss"],
      "num_steps": step,
      "num_epochs": config.num_epochs,
      "seconds": seconds,
      "seed": config.seed,
      "num_devices": jax.device_count(),
      "finished": True,
  }
  for key in ("teacher_accuracy", "agreement", "teacher_kl"):
    if key in final:
      summary[key] = final[key]
  if jax.process_index() == 0:
    report.write_json(os.path.join(workdir, "summary.json"), summary)
  writer.close()
  ckpt.close()
  return summary


def _split_frozen(out):
  state, metrics = out
  state = dict(state)
  state.pop("frozen")
  return state, metrics


def _check_finite(metrics: dict, step: int) -> None:
  for name, value in metrics.items():
    if not math.isfinite(value):
      raise NonFiniteError(f"step {step}: training {name} is {value}; stopping before it is checkpointed "
                           "(lower optimizer.learning_rate or set optimizer.clip_norm)")


def _check_resume_compatible(saved: dict, current: dict, workdir: str) -> None:
  diffs = [f"{k}: {_get(saved, k)!r} -> {_get(current, k)!r}" for k in RESUME_FIELDS
           if _get(saved, k) != _get(current, k)]
  if diffs:
    raise UserError(f"workdir: {workdir!r} holds checkpoints of a different run ({'; '.join(diffs)}); "
                    "use another --workdir (nothing was overwritten)")
