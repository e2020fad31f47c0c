"""Tests for tgeo_jax.bilevel's one-step lookahead: ``one_step`` against its definition ``one_step_autodiff``,
finite differences and the JVP identity of docs/methods.md §2 (``alpha_hypergrad_jvp_oracle``), on tiny models (an
MLP, and a CNN with train-mode BatchNorm). The other variants (unroll, implicit, head_only) are tested in
tests/test_hypergrad_variants.py.

Exactness checks run in float64 inside ``jax.enable_x64(True)``, scoped to each test so other tests keep the
default float32. Compilation dominates these tests on CPU, so each check compiles one program (setup included)
and the exactness and oracle tests share theirs.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from conftest import central_differences, flat as _flat, relative_l2 as relative_error, tree_norm as norm
from tgeo_jax import bilevel
from tgeo_jax import models

NUM_CLASSES = 3
BATCH = 8
TEMPERATURE = 4.0
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
CLIP_NORM = 1e-2  # Far below the tiny models' gradient norms, so clipping is active.
ADAM_LR, ADAM_B1, ADAM_B2, ADAM_EPS = 1e-2, 0.9, 0.999, 1e-8
INPUT_SHAPES = {"mlp_tiny": (4, 4, 1), "cnn_tiny": (8, 8, 1)}

# The student optimizers the lookahead must be exact for (the step is the student's configured optimizer).
OPTIMIZERS = {
    "momentum": lambda: optax.sgd(LR, momentum=MOMENTUM),
    "nesterov": lambda: optax.sgd(LR, momentum=MOMENTUM, nesterov=True),
    "decayed_sgd": lambda: optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM)),
    "adam": lambda: optax.adam(ADAM_LR, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS),
    "clip_chain": lambda: optax.chain(optax.clip_by_global_norm(CLIP_NORM), optax.add_decayed_weights(WEIGHT_DECAY),
                                      optax.sgd(LR, momentum=MOMENTUM, nesterov=True)),
}
# dtheta'/dg = -LR * grad_scale for the SGD-type steps the JVP oracle covers (see alpha_hypergrad_jvp_oracle).
ORACLE_GRAD_SCALES = {"momentum": 1.0, "nesterov": 1.0 + MOMENTUM}

# Optimisation level 0 roughly halves XLA's CPU compile time for these programs; the arithmetic is unchanged.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def weight_fn(meta, context):
  """A tiny fusion net on the student's logits: ``alpha = sigmoid(softmax(z) . w + b)``, ``[N, K] -> [N]``."""
  return jax.nn.sigmoid(jax.nn.softmax(context["student_logits"], axis=-1) @ meta["w"] + meta["b"])


def _per_sample_losses(logits, teacher_logits, labels):
  # Written here rather than taken from tgeo_jax.losses, which computes in float32: these checks need float64.
  log_s = jax.nn.log_softmax(logits / TEMPERATURE, axis=-1)
  log_t = jax.nn.log_softmax(teacher_logits / TEMPERATURE, axis=-1)
  soft = TEMPERATURE**2 * jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  hard = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]
  return soft, hard


class Problem(NamedTuple):
  """A tiny distillation problem in one dtype; ``meta`` and the batches are NumPy arrays."""

  graphdef: Any
  params: Any
  rest: Any
  meta: dict  # {"w": [K], "b": []}
  batch: dict  # {"x": [N, ...], "teacher_logits": [N, K], "labels": [N]}: the training batch.
  val: dict  # {"x": [N, ...], "labels": [N]}
  warm_grads: Any  # Same tree as params: the gradient of one earlier optimizer step (see warm_opt_state).

  def per_sample_fn(self, params, rest, batch):
    logits, new_rest = models.apply(self.graphdef, params, rest, batch["x"], train=True)
    soft, hard = _per_sample_losses(logits, batch["teacher_logits"], batch["labels"])
    return (soft, hard), (new_rest, {"student_logits": logits})

  def val_loss_fn(self, params, rest, val_batch):
    # Train-mode BatchNorm (batch statistics): the validation batch is its own normalisation population.
    logits, _ = models.apply(self.graphdef, params, rest, val_batch["x"], train=True)
    labels = val_batch["labels"]
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0])

  def student(self, tx) -> bilevel.StudentState:
    """theta with the warm optimizer state (``warm_opt_state``); call it inside jit."""
    return bilevel.StudentState(self.params, self.rest, warm_opt_state(tx, self.params, self.warm_grads))


