"""A study-only teacher that is confidently wrong on a known set S of training examples (config group
``study_wrong_teacher``; never on by default).

It exists to measure how much room a per-sample fusion ratio α has (docs/study4.md): where the teacher is wrong on
a known set S, the oracle α (0 on S, the best constant elsewhere) bounds what any adaptive method can gain over the
best constant α, and a learned α can be scored by how well it finds S (AUC).

The transform: for every example i of S, the teacher's logits over the K classes are rotated by a shift
``d_i`` drawn uniformly from ``{1, ..., K - 1}``::

    t'_i[c] = t_i[(c + d_i) mod K]

so the teacher keeps its confidence (the same softmax values, on other classes) but its top class moves from
``argmax t_i`` to ``(argmax t_i - d_i) mod K``: wrong wherever it was right. The student's labels, the
validation and test parts, and the teacher on any input that is not a training example are untouched.

S is one of (``study_wrong_teacher.kind``):

* ``random_examples``: ``round(fraction * N)`` examples of the training part chosen uniformly;
* ``classes``: every training example whose training label is in ``classes``.

S and the shifts are a pure function of ``(kind, fraction, classes, seed, the training labels)``: the same for
every method and run seed, so methods are compared on one teacher.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KINDS", "FIELD", "RECORD_FILE", "SUPPORTED_METHODS", "defaults", "active", "validate",
           "wrong_teacher_shift", "shift_logits", "record", "read_record"]

KINDS = ("none", "random_examples", "classes")
FIELD = "study_wrong_teacher"
RECORD_FILE = "study_wrong_teacher.npz"
# The methods whose every read of the teacher on a training example goes through ``Method.batch_teacher_logits`` or
# ``teacher_logits_over_train`` (where the transform is applied); others refuse the group.
SUPPORTED_METHODS = ("kd", "anl_kd", "ada_kd", "wls_kd", "rw_kd", "tgeo", "dist", "dkd")


def defaults():
  """``config.study_wrong_teacher``: off. ``oracle`` (KD only): α = 0 on S, ``kd.w_kd`` elsewhere (the study's
  ceiling for a per-sample α); an off group is not part of a run's fingerprint (``run_identity.config_record``)."""
  import ml_collections
  return ml_collections.ConfigDict(dict(kind="none", fraction=0.3, classes=(), seed=0, oracle=False))


def active(config) -> bool:
  """Whether ``config`` turns the study's wrong teacher on."""
  return FIELD in config and config[FIELD].kind != "none"


def validate(config, num_classes: int | None = None) -> None:
  """One-line ``UserError`` naming a bad ``study_wrong_teacher.*`` field (``num_classes`` checks class ids)."""
  from tgeo_jax.config_checks import is_int, is_number, require
  from tgeo_jax.errors import UserError
  if FIELD not in config:
    return
  g = config[FIELD]
  require(config, f"{FIELD}.kind", lambda v: v in KINDS, f"one of {KINDS}")
  require(config, f"{FIELD}.oracle", lambda v: isinstance(v, bool), "True or False")
  if g.kind == "none":
    if g.oracle:
      raise UserError(f"{FIELD}.oracle: True needs {FIELD}.kind 'random_examples' or 'classes' (the set S it "
                      "zeroes α on)")
    return
  if config.method not in SUPPORTED_METHODS:
    raise UserError(f"{FIELD}.kind: the study's wrong teacher works with the methods {SUPPORTED_METHODS}; method "
                    f"is {config.method!r}")
  if g.oracle and config.method != "kd":
    raise UserError(f"{FIELD}.oracle: True works with method 'kd' only (a per-sample α of KD); method is "
                    f"{config.method!r}")
  require(config, f"{FIELD}.seed", lambda v: is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)")
  if g.kind == "random_examples":
    require(config, f"{FIELD}.fraction", lambda v: is_number(v) and 0 < v <= 1, "a fraction in (0, 1]")
  else:
    bound = f" in [0, {num_classes})" if num_classes else " >= 0"
    require(config, f"{FIELD}.classes",
            lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(
                is_int(c) and 0 <= c and (num_classes is None or c < num_classes) for c in v),
            f"a non-empty list of class ids{bound}")


def wrong_teacher_shift(labels: np.ndarray, num_classes: int, *, kind: str, fraction: float = 0.0,
                        classes=(), seed: int = 0) -> np.ndarray:
  """Per training example, the rotation ``d_i`` of its teacher logits: 0 outside S, in ``[1, K)`` on S.

  Args:
    labels: ``[N]`` integer training labels (``classes`` selects by them).
    num_classes: ``K >= 2``.
    kind: one of ``KINDS``; fraction: in ``(0, 1]`` for ``random_examples``; classes: class ids for ``classes``.
    seed: chooses S (``random_examples``) and the shifts.
  Returns:
    ``[N]`` int32.

  Example:
    >>> import numpy as np
    >>> from tgeo_jax import study_teacher
    >>> d = study_teacher.wrong_teacher_shift(np.array([0, 1, 2, 1]), 3, kind="classes", classes=(1,))
    >>> (d > 0).tolist()
    [False, True, False, True]
  """
  labels = np.asarray(labels)
  n = len(labels)
  rng = np.random.default_rng([seed, 0x57])  # its own stream: independent of every other use of the seed
  if kind == "none":
    return np.zeros(n, np.int32)
  if kind == "random_examples":
    wrong = np.zeros(n, bool)
    wrong[rng.permutation(n)[:int(round(fraction * n))]] = True
  elif kind == "classes":
    wrong = np.isin(labels, np.asarray(classes, np.int64))
  else:
    raise ValueError(f"wrong_teacher_shift: kind {kind!r}, expected one of {KINDS}")
  shift = rng.integers(1, num_classes, size=n).astype(np.int32)
  return np.where(wrong, shift, 0).astype(np.int32)


def shift_logits(logits, shift):
  """``out[b, c] = logits[b, (c + shift[b]) mod K]``: each row rotated by its own shift (0 = unchanged).

  Args:
    logits: ``[B, K]``; shift: ``[B]`` integers.
  Returns:
    ``[B, K]``, same dtype; jit-able (jax or numpy arrays).

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax import study_teacher
    >>> study_teacher.shift_logits(jnp.array([[3.0, 1.0, 0.0]]), jnp.array([1])).tolist()
    [[1.0, 0.0, 3.0]]
  """
  import jax.numpy as jnp
  k = logits.shape[-1]
  columns = (jnp.arange(k)[None, :] + jnp.asarray(shift)[:, None]) % k
  return jnp.take_along_axis(logits, columns, axis=-1)


def record(workdir: str, shift: np.ndarray) -> None:
  """Writes S (``positions``: training-part positions, ``shifts``: their rotations) once to ``RECORD_FILE``."""
  import os
  path = os.path.join(workdir, RECORD_FILE)
  if os.path.exists(path):
    return
  from tgeo_jax import fileio
  positions = np.flatnonzero(shift).astype(np.int32)
  fileio.atomic_write(path, lambda f: np.savez(f, positions=positions, shifts=shift[positions],
                                               num_examples=np.int64(len(shift))))


def read_record(workdir: str) -> tuple[np.ndarray, np.ndarray] | None:
  """``(positions, shifts)`` of a run's S, or None for a run without the study's wrong teacher."""
  import os
  path = os.path.join(workdir, RECORD_FILE)
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    return f["positions"], f["shifts"]
