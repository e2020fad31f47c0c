"""The generic training loop: init, step, evaluate, log, checkpoint, resume. It knows no method.

Everything method-specific happens behind ``method.init / train_step / predict / teacher_logits``. The loop:
one jitted ``train_step`` over a replicated state and a ``('data',)``-sharded batch; evaluation each epoch over
every test example; a checkpoint at each epoch end (and every ``checkpoint.every_steps``) and on SIGTERM/SIGINT;
automatic, exact resume from the newest good checkpoint in ``workdir``.

Non-finite values: the jitted step also checks its metrics (loss, gradient norm, ...) and the new state for
NaN/Inf and keeps an on-device record of the first bad step, read on the host only where the loop syncs anyway
(log points) and before every checkpoint save, so a non-finite state is never saved. ``nonfinite='stop'`` ends the
run naming that step and quantity; ``'skip'`` keeps the previous state for such a step and counts it.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from tgeo_jax import checkpoint as checkpoint_lib
from tgeo_jax import config_checks, data, losses, methods, models, optim, parallel, report, run_identity
from tgeo_jax import teacher as teacher_lib
from tgeo_jax.errors import UserError

class NonFiniteError(RuntimeError):
  """A loss, gradient or state became NaN/Inf; the run stops before checkpointing it."""


class RunFault(RuntimeError):
  """A runtime fault outside the user's input (a full or failing disk): one line, exit status 1."""


def build_method(config, task: data.TaskData, steps_per_epoch: int):
  method_cls = methods.get_class(config.method)
  spec = task.spec
  try:
    student_model = models.create(config.model.name, num_classes=spec.num_classes, input_shape=spec.input_shape,
                                  seed=config.seed, dtype=models.compute_dtype(config), **spec.model_kwargs)
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
    teacher_logits = batch.get("teacher_logits")  # precomputed by FixedTeacherLogits for a frozen teacher
    if teacher_logits is None:
      teacher_logits = method.teacher_logits(state, batch["inputs"])
    if teacher_logits is not None:
      sums["teacher_correct"] = jnp.sum(losses.accuracy(teacher_logits, batch["labels"]) * mask)
      sums["agreement"] = jnp.sum((jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)) * mask)
      sums["teacher_kl"] = jnp.sum(losses.kl_divergence(logits, teacher_logits, temperature=1.0) * mask)
    if logits.shape[-1] == 2:
      # Binary tasks (CTR): per-example positive-class probabilities; evaluate() turns them into AUC / log-loss.
      sums["per_example"] = {"positive_prob": jax.nn.softmax(logits.astype(jnp.float32), -1)[:, 1],
                             "labels": batch["labels"], "mask": mask}
    return sums

  return eval_step


class FixedTeacherLogits:
  """A frozen teacher's logits on the evaluation batches, computed at the first evaluation and reused after:
  they cannot change, and recomputing them cost a teacher forward over the whole test set every epoch."""

  def __init__(self, method, frozen):
    self._fn = jax.jit(lambda f, x: method.teacher_logits({"frozen": f}, x))
    self._frozen = frozen
    self._cache = []

  def __call__(self, index: int, inputs):
    if index == len(self._cache):
      self._cache.append(self._fn(self._frozen, inputs))
    return self._cache[index]


