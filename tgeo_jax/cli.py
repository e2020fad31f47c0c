"""The command line: ``python train.py --config=FILE:ARG --workdir=DIR [--config.FIELD=VALUE ...]``.

``main(argv) -> exit status`` parses the flags (absl + ml_collections) and runs; every user-facing error is one line
on stderr: 2 for bad input (flags, config, data, checkpoints), 1 for a runtime fault (non-finite values, a full
disk), 128 + signal for SIGTERM/SIGINT. It never exits the process itself, so tests call it in-process.
"""

from __future__ import annotations

import os
import re
import sys

from tgeo_jax.errors import UserError

__all__ = ["parse", "USAGE", "main", "run"]


def _flag_values(argv: list[str]):
  """A fresh absl ``FlagValues`` with ``--workdir`` and ``--config`` for ``argv`` (ml_collections defines the
  ``--config.FIELD`` override flags from the argument list it is given, so each parse gets its own)."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and summary.json.", flag_values=fv)
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/fashion_mnist.py:kd.",
                                  flag_values=fv, lock_config=True, sys_argv=list(argv))
  return fv


def _verbosity(argv: list[str]) -> list[str]:
  """Applies and removes ``--verbosity=N`` / ``-v=N`` (absl logging; orbax logs at INFO)."""
  from absl import logging
  rest = []
  for a in argv:
    m = re.fullmatch(r"(?:--verbosity|-v)=(-?\d+)", a)
    if m:
      logging.set_verbosity(int(m.group(1)))
    else:
      rest.append(a)
  return rest


def parse(argv: list[str]):
  """``(config, workdir)`` from ``argv`` (``argv[0]`` is the program); bad flags raise a one-line ``UserError``."""
  from absl import flags
  argv = _verbosity(list(argv))
  try:
    fv = _flag_values(argv)
    rest = fv(argv)
    if fv.config is not None:
      fv.config.keys  # noqa: B018 - a failed config file load surfaces only on access: surface it here
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    message = lines[0]
    if "Traceback" in str(e):  # a config file's get_config raised: its own last line says what is wrong
      message = f"{message} {lines[-1]}"
    raise UserError(message) from None
  except (KeyError, AttributeError) as e:
    # ml_collections' KeyError carries "'name'\nDid you mean ...?": print its words, not the tuple's repr.
    inner = e.args[0] if e.args else e
    while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError(message))
      inner = inner.args[0]
    detail = " ".join(str(inner).split()).replace("'", "")
    missing = detail.split()[0] if detail else ""
    hint = detail[len(missing):].strip()
    if hint.startswith("Did you mean"):
      detail = f"{missing}; did you mean{hint[len('Did you mean'):]}"
    field = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                  and missing and missing in a.split("=")[0].split(".")[1:]), None)
    raise UserError(f"{field or '--config'}: no such config field ({detail})") from None
  except OSError as e:
    raise UserError("--config: " + " ".join(str(e).split())) from None
  except Exception as e:  # noqa: BLE001 - a config file raising on load
    raise UserError(f"--config: the config file failed to load ({type(e).__name__}: "
                    f"{str(e).splitlines()[0]})") from None
  if len(rest) > 1:
    raise UserError(f"unexpected argument {rest[1]!r} (every setting is a flag: --config=FILE:ARG, --workdir=DIR, "
                    "--config.FIELD=VALUE)")
  for name, example in (("config", "configs/fashion_mnist.py:kd"), ("workdir", "runs/kd")):
    if fv[name].value is None:
      raise UserError(f"--{name}: required, e.g. --{name}={example}")
  return fv.config, fv.workdir


USAGE = """usage: python train.py --config=FILE:ARG --workdir=DIR [--config.FIELD=VALUE ...]

  --config=FILE:ARG        a config file and its argument, e.g. configs/fashion_mnist.py:kd
  --workdir=DIR            checkpoints, metrics.jsonl, summary.json; the same command resumes a run there
  --config.FIELD=VALUE     any config field, e.g. --config.optimizer.learning_rate=0.05
  --verbosity=N            absl logging verbosity (orbax logs at INFO: --verbosity=0 shows it)

