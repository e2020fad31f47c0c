"""Command-line entry point.

  python train.py --config=configs/fashion_mnist.py:METHOD --workdir=DIR [--config.KEY=VALUE ...]

Re-running the same command on an interrupted or finished DIR resumes from its latest checkpoint.
Config files are Python: load only configs you trust, as you would run their code.
"""

import re
import signal
import sys

from tgeo_jax import signals


def _exit_quietly(signum, frame):
  """SIGINT/SIGTERM before the trainer installs its own handler (while flags, config and data load): exit with
  128 + signal and no traceback; there is nothing to save yet. Recorded too: should the exit be swallowed (a
  signal inside a gc callback), the trainer stops on the record before training."""
  del frame
  signals.record(signum)
  sys.exit(128 + signum)


signal.signal(signal.SIGINT, _exit_quietly)
signal.signal(signal.SIGTERM, _exit_quietly)
signals.quiet_swallowed_exits()


# After the handlers: a signal during these imports exits quietly too.
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and summary.json.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/fashion_mnist.py:kd.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS



def parse_flags(argv):
  """absl/ml_collections parsing with bad flags reported as one line and exit status 2 (no traceback)."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys  # noqa: B018 - a failed config file load surfaces only on access: surface it here
    return rest
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    message = lines[0]
    if "Traceback" in str(e):  # a config file's get_config raised: its own last line says what is wrong
      message = f"{message} {lines[-1]}"
  except (KeyError, AttributeError) as e:
    field = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                  and re.sub(r"\W", "", str(e)) in a.split("=")[0]), None)
    message = f"{field or '--config'}: no such config field ({str(e).strip(chr(34))})"
  except OSError as e:
    message = "--config: " + " ".join(str(e).split())
  except Exception as e:  # noqa: BLE001 - a config file raising on load
    message = f"--config: the config file failed to load ({type(e).__name__}: {str(e).splitlines()[0]})"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected argument {argv[1]!r} (every setting is a flag: --config=FILE:ARG, --workdir=DIR, "
          "--config.FIELD=VALUE)", file=sys.stderr)
    sys.exit(2)
  from tgeo_jax import cli
  sys.exit(cli.run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