@functools.lru_cache(maxsize=None)
def _model(name):
  def build():
    return models.create(name, num_classes=NUM_CLASSES, input_shape=INPUT_SHAPES[name], seed=0)

  # Initialised under jit: eager NNX initialisation compiles op by op and took seconds for the CNN.
  graphdef = models.split(nnx.eval_shape(build)).graphdef
  params, rest = jax.jit(lambda: tuple(models.split(build())[1:]))()
  return graphdef, params, rest


def make_problem(name: str, *, dtype=np.float32) -> Problem:
  """A tiny problem; use it inside ``jax.enable_x64(True)`` for ``dtype=np.float64``."""
  graphdef, params, rest = _model(name)
  # NumPy casts and device_put: no eager XLA compilations. (Train-mode BatchNorm needs jax arrays in ``rest``.)
  cast = functools.partial(jax.tree.map, lambda v: jnp.asarray(np.asarray(v, dtype)))
  rng = np.random.default_rng(0)
  shape = INPUT_SHAPES[name]

  def batch():
    return {"x": rng.normal(size=(BATCH, *shape)).astype(dtype),
            "teacher_logits": (2.0 * rng.normal(size=(BATCH, NUM_CLASSES))).astype(dtype),
            "labels": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)}

  train = batch()
  val = batch()
  del val["teacher_logits"]
  meta = {"w": np.array([0.8, -0.5, 0.3], dtype), "b": np.array(0.1, dtype)}
  warm_grads = jax.tree.map(lambda v: rng.normal(size=v.shape), params)
  return Problem(graphdef, cast(params), cast(rest), meta, train, val, cast(warm_grads))


def warm_opt_state(tx, params, warm_grads):
  """The state after one step on ``warm_grads`` from ``tx.init``: momentum / Adam moments are non-trivial."""
  return tx.update(warm_grads, tx.init(params), params)[1]


@functools.lru_cache(maxsize=None)
def float64_results(model: str, optimizer: str):
  """``(problem, one_step, one_step_autodiff, oracle_meta_grad or None)`` in float64, from ONE compiled program.

  Cached: the exactness and oracle tests read the same results. Call inside ``jax.enable_x64(True)``.
  """
  base = make_problem(model, dtype=np.float64)
  tx = OPTIMIZERS[optimizer]()
  grad_scale = ORACLE_GRAD_SCALES.get(optimizer)

  @jit
  def compute(meta, params, rest, warm_grads):
    problem = base._replace(meta=meta, params=params, rest=rest, warm_grads=warm_grads)
    args = (weight_fn, problem.meta, problem.per_sample_fn, problem.batch, problem.val_loss_fn, problem.val,
            problem.student(tx), tx)
    fast, ref = bilevel.one_step(*args), bilevel.one_step_autodiff(*args)
    if grad_scale is None:
      return fast, ref, None
    # docs/methods.md §2 identity: dL/dalpha from one JVP, then chained through weight_fn's VJP.
    val_grad = jax.grad(problem.val_loss_fn)(fast.student.params, fast.student.rest, problem.val)
    dalpha = bilevel.alpha_hypergrad_jvp_oracle(problem.per_sample_fn, problem.batch, val_grad, problem.params,
                                                problem.rest, LR, BATCH, grad_scale=grad_scale)
    context = {"student_logits": fast.diagnostics["student_logits"]}
    _, alpha_vjp = jax.vjp(lambda m: weight_fn(m, context), problem.meta)
    return fast, ref, alpha_vjp(dalpha)[0]

  return (base, *compute(base.meta, base.params, base.rest, base.warm_grads))


def _close(a, b, rtol=1e-5):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=1e-12)


