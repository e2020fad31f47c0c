"""SIGTERM/SIGINT that are never lost.

A signal handler's exception is swallowed ("Exception ignored in ...") when the signal lands while Python runs a
garbage-collection callback (JAX installs one), and the process then goes on. So every handler also records the
signal here, and the trainer checks the record where it can stop cleanly (before setup, and when the loop starts).
Imports nothing heavy: the commands (``train.py``, ``python -m tgeo_jax.demo``) install ``exit_at_once`` before
importing JAX and end with ``finish``.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["Interrupted", "StopRequest", "received", "record", "pending", "quiet_swallowed_exits", "exit_at_once",
           "finish"]

received: list[int] = []  # signals delivered to this process, in order


def record(signum: int) -> None:
  received.append(signum)


def pending() -> int | None:
  """The first signal received so far, or None."""
  return received[0] if received else None


def quiet_swallowed_exits() -> None:
  """Drops Python's "Exception ignored in ..." report of a stop a handler raised inside a gc callback (the stop
  is recorded and acted on; the report would be a traceback on the console). Anything else still reaches the
  previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_swallowed_stops", False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if pending() is not None and (isinstance(exc, (SystemExit, KeyboardInterrupt))
                                  or type(exc).__name__ == "Interrupted"):
      return
    previous(unraisable)

  hook.drops_swallowed_stops = True
  sys.unraisablehook = hook


def _flush_and_exit(status: int):
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # noqa: BLE001 (a closed or broken stream: exit regardless)
      pass
  os._exit(status)


def _exit_quietly(signum, frame):
  del frame
  record(signum)
  # os._exit, not sys.exit: the signal can land inside a native extension's import (jaxlib's nanobind module
  # init, seen in CI), where a Python exception becomes std::terminate: an abort with a traceback. Nothing needs
  # unwinding yet: the work-directory lock is the OS's (released at exit) and every file is written atomically.
  _flush_and_exit(128 + signum)


def exit_at_once() -> None:
  """For a command, first thing: SIGINT/SIGTERM exit with 128 + signal and no traceback while flags, config, data
  and JAX load (there is nothing to save yet). The trainer's ``StopRequest`` takes over for each run and gives
  these back when the run ends.

  Example (a command's entry point)::

    signals.exit_at_once()
    status = cli.main(sys.argv)   # the heavy imports inside
    signals.finish(status)
  """
  signal.signal(signal.SIGINT, _exit_quietly)
  signal.signal(signal.SIGTERM, _exit_quietly)
  quiet_swallowed_exits()


def finish(status: int | None):
  """Ends a command with ``status`` (``None``: 0), as ``sys.exit`` does, once its runs have returned.

  * A signal stopped a run: its checkpoint, if the loop had started, is written and closed. The interpreter's
    teardown is skipped (``os._exit`` after flushing): a signal during setup can leave a compilation running in
    jaxlib's thread pool, which segfaults once the modules it uses are torn down (seen in CI: exit -11 after the
    one line).
  * Otherwise the run is over (finished, or refused with its one line) and a signal from here on changes nothing:
    SIGINT/SIGTERM are ignored. One that landed during the teardown would meet the default action (finalisation
    resets Python-level handlers to SIG_DFL, but leaves SIG_IGN): the process would die of it (exit -2) after
    writing its summary.
  """
  if pending() is not None:
    _flush_and_exit(status if isinstance(status, int) else 128 + pending())
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  sys.exit(status)


class Interrupted(BaseException):
  """SIGTERM/SIGINT ended the run (after a checkpoint when inside the loop). A ``BaseException``, like
  ``KeyboardInterrupt``, so that no ``except Exception`` of a caller swallows it."""

  def __init__(self, signum: int):
    super().__init__(f"signal {signum}")
    self.signum = signum


class StopRequest:
  """SIGTERM/SIGINT: before the loop, ``Interrupted`` at once (nothing to save); inside it, the current step (or
  chunk of steps, with the device pipeline) finishes, then ``StopTraining``; a second signal exits without a
  checkpoint (the last one stays intact)."""

  def __init__(self, log=print):
    self.signum = None
    self.log = log  # prints a line (on the host that speaks for the run)
    self.deferred = False  # set when the training loop starts
    self._old = {}

  def __enter__(self):
    if pending() is not None:  # received before this handler existed (its exit may have been swallowed)
      raise Interrupted(pending())
    quiet_swallowed_exits()
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    record(signum)
    if not self.deferred:
      # Raised wherever setup is; should a gc callback swallow it, ``start_loop`` stops on the record.
      self.log(f"Received signal {signum} before training started: stopping (nothing to save).")
      raise Interrupted(signum)
    if self.signum is not None:  # a second signal: the user insists
      print(f"Received signal {signum} again: exiting without a checkpoint.", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    self.signum = signum

  def start_loop(self) -> None:
    """From here on a signal means: finish the step, save, stop. One received during setup stops now."""
    if pending() is not None:
      raise Interrupted(pending())
    self.deferred = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
