"""Files that must never be seen half-written, and the JSON readers: the one way the package does both.

``atomic_write(path, write)`` writes through a temporary file in the same directory (named by process and thread,
so concurrent writers never share one), fsyncs it, renames it over ``path`` and fsyncs the directory, so a crash
or a power loss leaves either the old file or the new one, whole. Checkpoints have their own path (orbax, plus the
fsyncs of ``checkpoint.py``); the teacher-logit cache keeps its own temporaries' names (``teacher.LogitCache``
removes those of dead writers by name).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from typing import Any, BinaryIO, Callable

__all__ = ["atomic_write", "write_text", "write_json", "read_json", "read_json_or_none", "failure_reason",
           "failure_remedy", "known_write_failure"]


def _fsync_directory(directory: str) -> None:
  try:
    fd = os.open(directory or ".", os.O_RDONLY)
  except OSError:
    return  # a platform or file system without directory handles: the rename is still atomic
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], Any]) -> None:
  """Calls ``write(f)`` on a binary temporary file, then makes it ``path`` atomically and durably."""
  tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_directory(os.path.dirname(path))
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str, obj, **dumps_kwargs) -> None:
  """``obj`` as JSON (``json.dumps(obj, **dumps_kwargs)`` and a newline), atomically."""
  write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def read_json_or_none(path: str) -> dict | None:
  """A JSON object file, or None when absent or unreadable (a file torn by a kill is rewritten, not trusted)."""
  try:
    value = read_json(path)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


# The write failures with a known remedy: errno, the words a wrapped error (tensorstore's) carries, reason, remedy.
_KNOWN_FAILURES = (
    (errno.ENOSPC, "No space left", "no space left on device", "free space"),
    (errno.EROFS, "Read-only file system", "read-only file system",
     "make the file system writable again (it is read-only)"),
)


def known_write_failure(e: BaseException) -> bool:
  """Whether ``e`` is a write failure with a known remedy: no space left, or a read-only file system."""
  return _known_failure(e) is not None


def _known_failure(e: BaseException):
  text = " ".join(str(e).split())
  for code, words, reason, remedy in _KNOWN_FAILURES:
    if getattr(e, "errno", None) == code or words in text:
      return reason, remedy
  return None


def failure_reason(e: BaseException) -> str:
  """A failed write in a few words: no space, a read-only file system, the OS's reason, or the exception."""
  known = _known_failure(e)
  if known:
    return known[0]
  if isinstance(e, OSError) and e.strerror:
    return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
  return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"


def failure_remedy(e: BaseException) -> str:
  """What to do about a failed write: free space, make the filesystem writable, or fix what the reason says."""
  known = _known_failure(e)
  return known[1] if known else "fix the cause"
