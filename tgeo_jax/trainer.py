"""The generic training loop: setup, the loop, evaluation and the summary apart. It knows no method.

``train_and_evaluate(config, workdir)`` is three steps:

* ``setup`` builds one ``Run``: the mesh, the task and its pipeline (``data.Pipeline``, or ``data.DevicePipeline``
  where the task fits on the device), the method and its state, the checkpointer (``restore``: the newest good
  checkpoint of this run's identity, see ``run_identity``), the metric writer and the jitted steps
  (``dispatch.BatchSteps`` / ``dispatch.ChunkSteps``);
* ``train`` runs the loop: the pipeline's units (a batch, or a chunk of steps built on the device) each through
  one jitted, guarded dispatch; ``itstime`` decides every cadence (log, save, the epoch end), and a chunk ends
  where one of them falls (``_next_stop``); an epoch end saves, then evaluates; a signal
  (``signals.StopRequest``) or the ``steps_per_run`` budget raises ``StopTraining``, handled in one place (save,
  then return or raise ``Interrupted`` to the caller);

  The training thread only dispatches steps: host batches (with their validation batch, for methods that take
  one) are prepared ahead in grain's threads or worker processes (``data.pipeline``), device batches inside the
  step from a few integers per step (``data.device_pipeline``); a checkpoint is copied to host memory and written
  in the background (``checkpoint.async_save``); the host syncs once per ``log.every_steps``, where the
  interval's steps/s and examples/s are recorded;
* ``finish`` evaluates the final state on the test and validation parts and writes ``summary.json``.

Everything method-specific happens behind ``method.init / train_step / predict / teacher_logits``. Nothing here
exits the process: a signal reaches the caller as ``Interrupted`` (``cli.py`` turns it into exit status 128 +
signal), so callers that run several trainings in one process (``generations.py``, ``bench/study.py``) can stop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from tgeo_jax import checkpoint as checkpoint_lib
from tgeo_jax import config_checks, data, dispatch, evaluation, fileio, methods, models, optim, parallel, report
from tgeo_jax import profiling, run_identity, signals
from tgeo_jax import teacher as teacher_lib
from tgeo_jax.errors import UserError
from tgeo_jax.signals import Interrupted
from tgeo_jax.health import NonFiniteError, initial_health, make_guarded_step, nonfinite_message, nonfinite_what

__all__ = ["Interrupted", "NonFiniteError", "RunFault", "build_method", "evaluate", "initial_health",
           "itstime", "make_guarded_step", "train_and_evaluate"]

evaluate = evaluation.evaluate  # the loop calls it through this module (tests substitute a failing one)


class RunFault(RuntimeError):
  """A runtime fault outside the user's input (a full or failing disk): one line, exit status 1."""


class StopTraining(Exception):
  """Ends the training loop early, inside ``train``: a signal (``signum``) or the ``steps_per_run`` budget."""

  def __init__(self, signum: int | None = None):
    super().__init__("signal" if signum else "steps_per_run")
    self.signum = signum


def itstime(step: int, every: int, *, last: int | None = None) -> bool:
  """True every ``every`` steps (``every`` <= 0: never) and at ``last`` (big_vision's cadence helper). A chunk of
  the device pipeline ends at each such step (``_next_stop``), so the loop asks at exactly those steps."""
  return (every > 0 and step % every == 0) or (last is not None and step == last)


# ------------------------------------------------------------------------------------------------ the method