class LookaheadExactnessTest(parameterized.TestCase):

  @parameterized.product(model=tuple(INPUT_SHAPES), optimizer=tuple(OPTIMIZERS))
  def test_one_step_equals_autodiff(self, model, optimizer):
    with jax.enable_x64(True):
      problem, fast, ref, _ = float64_results(model, optimizer)
      self.assertEqual(fast.meta_grad["w"].dtype, jnp.float64)
      self.assertGreater(norm(ref.meta_grad), 1e-6)
      _close(fast.meta_grad, ref.meta_grad)
      # Same real step: parameters, optimizer state, BatchNorm statistics; same losses, alpha, logits.
      _close(fast.student.params, ref.student.params)
      _close(fast.student.opt_state, ref.student.opt_state)
      _close(fast.student.rest, ref.student.rest)
      _close(fast.diagnostics, ref.diagnostics)
      self.assertEqual(set(fast.diagnostics), {"train_loss", "val_loss", "alpha", "student_logits"})
      chex.assert_shape(fast.diagnostics["alpha"], (BATCH,))
      chex.assert_shape(fast.diagnostics["student_logits"], (BATCH, NUM_CLASSES))
      if model == "cnn_tiny":
        # Train-mode BatchNorm: the running statistics moved.
        self.assertFalse(np.allclose(jax.tree.leaves(fast.student.rest)[0], jax.tree.leaves(problem.rest)[0]))


def _manual_lookahead_val_loss(problem, meta, opt_kind):
  """L_val(theta'(meta)) from scratch, with no optax and no tgeo_jax.bilevel: the finite-difference side.

  The optimizer state is the one ``warm_opt_state`` builds: one earlier step on ``problem.warm_grads`` (h)
  from a zero state, i.e. trace = clip(h) + wd theta for ``clip_chain``; for Adam mu = (1 - b1) h,
  nu = (1 - b2) h^2 and count = 1.
  """
  x, teacher_logits, labels = (problem.batch[key] for key in ("x", "teacher_logits", "labels"))
  logits, new_rest = models.apply(problem.graphdef, problem.params, problem.rest, x, train=True)
  probs = jnp.exp(logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True))
  alpha = 1.0 / (1.0 + jnp.exp(-(probs @ meta["w"] + meta["b"])))

  def train_objective(params):
    z, _ = models.apply(problem.graphdef, params, problem.rest, x, train=True)
    soft, hard = _per_sample_losses(z, teacher_logits, labels)
    return jnp.mean(alpha * soft + (1.0 - alpha) * hard)

  grads = jax.grad(train_objective)(problem.params)
  if opt_kind in ("momentum", "nesterov"):
    # The warm state's trace is h (one step from zero); the new trace is mu h + g.
    def step(theta, g, h):
      trace = MOMENTUM * h + g
      return theta - LR * ((g + MOMENTUM * trace) if opt_kind == "nesterov" else trace)

    new_params = jax.tree.map(step, problem.params, grads, problem.warm_grads)
  elif opt_kind == "clip_chain":
    def clip(tree):
      global_norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(tree)))
      return jax.tree.map(lambda v: v * jnp.minimum(1.0, CLIP_NORM / global_norm), tree)

    def step(theta, g, h):
      g = g + WEIGHT_DECAY * theta
      trace = MOMENTUM * (h + WEIGHT_DECAY * theta) + g
      return theta - LR * (g + MOMENTUM * trace)  # Nesterov

    new_params = jax.tree.map(step, problem.params, clip(grads), clip(problem.warm_grads))
  elif opt_kind == "adam":
    def step(theta, g, h):
      m = ADAM_B1 * (1 - ADAM_B1) * h + (1 - ADAM_B1) * g
      v = ADAM_B2 * (1 - ADAM_B2) * h**2 + (1 - ADAM_B2) * g**2
      m_hat, v_hat = m / (1 - ADAM_B1**2), v / (1 - ADAM_B2**2)
      return theta - ADAM_LR * m_hat / (jnp.sqrt(v_hat) + ADAM_EPS)

    new_params = jax.tree.map(step, problem.params, grads, problem.warm_grads)
  else:
    raise ValueError(opt_kind)
  return problem.val_loss_fn(new_params, new_rest, problem.val)


