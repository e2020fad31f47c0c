"""Argument checks for the pure losses: one style for every loss function of the library.

Two kinds, so that checking never slows the compiled step:

* **Static checks** run while a function is traced, on what is known then: Python (or numpy) values of
  temperatures, weights and smoothing factors, array shapes and dtypes. They cost nothing in the compiled program
  and raise ``ValueError`` naming the function, the argument and what was expected, e.g.
  ``kd_loss: temperature: expected a finite number > 0, got 0.0``.
* **Value checks** need the data: labels in ``[0, K)``, a traced ``alpha`` in ``[0, 1]``, a traced temperature
  ``> 0``. They run only when the caller passes ``validate=True``, as ``jax.experimental.checkify`` checks:
  called eagerly a failed check raises ``checkify.JaxRuntimeError`` at once; under ``jax.jit`` wrap the function
  in ``checkify.checkify`` and call ``err.throw()`` (a jitted function with ``validate=True`` and no ``checkify``
  around it fails to trace, by JAX's design). With ``validate=False`` (the default) no check is compiled.

Without ``validate`` an out-of-range label never gives a finite number: the per-sample losses that read the label
return NaN for it (the non-finite guard of the trainer, or a test, then sees it).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

__all__ = ["compute_dtype", "is_static", "as_static", "check_positive", "check_unit_interval", "check_nonnegative",
           "check_logits", "check_same_shape", "check_logit_pair", "check_labels", "value_checks", "valid_labels"]


def compute_dtype(*arrays) -> jnp.dtype:
  """The dtype every loss computes in: ``promote_types(input dtype, float32)``.

  bfloat16 / float16 inputs compute (and return) float32; float32 stays float32; float64 (under
  ``jax_enable_x64``) stays float64. With several floating inputs the widest wins.
  """
  dtype = jnp.dtype(jnp.float32)
  for a in arrays:
    if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating):
      dtype = jnp.promote_types(dtype, a.dtype)
  return dtype


def is_static(value) -> bool:
  """Whether ``value`` is known at trace time (a Python or numpy number or a numpy array), not a traced array."""
  return isinstance(value, (numbers.Number, np.ndarray, np.generic)) and not isinstance(value, bool)


def _fail(fn: str, arg: str, expected: str, got) -> None:
  raise ValueError(f"{fn}: {arg}: expected {expected}, got {got}")


def _require_number(fn: str, arg: str, value, expected: str) -> None:
  """A bool, None, a string...: neither a static number nor an array (a traced one is checked by ``validate``)."""
  if isinstance(value, bool) or not (is_static(value) or isinstance(value, jax.Array)):
    _fail(fn, arg, expected, repr(value))


def as_static(value, dtype):
  """A static number as a weakly typed Python float (a numpy float64 would promote float32 math to float64 under
  x64), a static array as ``dtype``; traced values unchanged."""
  if not is_static(value):
    return value
  return float(value) if np.ndim(value) == 0 else jnp.asarray(value, dtype)


def check_positive(fn: str, arg: str, value) -> None:
  """A static ``value`` must be a finite number ``> 0`` (temperatures); traced values pass (see ``value_checks``)."""
  _require_number(fn, arg, value, "a finite number > 0")
  if is_static(value) and not (np.all(np.isfinite(value)) and np.all(np.asarray(value) > 0)):
    _fail(fn, arg, "a finite number > 0", repr(value) if np.ndim(value) == 0 else np.asarray(value).tolist())


def check_nonnegative(fn: str, arg: str, value) -> None:
  """A static ``value`` must be a finite number ``>= 0`` (loss weights)."""
  _require_number(fn, arg, value, "a finite number >= 0")
  if is_static(value) and not (np.all(np.isfinite(value)) and np.all(np.asarray(value) >= 0)):
    _fail(fn, arg, "a finite number >= 0", repr(value) if np.ndim(value) == 0 else np.asarray(value).tolist())


def check_unit_interval(fn: str, arg: str, value) -> None:
  """A static ``value`` (scalar or array) must lie in ``[0, 1]`` (fusion ratios, smoothing factors)."""
  _require_number(fn, arg, value, "values in [0, 1]")
  if is_static(value):
    v = np.asarray(value, np.float64)
    if not (np.all(np.isfinite(v)) and np.all(v >= 0) and np.all(v <= 1)):
      _fail(fn, arg, "values in [0, 1]", repr(float(v)) if v.ndim == 0 else f"an array with values in "
            f"[{np.nanmin(v):.4g}, {np.nanmax(v):.4g}]")


def check_logits(fn: str, arg: str, logits) -> None:
  """``logits`` must be a floating ``[..., K]`` array with ``K >= 2`` classes (a 1-class axis is a shape bug)."""
  shape = jnp.shape(logits)
  if not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
    _fail(fn, arg, "a floating-point array of logits [..., K]", f"dtype {jnp.result_type(logits)}")
  if len(shape) < 1 or shape[-1] < 2:
    _fail(fn, arg, "logits of shape [..., K] with K >= 2 classes", f"shape {tuple(shape)}")


def check_same_shape(fn: str, arg: str, value, reference_arg: str, reference) -> None:
  """``value`` must have the shape of ``reference`` (e.g. teacher and student logits)."""
  if jnp.shape(value) != jnp.shape(reference):
    raise ValueError(f"{fn}: {arg}: expected the shape of {reference_arg} {tuple(jnp.shape(reference))}, "
                     f"got {tuple(jnp.shape(value))}")


def check_logit_pair(fn: str, student_logits, teacher_logits) -> None:
  """Student and teacher logits: each ``[..., K]`` floating with ``K >= 2``, and the same shape."""
  check_logits(fn, "student_logits", student_logits)
  check_logits(fn, "teacher_logits", teacher_logits)
  check_same_shape(fn, "teacher_logits", teacher_logits, "student_logits", student_logits)


def check_labels(fn: str, labels, logits, arg: str = "labels") -> None:
  """``labels`` must be integer class indices of shape ``logits.shape[:-1]``."""
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    _fail(fn, arg, "integer class indices", f"dtype {jnp.result_type(labels)}")
  if jnp.shape(labels) != jnp.shape(logits)[:-1]:
    raise ValueError(f"{fn}: {arg}: expected shape {tuple(jnp.shape(logits)[:-1])} (one class per row of the "
                     f"logits {tuple(jnp.shape(logits))}), got {tuple(jnp.shape(labels))}")


def valid_labels(labels: jax.Array, num_classes: int) -> jax.Array:
  """``[...]`` bool: ``0 <= label < num_classes``."""
  return (labels >= 0) & (labels < num_classes)


def value_checks(fn: str, validate: bool, *, labels=None, num_classes: int | None = None, alpha=None,
                 temperature=None) -> None:
  """With ``validate=True``, ``checkify`` checks of the data-dependent conditions (see the module docstring)."""
  if not validate:
    return
  if labels is not None:
    checkify.check(jnp.all(valid_labels(labels, num_classes)),
                   f"{fn}: labels: expected class indices in [0, {num_classes}), got values in "
                   "[{lo}, {hi}]", lo=jnp.min(labels, initial=0), hi=jnp.max(labels, initial=0))
  if alpha is not None and not is_static(alpha):
    alpha = jnp.asarray(alpha)
    checkify.check(jnp.all((alpha >= 0) & (alpha <= 1)),
                   f"{fn}: alpha: expected values in [0, 1], got values in [{{lo}}, {{hi}}]",
                   lo=jnp.min(alpha, initial=0.0), hi=jnp.max(alpha, initial=0.0))
  if temperature is not None and not is_static(temperature):
    temperature = jnp.asarray(temperature)
    checkify.check(jnp.all(temperature > 0), f"{fn}: temperature: expected > 0, got {{t}}", t=jnp.min(temperature))