def evaluate(eval_step, state, source, *, batch_size: int, mesh, teacher_logits=None) -> dict:
  """Test metrics over every example of ``source``; ``eval_step(state, batch) -> sums``.

  ``teacher_logits(i, inputs)`` (a ``FixedTeacherLogits``), when given, supplies batch ``i``'s teacher logits.
  """
  # A batch larger than the part would only pad it: clamp to the part's size rounded up to the device count.
  batch_size = min(batch_size, -(-len(source) // mesh.size) * mesh.size)
  totals, per_example = None, []
  for i, batch in enumerate(data.eval_batches(source, batch_size=batch_size, process_index=jax.process_index(),
                                              process_count=jax.process_count())):
    batch = parallel.shard_batch(batch, mesh)
    if teacher_logits is not None:
      batch["teacher_logits"] = teacher_logits(i, batch["inputs"])
    sums = dict(eval_step(state, batch))
    if "per_example" in sums:  # concatenated, not summed
      per_example.append(sums.pop("per_example"))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  out = {"accuracy": float(totals.pop("correct")) / count, "loss": float(totals.pop("loss")) / count}
  if "teacher_correct" in totals:
    out["teacher_accuracy"] = float(totals["teacher_correct"]) / count
    out["agreement"] = float(totals["agreement"]) / count
    out["teacher_kl"] = float(totals["teacher_kl"]) / count
  if per_example:
    from jax.experimental import multihost_utils
    from tgeo_jax import metrics as binary_metrics
    fetch = (jax.device_get if jax.process_count() == 1
             else lambda x: multihost_utils.process_allgather(x, tiled=True))
    cols = {k: np.concatenate([np.asarray(fetch(b[k])) for b in per_example]) for k in per_example[0]}
    keep = cols["mask"] > 0
    out["auc"] = binary_metrics.roc_auc(cols["labels"][keep], cols["positive_prob"][keep])
    out["log_loss"] = binary_metrics.log_loss(cols["labels"][keep], cols["positive_prob"][keep])
  return out


class _StopRequest:
  """SIGTERM/SIGINT: finish the current step, save a checkpoint, exit (see ``train_and_evaluate``)."""

  def __init__(self):
    self.signum = None
    # False until the training loop starts: a signal then exits at once (there is nothing new to save).
    self.deferred = False
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
    if not self.deferred:
      _log(f"Received signal {signum} before training started: exiting (nothing to save).")
      raise SystemExit(128 + signum)
    if self.signum is not None:  # a second signal: the user insists; the last checkpoint stays intact
      print(f"Received signal {signum} again: exiting without a checkpoint.", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    self.signum = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config.method`` in ``workdir`` (resuming when it holds a checkpoint); returns the summary.

  The work directory belongs to one configuration (``run_identity``: a resume with any other fingerprinted field,
  teacher or data is refused before anything is read or written) and to one process at a time (an OS-released
  lock). SIGTERM/SIGINT: before the training loop starts, the process exits at once (nothing to save); inside it,
  the current step finishes, a checkpoint is saved and the process exits with status 128 + signal; after it, the
  run finishes normally.
  """
  config_checks.validate(config)
  run_identity.prepare_workdir(workdir)
  with run_identity.WorkdirLock(workdir).acquire(process_index=jax.process_index(),
                                                 process_count=jax.process_count()):
    with _StopRequest() as stop:
      return _train_and_evaluate(config, workdir, stop)


def _checkpoint_steps_on_disk(ckpt_dir: str) -> list[int]:
  """Finished checkpoint steps, listed without opening orbax (which would create or clean the directory)."""
  try:
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  except (FileNotFoundError, NotADirectoryError):
    return []


def _train_and_evaluate(config, workdir: str, stop: "_StopRequest") -> dict:
  start_time = time.time()
  config_dict = json.loads(config.to_json_best_effort())
  ckpt_dir = os.path.join(workdir, "checkpoints")
  has_checkpoints = bool(_checkpoint_steps_on_disk(ckpt_dir))
  saved_identity = (run_identity.read_json_file(os.path.join(workdir, run_identity.IDENTITY_FILE))
                    if has_checkpoints else None)
  if saved_identity is not None:  # the config part first: a changed field stops before any data is loaded
    diffs = run_identity.identity_differences({"config": saved_identity.get("config", {})},
                                              {"config": run_identity.config_record(config_dict)})
    if diffs:
      raise run_identity.resume_error(workdir, diffs)
  mesh = parallel.make_mesh()
  parallel.check_batch_size("batch_size", config.batch_size, mesh)
  parallel.check_batch_size("eval_batch_size", config.eval_batch_size, mesh)

  task = data.load(config.data, seed=config.seed)
  steps_per_epoch = data.steps_per_epoch(len(task.train), config.batch_size)
  if steps_per_epoch == 0:
    raise UserError(f"batch_size: {config.batch_size} exceeds the {len(task.train)} training examples")
  total_steps = steps_per_epoch * config.num_epochs
  with teacher_lib.collect_loaded() as teachers:
    method = build_method(config, task, steps_per_epoch)
  for t in teachers:
    run_identity.check_teacher_provenance(t, task, verify=bool(config.teacher.get("verify_provenance", True)))
  identity = run_identity.make_identity(
      config_dict, task.identity,
      [{k: t.identity[k] for k in ("field", "model", "path", "variables_sha256", "run_fingerprint")}
       for t in teachers])
  if saved_identity is not None:
    diffs = run_identity.identity_differences(saved_identity, identity)
    if diffs:
      raise run_identity.resume_error(workdir, diffs)
  if method.uses_validation_batch:
    parallel.check_batch_size("val_batch_size", config.val_batch_size, mesh)
    if config.val_batch_size > len(task.val):
      raise UserError(f"val_batch_size: {config.val_batch_size} exceeds the {len(task.val)} held-out validation "
                      "examples (raise data.val_fraction or lower val_batch_size)")

  state = parallel.replicate(method.init(jax.random.PRNGKey(config.seed)), mesh)
  frozen = state.pop("frozen")
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, max_to_keep=config.checkpoint.max_to_keep, cleanup_tmp=True)
  try:
    return _run(config, workdir, stop, start_time=start_time, config_dict=config_dict, identity=identity,
                mesh=mesh, task=task, method=method, state=state, frozen=frozen, ckpt=ckpt,
                steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  finally:
    ckpt.close()


def _run(config, workdir, stop, *, start_time, config_dict, identity, mesh, task, method, state, frozen, ckpt,
         steps_per_epoch, total_steps) -> dict:
  meta = {"epoch": 0, "best_accuracy": 0.0, "seconds": 0.0, "skipped_steps": 0}
  existing = ckpt.steps()
  if existing:
    # The newest good checkpoint (a corrupt one is moved aside with a one-line warning); a checkpoint of another
    # configuration stops the run before anything is read or moved.
    restored = ckpt.restore_latest(
        state, check_meta=lambda saved: _check_resume_compatible(saved, config_dict, identity, task.num_classes,
                                                                 workdir))
    if restored is None:
      raise UserError(f"workdir: no readable checkpoint among steps {existing} in {workdir!r}")
    step0, state, meta = restored
    meta.setdefault("skipped_steps", 0)
    state = parallel.replicate(state, mesh)
    _log(f"Resuming {config.method} in {workdir} from step {step0} of {total_steps} (epoch {meta['epoch']}).")
  else:
    step0 = 0
    _log(f"Training {config.method} ({config.model.name}) in {workdir}: {config.num_epochs} epochs x "
         f"{steps_per_epoch} steps, {len(task.train)} train / {len(task.val)} val / {len(task.test)} test "
         f"examples, {jax.device_count()} device(s).")
  if jax.process_index() == 0 and (not existing or not os.path.exists(os.path.join(workdir,
                                                                                   run_identity.IDENTITY_FILE))):
    _write_or_fail(lambda: run_identity.write_run_files(workdir, config_dict, identity, task.membership), workdir)

  writer = report.MetricWriter(workdir, resume_step=step0 if existing else None, tensorboard=config.log.tensorboard)
  best_accuracy = max([meta.get("best_accuracy", 0.0)] + [r["accuracy"] for r in writer.records
                                                          if isinstance(r.get("accuracy"), float)])
  nonfinite = config.get("nonfinite", "stop")
  guarded_step, quantity_names = make_guarded_step(method, skip_nonfinite=nonfinite == "skip")
  train_step = jax.jit(guarded_step, donate_argnums=(0,), static_argnums=(3,))
  health = parallel.replicate(initial_health(step0, meta["skipped_steps"]), mesh)
  eval_fn = jax.jit(lambda s, f, b: make_eval_step(method)(dict(s, frozen=f), b))
  eval_step = lambda s, b: eval_fn(s, frozen, b)  # noqa: E731
  fixed_teacher = (FixedTeacherLogits(method, frozen)
                   if method.teacher is not None and method.teacher_is_frozen else None)
  val_stream = (data.validation_batches(task.val, batch_size=config.val_batch_size, seed=config.seed,
                                        process_index=jax.process_index(), process_count=jax.process_count())
                if method.uses_validation_batch else None)
  last_saved = step0 if existing else None
  # Training metrics summed since the last log point; checkpointed (host floats, exact for float32) so that the
  # train_* values logged after a resume are those of an uninterrupted run.
  train_log = meta.get("train_log") or {}
  running = ({k: jnp.asarray(np.asarray(v, dtype)) for k, (v, dtype) in train_log["running"].items()}
             if train_log.get("running") else None)
  num_running = train_log.get("num_running", 0)
  skipped_at_log = train_log.get("skipped_at_log", meta["skipped_steps"])
  last_train = train_log.get("last_train", {})

  def check_health(host_health, step):
    """Stops the run (stop mode) if any step so far was non-finite; returns the skipped-step count."""
    if nonfinite == "stop" and int(host_health["first_bad_step"]) >= 0:
      raise NonFiniteError(_nonfinite_message(host_health, quantity_names, step, last_saved))
    return int(host_health["skipped"])

  def save(step, epoch, health, finished=False):
    nonlocal last_saved
    skipped = check_health(jax.device_get(health), step)  # never checkpoint a non-finite state
    if step == last_saved:  # e.g. a signal right after an every_steps save
      return
    host_running = jax.device_get(running) if running is not None else None
    log_state = {"running": ({k: [float(v), str(np.asarray(v).dtype)] for k, v in host_running.items()}
                             if host_running is not None else None),
                 "num_running": num_running, "skipped_at_log": skipped_at_log, "last_train": last_train}
    host_meta = dict(meta, epoch=epoch, step=step, total_steps=total_steps, finished=finished,
                     method=config.method, num_classes=task.num_classes, config=config_dict, identity=identity,
                     best_accuracy=best_accuracy, skipped_steps=skipped, train_log=log_state,
                     seconds=meta["seconds"] + time.time() - start_time)
    try:
      ckpt.save(step, state, host_meta)
    except Exception as e:  # noqa: BLE001 - a full or failing disk: the previous checkpoints are intact
      raise RunFault(f"checkpoint: saving step {step} in {ckpt.directory} failed ({_reason(e)}); the previous "
                     "checkpoints are intact: free space and run the same command to resume") from None
    last_saved = step

  def evaluate_epoch(step, epoch):
    """The epoch-end evaluation record (after that epoch's checkpoint is saved: an evaluation that fails never
    costs the epoch's training)."""
    nonlocal best_accuracy
    host_health = jax.device_get(health)
    skipped = check_health(host_health, step)
    results = evaluate(eval_step, state, task.test, batch_size=config.eval_batch_size, mesh=mesh,
                       teacher_logits=fixed_teacher)
    best_accuracy = max(best_accuracy, results["accuracy"])
    if jax.process_index() == 0:
      results.update(method.epoch_report(dict(state, frozen=frozen), workdir, epoch))
    record = dict(step=step, epoch=epoch, **results, **last_train, skipped_steps=skipped,
                  seconds=meta["seconds"] + time.time() - start_time)
    if jax.process_index() == 0:
      _write_or_fail(lambda: writer.write(record), workdir)
    _log(f"epoch {epoch}/{config.num_epochs} step {step}: test accuracy {results['accuracy']:.4f} "
         f"loss {results['loss']:.4f}" + (f" (teacher {results['teacher_accuracy']:.4f}, agreement "
                                         f"{results['agreement']:.4f})" if "teacher_accuracy" in results else "")
         + (f"; {skipped} non-finite step(s) skipped so far (first: "
            f"{_nonfinite_what(host_health, quantity_names)})" if skipped else ""))

  def stop_for_signal(signum, step):
    _log(f"Received signal {signum}: saved a checkpoint at step {step}; run the same command to resume.")
    writer.close()
    sys.exit(128 + signum)

  if existing and step0 > 0 and step0 % steps_per_epoch == 0 and not any(
      r.get("step") == step0 for r in writer.records):
    # Killed after the epoch-end checkpoint, before its evaluation was recorded: evaluate it now.
    evaluate_epoch(step0, step0 // steps_per_epoch)

  step = step0
  stop.deferred = True  # from here on a signal means: finish the step, save, exit
  while step < total_steps:
    epoch, offset = divmod(step, steps_per_epoch)
    batches = data.train_batches(task.train, batch_size=config.batch_size, seed=config.seed, epoch=epoch,
                                 augment=task.augment, process_index=jax.process_index(),
                                 process_count=jax.process_count())[offset:]
    bar = tqdm.tqdm(total=steps_per_epoch, initial=offset, desc=f"epoch {epoch + 1}/{config.num_epochs}",
                    disable=not config.log.progress or jax.process_index() != 0, leave=False, dynamic_ncols=True)
    for batch in batches.to_iter_dataset():
      if val_stream is not None:
        batch["val"] = val_stream[step]
      state, metrics, health = train_step(state, frozen, parallel.shard_batch(batch, mesh),
                                          method.step_kind(step), health)
      running = metrics if running is None else jax.tree.map(jnp.add, running, metrics)
      num_running += 1
      step += 1
      bar.update(1)
      if step % config.log.every_steps == 0 or step % steps_per_epoch == 0:
        # The only host sync in the loop: averaged training metrics and the non-finite record, every
        # log.every_steps steps.
        host_running, host_health = jax.device_get((running, health))
        skipped = check_health(host_health, step)
        # Skipped steps contribute zeros to the sums: average over the steps that were applied.
        applied = num_running - (skipped - skipped_at_log)
        skipped_at_log = skipped
        host = {k: float(v) / applied for k, v in host_running.items()} if applied else {}
        if host:
          bar.set_postfix(loss=f"{host['loss']:.4f}", acc=f"{host.get('accuracy', float('nan')):.3f}")
        last_train = {f"train_{k}": v for k, v in host.items()}
        running, num_running = None, 0
      if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0 and step % steps_per_epoch:
        save(step, epoch, health)
      if stop.signum is not None and step % steps_per_epoch:
        save(step, epoch, health)
        bar.close()
        stop_for_signal(stop.signum, step)
      if config.steps_per_run and step - step0 >= config.steps_per_run and step % steps_per_epoch:
        save(step, epoch, health)
        bar.close()
        _log(f"Stopping after {config.steps_per_run} steps (steps_per_run) at step {step} of {total_steps}; "
             "run the same command to continue.")
        writer.close()
        return {"method": config.method, "finished": False, "num_steps": step}
    bar.close()
    epoch += 1
    check_health(jax.device_get(health), step)  # before saving or evaluating
    save(step, epoch, health, finished=step >= total_steps)
    evaluate_epoch(step, epoch)
    if stop.signum is not None and step < total_steps:
      stop_for_signal(stop.signum, step)
    if config.steps_per_run and step - step0 >= config.steps_per_run and step < total_steps:
      _log(f"Stopping after {step - step0} steps (steps_per_run) at step {step} of {total_steps}; "
           "run the same command to continue.")
      writer.close()
      return {"method": config.method, "finished": False, "num_steps": step}

  if step0 >= total_steps:
    _log(f"{workdir} already finished ({total_steps} steps); re-evaluating the final checkpoint.")
  final = evaluate(eval_step, state, task.test, batch_size=config.eval_batch_size, mesh=mesh,
                   teacher_logits=fixed_teacher)
  seconds = meta["seconds"] + (time.time() - start_time if step0 < total_steps else 0.0)
  # The held-out validation part, for model selection (e.g. the learning rate) without looking at the test set.
  val = (evaluate(eval_step, state, task.val, batch_size=config.eval_batch_size, mesh=mesh)
         if len(task.val) else {})
  summary = {
      "method": config.method,
      "model": config.model.name,
      "accuracy": final["accuracy"],
      "best_accuracy": max(best_accuracy, final["accuracy"]),
      "loss": final["loss"],
      "num_steps": step,
      "num_epochs": config.num_epochs,
      "skipped_steps": int(jax.device_get(health)["skipped"]),
      "seconds": seconds,
      "seed": config.seed,
      "num_devices": jax.device_count(),
      "finished": True,
  }
  for key in ("teacher_accuracy", "agreement", "teacher_kl", "auc", "log_loss"):
    if key in final:
      summary[key] = final[key]
  for key in ("accuracy", "loss", "auc"):
    if key in val:
      summary[f"val_{key}"] = val[key]
  # What identifies the run, so that tables group runs by fingerprint, never by path.
  summary.update(
      dataset=task.name, fingerprint=identity["fingerprint"], config_fingerprint=identity["config_fingerprint"],
      group_fingerprint=identity["group_fingerprint"], config=identity["config"],
      data={k: identity["data"][k] for k in ("name", "digest", "sizes")},
      teachers=[{k: t[k] for k in ("field", "model", "variables_sha256")} for t in identity["teachers"]])
  if jax.process_index() == 0:
    _write_or_fail(lambda: report.write_json(os.path.join(workdir, "summary.json"), summary), workdir)
  writer.close()
  return summary


def _reason(e: BaseException) -> str:
  text = " ".join(str(e).split())
  if "No space left" in text or getattr(e, "errno", None) == errno.ENOSPC:
    return "no space left on device"
  if isinstance(e, OSError) and e.strerror:
    return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
  return f"{type(e).__name__}: {text[:160]}"


def _write_or_fail(write, workdir: str) -> None:
  """Runs ``write`` (a file in the work directory); an OS error is a one-line ``RunFault``."""
  try:
    write()
  except OSError as e:
    raise RunFault(f"workdir: writing in {workdir!r} failed ({_reason(e)}); the checkpoints are intact: fix it and "
                   "run the same command to resume") from None


def _split_frozen(out):
  state, metrics = out
  state = dict(state)
  state.pop("frozen")
  return state, metrics


# ------------------------------------------------------------------------------------------ non-finite values


def initial_health(step: int, skipped: int = 0) -> dict:
  """The on-device non-finite record: ``step`` (steps taken), ``first_bad_step`` (-1: none), ``what`` (index into
  the quantity names), ``value`` (that quantity's value, NaN for state entries), ``skipped`` (steps skipped)."""
  return {"step": jnp.int32(step), "first_bad_step": jnp.int32(-1), "what": jnp.int32(-1),
          "value": jnp.float32(0.0), "skipped": jnp.int32(skipped)}


def _select(ok, new, old):
  if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(jnp.where(ok, jax.random.key_data(new), jax.random.key_data(old)),
                                    impl=jax.random.key_impl(new))
  return jnp.where(ok, new, old)


def make_guarded_step(method, *, skip_nonfinite: bool):
  """``step(state, frozen, batch, kind, health) -> (state, metrics, health)`` around ``method.train_step``.

  Checks every step, on device, that the metrics (loss first, then the gradient norm, then the others) and every
  floating entry of the new state are finite, and records the first step that is not in ``health`` (the host
  reads it at log points and before saves: no per-step sync). With ``skip_nonfinite`` such a step's update is
  dropped (the whole previous state is kept, optimizer counts included, as ``optax.apply_if_finite`` does), its
  metrics are zeroed and it is counted in ``health['skipped']``. Returns the step and the list of quantity names
  that ``health['what']`` indexes (filled while tracing).
  """
  names: list[str] = []

  def code(name):
    if name not in names:
      names.append(name)
    return names.index(name)

  def step(state, frozen, batch, kind, health):
    new_state, metrics = _split_frozen(method.train_step(dict(state, frozen=frozen), batch, kind))
    checks = []  # (name code, all finite, value)
    for name in sorted(metrics, key=lambda k: (k != "loss", k != "grad_norm", k)):
      value = jnp.asarray(metrics[name])
      if jnp.issubdtype(value.dtype, jnp.inexact):
        checks.append((code(f"training {name}"), jnp.all(jnp.isfinite(value)),
                       jnp.mean(value).astype(jnp.float32)))
    for key in sorted(new_state):
      leaves = [x for x in jax.tree.leaves(new_state[key]) if jnp.issubdtype(x.dtype, jnp.inexact)]
      if leaves:
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        checks.append((code(f"new {key}"), finite, jnp.float32(jnp.nan)))
    if not checks:
      return new_state, metrics, dict(health, step=health["step"] + 1)
    each_ok = jnp.stack([c[1] for c in checks])
    ok = jnp.all(each_ok)
    first = jnp.argmin(each_ok)  # the first quantity that is not finite
    number = health["step"] + 1
    newly_bad = jnp.logical_and(~ok, health["first_bad_step"] < 0)
    new_health = {
        "step": number,
        "first_bad_step": jnp.where(newly_bad, number, health["first_bad_step"]),
        "what": jnp.where(newly_bad, jnp.asarray([c[0] for c in checks], jnp.int32)[first], health["what"]),
        "value": jnp.where(newly_bad, jnp.stack([c[2] for c in checks])[first], health["value"]),
        "skipped": health["skipped"] + ((~ok).astype(jnp.int32) if skip_nonfinite else 0),
    }
    if skip_nonfinite:
      new_state = jax.tree.map(lambda n, o: _select(ok, n, o), new_state, state)
      metrics = jax.tree.map(lambda m: jnp.where(ok, m, jnp.zeros_like(m)), metrics)
    return new_state, metrics, new_health

  return step, names


def _nonfinite_what(host_health, names) -> str:
  name = names[int(host_health["what"])]
  if name.startswith("training "):
    return f"step {int(host_health['first_bad_step'])}, {name} = {float(host_health['value'])}"
  return f"step {int(host_health['first_bad_step'])}, {name} has NaN/Inf entries"


def _nonfinite_message(host_health, names, step, last_saved) -> str:
  bad = int(host_health["first_bad_step"])
  name = names[int(host_health["what"])]
  what = (f"the {name} is {float(host_health['value'])}" if name.startswith("training ")
          else f"the {name.removeprefix('new ')} state has NaN/Inf entries")
  kept = (f"the last checkpoint, step {last_saved}, is intact" if last_saved is not None
          else "no checkpoint was saved")
  return (f"step {bad}: {what}; stopped at step {step} before saving it, {kept}. Lower optimizer.learning_rate, "
          "set optimizer.clip_norm > 0, or set nonfinite='skip' to skip such steps")


def _check_resume_compatible(saved_meta: dict, current: dict, identity: dict, num_classes: int,
                             workdir: str) -> None:
  """The checkpoint's identity record (or, for a checkpoint written before identity records, its config) must
  equal this run's; otherwise a ``UserError`` naming every differing field."""
  saved_identity = saved_meta.get("identity")
  if saved_identity is None:
    saved_identity = {"config": run_identity.config_record(saved_meta.get("config", {}))}
  diffs = run_identity.identity_differences(saved_identity, identity)
  if saved_meta.get("num_classes", num_classes) != num_classes:
    diffs.append(f"num_classes: {saved_meta['num_classes']} -> {num_classes}")
  if diffs:
    raise run_identity.resume_error(workdir, diffs)
