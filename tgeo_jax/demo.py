"""``make demo``: a CNN teacher and students on Fashion-MNIST, then a table of test accuracies.

The teacher trains once on the full training part and is cached in ``WORKDIR/teacher`` (later runs reuse it);
each student trains on a 5,000-example stratified subset (where the teacher's soft labels matter) in
``WORKDIR/<method>``. Every run resumes if interrupted. Equivalent to, for each method::

  python train.py --config=configs/fashion_mnist.py:teacher --workdir=WORKDIR/teacher
  python train.py --config=configs/fashion_mnist.py:METHOD --workdir=WORKDIR/METHOD \
      --config.teacher.checkpoint=WORKDIR/teacher
"""

from __future__ import annotations

import os
import time

from tgeo_jax import signals  # imports nothing heavy

if __name__ == "__main__":  # the command: a signal while absl, the config code and JAX load exits quietly too
  signals.exit_at_once()

from absl import app, flags, logging

from tgeo_jax import default_config, report

__all__ = ["FLAGS", "CONFIG_FILE", "load_config", "main"]

flags.DEFINE_string("workdir", "workdirs/demo", "Where the teacher and the students are trained.")
flags.DEFINE_list("methods", ["ce", "kd", "tgeo"], "Student methods to train (configs/fashion_mnist.py:METHOD).")
flags.DEFINE_list("overrides", [], "Extra config overrides for every student, e.g. num_epochs=5.")
FLAGS = flags.FLAGS

CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "fashion_mnist.py")


def load_config(arg: str):
  return default_config.load_config_file(CONFIG_FILE, arg)


def main(argv):
  del argv
  from tgeo_jax import cli
  if logging.get_verbosity() == logging.INFO:
    logging.set_verbosity(logging.WARNING)
  start = time.time()
  teacher_dir = os.path.join(FLAGS.workdir, "teacher")
  print(f"== teacher ({teacher_dir})")
  code = cli.run(load_config("teacher"), teacher_dir)
  if code:
    return code
  rows = [dict(report.read_json(os.path.join(teacher_dir, "summary.json")), role="teacher")]
  for method in FLAGS.methods:
    config = default_config.override(load_config(method), FLAGS.overrides)
    config.teacher.checkpoint = teacher_dir
    workdir = os.path.join(FLAGS.workdir, method)
    print(f"== student: {method} ({workdir})")
    code = cli.run(config, workdir)
    if code:
      return code
    rows.append(dict(report.read_json(os.path.join(workdir, "summary.json")), role="student"))
  print()
  print("Fashion-MNIST test accuracy (students: 5,000 training examples; teacher: the full training part)")
  print(report.format_table(rows, ["role", "method", "model", "accuracy", "best_accuracy", "num_steps", "seconds"]))
  print(f"\ntotal wall time {time.time() - start:.1f} s (runs already finished in {FLAGS.workdir} are reused)")
  return 0


def _command() -> None:
  """``python -m tgeo_jax.demo``: ``train.py``'s signal handling (tgeo_jax.signals; ``exit_at_once`` is installed
  above, before the imports): SIGINT / SIGTERM while loading exit 128 + signal quietly; inside a run the trainer
  saves and stops; after a stop no interpreter teardown; after the table signals are ignored."""
  try:
    app.run(main)
  except SystemExit as stop:
    signals.finish(stop.code)
  signals.finish(0)


if __name__ == "__main__":
  _command()
