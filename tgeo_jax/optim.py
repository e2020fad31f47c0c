"""Optimizers and learning-rate schedules from the config (optax only)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from tgeo_jax.errors import UserError

__all__ = ["ADAM_EPS_ROOT", "make_schedule", "make_optimizer"]

# Inside sqrt(v + eps_root): the bilevel lookahead differentiates through the update, and d sqrt(v)/dv at v = 0
# (a parameter, e.g. an unused embedding row, whose gradient has always been 0) is inf, making the hypergradient
# NaN. 1e-16 keeps it finite and changes the step by < 1e-8 relative for any non-zero second moment.
ADAM_EPS_ROOT = 1e-16


def make_schedule(opt_config, *, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
  """Learning rate per step: linear warm-up over ``warmup_epochs``, then ``schedule``:

  * ``constant``;
  * ``cosine``: cosine decay to 0 at the end of training;
  * ``step``: multiply by ``decay_factor`` at each epoch in ``decay_epochs`` (CIFAR protocol: 150/180/210, x0.1).

  The returned schedule maps a step count (the optimizer's int32 ``count``, any integer or float scalar) to the
  learning rate in JAX's default float dtype: float32, or float64 under ``jax_enable_x64``. optax's linear ramp
  computes in float32 from an int32 count even under x64, so a float64 run's warm-up would otherwise get a
  float32 learning rate; in float32 the values are the same as optax's on the int32 count.

  Example::

    schedule = make_schedule(config.optimizer, steps_per_epoch=100, num_epochs=3)
    schedule(jnp.int32(0))  # learning_rate / (100 * warmup_epochs), the first warm-up step
  """
  lr = opt_config.learning_rate
  total = max(1, steps_per_epoch * num_epochs)
  warmup = int(round(opt_config.warmup_epochs * steps_per_epoch))
  name = opt_config.schedule
  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, total - warmup))
  elif name == "step":
    boundaries = {int(e * steps_per_epoch) - warmup: opt_config.decay_factor for e in opt_config.decay_epochs}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    raise UserError(f"optimizer.schedule: unknown schedule {name!r}; expected 'constant', 'cosine' or 'step'")
  schedule = main if warmup <= 0 else optax.join_schedules(
      [optax.linear_schedule(lr / warmup, lr, warmup), main], [warmup])

  def in_default_float(count):
    # The count converted first: every step count a run reaches (< 2**24) is exact in float32.
    return schedule(jnp.asarray(count, dtype=jnp.result_type(float)))

  return in_default_float


def make_optimizer(opt_config, *, steps_per_epoch: int, num_epochs: int) -> optax.GradientTransformation:
  """``clip_by_global_norm`` (if ``clip_norm`` > 0) -> weight decay -> SGD(momentum, nesterov) / Adam(W)."""
  schedule = make_schedule(opt_config, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs)
  parts = []
  if opt_config.clip_norm:
    parts.append(optax.clip_by_global_norm(opt_config.clip_norm))
  name = opt_config.name
  if name == "sgd":
    if opt_config.weight_decay:
      # Coupled L2 as in PyTorch's SGD(weight_decay=...): the decay goes through the momentum.
      parts.append(optax.add_decayed_weights(opt_config.weight_decay))
    parts.append(optax.sgd(schedule, momentum=opt_config.momentum or None, nesterov=opt_config.nesterov))
  elif name == "adam":
    if opt_config.weight_decay:
      parts.append(optax.add_decayed_weights(opt_config.weight_decay))
    parts.append(optax.adam(schedule, eps_root=ADAM_EPS_ROOT))
  elif name == "adamw":
    parts.append(optax.adamw(schedule, eps_root=ADAM_EPS_ROOT, weight_decay=opt_config.weight_decay))
  else:
    raise UserError(f"optimizer.name: unknown optimizer {name!r}; expected 'sgd', 'adam' or 'adamw'")
  return optax.chain(*parts)
