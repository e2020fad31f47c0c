"""Non-finite values: an on-device record of the first NaN/Inf step, and the guarded step that keeps it.

The jitted step checks its metrics (loss, gradient norm, ...) and the new state for NaN/Inf and keeps an on-device
record of the first bad step, read on the host only where the loop syncs anyway (log points) and before every
checkpoint save, so a non-finite state is never saved. ``nonfinite='stop'`` ends the run naming that step and
quantity; ``'skip'`` keeps the previous state for such a step and counts it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["NonFiniteError", "initial_health", "make_guarded_step", "nonfinite_what", "nonfinite_message"]


class NonFiniteError(RuntimeError):
  """A loss, gradient or state became NaN/Inf; the run stops before checkpointing it (exit status 1)."""


def initial_health(step: int, skipped: int = 0) -> dict:
  """The on-device non-finite record: ``step`` (steps taken), ``first_bad_step`` (-1: none), ``what`` (index into
  the quantity names), ``value`` (that quantity's value, NaN for state entries), ``skipped`` (steps skipped)."""
  return {"step": jnp.int32(step), "first_bad_step": jnp.int32(-1), "what": jnp.int32(-1),
          "value": jnp.float32(0.0), "skipped": jnp.int32(skipped)}


def _select(ok, new, old):
  """``new`` where the scalar ``ok``, else ``old`` (PRNG keys included), bit for bit."""
  if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(jnp.where(ok, jax.random.key_data(new), jax.random.key_data(old)),
                                    impl=jax.random.key_impl(new))
  return jnp.where(ok, new, old)


def make_guarded_step(method, *, skip_nonfinite: bool):
  """``step(state, frozen, batch, kind, health) -> (state, metrics, health)`` around ``method.train_step``.

  Checks every step, on device, that the metrics (loss first, then the gradient norm, then the others) and every
  floating entry of the new state are finite, and records the first step that is not in ``health`` (the host
  reads it at log points and before saves: no per-step sync). With ``skip_nonfinite`` such a step's update is
  dropped (the whole previous state is kept, optimizer counts included, as ``optax.apply_if_finite`` does), its
  metrics are zeroed and it is counted in ``health['skipped']``. Returns the step and the list of quantity names
  that ``health['what']`` indexes (filled while tracing).
  """
  names: list[str] = []

  def code(name):
    if name not in names:
      names.append(name)
    return names.index(name)

  def step(state, frozen, batch, kind, health):
    new_state, metrics = method.train_step(state, frozen, batch, kind)
    checks = []  # (name code, all finite, value)
    for name in sorted(metrics, key=lambda k: (k != "loss", k != "grad_norm", k)):
      value = jnp.asarray(metrics[name])
      if jnp.issubdtype(value.dtype, jnp.inexact):
        checks.append((code(f"training {name}"), jnp.all(jnp.isfinite(value)),
                       jnp.mean(value).astype(jnp.float32)))
    for key in sorted(new_state):
      leaves = [x for x in jax.tree.leaves(new_state[key]) if jnp.issubdtype(x.dtype, jnp.inexact)]
      if leaves:
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        checks.append((code(f"new {key}"), finite, jnp.float32(jnp.nan)))
    if not checks:
      return new_state, metrics, dict(health, step=health["step"] + 1)
    each_ok = jnp.stack([c[1] for c in checks])
    ok = jnp.all(each_ok)
    first = jnp.argmin(each_ok)  # the first quantity that is not finite
    number = health["step"] + 1
    newly_bad = jnp.logical_and(~ok, health["first_bad_step"] < 0)
    new_health = {
        "step": number,
        "first_bad_step": jnp.where(newly_bad, number, health["first_bad_step"]),
        "what": jnp.where(newly_bad, jnp.asarray([c[0] for c in checks], jnp.int32)[first], health["what"]),
        "value": jnp.where(newly_bad, jnp.stack([c[2] for c in checks])[first], health["value"]),
        "skipped": health["skipped"] + ((~ok).astype(jnp.int32) if skip_nonfinite else 0),
    }
    if skip_nonfinite:
      new_state = jax.tree.map(lambda n, o: _select(ok, n, o), new_state, state)
      metrics = jax.tree.map(lambda m: jnp.where(ok, m, jnp.zeros_like(m)), metrics)
    return new_state, metrics, new_health

  return step, names


def nonfinite_what(host_health, names) -> str:
  name = names[int(host_health["what"])]
  if name.startswith("training "):
    return f"step {int(host_health['first_bad_step'])}, {name} = {float(host_health['value'])}"
  return f"step {int(host_health['first_bad_step'])}, {name} has NaN/Inf entries"


def nonfinite_message(host_health, names, step, last_saved) -> str:
  bad = int(host_health["first_bad_step"])
  name = names[int(host_health["what"])]
  what = (f"the {name} is {float(host_health['value'])}" if name.startswith("training ")
          else f"the {name.removeprefix('new ')} state has NaN/Inf entries")
  kept = (f"the last checkpoint, step {last_saved}, is intact" if last_saved is not None
          else "no checkpoint was saved")
  return (f"step {bad}: {what}; stopped at step {step} before saving it, {kept}. Lower optimizer.learning_rate, "
          "set optimizer.clip_norm > 0, or set nonfinite='skip' to skip such steps")