Fields and their defaults: tgeo_jax/default_config.py and the config file; methods: docs/methods.md."""


def main(argv: list[str]) -> int:
  """Parses ``argv`` and runs it; returns the exit status."""
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print(USAGE)
    return 0
  try:
    config, workdir = parse(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return run(config, workdir)


def _one_line_warnings() -> None:
  """The library's own warnings as ``warning: MESSAGE`` lines, like every other line the program prints."""
  import warnings
  default = warnings.formatwarning

  def formatwarning(message, category, filename, lineno, line=None):
    if category.__module__.startswith("tgeo_jax"):
      return f"warning: {message}\n"
    return default(message, category, filename, lineno, line)

  warnings.formatwarning = formatwarning


def use_compilation_cache(directory: str) -> None:
  """Points JAX's persistent compilation cache at ``directory`` (``compilation_cache_dir``; '' leaves JAX's own
  setting, e.g. ``JAX_COMPILATION_CACHE_DIR``). A directory that cannot be created or written is a one-line
  ``UserError``; a later failed write of one entry is JAX's warning, and the run continues."""
  if not directory or not isinstance(directory, str):  # '' is off; another type is config_checks' one line
    return
  import tempfile

  import jax
  from jax.experimental.compilation_cache import compilation_cache

  from tgeo_jax import fileio
  directory = os.path.abspath(os.path.expanduser(directory))
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_probe"):
      pass
  except OSError as e:
    raise UserError(f"compilation_cache_dir: cannot write in {directory!r} ({fileio.failure_reason(e)}); expected "
                    "a writable directory, or '' to turn the cache off") from None
  if jax.config.jax_compilation_cache_dir != directory:
    # The cache is opened once per process, at the first compilation: reset it, in case this process compiled
    # with another (or no) cache before (tests, notebooks, bench/study.py).
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(directory)


def run(config, workdir: str) -> int:
  from absl import logging
  from tgeo_jax import methods, parallel, trainer
  _one_line_warnings()
  # orbax logs every save at INFO; keep the console to our own progress lines unless asked (--verbosity).
  if logging.get_verbosity() == logging.INFO:
    logging.set_verbosity(logging.WARNING)
  try:
    from tgeo_jax import config_checks
    for field in ("distributed_init_timeout", "distributed_heartbeat_timeout"):  # used before validate() runs
      config_checks.positive_int(config, field)
    parallel.initialize_distributed(bool(config.distributed),
                                    init_timeout=config.distributed_init_timeout,
                                    heartbeat_timeout=config.distributed_heartbeat_timeout)
    use_compilation_cache(config.compilation_cache_dir)
    method_cls = methods.get_class(config.method)
    if method_cls.generations is not None:  # a chain of runs (TriKD's curriculum), driven above the trainer
      from tgeo_jax import generations
      summary = generations.run(config, workdir)
    else:
      summary = trainer.train_and_evaluate(config, workdir)
  except trainer.Interrupted as e:  # SIGTERM/SIGINT: a checkpoint was saved if the loop had started
    return 128 + e.signum
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (trainer.NonFiniteError, trainer.RunFault) as e:
    if parallel.is_peer_failure(e):  # e.g. a save whose gather met a dead process: say that, and exit at once
      parallel.stop_after_peer_failure(str(e))
    print(f"error: {e}", file=sys.stderr)
    return 1
  except OSError as e:  # a disk fault outside the trainer's own guards: one line, never a traceback
    where = f"{e.filename}: " if e.filename else ""
    print(f"error: {where}{e.strerror or e}", file=sys.stderr)
    return 1
  except Exception as e:
    if not parallel.is_peer_failure(e):
      raise
    parallel.stop_after_peer_failure(str(e))
  if not summary.get("finished", True):
    return 0
  acc = summary["accuracy"]
  extra = f", teacher {summary['teacher_accuracy']:.4f}" if "teacher_accuracy" in summary else ""
  print(f"done: {summary['method']} test accuracy {acc:.4f} (best {summary['best_accuracy']:.4f}{extra}) "
        f"in {summary['seconds']:.1f} s; summary in {workdir}/summary.json")
  return 0
