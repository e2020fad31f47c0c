"""User-facing errors: the CLI prints them as one line and exits with status 2 (no traceback)."""

__all__ = ["UserError"]


class UserError(Exception):
  """Bad configuration, data or checkpoint; the message names the field/file and what was expected."""
