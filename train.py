"""Command-line entry point.

  python train.py --config=configs/fashion_mnist.py:METHOD --workdir=DIR [--config.KEY=VALUE ...]

Re-running the same command on an interrupted or finished DIR resumes from its latest checkpoint.
Config files are Python: load only configs you trust, as you would run their code. Everything but the signal
set-up lives in ``tgeo_jax.cli.main`` (which the tests call in-process).
"""

import sys

from tgeo_jax import signals  # imports nothing heavy

# SIGINT/SIGTERM before the trainer installs its own handler (while flags, config and data load): exit with
# 128 + signal and no traceback; there is nothing to save yet.
signals.exit_at_once()

if __name__ == "__main__":
  from tgeo_jax import supervise  # after the handlers: a signal during the imports exits quietly too

  supervise.become_child()  # a supervised multi-host child dies with its parent
  if supervise.wanted(sys.argv):  # multi-host: the run is a child whose JAX aborts become one line
    sys.exit(supervise.run(sys.argv))
  from tgeo_jax import cli

  # After a signal: no interpreter teardown; after a finished or refused run: signals ignored (signals.finish).
  signals.finish(cli.main(sys.argv))