def build_method(config, task: data.TaskData, steps_per_epoch: int, *, teacher: teacher_lib.Teacher | None = None):
  """The method of ``config`` for ``task``: the student, the optimizer, and the teacher of ``teacher.checkpoint``
  (or ``teacher``, given in code: benchmarks and tests need no checkpoint then)."""
  method_cls = methods.get_class(config.method)
  spec = task.spec
  try:
    student_model = models.create(config.model.name, num_classes=spec.num_classes, input_shape=spec.input_shape,
                                  seed=config.seed, dtype=models.compute_dtype(config), **spec.model_kwargs)
  except KeyError as e:
    raise UserError(f"model.name: {e.args[0]}") from None
  tx = optim.make_optimizer(config.optimizer, steps_per_epoch=steps_per_epoch, num_epochs=config.num_epochs)
  if teacher is None and method_cls.loads_teacher_checkpoint:
    teacher = teacher_lib.load_teacher(config, spec)
  return method_cls(config, spec, student=models.split(student_model), tx=tx, teacher=teacher, task=task,
                    steps_per_epoch=steps_per_epoch)


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ the run


class TrainLog:
  """Training metrics summed since the last log point, and the last logged averages.

  Part of every checkpoint (host floats: exact for float32), so the ``train_*`` values recorded after a resume are
  those of an uninterrupted run.
  """

  def __init__(self, saved: dict | None, skipped: int):
    saved = saved or {}
    self.running = ({k: jnp.asarray(np.asarray(v, dtype)) for k, (v, dtype) in saved["running"].items()}
                    if saved.get("running") else None)
    self.count = saved.get("num_running", 0)
    self.skipped_at_log = saved.get("skipped_at_log", skipped)
    self.last = saved.get("last_train", {})

  def add(self, running, steps: int = 1) -> None:
    """Records the sums returned by ``steps`` steps (which added their metrics to ``sums``, on the device)."""
    self.running = running
    self.count += steps

  def flush(self, host_running, skipped: int) -> dict:
    """The averages since the last log point (skipped steps, zeroed, not counted); resets the sums."""
    applied = self.count - (skipped - self.skipped_at_log)
    self.skipped_at_log = skipped
    host = {k: float(v) / applied for k, v in host_running.items()} if applied else {}
    self.last = {f"train_{k}": v for k, v in host.items()}
    self.running, self.count = None, 0
    return host

  def to_meta(self) -> dict:
    host = jax.device_get(self.running) if self.running is not None else None
    return {"running": ({k: [float(v), str(np.asarray(v).dtype)] for k, v in host.items()}
                        if host is not None else None),
            "num_running": self.count, "skipped_at_log": self.skipped_at_log, "last_train": self.last}


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built by ``setup``."""

  config: Any
  workdir: str
  mesh: Any
  task: data.TaskData
  pipeline: Any  # data.Pipeline | data.DevicePipeline
  method: Any
  state: dict
  frozen: dict
  ckpt: checkpoint_lib.Checkpointer
  writer: report.MetricWriter
  identity: dict
  config_dict: dict
  steps_per_epoch: int
  total_steps: int
  step: int  # steps taken so far
  step0: int  # the step this process started (or resumed) at
  resumed: bool
  meta: dict
  start_time: float
  steps: Any  # dispatch.BatchSteps | dispatch.ChunkSteps: (run, pipeline unit) -> steps taken
  eval_step: Any
  fixed_teacher: Any
  health: dict
  log: TrainLog
  best_accuracy: float
  last_saved: int | None
  profile: profiling.Profile
  log_clock: tuple = (0, 0.0)  # (step, time.perf_counter()) where the current logging interval began

  @property
  def epoch(self) -> int:
    return self.step // self.steps_per_epoch

  def at_epoch_end(self) -> bool:
    return self.step > 0 and self.step % self.steps_per_epoch == 0

  def close(self) -> None:
    self.profile.stop()
    self.writer.close()
    wait_for_save(self, closing=True)


def train_and_evaluate(config, workdir: str, *, teacher: teacher_lib.Teacher | None = None) -> dict:
  """Trains ``config.method`` in ``workdir`` (resuming when it holds a checkpoint); returns the summary.

  The work directory belongs to one configuration (``run_identity``: a resume with any other fingerprinted field,
  teacher or data is refused before anything is read or written) and to one process at a time (an OS-released
  lock). SIGTERM/SIGINT: before the loop, ``Interrupted`` at once (nothing to save); inside it, the current step
  (the current chunk, with the device pipeline) finishes, a checkpoint is saved and ``Interrupted`` is raised;
  after it, the run finishes normally.
  ``steps_per_run`` returns an unfinished summary (``finished: False``) after a checkpoint. ``teacher``: a teacher
  given in code instead of ``teacher.checkpoint``.
  """
  for note in config_checks.adapt_to_mock_data(config):
    print(f"warning: {note}", file=sys.stderr, flush=True)
  methods.validate_config(config)
  created = not os.path.exists(workdir)
  run_identity.prepare_workdir(workdir)
  lock = run_identity.WorkdirLock(workdir)
  with lock.acquire(process_index=jax.process_index(), process_count=jax.process_count()), signals.StopRequest(log=_log) as stop:
    try:
      run = setup(config, workdir, teacher=teacher)
    except UserError:
      if created:  # refused before anything was written: leave no work directory behind
        run_identity.remove_unused_workdir(workdir, lock.path)
      raise
    try:
      try:
        stop.start_loop()
        train(run, stop)
      except StopTraining as e:
        save(run)
        if e.signum is not None:
          _log(f"Received signal {e.signum}: saved a checkpoint at step {run.step}; run the same command to resume.")
          raise Interrupted(e.signum) from None
        _log(f"Stopping after {run.step - run.step0} steps (steps_per_run) at step {run.step} of "
             f"{run.total_steps}; run the same command to continue.")
        return {"method": config.method, "finished": False, "num_steps": run.step}
      return finish(run)
    finally:
      run.close()


def _checkpoint_steps_on_disk(ckpt_dir: str) -> list[int]:
  """Finished checkpoint steps, listed without opening orbax (which would create or clean the directory)."""
  try:
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  except (FileNotFoundError, NotADirectoryError):
    return []


def setup(config, workdir: str, *, teacher: teacher_lib.Teacher | None = None) -> Run:
  """Builds the run: the task and its pipeline, the method and its state (restored from the newest good checkpoint
  of this run's identity; any other is refused before anything is read), the metric writer and the jitted steps."""
  start_time = time.time()
  # Mock data is small and cheap to load: load it first, so that a paper config's validation batch can be fitted
  # to what the mock split holds out before the config is recorded (config_checks.adapt_to_mock_data).
  task = _load_and_fit_mock_task(config) if config.data.mock is True else None
  config_dict = json.loads(config.to_json_best_effort())
  reads = functools.partial(methods.reads_field, config.method)  # only these fields identify the run
  saved_identity = _refuse_a_changed_config(workdir, config_dict, reads)  # before any data is loaded
  mesh = parallel.make_mesh()
  parallel.check_batch_size("batch_size", config.batch_size, mesh)
  parallel.check_batch_size("eval_batch_size", config.eval_batch_size, mesh)

  if task is None:
    task = data.load(config.data, seed=config.seed)
  steps_per_epoch = data.steps_per_epoch(len(task.train), config.batch_size)
  if steps_per_epoch == 0:
    raise UserError(f"batch_size: {config.batch_size} exceeds the {len(task.train)} training examples")
  method, teachers = _build_checked_method(config, task, steps_per_epoch, teacher=teacher)
  identity = run_identity.make_identity(
      config_dict, task.identity,
      [{k: t.identity[k] for k in ("field", "model", "path", "variables_sha256", "run_fingerprint")}
       for t in teachers], reads)
  if saved_identity is not None:
    run_identity.refuse_differences(workdir, saved_identity, identity, reads)
  if method.uses_validation_batch:
    parallel.check_batch_size("val_batch_size", config.val_batch_size, mesh)
    if config.val_batch_size > len(task.val):
      raise UserError(f"val_batch_size: {config.val_batch_size} exceeds the {len(task.val)} held-out validation "
                      "examples (raise data.val_fraction or lower val_batch_size)")
  pipeline = _build_pipeline(config, task, mesh, uses_validation_batch=method.uses_validation_batch)
  total_steps = steps_per_epoch * config.num_epochs
  profile = profiling.Profile(config.log.profile_steps, workdir, log=_log)
  profile.check(total_steps)

  state, frozen = parallel.replicate(method.init(jax.random.PRNGKey(config.seed)), mesh)
  teacher_lib.check_outputs(method, frozen, task)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep,
                                     cleanup_tmp=True, async_save=config.checkpoint.async_save)
  try:
    step0, state, meta = restore(ckpt, state, identity=identity, num_classes=task.num_classes, workdir=workdir,
                                 mesh=mesh, reads=reads)
    resumed = step0 is not None
    step0 = step0 or 0
    _log_start(config, workdir, task, pipeline, step0, total_steps, steps_per_epoch, meta if resumed else None)
    pipeline.prepare(step0 // steps_per_epoch)  # the first epoch's order is computed while the step compiles
    if jax.process_index() == 0 and (not resumed or not os.path.exists(os.path.join(workdir,
                                                                                    run_identity.IDENTITY_FILE))):
      _write_or_fail(lambda: run_identity.write_run_files(workdir, config_dict, identity, task.membership), workdir)
    writer = report.MetricWriter(workdir, resume_step=step0 if resumed else None, tensorboard=config.log.tensorboard,
                                 wandb=config.log.wandb, config=config_dict)
    best_accuracy = max([meta.get("best_accuracy", 0.0)] + [r["accuracy"] for r in writer.records
                                                            if isinstance(r.get("accuracy"), float)])
    train_log = TrainLog(meta.get("train_log"), meta["skipped_steps"])
    if train_log.running is not None:  # restored sums, placed as the step returns them (one compilation, not two)
      train_log.running = parallel.replicate(train_log.running, mesh)
    skip_nonfinite = config.nonfinite == "skip"
    steps = (dispatch.ChunkSteps(method, mesh, pipeline, kinds=dispatch.run_kinds(method, total_steps),
                                 skip_nonfinite=skip_nonfinite)
             if isinstance(pipeline, data.DevicePipeline)
             else dispatch.BatchSteps(method, mesh, skip_nonfinite=skip_nonfinite))
    eval_fn = jax.jit(evaluation.make_eval_step(method, task.metrics))
  except BaseException:
    ckpt.close()
    raise
  return Run(
      config=config, workdir=workdir, mesh=mesh, task=task, pipeline=pipeline, method=method, state=state,
      frozen=frozen, ckpt=ckpt, writer=writer, identity=identity, config_dict=config_dict,
      steps_per_epoch=steps_per_epoch, total_steps=total_steps, step=step0, step0=step0, resumed=resumed, meta=meta,
      start_time=start_time, steps=steps,
      eval_step=lambda s, b: eval_fn(s, frozen, b),
      fixed_teacher=(evaluation.FixedTeacherLogits(method, frozen)
                     if method.teacher is not None and method.teacher_logits_fixed else None),
      health=parallel.replicate(initial_health(step0, meta["skipped_steps"]), mesh),
      log=train_log, best_accuracy=best_accuracy, last_saved=step0 if resumed else None, profile=profile,
      log_clock=(step0, time.perf_counter()))


def _load_and_fit_mock_task(config) -> data.TaskData:
  """The mock task, with the config's validation batch fitted to the examples it holds out (a warning each)."""
  task = data.load(config.data, seed=config.seed)
  uses_validation_batch = methods.get_class(config.method).uses_validation_batch
  for note in config_checks.fit_mock_validation_batch(config, len(task.val), jax.device_count(),
                                                      uses_validation_batch=uses_validation_batch):
    print(f"warning: {note}", file=sys.stderr, flush=True)
  return task


def _refuse_a_changed_config(workdir: str, config_dict: dict, reads) -> dict | None:
  """The identity saved in a work directory that holds checkpoints (None otherwise), after refusing a config that
  differs from its config part in a field the method reads: a changed field stops before any data is loaded."""
  if not _checkpoint_steps_on_disk(os.path.join(workdir, "checkpoints")):
    return None
  saved = run_identity.read_json_file(os.path.join(workdir, run_identity.IDENTITY_FILE))
  if saved is not None:
    run_identity.refuse_differences(workdir, {"config": saved.get("config", {})},
                                    {"config": run_identity.config_record(config_dict, reads)}, reads)
  return saved


def _build_checked_method(config, task, steps_per_epoch: int, *, teacher):
  """``build_method`` and the teachers it loaded, each checked against the task (provenance), with a warning for
  a study's wrong teacher."""
  with teacher_lib.collect_loaded() as teachers:
    method = build_method(config, task, steps_per_epoch, teacher=teacher)
  if method.study_teacher_shift is not None:  # never a silent mix-up of a study teacher with a real one
    wrong = int(np.count_nonzero(method.study_teacher_shift))
    print(f"warning: study_wrong_teacher: the teacher is made confidently wrong on {wrong} of {len(task.train)} "
          f"training examples ({config.study_wrong_teacher.kind}; a study setting, not a real teacher)",
          file=sys.stderr, flush=True)
  for t in teachers:
    run_identity.check_teacher_provenance(t, task, verify=bool(config.teacher.verify_provenance))
  return method, teachers


def _build_pipeline(config, task, mesh, *, uses_validation_batch: bool):
  """The run's pipeline: the device-resident one where ``device_pipeline.mode`` asks for it (``auto``: where it
  can hold the task, ``data.unsupported_reason``, in a quarter of the device's memory), else the host one."""
  val_batch_size = config.val_batch_size if uses_validation_batch else None
  mode = config.device_pipeline.mode
  if mode == "auto":
    mode = ("on" if data.unsupported_reason(task, process_count=jax.process_count()) is None
            and data.fits_on_device(task, with_validation=uses_validation_batch) else "off")
  if mode == "on":  # a task it cannot hold is a UserError naming device_pipeline.mode and why
    # No longer than the loop's shortest cadence: a chunk ends at each log point, checkpoint and epoch end, and a
    # longer program would only run skip steps.
    steps_per_epoch = data.steps_per_epoch(len(task.train), config.batch_size)
    steps = min([config.device_pipeline.steps_per_dispatch, steps_per_epoch]
                + [every for every in (config.log.every_steps, config.checkpoint.every_steps) if every > 0])
    return data.DevicePipeline(task, batch_size=config.batch_size, seed=config.seed, mesh=mesh,
                               steps_per_dispatch=steps, val_batch_size=val_batch_size,
                               eval_batch_size=config.eval_batch_size)
  return data.Pipeline(task, batch_size=config.batch_size, seed=config.seed, val_batch_size=val_batch_size,
                       eval_batch_size=config.eval_batch_size, devices=mesh.size,
                       workers=data.resolve_workers(config.data, task.train),
                       process_index=jax.process_index(), process_count=jax.process_count())


def _pipeline_words(pipeline) -> str:
  if isinstance(pipeline, data.DevicePipeline):
    return f"batches built on the device ({pipeline.steps_per_dispatch} steps per dispatch at most)"
  return "batches built on the host"


def _log_start(config, workdir: str, task, pipeline, step0: int, total_steps: int, steps_per_epoch: int,
               resumed_meta):
  if resumed_meta is not None:
    _log(f"Resuming {config.method} in {workdir} from step {step0} of {total_steps} (epoch {resumed_meta['epoch']}), "
         f"{_pipeline_words(pipeline)}.")
  else:
    _log(f"Training {config.method} ({config.model.name}) in {workdir}: {config.num_epochs} epochs x "
         f"{steps_per_epoch} steps, {len(task.train)} train / {len(task.val)} val / {len(task.test)} test "
         f"examples, {jax.device_count()} device(s), {_pipeline_words(pipeline)}.")


def restore(ckpt: checkpoint_lib.Checkpointer, state, *, identity: dict, num_classes: int, workdir: str, mesh,
            reads=None):
  """``(step, state, meta)`` of the newest good checkpoint in ``ckpt`` (a corrupt one is moved aside with a one-line
  warning), or ``(None, state, fresh meta)`` when there is none. A checkpoint of another run identity stops the
  run before anything is read or moved."""
  meta = {"epoch": 0, "best_accuracy": 0.0, "seconds": 0.0, "skipped_steps": 0}
  existing = ckpt.steps()
  if not existing:
    return None, state, meta
  restored = ckpt.restore_latest(
      state, check_meta=lambda saved: run_identity.check_resume_compatible(saved, identity, num_classes, workdir,
                                                                           reads))
  if restored is None:
    raise UserError(f"workdir: no readable checkpoint among steps {existing} in {workdir!r}")
  step0, state, meta = restored
  meta.setdefault("skipped_steps", 0)
  return step0, parallel.replicate(state, mesh), meta


# ------------------------------------------------------------------------------------------------ the loop


def train(run: Run, stop: signals.StopRequest) -> None:
  """Steps until ``run.total_steps``; raises ``StopTraining`` for a signal or the ``steps_per_run`` budget."""
  config = run.config
  if run.resumed and run.at_epoch_end() and not any(r.get("step") == run.step and r.get("kind") != "train"
                                                    for r in run.writer.records):
    evaluate_epoch(run)  # killed after the epoch-end checkpoint, before its evaluation was recorded
  budget_end = run.step + config.steps_per_run if config.steps_per_run else None
  while run.step < run.total_steps:
    offset = run.step % run.steps_per_epoch
    epoch_end = (run.epoch + 1) * run.steps_per_epoch  # the step after which this epoch saves and evaluates
    if run.epoch + 1 < config.num_epochs:  # the next epoch's order, computed while this one trains
      run.pipeline.prepare(run.epoch + 1)
    bar = tqdm.tqdm(total=run.steps_per_epoch, initial=offset, desc=f"epoch {run.epoch + 1}/{config.num_epochs}",
                    disable=not config.log.progress or jax.process_index() != 0, leave=False, dynamic_ncols=True)
    try:
      # A batch, or a chunk of steps (device pipeline) that ends where the loop acts: the same log points,
      # checkpoints and stops as step by step.
      stops = [epoch_end, *([budget_end] if budget_end is not None else []), *(run.profile.range or ())]
      until = functools.partial(_next_stop, config, run.epoch * run.steps_per_epoch, stops)
      for unit in run.pipeline.epoch(run.epoch, offset, until=until):
        run.profile.before_step(run.step)
        taken = run.steps(run, unit)
        run.step += taken
        run.profile.after_step(run.step, run.state)
        bar.update(taken)
        if itstime(run.step, config.log.every_steps, last=epoch_end):
          log_train_metrics(run, bar)
        if run.step == epoch_end:
          break  # the epoch end saves and evaluates below
        if itstime(run.step, config.checkpoint.every_steps):
          save(run)
        if stop.signum is not None:
          raise StopTraining(stop.signum)
        if budget_end is not None and run.step >= budget_end:
          raise StopTraining()
    finally:
      bar.close()
    save(run)  # before evaluating: an evaluation that fails never costs the epoch's training
    evaluate_epoch(run)
    run.log_clock = (run.step, time.perf_counter())  # throughput excludes the evaluation
    if run.step < run.total_steps:
      if stop.signum is not None:
        raise StopTraining(stop.signum)
      if budget_end is not None and run.step >= budget_end:
        raise StopTraining()


def _next_stop(config, epoch_start: int, stops, step_in_epoch: int) -> int:
  """The first step after ``epoch_start + step_in_epoch`` where the loop acts (a log point, a checkpoint, or one of
  ``stops``: the epoch end, the end of the ``steps_per_run`` budget, the profiled range's ends), as a step of the
  epoch."""
  step = epoch_start + step_in_epoch
  ends = [s for s in stops if s > step] + [step + every - step % every
                                           for every in (config.log.every_steps, config.checkpoint.every_steps)
                                           if every > 0]
  return min(ends) - epoch_start


def log_train_metrics(run: Run, bar) -> None:
  """The loop's only host sync: the training-metric averages and the non-finite record; a ``kind: train`` record
  in metrics.jsonl (and TensorBoard) with the interval's throughput."""
  host_running, host_health = jax.device_get((run.log.running, run.health))
  host = run.log.flush(host_running, check_health(run, host_health))
  if not host:
    return
  bar.set_postfix(loss=f"{host['loss']:.4f}", acc=f"{host.get('accuracy', float('nan')):.3f}")
  clock_step, clock_time = run.log_clock
  now = time.perf_counter()
  steps, seconds = run.step - clock_step, now - clock_time
  run.log_clock = (run.step, now)
  throughput = ({"steps_per_second": steps / seconds, "examples_per_second": steps * run.config.batch_size / seconds}
                if steps > 0 and seconds > 0 else {})
  record = dict(kind="train", step=run.step, epoch=run.epoch, **run.log.last, **throughput,
                seconds=run.meta["seconds"] + time.time() - run.start_time)
  if jax.process_index() == 0:
    _write_or_fail(lambda: run.writer.write(record), run.workdir)


def check_health(run: Run, host_health) -> int:
  """Stops the run (``nonfinite='stop'``) if any step so far was non-finite; returns the skipped-step count."""
  if run.config.nonfinite == "stop" and int(host_health["first_bad_step"]) >= 0:
    raise NonFiniteError(nonfinite_message(host_health, run.steps.quantity_names, run.step, run.last_saved))
  return int(host_health["skipped"])


def save(run: Run) -> None:
  """A checkpoint at ``run.step`` (never of a non-finite state; nothing if that step is saved already)."""
  skipped = check_health(run, jax.device_get(run.health))
  if run.step == run.last_saved:
    return
  host_meta = dict(run.meta, epoch=run.epoch, step=run.step, total_steps=run.total_steps,
                   finished=run.step >= run.total_steps, method=run.config.method,
                   num_classes=run.task.num_classes, config=run.config_dict, identity=run.identity,
                   best_accuracy=run.best_accuracy, skipped_steps=skipped, train_log=run.log.to_meta(),
                   seconds=run.meta["seconds"] + time.time() - run.start_time)
  wait_for_save(run)
  try:
    run.ckpt.save(run.step, run.state, host_meta)
  except Exception as e:  # noqa: BLE001 - a full or failing disk: the previous checkpoints are intact
    raise RunFault(f"checkpoint: saving step {run.step} in {run.ckpt.directory} failed ({fileio.failure_reason(e)}); the "
                   f"previous checkpoints are intact: {fileio.failure_remedy(e)} and run the same command to resume") from None
  run.last_saved = run.step


def wait_for_save(run: Run, *, closing: bool = False) -> None:
  """Waits for a background checkpoint write (``checkpoint.async_save``); its failure is a one-line ``RunFault``.
  ``closing``: also closes the checkpointer."""
  try:
    if closing:
      run.ckpt.close()
    else:
      run.ckpt.wait()
  except Exception as e:  # noqa: BLE001 - as in ``save``: the checkpoints before it are intact
    raise RunFault(f"checkpoint: saving step {run.last_saved} in {run.ckpt.directory} failed ({fileio.failure_reason(e)}); the "
                   f"previous checkpoints are intact: {fileio.failure_remedy(e)} and run the same command to resume") from None


def evaluate_epoch(run: Run) -> None:
  """The epoch-end evaluation record: test metrics, the method's epoch report, the last training averages."""
  host_health = jax.device_get(run.health)
  skipped = check_health(run, host_health)
  results = evaluate(run.eval_step, run.state, run.pipeline.evaluation(run.task.test), mesh=run.mesh,
                     teacher_logits=run.fixed_teacher)
  run.best_accuracy = max(run.best_accuracy, results["accuracy"])
  if jax.process_index() == 0:
    results.update(run.method.epoch_report(run.state, run.frozen, run.workdir, run.epoch))
  record = dict(kind="eval", step=run.step, epoch=run.epoch, **results, **run.log.last, skipped_steps=skipped,
                seconds=run.meta["seconds"] + time.time() - run.start_time)
  if jax.process_index() == 0:
    _write_or_fail(lambda: run.writer.write(record), run.workdir)
  teacher = (f" (teacher {results['teacher_accuracy']:.4f}, agreement {results['agreement']:.4f})"
             if "teacher_accuracy" in results else "")
  skipped_note = (f"; {skipped} non-finite step(s) skipped so far (first: "
                  f"{nonfinite_what(host_health, run.steps.quantity_names)})" if skipped else "")
  _log(f"epoch {run.epoch}/{run.config.num_epochs} step {run.step}: test accuracy {results['accuracy']:.4f} "
       f"loss {results['loss']:.4f}{teacher}{skipped_note}")


def finish(run: Run) -> dict:
  """The final evaluation (test and validation parts) and ``summary.json``."""
  config = run.config
  if run.step0 >= run.total_steps:
    _log(f"{run.workdir} already finished ({run.total_steps} steps); re-evaluating the final checkpoint.")
  final = evaluate(run.eval_step, run.state, run.pipeline.evaluation(run.task.test), mesh=run.mesh,
                   teacher_logits=run.fixed_teacher)
  seconds = run.meta["seconds"] + (time.time() - run.start_time if run.step0 < run.total_steps else 0.0)
  # The held-out validation part, for model selection (e.g. the learning rate) without looking at the test set.
  val = (evaluate(run.eval_step, run.state, run.pipeline.evaluation(run.task.val), mesh=run.mesh)
         if len(run.task.val) else {})
  summary = {
      "method": config.method,
      "model": config.model.name,
      "accuracy": final["accuracy"],
      "best_accuracy": max(run.best_accuracy, final["accuracy"]),
      "loss": final["loss"],
      "num_steps": run.step,
      "num_epochs": config.num_epochs,
      "skipped_steps": int(jax.device_get(run.health)["skipped"]),
      "seconds": seconds,
      "seed": config.seed,
      "num_devices": jax.device_count(),
      "pipeline": "device" if isinstance(run.pipeline, data.DevicePipeline) else "host",
      "finished": True,
  }
  if config.data.mock:  # TFDS mock data (data.mock): never to be read as a result
    summary["data_mock"] = True
  for key in ("teacher_accuracy", "agreement", "teacher_kl", *run.task.metrics):
    if key in final:
      summary[key] = final[key]
  for key in ("accuracy", "loss", "auc"):
    if key in val:
      summary[f"val_{key}"] = val[key]
  # What identifies the run, so that tables group runs by fingerprint, never by path.
  identity = run.identity
  summary.update(
      dataset=run.task.name, fingerprint=identity["fingerprint"], config_fingerprint=identity["config_fingerprint"],
      group_fingerprint=identity["group_fingerprint"], config=identity["config"],
      data={k: identity["data"][k] for k in ("name", "digest", "sizes")},
      teachers=[{k: t[k] for k in ("field", "model", "variables_sha256")} for t in identity["teachers"]])
  wait_for_save(run)  # summary.json says "finished": the final checkpoint is on disk before it
  if jax.process_index() == 0:
    _write_or_fail(lambda: report.write_json(os.path.join(run.workdir, "summary.json"), summary), run.workdir)
  return summary


# ------------------------------------------------------------------------------------------------ helpers


def _write_or_fail(write, workdir: str) -> None:
  """Runs ``write`` (a file in the work directory); an OS error is a one-line ``RunFault``."""
  try:
    write()
  except OSError as e:
    raise RunFault(f"workdir: writing in {workdir!r} failed ({fileio.failure_reason(e)}); the checkpoints are intact: fix it and "
                   "run the same command to resume") from None
