"""SIGTERM/SIGINT that are never lost.

A signal handler's exception is swallowed ("Exception ignored in ...") when the signal lands while Python runs a
garbage-collection callback (JAX installs one), and the process then goes on. So every handler also records the
signal here, and the trainer checks the record where it can stop cleanly (before setup, and when the loop starts).
Imports nothing heavy: ``train.py`` installs its handler before importing JAX.
"""

from __future__ import annotations

__all__ = ["received", "record", "pending", "quiet_swallowed_exits"]

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
  import sys
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
