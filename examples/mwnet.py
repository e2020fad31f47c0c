"""Meta-Weight-Net (Shu et al. 2019) on noisy labels with YOUR model, through the general meta-gradient API.

    python examples/mwnet.py [--hypergrad one_step|unroll|implicit|all] [--steps 200]

A 3-class problem whose training labels are 40% flipped and a clean validation set. ONE loss, re-weighted per
example: the student minimises ``sum_i w_i CE_i / sum_i w_i`` with ``w_i = net_φ(CE_i)`` (a small network on the
example's own loss, as in MW-Net); φ is learned so that the validation loss after the student's step falls
(``tgeo_jax.hypergrad``: the inner loss receives φ; no fake second loss). It prints, per hypergradient, the clean
validation accuracy of the student against plain training, and how well the weights separate the flipped labels
(AUC of 1 - w: 0.5 = chance).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tgeo_jax import bilevel, hypergrad, metrics


class MLP(nnx.Module):  # the user's model: any NNX module
  def __init__(self, din, dout, *, rngs):
    self.hidden, self.out = nnx.Linear(din, 32, rngs=rngs), nnx.Linear(32, dout, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


class WeightNet(nnx.Module):  # MW-Net's weighting function: loss -> weight in (0, 1)
  def __init__(self, *, rngs):
    self.hidden, self.out = nnx.Linear(1, 16, rngs=rngs), nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, loss):
    return jax.nn.sigmoid(self.out(jax.nn.relu(self.hidden(loss[:, None]))))[:, 0]


def make_data(rng, n, *, flip):
  """Points around 3 centres, labels flipped with probability ``flip``."""
  y = rng.integers(0, 3, n)
  x = rng.normal(size=(n, 2)) + 2.5 * np.stack([np.cos(2.1 * y), np.sin(2.1 * y)], -1)
  flipped = rng.random(n) < flip
  noisy = np.where(flipped, (y + rng.integers(1, 3, n)) % 3, y)
  return dict(x=jnp.asarray(x, jnp.float32), labels=jnp.asarray(noisy)), flipped


def main(variant="one_step", steps=200, seed=0, batch_size=128, window=3):
  rng = np.random.default_rng(seed)
  (train, flipped), (val, _) = make_data(rng, 4096, flip=0.4), make_data(rng, 512, flip=0.0)
  graphdef, params = nnx.split(MLP(2, 3, rngs=nnx.Rngs(seed)), nnx.Param)
  weight_def, meta = nnx.split(WeightNet(rngs=nnx.Rngs(seed + 1)), nnx.Param)
  tx, meta_tx = optax.sgd(0.1, momentum=0.9), optax.adam(1e-3)
  student = bilevel.StudentState(params, {}, tx.init(params))
  meta_state = meta_tx.init(meta)

  def per_example_loss(params, x, labels):
    return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, params)(x), labels)

  def weights(meta, losses):  # the weighting net reads the (stop-gradient) loss of each example
    return nnx.merge(weight_def, meta)(jax.lax.stop_gradient(losses))

  def inner_loss_fn(params, rest, meta, batch):  # L_in(θ; φ): one loss, re-weighted
    losses = per_example_loss(params, batch["x"], batch["labels"])
    w = weights(meta, losses)
    return jnp.sum(w * losses) / jnp.maximum(jnp.sum(w), 1e-8), (rest, {"weights": w})

  def val_loss_fn(params, rest, val_batch):
    return jnp.mean(per_example_loss(params, val_batch["x"], val_batch["labels"]))

  @jax.jit
  def meta_step(student, meta, meta_state, batches, val_batch):
    if variant == "one_step":
      result = hypergrad.one_step(inner_loss_fn, meta, jax.tree.map(lambda b: b[0], batches), val_loss_fn,
                                  val_batch, student, tx)
    elif variant == "unroll":
      result = hypergrad.unroll(inner_loss_fn, meta, batches, val_loss_fn, val_batch, student, tx)
    else:
      result = hypergrad.implicit(inner_loss_fn, meta, jax.tree.map(lambda b: b[0], batches), val_loss_fn,
                                  val_batch, student, tx, solver="neumann", terms=5, neumann_lr=0.1, damping=0.1,
                                  tol=0.5)
    updates, meta_state = meta_tx.update(result.meta_grad, meta_state, meta)
    return result.student, optax.apply_updates(meta, updates), meta_state

  @jax.jit
  def plain_step(student, batch):  # the baseline: every example weighted 1
    grads = jax.grad(lambda p: jnp.mean(per_example_loss(p, batch["x"], batch["labels"])))(student.params)
    params, opt_state = bilevel.optimizer_step(tx, grads, student.opt_state, student.params)
    return bilevel.StudentState(params, student.rest, opt_state)

  k = window if variant == "unroll" else 1
  plain = student
  for _ in range(steps):
    idx, vidx = rng.integers(0, 4096, (k, batch_size)), rng.integers(0, 512, batch_size)
    batches = {name: a[idx] for name, a in train.items()}  # [k, batch] per field: k real batches
    student, meta, meta_state = meta_step(student, meta, meta_state, batches,
                                          {name: a[vidx] for name, a in val.items()})
    for j in range(k):
      plain = plain_step(plain, {name: b[j] for name, b in batches.items()})

  def accuracy(params):
    return float(jnp.mean(jnp.argmax(nnx.merge(graphdef, params)(val["x"]), -1) == val["labels"]))

  w = np.asarray(weights(meta, per_example_loss(student.params, train["x"], train["labels"])))
  out = dict(variant=variant, val_accuracy=accuracy(student.params), plain_val_accuracy=accuracy(plain.params),
             weight_flipped=float(w[flipped].mean()), weight_clean=float(w[~flipped].mean()),
             auc_flipped=metrics.roc_auc(flipped.astype(np.int32), 1.0 - w))
  print(f"{variant:>8}: validation accuracy {out['val_accuracy']:.3f} (plain training {out['plain_val_accuracy']:.3f}), "
        f"mean weight flipped {out['weight_flipped']:.3f} / clean {out['weight_clean']:.3f}, "
        f"AUC of 1 - w for the flipped labels {out['auc_flipped']:.3f}")
  return out


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hypergrad", default="all", choices=["one_step", "unroll", "implicit", "all"])
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args()
  for v in (["one_step", "unroll", "implicit"] if args.hypergrad == "all" else [args.hypergrad]):
    main(v, steps=args.steps)
