"""Command-line entry point.

  python train.py --config=configs/fashion_mnist.py:METHOD --workdir=DIR [--config.KEY=VALUE ...]

Re-running the same command on an interrupted or finished DIR resumes from its latest checkpoint.
Config files are Python: load only configs you trust, as you would run their code. Everything but the signal
set-up lives in ``tgeo_jax.cli.main`` (which the tests call in-process).
"""

import os
import signal
import sys

from tgeo_jax import signals  # imports nothing heavy


def _flush_and_exit(status: int):
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # noqa: BLE001 (a closed or broken stream: exit regardless)
      pass
  os._exit(status)


def _exit_quietly(signum, frame):
  """SIGINT/SIGTERM before the trainer installs its own handler (while flags, config and data load): exit with
  128 + signal and no traceback; there is nothing to save yet."""
  del frame
  signals.record(signum)
  # os._exit, not sys.exit: the signal can land inside a native extension's import (jaxlib's nanobind module
  # init, seen in CI), where a Python exception becomes std::terminate: an abort with a traceback. Nothing needs
  # unwinding yet: the work-directory lock is the OS's (released at exit) and every file is written atomically.
  _flush_and_exit(128 + signum)


signal.signal(signal.SIGINT, _exit_quietly)
signal.signal(signal.SIGTERM, _exit_quietly)
signals.quiet_swallowed_exits()

if __name__ == "__main__":
  from tgeo_jax import supervise  # after the handlers: a signal during the imports exits quietly too

  supervise.become_child()  # a supervised multi-host child dies with its parent
  if supervise.wanted(sys.argv):  # multi-host: the run is a child whose JAX aborts become one line
    sys.exit(supervise.run(sys.argv))
  from tgeo_jax import cli

  status = cli.main(sys.argv)
  if signals.pending() is not None:
    # A signal stopped the run; its checkpoint, if the loop had started, is written and closed. Skip the
    # interpreter's teardown: a signal during setup can leave a compilation running in jaxlib's thread pool,
    # which segfaults once the modules it uses are torn down (seen in CI: exit -11 after the one line).
    _flush_and_exit(status)
  # The run is over (finished, or refused with its one line). A signal from here on changes nothing, and one that
  # lands during the interpreter's teardown would meet the default action (finalisation resets Python-level
  # handlers to SIG_DFL, but leaves SIG_IGN): the process would die of it (exit -2) after writing its summary.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  sys.exit(status)
