"""Config validation: every problem becomes one line naming the field and what was expected."""

from __future__ import annotations

import math
import os

from tgeo_jax import models
from tgeo_jax.errors import UserError

__all__ = ["NONFINITE_MODES", "field", "require", "is_int", "is_number", "positive_int", "nonnegative_int", "positive_number",
           "nonnegative_number", "validate", "parse_profile_steps"]

# What a NaN/Inf loss, gradient or state does: end the run naming the step, or skip that update and count it.
NONFINITE_MODES = ("stop", "skip")


def field(config, dotted: str):
  """``config``'s value at ``dotted`` (``"a.b"``); a missing field is a one-line ``UserError``."""
  node = config
  for part in dotted.split("."):
    if part not in node:
      raise UserError(f"{dotted}: missing from the config")
    node = node[part]
  return node


def require(config, dotted: str, predicate, expected: str) -> None:
  value = field(config, dotted)
  ok = False
  try:
    ok = bool(predicate(value))
  except TypeError:
    ok = False
  if not ok:
    raise UserError(f"{dotted}: expected {expected}, got {value!r}")


def is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):
  """A finite int or float (``inf`` and ``nan`` are not numbers a field can take: they fail an epoch later)."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(config, dotted):
  require(config, dotted, lambda v: is_int(v) and v > 0, "a positive integer")


def nonnegative_int(config, dotted):
  require(config, dotted, lambda v: is_int(v) and v >= 0, "an integer >= 0")


def positive_number(config, dotted):
  require(config, dotted, lambda v: is_number(v) and v > 0, "a positive number")


def nonnegative_number(config, dotted):
  require(config, dotted, lambda v: is_number(v) and v >= 0, "a number >= 0")


def adapt_to_mock_data(config) -> list[str]:
  """On ``data.mock=True``, lowers what a tiny smoke-test run cannot satisfy; returns one note per change.

  A mock split holds ``data.mock_examples`` examples and a smoke test runs an epoch or two, so a paper config's
  DKD warm-up (20 epochs) would refuse the run: ``dkd.warmup_epochs`` is capped at ``num_epochs`` (the validation
  batch is fitted once the data is loaded, ``fit_mock_validation_batch``). The changes are in the run's config (and
  so in its fingerprint), which is a mock run's anyway. Real-data runs are never changed.
  """
  if config.data.mock is not True:
    return []
  notes = []
  if config.method == "dkd" and is_number(config.dkd.warmup_epochs) and is_number(config.num_epochs) \
      and config.dkd.warmup_epochs > config.num_epochs:
    notes.append(f"dkd.warmup_epochs {config.dkd.warmup_epochs:g} -> {config.num_epochs:g} (num_epochs)")
    config.dkd.warmup_epochs = float(config.num_epochs)
  return [f"data.mock=True: {note}, so the smoke test can run" for note in notes]


def fit_mock_validation_batch(config, held_out: int, device_count: int, *, uses_validation_batch: bool) -> list[str]:
  """On mock data, lowers ``val_batch_size`` to the largest multiple of ``device_count`` that the ``held_out``
  validation examples fill, for the methods that draw validation batches; returns the note (or nothing)."""
  if not (config.data.mock is True and uses_validation_batch):
    return []
  fitted = held_out // device_count * device_count
  if not 0 < fitted < config.val_batch_size:
    return []
  note = (f"data.mock=True: val_batch_size {config.val_batch_size} -> {fitted} (the mock split holds out "
          f"{held_out} validation examples), so the smoke test can run")
  config.val_batch_size = fitted
  return [note]


def validate(config) -> None:
  """Checks the fields every run uses (``methods.validate_config`` adds the method's own)."""
  field(config, "method")
  # Seeds become uint32 PRNG keys and numpy seeds: a larger one would wrap silently or fail late.
  require(config, "seed", lambda v: is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)")
  require(config, "data.split_seed", lambda v: is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)")
  positive_int(config, "num_epochs")
  positive_int(config, "batch_size")
  positive_int(config, "eval_batch_size")
  positive_int(config, "val_batch_size")
  require(config, "steps_per_run", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = no limit)")
  require(config, "data.val_fraction", lambda v: is_number(v) and 0 < v < 1, "a fraction in (0, 1)")
  require(config, "data.train_subset", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = all)")
  require(config, "data.outliers", lambda v: is_int(v) and v >= 0, "an integer >= 0")
  require(config, "data.val_subset", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = all)")
  require(config, "data.label_noise", lambda v: is_number(v) and 0 <= v < 1, "a fraction in [0, 1)")
  require(config, "data.train_with_val", lambda v: isinstance(v, bool), "True or False")
  if "workers" in config.data:  # the input pipeline (tgeo_jax/data/pipeline.py, tfds_sources.py)
    require(config, "data.workers", lambda v: v is None or (is_int(v) and v >= 0),
            "None (auto) or an integer >= 0 (worker processes)")
    require(config, "data.in_memory", lambda v: v in ("auto", "on", "off"), "'auto', 'on' or 'off'")
    require(config, "data.jpeg_draft", lambda v: isinstance(v, bool), "True or False")
    cache = field(config, "data.cache_dir")
    if cache and os.path.exists(cache) and not os.path.isdir(cache):
      raise UserError(f"data.cache_dir: {cache!r} is a file, expected a directory")
  if "device_pipeline" in config:  # tgeo_jax/data/device_pipeline.py
    require(config, "device_pipeline.mode", lambda v: v in ("auto", "on", "off"), "'auto', 'on' or 'off'")
    positive_int(config, "device_pipeline.steps_per_dispatch")
  if "mock" in config.data:  # TFDS mock data (tgeo_jax/data/tfds_sources.py)
    require(config, "data.mock", lambda v: isinstance(v, bool), "True or False")
    if config.data.mock:
      from tgeo_jax.data import LOADERS
      tfds_names = sorted(k for k, v in LOADERS.items() if isinstance(v, str) and ".tfds_sources:" in v)
      if config.data.name not in tfds_names:
        raise UserError(f"data.mock: True works for the TFDS datasets {tfds_names} only; data.name is "
                        f"{config.data.name!r}")
      positive_int(config, "data.mock_examples")
  if config.data.get("tfds_name"):
    from tgeo_jax.data import LOADERS
    if not (isinstance(LOADERS.get(config.data.name), str) and ".tfds_sources:" in LOADERS[config.data.name]):
      raise UserError(f"data.tfds_name: {config.data.tfds_name!r} names a TFDS dataset, but data.name "
                      f"{config.data.name!r} does not read TFDS (it would be ignored); set it only with cifar100 or "
                      "imagenet2012")
  require(config, "optimizer.decay_epochs",
          lambda v: isinstance(v, (tuple, list)) and all(is_number(e) and e > 0 for e in v),
          "a list of epochs > 0 (for schedule='step')")
  positive_number(config, "optimizer.learning_rate")
  nonnegative_number(config, "optimizer.weight_decay")
  nonnegative_number(config, "optimizer.clip_norm")
  require(config, "optimizer.warmup_epochs", lambda v: is_number(v) and 0 <= v <= config.num_epochs,
          f"a number in [0, num_epochs={config.num_epochs}]")
  require(config, "optimizer.momentum", lambda v: is_number(v) and 0 <= v < 1, "a momentum in [0, 1)")
  positive_int(config, "log.every_steps")
  require(config, "checkpoint.every_steps", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = epoch ends)")
  positive_int(config, "checkpoint.max_to_keep")
  require(config, "checkpoint.async_save", lambda v: isinstance(v, bool), "True or False")
  parse_profile_steps(field(config, "log.profile_steps"))
  require(config, "compilation_cache_dir", lambda v: isinstance(v, str), "a directory path or '' (off)")
  require(config, "nonfinite", lambda v: v in NONFINITE_MODES, "'stop' or 'skip'")
  for name in ("distributed_init_timeout", "distributed_heartbeat_timeout"):
    positive_int(config, name)
  if field(config, "data.name") == "synthetic":
    require(config, "data.synthetic.num_classes", lambda v: is_int(v) and v >= 2, "an integer >= 2")
    positive_int(config, "data.synthetic.num_train")
    positive_int(config, "data.synthetic.num_test")
    require(config, "data.synthetic.input_shape",
            lambda v: isinstance(v, (tuple, list)) and len(v) >= 1 and all(is_int(d) and d > 0 for d in v),
            "a shape of positive integers, e.g. (28, 28, 1)")
  if field(config, "log.tensorboard"):
    try:
      import tensorboardX  # noqa: F401
    except ImportError:
      raise UserError("log.tensorboard: True needs tensorboardX: pip install 'tgeo_jax[tensorboard]' (or set "
                      "log.tensorboard=False)") from None
  require(config, "log.wandb", lambda v: isinstance(v, bool), "True or False")
  if field(config, "log.wandb"):
    try:
      import wandb  # noqa: F401
    except ImportError:
      raise UserError("log.wandb: True needs wandb: pip install 'tgeo_jax[wandb]' (or set log.wandb=False)") from None
  cache_dir = field(config, "teacher.logits_cache_dir")
  if cache_dir and os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
    raise UserError(f"teacher.logits_cache_dir: {cache_dir!r} is a file, expected a directory")
  require(config, "teacher.verify_provenance", lambda v: isinstance(v, bool), "True or False")
  require(config, "teacher.cache_logits", lambda v: v in ("auto", "on", "off"), "'auto', 'on' or 'off'")
  models.compute_dtype(config)  # 'float32' (also when absent) | 'bfloat16'; anything else is a UserError
  from tgeo_jax import study_teacher
  study_teacher.validate(config)


def parse_profile_steps(text) -> tuple[int, int] | None:
  """``log.profile_steps``: ``""`` (off) or ``"A:B"``, the steps ``A <= step < B`` (0-based, A < B)."""
  if not text:
    return None
  first, sep, last = str(text).partition(":")
  try:
    a, b = int(first), int(last)
  except ValueError:
    a = b = -1
  if not sep or a < 0 or b <= a:
    raise UserError(f"log.profile_steps: expected 'A:B' with 0 <= A < B (the steps to trace), got {text!r}")
  return a, b
