"""Command-line entry point.

  python train.py --config=configs/fashion_mnist.py:METHOD --workdir=DIR [--config.KEY=VALUE ...]

Re-running the same command on an interrupted or finished DIR resumes from its latest checkpoint.
Config files are Python: load only configs you trust, as you would run their code.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and summary.json.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/fashion_mnist.py:kd.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from tgeo_jax import cli
  sys.exit(cli.run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
  app.run(main)
