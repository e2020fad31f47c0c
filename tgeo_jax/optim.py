"""Optimizers and learning-rate schedules from the config (optax only)."""

from __future__ import annotations

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
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(lr / warmup, lr, warmup), main], [warmup])


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