class FiniteDifferenceTest(parameterized.TestCase):

  @parameterized.parameters(("mlp_tiny", "momentum"), ("mlp_tiny", "nesterov"), ("cnn_tiny", "momentum"),
                            ("cnn_tiny", "nesterov"), ("mlp_tiny", "clip_chain"), ("mlp_tiny", "adam"))
  def test_hypergradient_matches_central_differences(self, model, opt_kind):
    # cnn_tiny: BatchNorm in train mode in the train forward and in the validation forward.
    with jax.enable_x64(True):
      problem = make_problem(model, dtype=np.float64)
      tx = OPTIMIZERS[opt_kind]()

      @jit
      def hypergrad(meta):
        return bilevel.one_step(weight_fn, meta, problem.per_sample_fn, problem.batch, problem.val_loss_fn,
                                problem.val, problem.student(tx), tx)

      result = hypergrad(problem.meta)
      val_loss = jit(lambda m: _manual_lookahead_val_loss(problem, m, opt_kind))
      self.assertAlmostEqual(float(val_loss(problem.meta)), float(result.diagnostics["val_loss"]), places=10)
      self.assertGreater(norm(result.meta_grad), 1e-6)
      self.assertLess(relative_error(central_differences(val_loss, problem.meta), result.meta_grad), 1e-3)


class JvpOracleTest(parameterized.TestCase):

  @parameterized.product(model=tuple(INPUT_SHAPES), optimizer=tuple(ORACLE_GRAD_SCALES))
  def test_oracle_chained_through_weight_fn_equals_meta_grad(self, model, optimizer):
    with jax.enable_x64(True):
      _, fast, _, oracle_meta_grad = float64_results(model, optimizer)
      _close(oracle_meta_grad, fast.meta_grad)

  def test_oracle_needs_the_nesterov_factor(self):
    # The (1 + mu) factor is real: with grad_scale = 1 (the oracle is linear in it) Nesterov's check fails.
    with jax.enable_x64(True):
      _, fast, _, oracle_meta_grad = float64_results("mlp_tiny", "nesterov")
      with self.assertRaises(AssertionError):
        _close(jax.tree.map(lambda v: np.asarray(v) / (1.0 + MOMENTUM), oracle_meta_grad), fast.meta_grad)


class MetaTrainingTest(absltest.TestCase):

  def test_adam_on_phi_moves_fusion_params_and_student(self):
    # float32, as in training: the jitted "reuse" ordering (the lookahead step is the real student step).
    problem = make_problem("mlp_tiny")
    tx, meta_tx = OPTIMIZERS["nesterov"](), optax.adam(1e-2)

    @jit
    def step(meta, meta_opt_state, student):
      result = bilevel.one_step(weight_fn, meta, problem.per_sample_fn, problem.batch, problem.val_loss_fn,
                                problem.val, student, tx)
      meta, meta_opt_state = bilevel.optimizer_step(meta_tx, result.meta_grad, meta_opt_state, meta)
      return meta, meta_opt_state, result

    meta = problem.meta
    meta_opt_state, opt_state = jit(lambda m, p: (meta_tx.init(m), tx.init(p)))(meta, problem.params)
    student = bilevel.StudentState(problem.params, problem.rest, opt_state)
    for _ in range(3):
      meta, meta_opt_state, result = step(meta, meta_opt_state, student)
      self.assertGreater(norm(result.meta_grad), 0.0)
      alpha = np.asarray(result.diagnostics["alpha"])
      self.assertTrue(np.all((alpha > 0) & (alpha < 1)))
      student = result.student
    self.assertTrue(np.all(np.isfinite(_flat(meta))))
    # Adam moves every coordinate by about its learning rate per step once the gradient is non-zero.
    self.assertGreater(float(np.min(np.abs(np.asarray(meta["w"]) - problem.meta["w"]))), 1e-3)
    self.assertNotEqual(float(meta["b"]), float(problem.meta["b"]))
    self.assertGreater(relative_error(student.params, problem.params), 0.0)


if __name__ == "__main__":
  absltest.main()
