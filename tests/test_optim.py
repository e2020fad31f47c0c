"""Schedules and optimizer chains built from the config."""

import chex
import numpy as np
import pytest

from configs import fashion_mnist
from tgeo_jax import optim
from tgeo_jax.errors import UserError


def opt_config(**kw):
  c = fashion_mnist.base_config().optimizer
  c.update(kw)
  return c


def test_warmup_then_cosine():
  sched = optim.make_schedule(opt_config(learning_rate=0.1, warmup_epochs=1, schedule="cosine"),
                              steps_per_epoch=10, num_epochs=3)
  np.testing.assert_allclose(sched(0), 0.01, rtol=1e-6)  # lr / warmup at step 0
  np.testing.assert_allclose(sched(9), 0.091, rtol=1e-5)  # linear ramp: 0.01 + 0.09 * 9 / 10
  np.testing.assert_allclose(sched(10), 0.1, rtol=1e-6)  # cosine starts at its peak
  np.testing.assert_allclose(sched(20), 0.05, rtol=1e-5)  # half way through the 20 cosine steps
  np.testing.assert_allclose(sched(30), 0.0, atol=1e-7)


def test_step_schedule():
  sched = optim.make_schedule(opt_config(learning_rate=0.05, warmup_epochs=0, schedule="step",
                                         decay_epochs=(150, 180, 210)), steps_per_epoch=2, num_epochs=240)
  for step, want in [(0, 0.05), (299, 0.05), (300, 0.005), (360, 5e-4), (420, 5e-5)]:
    np.testing.assert_allclose(sched(step), want, rtol=1e-5)


def test_unknown_names():
  with pytest.raises(UserError, match="optimizer.schedule"):
    optim.make_schedule(opt_config(schedule="linear"), steps_per_epoch=1, num_epochs=1)
  with pytest.raises(UserError, match="optimizer.name"):
    optim.make_optimizer(opt_config(name="lamb"), steps_per_epoch=1, num_epochs=1)


def test_sgd_chain_clips_and_decays():
  import jax.numpy as jnp
  tx = optim.make_optimizer(opt_config(learning_rate=1.0, warmup_epochs=0, schedule="constant", momentum=0.0,
                                       weight_decay=0.5, clip_norm=1.0), steps_per_epoch=1, num_epochs=1)
  params = {"w": jnp.array([2.0])}
  updates, _ = tx.update({"w": jnp.array([10.0])}, tx.init(params), params)
  # clip 10 -> 1, add 0.5 * 2 = 1, times -lr.
  chex.assert_trees_all_close(updates, {"w": jnp.array([-2.0])})


def test_adam_update_is_differentiable_at_zero_gradient():
  """The lookahead differentiates through tx.update; with eps_root = 0, Adam's sqrt(v) gives NaN at v = 0."""
  import jax
  import jax.numpy as jnp
  tx = optim.make_optimizer(opt_config(name="adam", learning_rate=1e-3, warmup_epochs=0, schedule="constant",
                                       weight_decay=0.0, clip_norm=0.0), steps_per_epoch=1, num_epochs=1)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  jvp = jax.jvp(lambda g: tx.update(g, state, params)[0], ({"w": jnp.zeros(3)},), ({"w": jnp.ones(3)},))[1]
  assert bool(jnp.all(jnp.isfinite(jvp["w"])))


@pytest.mark.parametrize("schedule,warmup", [("cosine", 1), ("cosine", 0), ("step", 1), ("constant", 2)])
def test_schedule_values_are_optax_in_float32_and_float64_under_x64(schedule, warmup):
  """In float32 the schedule equals optax's on the optimizer's int32 count bit for bit; under x64 it computes in
  float64 (optax's linear warm-up alone would give float32) and matches the closed form to float64 precision."""
  import math
  import jax
  import jax.numpy as jnp
  import optax
  config = opt_config(learning_rate=0.1, warmup_epochs=warmup, schedule=schedule, decay_epochs=(2,))
  steps_per_epoch, num_epochs = 10, 3
  warm, total = warmup * steps_per_epoch, steps_per_epoch * num_epochs

  def closed_form(step):  # float64, by hand
    if step < warm:
      return 0.1 / warm + (0.1 - 0.1 / warm) * step / warm
    t = step - warm
    if schedule == "cosine":
      return 0.05 * (1 + math.cos(math.pi * min(t, total - warm) / (total - warm)))
    if schedule == "step":
      return 0.1 * (0.1 if t >= 2 * steps_per_epoch - warm else 1.0)
    return 0.1

  main = {"cosine": optax.cosine_decay_schedule(0.1, total - warm), "constant": optax.constant_schedule(0.1),
          "step": optax.piecewise_constant_schedule(0.1, {2 * steps_per_epoch - warm: 0.1})}[schedule]
  reference = main if not warm else optax.join_schedules([optax.linear_schedule(0.1 / warm, 0.1, warm), main],
                                                         [warm])
  sched = jax.jit(optim.make_schedule(config, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs))
  for step in range(total + 1):
    count = jnp.asarray(step, jnp.int32)
    got = sched(count)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, jax.jit(reference)(count))
  with jax.enable_x64(True):
    sched64 = jax.jit(optim.make_schedule(config, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs))
    for step in range(total + 1):
      got = sched64(jnp.asarray(step, jnp.int32))
      assert got.dtype == jnp.float64
      np.testing.assert_allclose(float(got), closed_form(step), rtol=1e-15, atol=1e-17)
