"""Learn a per-sample weighting between YOUR two losses, for YOUR NNX model and optax optimizer.

    python examples/learned_weighting.py [--hypergrad one_step|unroll] [--steps 300]

A 3-class problem whose training labels are 40% flipped, with a "teacher" that is right on most examples. The
student minimises mean_i [a_i soft_i + (1 - a_i) hard_i] (soft: CE to the teacher's probabilities, hard: CE to the
noisy label); a_i comes from a small weighting network on per-example context, learned so that the student's loss
on a clean validation set falls (tgeo_jax.bilevel: ``one_step`` lookahead or a 3-batch ``unroll``).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tgeo_jax import bilevel


class MLP(nnx.Module):  # the user's model: any NNX module
  def __init__(self, din, dout, *, rngs):
    self.hidden, self.out = nnx.Linear(din, 32, rngs=rngs), nnx.Linear(32, dout, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def make_data(rng, n, *, flip):
  """Points around 3 centres; labels flipped with probability ``flip``; a teacher right 90% of the time."""
  y = rng.integers(0, 3, n)
  x = rng.normal(size=(n, 2)) + 2.5 * np.stack([np.cos(2.1 * y), np.sin(2.1 * y)], -1)
  flipped = rng.random(n) < flip
  noisy = np.where(flipped, (y + rng.integers(1, 3, n)) % 3, y)
  teacher = np.where(rng.random(n) < 0.9, y, rng.integers(0, 3, n))
  teacher_probs = 0.1 / 2 + 0.85 * np.eye(3)[teacher]
  return dict(x=jnp.asarray(x, jnp.float32), labels=jnp.asarray(noisy), teacher_probs=jnp.asarray(teacher_probs),
              flipped=jnp.asarray(flipped))


def main(hypergrad="one_step", steps=300, seed=0, window=3):
  rng = np.random.default_rng(seed)
  train, val = make_data(rng, 4096, flip=0.4), make_data(rng, 512, flip=0.0)
  graphdef, params = nnx.split(MLP(2, 3, rngs=nnx.Rngs(seed)), nnx.Param)
  weight_def, meta = nnx.split(nnx.Linear(3, 1, rngs=nnx.Rngs(seed + 1)), nnx.Param)  # the weighting network
  tx, meta_tx = optax.sgd(0.1, momentum=0.9), optax.adam(1e-2)  # the user's optimizers
  student = bilevel.StudentState(params, {}, tx.init(params))  # no BatchNorm: rest is empty
  meta_state = meta_tx.init(meta)

  def per_sample_fn(params, rest, batch):  # ((soft [N], hard [N]), (new rest, context))
    logits = nnx.merge(graphdef, params)(batch["x"])
    soft = optax.softmax_cross_entropy(logits, batch["teacher_probs"])
    hard = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return (soft, hard), (rest, {"student_logits": logits, **batch})

  def weight_fn(meta, context):  # a [N]: weight of the teacher loss, from what the context carries
    p_label = jnp.take_along_axis(jax.nn.softmax(context["student_logits"]), context["labels"][:, None], 1)[:, 0]
    t_label = jnp.take_along_axis(context["teacher_probs"], context["labels"][:, None], 1)[:, 0]
    features = jnp.stack([p_label, t_label, jnp.ones_like(p_label)], -1)
    return jax.nn.sigmoid(nnx.merge(weight_def, meta)(features)[:, 0])

  def val_loss_fn(params, rest, val_batch):
    logits = nnx.merge(graphdef, params)(val_batch["x"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, val_batch["labels"]))

  @jax.jit
  def meta_step(student, meta, meta_state, batches):
    if hypergrad == "unroll":  # K consecutive batches, the K real steps; the weighting net moves once per window
      result = bilevel.unroll(weight_fn, meta, per_sample_fn, batches, val_loss_fn, val, student, tx)
    else:
      result = bilevel.one_step(weight_fn, meta, per_sample_fn, jax.tree.map(lambda b: b[0], batches),
                                val_loss_fn, val, student, tx)
    updates, meta_state = meta_tx.update(result.meta_grad, meta_state, meta)
    return result.student, optax.apply_updates(meta, updates), meta_state

  k = window if hypergrad == "unroll" else 1
  for _ in range(steps):
    idx = rng.integers(0, 4096, (k, 128))
    batches = {key: value[idx] for key, value in train.items() if key != "flipped"}
    student, meta, meta_state = meta_step(student, meta, meta_state, batches)

  logits = nnx.merge(graphdef, student.params)(val["x"])
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == val["labels"]))
  (_, _), (_, context) = per_sample_fn(student.params, {}, {k: v for k, v in train.items() if k != "flipped"})
  alpha = weight_fn(meta, context)
  out = {"val_accuracy": accuracy, "alpha_flipped": float(jnp.mean(alpha[train["flipped"]])),
         "alpha_clean": float(jnp.mean(alpha[~train["flipped"]]))}
  print(f"{hypergrad}: clean validation accuracy {accuracy:.3f}; mean teacher weight a on flipped labels "
        f"{out['alpha_flipped']:.3f}, on clean labels {out['alpha_clean']:.3f}")
  return out


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--hypergrad", default="one_step", choices=["one_step", "unroll"])
  parser.add_argument("--steps", type=int, default=300)
  main(**vars(parser.parse_args()))
