"""Runs a config with user-facing error handling: bad input -> one line on stderr, exit status 2."""

from __future__ import annotations

import sys

from tgeo_jax.errors import UserError


def run(config, workdir: str) -> int:
  from absl import logging
  from tgeo_jax import methods, parallel, trainer
  # orbax logs every save at INFO; keep the console to our own progress lines unless asked (-v / --verbosity).
  if logging.get_verbosity() == logging.INFO:
    logging.set_verbosity(logging.WARNING)
  try:
    parallel.initialize_distributed(bool(config.distributed))
    method_cls = methods.get_class(config.method)
    summary = (method_cls.run or trainer.train_and_evaluate)(config, workdir)
  except trainer.Interrupted as e:  # SIGTERM/SIGINT: a checkpoint was saved if the loop had started
    return 128 + e.signum
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (trainer.NonFiniteError, trainer.RunFault) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except OSError as e:  # a disk fault outside the trainer's own guards: one line, never a traceback
    where = f"{e.filename}: " if e.filename else ""
    print(f"error: {where}{e.strerror or e}", file=sys.stderr)
    return 1
  if not summary.get("finished", True):
    return 0
  acc = summary["accuracy"]
  extra = f", teacher {summary['teacher_accuracy']:.4f}" if "teacher_accuracy" in summary else ""
  print(f"done: {summary['method']} test accuracy {acc:.4f} (best {summary['best_accuracy']:.4f}{extra}) "
        f"in {summary['seconds']:.1f} s; summary in {workdir}/summary.json")
  return 0
