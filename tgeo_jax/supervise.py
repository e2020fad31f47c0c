"""Multi-host runs under a supervising parent: a process that JAX itself aborts ends with one line.

When a process of a multi-host run dies, the others usually meet the lost connection at their next collective and
stop with one line (``parallel.stop_after_peer_failure``). But JAX's C++ coordination client can get there first
and abort the process from one of its own threads (SIGABRT, a glog ``F`` line and a C++ stack, no Python hook: its
``missed_heartbeat_callback`` takes no Python function in jaxlib 0.10). That is what happens when the coordinator
(process 0) dies, and when a process waits at start-up for peers that never come.

So ``train.py`` with ``distributed=True`` runs the training as a child process (the same command, marked by
``TGEO_SUPERVISED=1`` in its environment) and forwards its stderr line by line, holding back JAX's own log lines
(glog format) and what follows them for a while. If the child is aborted by JAX's coordination client, the held
report is replaced by one line naming what happened (and kept, whole, in ``WORKDIR/distributed_abort.<i>.log``),
exit status 1. Anything else reaches stderr unchanged (held lines after ``HOLD_SECONDS`` or at the child's exit)
and the child's exit status is the parent's. SIGINT/SIGTERM are forwarded to the child, which stops with a
checkpoint as usual; the child dies with the parent (``PR_SET_PDEATHSIG``), so killing the parent kills the run.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

__all__ = ["ENV", "HOLD_SECONDS", "wanted", "become_child", "run", "supervise", "describe_abort"]

ENV = "TGEO_SUPERVISED"
# A line JAX's C++ runtime logs: severity, date, time, thread, file:line (absl/glog).
_NATIVE_LOG = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [^\]]+\] ")
_MAYBE_NATIVE = re.compile(rb"^[IWEF]\d")  # an incomplete line that may become a native log line
_FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
# Held native log lines reach stderr when the child is still running this long after the last one.
HOLD_SECONDS = 30.0


def wanted(argv: list[str]) -> bool:
  """Whether ``argv`` (``train.py``'s) is a multi-host run that is not itself the supervised child."""
  if os.environ.get(ENV) == "1":
    return False
  from tgeo_jax import cli
  from tgeo_jax.errors import UserError
  try:
    config, _ = cli.parse(argv)
  except UserError:
    return False  # cli.main reports it, in this process
  return bool(config.get("distributed", False))


def describe_abort(report: str, init_timeout: int | None = None) -> str:
  """The one line for a child aborted by JAX's coordination client, from its native report ``report``."""
  count, index = os.environ.get("JAX_NUM_PROCESSES", "?"), os.environ.get("JAX_PROCESS_ID", "?")
  status = re.search(r"absl::Status: ([A-Z_]+): ([^\n]*)", report)
  # The status and its first sentence ("UNAVAILABLE: Failed to send RPC to coordination service").
  first_sentence = re.split(r"(?<=[a-z])\. ", status.group(2))[0] if status else ""
  detail = f"{status.group(1)}: {first_sentence}" if status else "aborted by JAX's coordination client"
  detail = re.sub(r"\s*\[type\.googleapis.*", "", detail)[:160].rstrip(" .")
  if "RegisterTask" in report or "DEADLINE_EXCEEDED" in detail and "Barrier" not in report:
    waited = f" within distributed_init_timeout={init_timeout} s" if init_timeout else ""
    return (f"error: distributed: process {index} of {count}: not every process joined the run{waited} "
            f"({detail}); start the same command on each of the {count} processes")
  who = "process 0 (the coordinator)" if "leader task" in report else "another process"
  return (f"error: distributed: {who} of {count} stopped or lost contact ({detail}); process {index} stops too, "
          "nothing was lost: run the same command on every process to resume")


def become_child() -> None:
  """In the supervised child (``TGEO_SUPERVISED=1``), first thing: die with the parent (``PR_SET_PDEATHSIG``), so
  killing the parent kills the run. Set here rather than between fork and exec: a ``preexec_fn`` forces a fork of
  a multithreaded parent."""
  if os.environ.get(ENV) != "1":
    return
  try:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() == 1:  # the parent died before the line above: nobody supervises this run
    os._exit(1)


def run(argv: list[str]) -> int:
  """Runs ``argv`` (``[train.py, flags...]``) as a supervised child; returns the exit status to use."""
  from tgeo_jax import cli
  config, workdir = cli.parse(argv)
  return supervise([sys.executable, *argv], workdir, config.get("distributed_init_timeout"))


def supervise(command: list[str], workdir: str, init_timeout: int | None = None) -> int:
  """Runs ``command`` as the supervised child (module docstring); returns the exit status to use."""
  # Its own process group: a terminal's Ctrl-C reaches the parent only, which forwards it once.
  child = subprocess.Popen(command, env=dict(os.environ, **{ENV: "1"}), stderr=subprocess.PIPE, process_group=0)

  def forward(signum, frame):
    del frame
    if child.poll() is None:
      child.send_signal(signum)

  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, forward)

  out = sys.stderr.buffer
  fd = child.stderr.fileno()
  pending = b""  # an incomplete last line
  held: list[bytes] = []  # native log lines and every line after them, not yet written
  held_since = None
  report = bytearray()  # everything held since the first native line (what an abort is described from)

  def emit(data: bytes) -> None:
    out.write(data)
    out.flush()

  while True:
    ready, _, _ = select.select([fd], [], [], 1.0)
    chunk = os.read(fd, 65536) if ready else b""
    if ready and not chunk:  # the child closed stderr: it is exiting
      break
    pending += chunk
    *lines, pending = pending.split(b"\n")
    for line in lines:
      line += b"\n"
      if held or _NATIVE_LOG.match(line):
        held.append(line)
        report.extend(line)
        held_since = time.monotonic() if _NATIVE_LOG.match(line) or held_since is None else held_since
      else:
        emit(line)
    if pending and not held and not _MAYBE_NATIVE.match(pending):
      emit(pending)  # a progress bar's carriage-return update: no newline to wait for
      pending = b""
    if held and time.monotonic() - held_since > HOLD_SECONDS and child.poll() is None:
      emit(b"".join(held))  # not an abort: the child carries on
      held, held_since = [], None
  if pending:
    (held.append if held else emit)(pending)
    if held:
      report.extend(pending)
  rc = child.wait()
  if rc == -signal.SIGABRT and _FATAL in report:
    text = report.decode(errors="replace")
    _keep_report(workdir, text)
    emit((describe_abort(text, init_timeout) + "\n").encode())
    return 1
  if held and rc == 1 and any(line.startswith(b"error: distributed:") for line in held):
    # The child met the lost peer in Python first and said so in one line (parallel.stop_after_peer_failure):
    # JAX's own lines about the same event go to the report file, not to stderr.
    _keep_report(workdir, report.decode(errors="replace"))
    emit(b"".join(line for line in held if line.startswith(b"error: ")))
    return 1
  if held:
    emit(b"".join(held))
  return 128 - rc if rc < 0 else rc


def _keep_report(workdir: str, text: str) -> None:
  """JAX's native report of this process, whole, in ``WORKDIR/distributed_abort.<process>.log``."""
  if os.path.isdir(workdir):
    index = os.environ.get("JAX_PROCESS_ID", "0")
    with open(os.path.join(workdir, f"distributed_abort.{index}.log"), "w") as f:
      f.write(text)
