"""Curriculum generations: several training runs in a chain, driven above the trainer.

A method that trains in generations (TriKD) declares on its class ``generations = {"count": FIELD, "previous":
FIELD, "name": NAME}``: the ``count`` field holds G, the ``previous`` field takes the work directory of the
previous generation's finished run (TriKD's anchor; ``name`` is what the summary calls it). ``run(config,
workdir)`` trains generations 1..G in ``workdir/gen_1 .. gen_G``, each a plain ``trainer.train_and_evaluate``
with the count set to 1; generation 1 keeps the ``previous`` field as configured. G = 1 is one plain run in
``workdir``.
"""

from __future__ import annotations

import functools
import os

import jax

from tgeo_jax import config_checks, fileio, methods, run_identity, trainer

__all__ = ["run"]


def _finished_summary(workdir: str) -> dict | None:
  summary = fileio.read_json_or_none(os.path.join(workdir, "summary.json"))
  return summary if summary is not None and summary.get("finished") else None


def run(config, workdir: str) -> dict:
  """Trains the generations of ``config.method`` in ``workdir/gen_g``, each from the previous generation's run.

  Resumable: a generation with a finished ``summary.json`` of the same configuration is skipped, an unfinished one
  resumes from its checkpoint (``trainer.train_and_evaluate`` does that). Returns the last generation's summary
  with a ``generations`` list (also written to ``workdir/summary.json``), or an unfinished summary when a
  generation stopped early (``steps_per_run``).

  Example::

    config.trikd.generations = 2
    summary = generations.run(config, "runs/trikd")  # runs/trikd/gen_1, runs/trikd/gen_2
  """
  method_cls = methods.get_class(config.method)
  if method_cls.generations is None:
    return trainer.train_and_evaluate(config, workdir)
  spec = method_cls.generations
  config_checks.require(config, spec["count"], lambda v: config_checks.is_int(v) and v >= 1, "an integer >= 1")
  group, count_key = spec["count"].split(".")
  previous_group, previous_key = spec["previous"].split(".")
  num_generations = config[group][count_key]
  if num_generations == 1:
    return trainer.train_and_evaluate(config, workdir)
  previous = config[previous_group][previous_key]
  reads = functools.partial(methods.reads_field, config.method)
  history, seconds = [], 0.0
  for g in range(1, num_generations + 1):
    gen_dir = os.path.join(workdir, f"gen_{g}")
    gen_config = config.copy_and_resolve_references()
    gen_config[group][count_key] = 1
    gen_config[previous_group][previous_key] = previous
    summary = _finished_summary(gen_dir)
    if summary is not None and not run_identity.matches_fingerprint(summary.get("config_fingerprint"), gen_config,
                                                                    reads):
      # A finished generation of another configuration is never reused (the trainer refuses to resume one).
      summary = None
    if summary is not None:
      if jax.process_index() == 0:
        print(f"{config.method} generation {g}/{num_generations} already finished in {gen_dir}; skipping.",
              flush=True)
    else:
      summary = trainer.train_and_evaluate(gen_config, gen_dir)
      if not summary.get("finished", True):
        return summary
    history.append({"generation": g, "workdir": gen_dir, spec["name"]: previous,
                    **{k: summary[k] for k in ("accuracy", "best_accuracy", "teacher_accuracy") if k in summary}})
    seconds += summary.get("seconds", 0.0)
    previous = gen_dir
  final = dict(summary, generations=history, seconds=seconds)
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(workdir, "summary.json"), final)
  return final
