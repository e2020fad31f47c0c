"""Learn the KD temperature τ on a validation set, for YOUR model, through the general meta-gradient API.

    python examples/learned_temperature.py [--steps 300] [--init_tau 1.0]

A 3-class problem, 30% flipped training labels, and a teacher whose logits carry the class structure (its second
choice is informative) but are sharp. The student minimises ``0.5 τ² KL_τ(teacher || student) + 0.5 CE(label)``;
``log τ`` is a meta-parameter learned so that the clean validation loss after each student step falls
(``tgeo_jax.hypergrad.one_step``: the inner loss receives φ = {"log_tau"}). It prints τ over training and the
student's validation accuracy against the same training at the initial τ held fixed.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tgeo_jax import bilevel, hypergrad, losses


class MLP(nnx.Module):
  def __init__(self, din, dout, *, rngs):
    self.hidden, self.out = nnx.Linear(din, 32, rngs=rngs), nnx.Linear(32, dout, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def make_data(rng, n, *, flip):
  """Points around 3 centres (labels flipped with probability ``flip``) and a sharp teacher that knows the
  geometry: logits = 6 x (negative squared distance to each centre), right on ~95% of the points."""
  y = rng.integers(0, 3, n)
  centres = 2.0 * np.stack([np.cos(2.1 * np.arange(3)), np.sin(2.1 * np.arange(3))], -1)
  x = rng.normal(size=(n, 2)) + centres[y]
  teacher_logits = -6.0 * ((x[:, None, :] - centres[None]) ** 2).sum(-1)
  noisy = np.where(rng.random(n) < flip, (y + rng.integers(1, 3, n)) % 3, y)
  return dict(x=jnp.asarray(x, jnp.float32), labels=jnp.asarray(noisy),
              teacher_logits=jnp.asarray(teacher_logits, jnp.float32))


def main(steps=300, seed=0, init_tau=1.0, learn=True, batch_size=128):
  rng = np.random.default_rng(seed)
  train, val = make_data(rng, 4096, flip=0.3), make_data(rng, 512, flip=0.0)
  graphdef, params = nnx.split(MLP(2, 3, rngs=nnx.Rngs(seed)), nnx.Param)
  tx, meta_tx = optax.sgd(0.05, momentum=0.9), optax.adam(3e-2)
  student = bilevel.StudentState(params, {}, tx.init(params))
  meta = {"log_tau": jnp.log(jnp.float32(init_tau))}
  meta_state = meta_tx.init(meta)

  def inner_loss_fn(params, rest, meta, batch):  # L_in(θ; τ)
    logits = nnx.merge(graphdef, params)(batch["x"])
    tau = jnp.exp(meta["log_tau"])
    soft = losses.kd_loss(logits, batch["teacher_logits"], temperature=tau)  # τ² KL_τ, per example
    hard = losses.cross_entropy(logits, batch["labels"])
    return jnp.mean(0.5 * soft + 0.5 * hard), (rest, {})

  def val_loss_fn(params, rest, val_batch):
    logits = nnx.merge(graphdef, params)(val_batch["x"])
    return jnp.mean(losses.cross_entropy(logits, val_batch["labels"]))

  @jax.jit
  def step(student, meta, meta_state, batch, val_batch):
    result = hypergrad.one_step(inner_loss_fn, meta, batch, val_loss_fn, val_batch, student, tx)
    if learn:
      updates, meta_state = meta_tx.update(result.meta_grad, meta_state, meta)
      meta = optax.apply_updates(meta, updates)
    return result.student, meta, meta_state

  taus = []
  for i in range(steps):
    idx, vidx = rng.integers(0, 4096, batch_size), rng.integers(0, 512, batch_size)
    student, meta, meta_state = step(student, meta, meta_state, {k: v[idx] for k, v in train.items()},
                                     {k: v[vidx] for k, v in val.items()})
    if i % (steps // 6) == 0 or i == steps - 1:
      taus.append(round(float(jnp.exp(meta["log_tau"])), 3))
  logits = nnx.merge(graphdef, student.params)(val["x"])
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == val["labels"]))
  return dict(tau_trajectory=taus, tau=taus[-1], val_accuracy=accuracy)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--init_tau", type=float, default=1.0)
  args = parser.parse_args()
  learned = main(steps=args.steps, init_tau=args.init_tau)
  fixed = main(steps=args.steps, init_tau=args.init_tau, learn=False)
  print(f"learned τ over training: {learned['tau_trajectory']}")
  print(f"validation accuracy: learned τ = {learned['tau']:.2f}: {learned['val_accuracy']:.3f}; "
        f"fixed τ = {args.init_tau:g}: {fixed['val_accuracy']:.3f}")
