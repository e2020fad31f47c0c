"""Tests for the hypergradient variants of tgeo_jax.bilevel (one_step, unroll, implicit, head_only).

Exactness checks run in float64 inside ``jax.enable_x64(True)``, scoped to each test. Compilation dominates on
CPU, so each check compiles few programs: the agreements between implementations are computed in one jitted
program per problem. Tiny models: ``mlp_tiny``, ``cnn_tiny`` and a one-stage CNN (train-mode BatchNorm), a
linear least-squares student (ridge regression, where the implicit hypergradient has a closed form) and a linear
softmax student (a model that is only a head).

Errors are ``max|a - b| / max|b|`` over all leaves (``rel_max``) unless stated otherwise; they are logged at INFO
(``pytest -o log_cli=true --log-cli-level=INFO``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from conftest import central_differences, flat as _flat, relative_l2 as rel_l2, tree_norm as norm
from tgeo_jax import bilevel
from tgeo_jax import models

NUM_CLASSES = 3
BATCH = 8
TEMPERATURE = 4.0
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
CLIP_NORM = 1e-2  # Below the tiny models' gradient norms: clipping is active.
ADAM_LR, ADAM_B1, ADAM_B2, ADAM_EPS = 1e-2, 0.9, 0.999, 1e-8
INPUT_SHAPES = {"mlp_tiny": (4, 4, 1), "cnn_tiny": (8, 8, 1), "cnn_1stage": (6, 6, 1)}
# (registered name, constructor overrides): cnn_1stage is one conv + train-mode BatchNorm + head, half of cnn_tiny's
# graph, for the tests whose cost is compiling K unrolled second-order steps.
MODELS = {"mlp_tiny": ("mlp_tiny", {}), "cnn_tiny": ("cnn_tiny", {}), "cnn_1stage": ("cnn_tiny", {"widths": (4,)})}

OPTIMIZERS = {
    "momentum": lambda: optax.sgd(LR, momentum=MOMENTUM),
    "adam": lambda: optax.adam(ADAM_LR, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS),
    "clip_chain": lambda: optax.chain(optax.clip_by_global_norm(CLIP_NORM), optax.add_decayed_weights(WEIGHT_DECAY),
                                      optax.sgd(LR, momentum=MOMENTUM, nesterov=True)),
}

# Optimisation level 0 roughly halves XLA's CPU compile time for these programs; the arithmetic is unchanged.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# ------------------------------------------------------------------------------------------------------- helpers

def rel_max(approx, exact) -> float:
  """``max|approx - exact| / max|exact|`` over all leaves (NumPy: no eager XLA compilation)."""
  a, b = _flat(approx), _flat(exact)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def cosine(a, b) -> float:
  a, b = _flat(a), _flat(b)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def check(test, name: str, err: float, bound: float):
  logging.info("%s: %s = %.3g (bound %.0e)", test.id(), name, err, bound)
  test.assertLess(err, bound, name)


def weight_fn(meta, context):
  """A tiny fusion net on the student's logits: ``alpha = sigmoid(softmax(z) . w + b)``, ``[N, K] -> [N]``."""
  return jax.nn.sigmoid(jax.nn.softmax(context["student_logits"], axis=-1) @ meta["w"] + meta["b"])


def per_sample_losses(logits, teacher_logits, labels):
  # Written here (tgeo_jax.losses computes in float32; these checks need float64).
  log_s = jax.nn.log_softmax(logits / TEMPERATURE, axis=-1)
  log_t = jax.nn.log_softmax(teacher_logits / TEMPERATURE, axis=-1)
  soft = TEMPERATURE**2 * jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  hard = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]
  return soft, hard


def cross_entropy(logits, labels):
  return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0])


def warm_opt_state(tx, params, warm_grads):
  """The state after one step on ``warm_grads``: non-trivial momentum / Adam moments."""
  return tx.update(warm_grads, tx.init(params), params)[1]


class Problem(NamedTuple):
  """A tiny distillation problem on an NNX model, float64; batches are dicts of NumPy arrays."""

  graphdef: Any
  params: Any
  rest: Any
  meta: dict  # {"w": [K], "b": []}
  batches: dict  # {"x": [S, N, ...], "teacher_logits": [S, N, K], "labels": [S, N]}, S steps.
  val: dict  # {"x", "labels"}
  warm_grads: Any

  def per_sample_fn(self, params, rest, batch):
    logits, new_rest = models.apply(self.graphdef, params, rest, batch["x"], train=True)
    soft, hard = per_sample_losses(logits, batch["teacher_logits"], batch["labels"])
    return (soft, hard), (new_rest, {"student_logits": logits, "labels": batch["labels"]})

  def val_loss_fn(self, params, rest, val_batch):
    # Train-mode BatchNorm: the validation batch is its own normalisation population.
    logits, _ = models.apply(self.graphdef, params, rest, val_batch["x"], train=True)
    return cross_entropy(logits, val_batch["labels"])

  def batch(self, step: int) -> dict:
    return {k: v[step] for k, v in self.batches.items()}


@functools.lru_cache(maxsize=None)
def _model(name):
  registered, overrides = MODELS[name]

  def build():
    return models.create(registered, num_classes=NUM_CLASSES, input_shape=INPUT_SHAPES[name], seed=0, **overrides)

  # Initialised under jit: eager NNX initialisation compiles op by op.
  graphdef = models.split(nnx.eval_shape(build)).graphdef
  params, rest = jax.jit(lambda: tuple(models.split(build())[1:]))()
  return graphdef, params, rest


def make_problem(name: str, num_steps: int = 1) -> Problem:
  """Call inside ``jax.enable_x64(True)``."""
  graphdef, params, rest = _model(name)
  cast = functools.partial(jax.tree.map, lambda v: jnp.asarray(np.asarray(v, np.float64)))
  rng = np.random.default_rng(0)
  shape = INPUT_SHAPES[name]
  batches = {"x": rng.normal(size=(num_steps, BATCH, *shape)),
             "teacher_logits": 2.0 * rng.normal(size=(num_steps, BATCH, NUM_CLASSES)),
             "labels": rng.integers(0, NUM_CLASSES, (num_steps, BATCH)).astype(np.int32)}
  val = {"x": rng.normal(size=(BATCH, *shape)), "labels": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)}
  meta = {"w": np.array([0.8, -0.5, 0.3]), "b": np.array(0.1)}
  warm_grads = jax.tree.map(lambda v: rng.normal(size=v.shape), params)
  return Problem(graphdef, cast(params), cast(rest), meta, batches, val, cast(warm_grads))


# ------------------------------------------------------------------------------------- linear students (closed form)

RIDGE_N, RIDGE_D, RIDGE_M, RIDGE_L2 = 12, 5, 10, 0.5


class Ridge(NamedTuple):
  """Least squares with a ridge term: soft_i, hard_i quadratic in w with the same Hessian, so H is constant.

  soft_i = 1/2 (x_i.w - t_i)^2 + l2/2 |w|^2, hard_i = 1/2 (x_i.w - y_i)^2 + l2/2 |w|^2 (the ridge term enters
  L_train once since alpha + (1 - alpha) = 1); alpha_i = sigmoid(x_i . m_w + m_b) reads the inputs only, so
  alpha does not depend on w and theta* = argmin L_train(.; alpha) is a linear solve.
  L_val = 1/(2M) |X_v w - y_v|^2.
  """

  x: np.ndarray
  t: np.ndarray
  y: np.ndarray
  xv: np.ndarray
  yv: np.ndarray
  meta: dict

  @staticmethod
  def weight_fn(meta, context):
    return jax.nn.sigmoid(context["x"] @ meta["w"] + meta["b"])

  @staticmethod
  def per_sample_fn(params, rest, batch):
    pred = batch["x"] @ params["w"]
    ridge = 0.5 * RIDGE_L2 * jnp.sum(params["w"] ** 2)
    soft = 0.5 * (pred - batch["t"]) ** 2 + ridge
    hard = 0.5 * (pred - batch["y"]) ** 2 + ridge
    return (soft, hard), (rest, {"student_logits": pred[:, None], "x": batch["x"]})

  @staticmethod
  def val_loss_fn(params, rest, val_batch):
    del rest
    return 0.5 * jnp.mean((val_batch["x"] @ params["w"] - val_batch["y"]) ** 2)

  @property
  def batch(self):
    return {"x": self.x, "t": self.t, "y": self.y}

  @property
  def val(self):
    return {"x": self.xv, "y": self.yv}

  def alpha(self):
    return 1.0 / (1.0 + np.exp(-(self.x @ self.meta["w"] + self.meta["b"])))

  def hessian(self):
    return self.x.T @ self.x / RIDGE_N + RIDGE_L2 * np.eye(RIDGE_D)

  def minimiser(self):
    a = self.alpha()
    return np.linalg.solve(self.hessian(), self.x.T @ (a * self.t + (1 - a) * self.y) / RIDGE_N)

  def closed_form_meta_grad(self, damping: float = 0.0):
    """dL_val(theta*(alpha(phi)))/dphi by NumPy: theta* = H^-1 X^T (alpha t + (1 - alpha) y) / N, so
    dtheta*/dalpha_i = H^-1 x_i (t_i - y_i) / N (with H + damping I for the damped variant)."""
    w = self.minimiser()
    g_val = self.xv.T @ (self.xv @ w - self.yv) / RIDGE_M
    v = np.linalg.solve(self.hessian() + damping * np.eye(RIDGE_D), g_val)
    dalpha = (self.x @ v) * (self.t - self.y) / RIDGE_N
    a = self.alpha()
    s = dalpha * a * (1 - a)
    return {"w": self.x.T @ s, "b": np.sum(s)}

  def student(self, tx):
    params = {"w": jnp.asarray(self.minimiser())}
    return bilevel.StudentState(params, {}, tx.init(params))


def make_ridge(condition: float = 1.0) -> Ridge:
  """``condition`` > 1 stretches the input columns: an ill-conditioned H (for the CG failure test)."""
  rng = np.random.default_rng(1)
  scales = np.geomspace(1.0, condition, RIDGE_D)
  x = rng.normal(size=(RIDGE_N, RIDGE_D)) * scales
  w_true = rng.normal(size=RIDGE_D)
  y = x @ w_true + 0.3 * rng.normal(size=RIDGE_N)
  t = x @ w_true + 0.5 + 0.1 * rng.normal(size=RIDGE_N)
  xv = rng.normal(size=(RIDGE_M, RIDGE_D)) * scales
  yv = xv @ w_true + 0.3 * rng.normal(size=RIDGE_M)
  return Ridge(x, t, y, xv, yv, {"w": 0.3 * rng.normal(size=RIDGE_D), "b": np.array(0.2)})


class Softmax(NamedTuple):
  """A linear softmax student (only a head): logits = x W + b, KD losses; the parameters live under 'head'."""

  params: dict
  batch: dict
  val: dict
  meta: dict

  @staticmethod
  def per_sample_fn(params, rest, batch):
    logits = batch["x"] @ params["head"]["kernel"] + params["head"]["bias"]
    return per_sample_losses(logits, batch["teacher_logits"], batch["labels"]), (rest, {"student_logits": logits})

  @staticmethod
  def val_loss_fn(params, rest, val_batch):
    del rest
    return cross_entropy(val_batch["x"] @ params["head"]["kernel"] + params["head"]["bias"], val_batch["labels"])


def make_softmax() -> Softmax:
  rng = np.random.default_rng(2)
  d = 6
  params = {"head": {"kernel": jnp.asarray(0.5 * rng.normal(size=(d, NUM_CLASSES))),
                     "bias": jnp.asarray(0.1 * rng.normal(size=NUM_CLASSES))}}
  batch = {"x": rng.normal(size=(BATCH, d)), "teacher_logits": 2.0 * rng.normal(size=(BATCH, NUM_CLASSES)),
           "labels": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)}
  val = {"x": rng.normal(size=(BATCH, d)), "labels": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)}
  return Softmax(params, batch, val, {"w": np.array([0.8, -0.5, 0.3]), "b": np.array(0.1)})


# ------------------------------------------------------------------------------------------------------ one step

class OneStepTest(absltest.TestCase):

  def test_unroll_k1_and_head_only_against_one_step(self):
    """unroll(K=1) == one_step in both remat modes; head_only takes the same real step with a different, aligned
    meta-gradient (mlp_tiny, clip_chain). one_step == one_step_autodiff is tests/test_bilevel.py's (every optimizer,
    with BatchNorm)."""
    with jax.enable_x64(True):
      problem = make_problem("mlp_tiny")
      tx = OPTIMIZERS["clip_chain"]()

      @jit
      def compute(meta, params, rest, warm_grads, batches, val):
        student = bilevel.StudentState(params, rest, warm_opt_state(tx, params, warm_grads))
        batch = jax.tree.map(lambda v: v[0], batches)
        args = (problem.per_sample_fn, batch, problem.val_loss_fn, val, student, tx)
        unroll_args = (problem.per_sample_fn, batches, problem.val_loss_fn, val, student, tx)
        return {
            "one_step": bilevel.one_step(weight_fn, meta, *args),
            "unroll": bilevel.unroll(weight_fn, meta, *unroll_args),
            "unroll_plain": bilevel.unroll(weight_fn, meta, *unroll_args, remat=False),
            "head_only": bilevel.head_only(weight_fn, meta, *args),
        }

      out = compute(problem.meta, problem.params, problem.rest, problem.warm_grads, problem.batches, problem.val)
      ref = out["one_step"]
      self.assertEqual(ref.meta_grad["w"].dtype, jnp.float64)
      self.assertGreater(norm(ref.meta_grad), 1e-6)
      chex.assert_shape(ref.diagnostics["alpha"], (BATCH,))
      chex.assert_shape(ref.diagnostics["student_logits"], (BATCH, NUM_CLASSES))
      for name in ("unroll", "unroll_plain"):
        other = out[name]
        check(self, f"one_step vs {name} meta_grad", rel_max(other.meta_grad, ref.meta_grad), 1e-10)
        check(self, f"one_step vs {name} student", rel_max(other.student, ref.student), 1e-10)
        for key in ("train_loss", "val_loss", "alpha", "student_logits"):
          value = other.diagnostics[key]
          if key in ("alpha", "student_logits"):
            value = value[0]
          check(self, f"one_step vs {name} {key}", rel_max(value, ref.diagnostics[key]), 1e-10)
      # head_only drops the body's share of the lookahead: a different, but aligned, meta-gradient.
      head = out["head_only"]
      check(self, "head_only student vs one_step (the same real step)", rel_max(head.student, ref.student), 1e-12)
      self.assertAlmostEqual(float(head.diagnostics["val_loss"]), float(ref.diagnostics["val_loss"]), places=12)
      err, cos = rel_l2(head.meta_grad, ref.meta_grad), cosine(head.meta_grad, ref.meta_grad)
      logging.info("head_only vs one_step on mlp_tiny: relative L2 difference %.3g, cosine %.4f", err, cos)
      self.assertGreater(err, 1e-3)
      self.assertGreater(cos, 0.0)


# --------------------------------------------------------------------------------------------------------- unroll

def plain_step_fn(problem: Problem, tx):
  """One real step written without tgeo_jax.bilevel: alpha from the stop-gradient context, jax.grad, tx."""

  def step(meta, params, rest, opt_state, batch):
    _, (_, context) = problem.per_sample_fn(params, rest, batch)
    alpha = weight_fn(meta, jax.lax.stop_gradient(context))

    def objective(p):
      (soft, hard), (new_rest, _) = problem.per_sample_fn(p, rest, batch)
      return jnp.mean(alpha * soft + (1 - alpha) * hard), new_rest

    grads, new_rest = jax.grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_rest, opt_state

  return step


class UnrollTest(parameterized.TestCase):
  K = 3

  def test_scan_remat_plain_python_loop_and_trajectory_agree(self):
    """mlp_tiny, Adam (an integer count in the optimizer state), K = 2 distinct batches (the Python loop and
    remat=False compile K copies of a second-order step; the K = 3 BatchNorm case is the finite-difference
    test's)."""
    k_steps = 2
    with jax.enable_x64(True):
      problem = make_problem("mlp_tiny", num_steps=k_steps)
      tx = OPTIMIZERS["adam"]()
      student = bilevel.StudentState(problem.params, problem.rest, jit(tx.init)(problem.params))
      # The trainer's path: K separate real steps, one per call (written without bilevel), storing the state
      # before each; unroll_from_trajectory then sweeps backwards over what they stored.
      step = jit(plain_step_fn(problem, tx))
      states, state = [], tuple(student)
      for k in range(k_steps):
        states.append(state)
        state = step(problem.meta, *state, problem.batch(k))
      trajectory = bilevel.StudentState(*jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states))
      final = bilevel.StudentState(state[0], state[1], None)

      @jit
      def unrolls(meta, student, batches, val, trajectory, final):
        args = (weight_fn, meta, problem.per_sample_fn, batches, problem.val_loss_fn, val, student, tx)
        from_trajectory = bilevel.unroll_from_trajectory(weight_fn, meta, problem.per_sample_fn, batches,
                                                         trajectory, final, problem.val_loss_fn, val, tx)
        return (bilevel.unroll(*args), bilevel.unroll(*args, remat=False), bilevel.unroll_python_loop(*args),
                from_trajectory)

      scan, plain, loop, (meta_grad, val_loss) = unrolls(problem.meta, student, problem.batches, problem.val,
                                                         trajectory, final)
      self.assertGreater(norm(scan.meta_grad), 1e-6)
      for name, other in (("remat=False", plain), ("python loop", loop)):
        check(self, f"unroll vs {name} meta_grad", rel_max(other.meta_grad, scan.meta_grad), 1e-10)
        check(self, f"unroll vs {name} student", rel_max(other.student, scan.student), 1e-10)
        check(self, f"unroll vs {name} diagnostics", rel_max(other.diagnostics, scan.diagnostics), 1e-10)
      chex.assert_shape(scan.diagnostics["alpha"], (k_steps, BATCH))
      chex.assert_shape(scan.diagnostics["student_logits"], (k_steps, BATCH, NUM_CLASSES))
      chex.assert_shape(scan.diagnostics["train_losses"], (k_steps,))
      self.assertAlmostEqual(float(scan.diagnostics["train_loss"]), float(np.mean(scan.diagnostics["train_losses"])),
                             places=12)
      check(self, "K plain steps vs unroll's student", rel_max(state, scan.student), 1e-10)
      check(self, "unroll vs unroll_from_trajectory meta_grad", rel_max(meta_grad, scan.meta_grad), 1e-10)
      self.assertAlmostEqual(float(val_loss), float(scan.diagnostics["val_loss"]), places=12)

  @parameterized.parameters("momentum", "adam")
  def test_matches_central_differences(self, optimizer):
    """unroll over K = 3 distinct batches == central differences of phi -> L_val(theta_K(phi)), the K steps
    written out from scratch (no optax, no bilevel), on a one-stage CNN (conv, BatchNorm, head) with train-mode
    BatchNorm in the steps and in L_val.

    Not with eval-mode BatchNorm in L_val: flax's nnx.BatchNorm stop-gradients its running-statistics update, so
    no autodiff sees phi -> theta_k -> rest_K (measured here: 1.1% (momentum) and 7.9% (Adam) relative error
    against differences); test_rest_path_matches_central_differences covers a differentiable rest.

    The context is stop-gradient: alpha_k = weight_fn(phi, context_k) reads the student's logits as data. So the
    function differentiated is the one where the logits fed to the weight net are those of the base trajectory
    (at phi_0), frozen, while the losses and steps are recomputed at the perturbed phi; at phi_0 it equals
    L_val(theta_K(phi_0)).
    """
    with jax.enable_x64(True):
      problem = make_problem("cnn_1stage", num_steps=self.K)
      tx = OPTIMIZERS[optimizer]()
      student = bilevel.StudentState(problem.params, problem.rest, jit(tx.init)(problem.params))
      result = jit(lambda m, s, b, v: bilevel.unroll(weight_fn, m, problem.per_sample_fn, b,
                                                     problem.val_loss_fn, v, s, tx))(
                                                         problem.meta, student, problem.batches, problem.val)
      frozen_logits = np.asarray(result.diagnostics["student_logits"])  # [K, N, K_classes] on the base trajectory

      @jit
      def val_loss(meta):
        theta, rest = problem.params, problem.rest
        m1 = jax.tree.map(jnp.zeros_like, theta)
        m2 = jax.tree.map(jnp.zeros_like, theta)
        for k in range(self.K):
          x, teacher_logits, labels = (problem.batches[key][k] for key in ("x", "teacher_logits", "labels"))
          alpha = jax.nn.sigmoid(jax.nn.softmax(frozen_logits[k]) @ meta["w"] + meta["b"])

          def objective(p, x=x, teacher_logits=teacher_logits, labels=labels, alpha=alpha, rest=rest):
            z, new_rest = models.apply(problem.graphdef, p, rest, x, train=True)
            soft, hard = per_sample_losses(z, teacher_logits, labels)
            return jnp.mean(alpha * soft + (1 - alpha) * hard), new_rest

          grads, rest = jax.grad(objective, has_aux=True)(theta)
          if optimizer == "momentum":
            m1 = jax.tree.map(lambda m, g: MOMENTUM * m + g, m1, grads)
            theta = jax.tree.map(lambda p, m: p - LR * m, theta, m1)
          else:
            t = k + 1
            m1 = jax.tree.map(lambda m, g: ADAM_B1 * m + (1 - ADAM_B1) * g, m1, grads)
            m2 = jax.tree.map(lambda v, g: ADAM_B2 * v + (1 - ADAM_B2) * g**2, m2, grads)
            theta = jax.tree.map(
                lambda p, m, v, t=t: p - ADAM_LR * (m / (1 - ADAM_B1**t)) / (jnp.sqrt(v / (1 - ADAM_B2**t)) + ADAM_EPS),
                theta, m1, m2)
        return problem.val_loss_fn(theta, rest, problem.val)

      self.assertAlmostEqual(float(val_loss(problem.meta)), float(result.diagnostics["val_loss"]), places=10)
      self.assertGreater(norm(result.meta_grad), 1e-6)
      check(self, f"unroll K=3 ({optimizer}) vs central differences (relative L2)",
            rel_l2(result.meta_grad, central_differences(val_loss, problem.meta)), 1e-3)

  def test_rest_path_matches_central_differences(self):
    """The cotangent of rest through the steps: a ridge student whose rest is a differentiable running mean of
    its predictions (momentum 0.5) that L_val reads, K = 3 SGD-momentum steps; central differences of the
    from-scratch loop (alpha reads the inputs only, so nothing is frozen)."""
    with jax.enable_x64(True):
      ridge = make_ridge()
      tx = optax.sgd(0.05, momentum=MOMENTUM)

      def per_sample_fn(params, rest, batch):
        losses, (_, context) = ridge.per_sample_fn(params, rest, batch)
        return losses, ({"m": 0.5 * rest["m"] + 0.5 * jnp.mean(batch["x"] @ params["w"])}, context)

      def val_loss_fn(params, rest, val_batch):
        return 0.5 * jnp.mean((val_batch["x"] @ params["w"] + rest["m"] - val_batch["y"]) ** 2)

      x, t, y = (np.stack([v * (1 + 0.1 * k) for k in range(self.K)]) for v in (ridge.x, ridge.t, ridge.y))
      batches = {"x": x, "t": t, "y": y}
      w0 = jnp.asarray(np.random.default_rng(3).normal(size=RIDGE_D))
      student = bilevel.StudentState({"w": w0}, {"m": jnp.asarray(1.0)}, tx.init({"w": w0}))
      args = (per_sample_fn, batches, val_loss_fn, ridge.val, student, tx)
      result = jit(lambda m: bilevel.unroll(ridge.weight_fn, m, *args))(ridge.meta)

      @jit
      def val_loss(meta):
        w, m, trace = w0, 1.0, jnp.zeros_like(w0)
        for k in range(self.K):
          alpha = jax.nn.sigmoid(x[k] @ meta["w"] + meta["b"])
          m = 0.5 * m + 0.5 * jnp.mean(x[k] @ w)
          grad = jax.grad(lambda w, k=k, alpha=alpha: jnp.mean(
              alpha * 0.5 * (x[k] @ w - t[k]) ** 2 + (1 - alpha) * 0.5 * (x[k] @ w - y[k]) ** 2)
              + 0.5 * RIDGE_L2 * jnp.sum(w**2))(w)
          trace = MOMENTUM * trace + grad
          w = w - 0.05 * trace
        return 0.5 * jnp.mean((ridge.xv @ w + m - ridge.yv) ** 2)

      self.assertAlmostEqual(float(val_loss(ridge.meta)), float(result.diagnostics["val_loss"]), places=12)
      fd = central_differences(val_loss, ridge.meta)
      check(self, "unroll K=3 with a differentiable rest vs central differences (relative L2)",
            rel_l2(result.meta_grad, fd), 1e-6)
      # The rest path matters here: dropping it (rest read as a constant by L_val) changes the meta-gradient.
      frozen = jit(lambda m: bilevel.unroll(ridge.weight_fn, m, per_sample_fn, batches,
                                            lambda p, r, v: val_loss_fn(p, jax.lax.stop_gradient(r), v),
                                            ridge.val, student, tx))(ridge.meta)
      self.assertGreater(rel_l2(frozen.meta_grad, fd), 1e-3)


# ------------------------------------------------------------------------------------------------------- implicit

def _run_implicit(problem, tx, *, student=None, val=None, **kw):
  student = problem.student(tx) if student is None else student
  val = problem.val if val is None else val
  return jit(lambda m, s, b, v: bilevel.implicit(problem.weight_fn, m, problem.per_sample_fn, b,
                                                  problem.val_loss_fn, v, s, tx, **kw))(
                                                      problem.meta, student, problem.batch, val)


class ImplicitTest(parameterized.TestCase):

  @parameterized.parameters(0.0, 0.3)
  def test_cg_equals_closed_form_on_ridge(self, damping):
    with jax.enable_x64(True):
      ridge = make_ridge()
      tx = optax.sgd(LR)
      result = _run_implicit(ridge, tx, solver="cg", terms=20, tol=1e-12, damping=damping)
      exact = ridge.closed_form_meta_grad(damping)
      self.assertGreater(norm(exact), 1e-3)
      check(self, f"implicit CG (damping {damping}) vs closed form", rel_max(result.meta_grad, exact), 1e-8)
      self.assertTrue(bool(result.diagnostics["solve_converged"]))
      self.assertLessEqual(float(result.diagnostics["solve_residual"]), 1e-12)
      # theta is the exact minimiser: the real step (the training gradient there is ~0) leaves it in place.
      check(self, "real step from theta*", rel_max(result.student.params["w"], ridge.minimiser()), 1e-12)

  def test_neumann_equals_unrolled_sgd_from_the_minimiser(self):
    """Neumann with J terms == unroll of J + 1 SGD steps (lr eta) on the same batch, started at theta*.

    Derivation (alpha shared by the steps, theta_0 = theta* independent of alpha, Z_k = dtheta_k/dalpha_i):
      theta_{k+1} = theta_k - eta grad L_train(theta_k; alpha); grad L_train(theta*; alpha) = 0, so theta_k = theta*.
      Z_0 = 0, Z_{k+1} = (I - eta H) Z_k - eta c_i with H = Hessian at theta*, c_i = (1/N) grad (soft_i - hard_i).
      Hence Z_{J+1} = -eta sum_{j=0..J} (I - eta H)^j c_i, and with H symmetric and theta_{J+1} = theta*:
      dL_val(theta_{J+1})/dalpha_i = -(1/N) <v_J, grad (soft_i - hard_i)(theta*)>,
      v_J = eta sum_{j=0..J} (I - eta H)^j grad L_val(theta*): exactly the Neumann estimate with J terms.
    (unroll recomputes alpha_k = alpha(phi) at every step; chained through weight_fn they sum to the shared alpha.)
    Also: J large (eta below 1 / lambda_max) converges to the closed form.
    """
    with jax.enable_x64(True):
      ridge = make_ridge()
      eta = 0.5 / float(np.linalg.eigvalsh(ridge.hessian())[-1])
      tx = optax.sgd(eta)
      student = ridge.student(tx)

      @jit
      def compute(meta, student, batch, val):
        out = {}
        for j in (0, 3):
          out[f"neumann_{j}"] = bilevel.implicit(ridge.weight_fn, meta, ridge.per_sample_fn, batch,
                                                 ridge.val_loss_fn, val, student, tx, solver="neumann", terms=j,
                                                 neumann_lr=eta)
          batches = jax.tree.map(lambda v, j=j: jnp.stack([v] * (j + 1)), batch)
          out[f"unroll_{j}"] = bilevel.unroll(ridge.weight_fn, meta, ridge.per_sample_fn, batches,
                                              ridge.val_loss_fn, val, student, tx)
        out["neumann_400"] = bilevel.implicit(ridge.weight_fn, meta, ridge.per_sample_fn, batch, ridge.val_loss_fn,
                                              val, student, tx, solver="neumann", terms=400, neumann_lr=eta)
        return out

      out = compute(ridge.meta, student, ridge.batch, ridge.val)
      for j in (0, 3):
        check(self, f"neumann J={j} vs unroll K={j + 1}",
              rel_max(out[f"neumann_{j}"].meta_grad, out[f"unroll_{j}"].meta_grad), 1e-10)
        # A truncated series: contracting (no warning), and honestly not "converged" (residual far above tol).
        self.assertTrue(bool(out[f"neumann_{j}"].diagnostics["solve_contracting"]))
        self.assertFalse(bool(out[f"neumann_{j}"].diagnostics["solve_converged"]))
        self.assertGreater(float(out[f"neumann_{j}"].diagnostics["solve_residual"]), 1e-6)
      self.assertGreater(rel_max(out["neumann_0"].meta_grad, out["neumann_3"].meta_grad), 1e-3)
      check(self, "neumann J=400 vs closed form", rel_max(out["neumann_400"].meta_grad,
                                                          ridge.closed_form_meta_grad()), 1e-6)

  def test_neumann_j0_equals_jvp_oracle_with_val_grad_at_theta(self):
    """J = 0 is -(eta/N) <grad L_val(theta), grad (soft_i - hard_i)(theta)> at any theta (an MLP mid-training)."""
    with jax.enable_x64(True):
      problem = make_problem("mlp_tiny")
      tx = OPTIMIZERS["momentum"]()

      @jit
      def compute(meta, params, rest, batch, val):
        student = bilevel.StudentState(params, rest, tx.init(params))
        result = bilevel.implicit(weight_fn, meta, problem.per_sample_fn, batch, problem.val_loss_fn, val, student,
                                  tx, solver="neumann", terms=0, neumann_lr=LR)
        _, (_, context) = problem.per_sample_fn(params, rest, batch)
        val_grad = jax.grad(problem.val_loss_fn)(params, rest, val)
        dalpha = bilevel.alpha_hypergrad_jvp_oracle(problem.per_sample_fn, batch, val_grad, params, rest, LR, BATCH)
        _, alpha_vjp = jax.vjp(lambda m: weight_fn(m, context), meta)
        return result, alpha_vjp(dalpha)[0]

      with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.HypergradSolveWarning)  # J = 0 need not contract here
        result, oracle = compute(problem.meta, problem.params, problem.rest, problem.batch(0), problem.val)
        jax.effects_barrier()
      self.assertGreater(norm(oracle), 1e-6)
      check(self, "neumann J=0 vs alpha_hypergrad_jvp_oracle", rel_max(result.meta_grad, oracle), 1e-10)

  def test_unconverged_cg_is_reported_and_warns_once_per_call_site(self):
    with jax.enable_x64(True):
      ridge = make_ridge(condition=30.0)
      tx = optax.sgd(LR)
      fn = jit(lambda m, s, b, v: bilevel.implicit(ridge.weight_fn, m, ridge.per_sample_fn, b, ridge.val_loss_fn,
                                                    v, s, tx, solver="cg", terms=1, tol=1e-10))
      bilevel._solve_warning_counts.clear()  # a fresh rate limit for this test
      student = ridge.student(tx)
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [fn(ridge.meta, student, ridge.batch, ridge.val) for _ in range(3)]
        jax.block_until_ready(results)
        jax.effects_barrier()
      solve_warnings = [w for w in caught if issubclass(w.category, bilevel.HypergradSolveWarning)]
      # Rate-limited: three failures at one call site warn once (the 1st; the 10th, 100th... would warn again).
      self.assertLen(solve_warnings, 1)
      self.assertIn("did not converge", str(solve_warnings[0].message))
      self.assertIn("cg", str(solve_warnings[0].message))
      result = results[0]
      self.assertFalse(bool(result.diagnostics["solve_converged"]))
      self.assertGreater(float(result.diagnostics["solve_residual"]), 1e-10)
      self.assertTrue(np.all(np.isfinite(_flat(result.meta_grad))))
      logging.info("CG with 1 iteration (condition ~%g): relative residual %.3g, meta_grad error vs closed form "
                   "%.3g", 30.0**2, float(result.diagnostics["solve_residual"]),
                   rel_max(result.meta_grad, ridge.closed_form_meta_grad()))

  @parameterized.parameters("cg", "neumann")
  def test_non_finite_is_never_a_silent_zero(self, solver):
    with jax.enable_x64(True):
      ridge = make_ridge()
      tx = optax.sgd(LR)
      val = dict(ridge.val)
      val["y"] = val["y"].copy()
      val["y"][0] = np.nan
      bilevel._solve_warning_counts.clear()
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _run_implicit(ridge, tx, val=val, solver=solver, terms=3)
        jax.block_until_ready(result)
        jax.effects_barrier()
      self.assertTrue(any(issubclass(w.category, bilevel.HypergradSolveWarning) for w in caught))
      self.assertFalse(bool(result.diagnostics["solve_converged"]))
      self.assertFalse(np.isfinite(float(result.diagnostics["solve_residual"])))
      self.assertTrue(np.all(np.isnan(_flat(result.meta_grad))))


# ------------------------------------------------------------------------------------------------------ head only

class HeadOnlyTest(absltest.TestCase):

  def test_equals_one_step_for_a_linear_student(self):
    """A model that is only a head (a linear softmax student, parameters under 'head': the default predicate)."""
    with jax.enable_x64(True):
      problem = make_softmax()
      tx = OPTIMIZERS["clip_chain"]()
      warm = jax.tree.map(lambda v: 0.1 * np.ones(v.shape), problem.params)

      @jit
      def both(meta, params, batch, val):
        student = bilevel.StudentState(params, {}, warm_opt_state(tx, params, warm))
        args = (weight_fn, meta, problem.per_sample_fn, batch, problem.val_loss_fn, val, student, tx)
        return bilevel.one_step(*args), bilevel.head_only(*args)

      ref, head = both(problem.meta, problem.params, problem.batch, problem.val)
      self.assertGreater(norm(ref.meta_grad), 1e-6)
      check(self, "head_only vs one_step (linear student) meta_grad", rel_max(head.meta_grad, ref.meta_grad), 1e-10)
      check(self, "head_only vs one_step (linear student) student", rel_max(head.student, ref.student), 1e-12)


# -------------------------------------------------------------------------------------------------- bad arguments

class ArgumentTest(absltest.TestCase):
  """Validation happens before any computation (``jax.eval_shape``: traced, nothing compiled)."""

  def setUp(self):
    super().setUp()
    self.ridge = make_ridge()
    self.tx = optax.sgd(LR)
    self.student = self.ridge.student(self.tx)

  def implicit(self, **kw):
    r = self.ridge
    return jax.eval_shape(lambda: bilevel.implicit(r.weight_fn, r.meta, r.per_sample_fn, r.batch, r.val_loss_fn,
                                                   r.val, self.student, self.tx, **kw))

  def unroll(self, batches, fn=bilevel.unroll):
    r = self.ridge
    return jax.eval_shape(lambda: fn(r.weight_fn, r.meta, r.per_sample_fn, batches, r.val_loss_fn, r.val,
                                     self.student, self.tx))

  def test_implicit_arguments(self):
    for kw, name in (({"terms": -1}, "terms"), ({"terms": 2.5}, "terms"), ({"solver": "cg", "terms": 0}, "terms"),
                     ({"damping": -0.1}, "damping"), ({"damping": float("nan")}, "damping"),
                     ({"solver": "lu"}, "solver"), ({"neumann_lr": 0.0}, "neumann_lr"),
                     ({"neumann_lr": -1.0}, "neumann_lr"), ({"tol": 0.0}, "tol")):
      with self.subTest(**kw), self.assertRaisesRegex(ValueError, f"^{name}:"):
        self.implicit(**kw)

  def test_unroll_batches(self):
    batch = self.ridge.batch
    for fn in (bilevel.unroll, bilevel.unroll_python_loop):
      with self.assertRaisesRegex(ValueError, "^batches: empty"):
        self.unroll({}, fn)
      with self.assertRaisesRegex(ValueError, "^batches: K = 0"):
        self.unroll(jax.tree.map(lambda v: np.zeros((0, *v.shape)), batch), fn)
      with self.assertRaisesRegex(ValueError, "^batches: every leaf"):
        self.unroll({"x": np.zeros((2, RIDGE_N, RIDGE_D)), "t": np.zeros((3, RIDGE_N)),
                     "y": np.zeros((3, RIDGE_N))}, fn)
      with self.assertRaisesRegex(ValueError, "^batches: every leaf"):
        self.unroll({"x": np.zeros((2, RIDGE_N, RIDGE_D)), "t": np.float64(0.0), "y": np.zeros((2, RIDGE_N))}, fn)

  def test_trajectory_length(self):
    r = self.ridge
    batches = jax.tree.map(lambda v: np.stack([v, v]), r.batch)
    trajectory = jax.tree.map(lambda v: np.stack([v] * 3), self.student)
    with self.assertRaisesRegex(ValueError, "^trajectory: 3 stored states but batches has K = 2"):
      bilevel.unroll_from_trajectory(r.weight_fn, r.meta, r.per_sample_fn, batches, trajectory, self.student,
                                     r.val_loss_fn, r.val, self.tx)

  def test_head_predicate_and_context(self):
    r = self.ridge
    args = (r.weight_fn, r.meta, r.per_sample_fn, r.batch, r.val_loss_fn, r.val, self.student, self.tx)
    with self.assertRaisesRegex(ValueError, "^is_head: selects no parameter"):
      jax.eval_shape(lambda: bilevel.head_only(*args))  # the ridge parameters are {'w'}: no 'head'
    self.assertIsNotNone(jax.eval_shape(lambda: bilevel.head_only(*args, is_head=lambda path: True)))
    with self.assertRaisesRegex(ValueError, "^head_by_name"):
      bilevel.head_by_name()

    def no_logits(params, rest, batch):
      losses, (new_rest, context) = r.per_sample_fn(params, rest, batch)
      return losses, (new_rest, {"x": context["x"]})

    def column_alpha(meta, context):
      return r.weight_fn(meta, context)[:, None]  # [N, 1]: would broadcast alpha * soft to [N, N]

    batches = jax.tree.map(lambda v: np.stack([v, v]), r.batch)
    calls = {
        "one_step": lambda w=column_alpha, s=self.student: bilevel.one_step(w, r.meta, *args[2:6], s, self.tx),
        "unroll": lambda w=column_alpha, s=self.student: bilevel.unroll(
            w, r.meta, r.per_sample_fn, batches, r.val_loss_fn, r.val, s, self.tx),
        "implicit": lambda w=column_alpha, s=self.student: bilevel.implicit(w, r.meta, *args[2:6], s, self.tx),
    }
    for name, call in calls.items():
      with self.subTest(fn=name), self.assertRaisesRegex(ValueError, r"weight_fn must return alpha of shape \[N\]"):
        jax.eval_shape(call)
      with self.subTest(fn=name), self.assertRaisesRegex(ValueError, "student must be a StudentState"):
        jax.eval_shape(functools.partial(call, w=r.weight_fn, s=(self.student.params, self.student.rest)))

    every_leaf = {"is_head": lambda path: True}
    for fn, kw in ((bilevel.one_step, {}), (bilevel.one_step_autodiff, {}), (bilevel.head_only, every_leaf),
                   (bilevel.implicit, {})):
      # The context is what weight_fn reads: 'student_logits' is optional (issue 30; diagnostics report None), a
      # context that is not a dict is one line naming the function.
      def x_alpha(meta, context):
        return jax.nn.sigmoid(jnp.sum(context["x"].reshape(context["x"].shape[0], -1), -1) * 0.0 + meta["b"])

      with self.subTest(fn=fn.__name__):
        out = jax.eval_shape(lambda fn=fn, kw=kw: fn(x_alpha, r.meta, no_logits, r.batch, r.val_loss_fn, r.val,
                                                     self.student, self.tx, **kw))
        self.assertIsNone(out.diagnostics["student_logits"])
      with self.subTest(fn=fn.__name__), self.assertRaisesRegex(ValueError, f"^{fn.__name__}: per_sample_fn must "
                                                                "return \\(new_rest, context\\) with context a dict"):
        jax.eval_shape(lambda fn=fn, kw=kw: fn(r.weight_fn, r.meta, lambda p, rs, b: (no_logits(p, rs, b)[0], (rs, [])),
                                               r.batch, r.val_loss_fn, r.val, self.student, self.tx, **kw))


if __name__ == "__main__":
  absltest.main()


def test_the_solve_warning_is_one_line_on_the_command_line():
  """Raised from a jax.debug.callback, the warning names the library function, not JAX's callback machinery, and the
  CLI prints it as one ``warning:`` line (no file path, no stray source line)."""
  import warnings

  from tgeo_jax import cli
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    bilevel._warn_not_converged(0.92, False, site="test_site", solver="neumann", terms=5, damping=0.0, tol=1e-6)
  [w] = caught
  assert (w.filename, w.lineno, w.category) == ("tgeo_jax.bilevel.implicit", 0, bilevel.HypergradSolveWarning)
  default = warnings.formatwarning
  try:
    cli._one_line_warnings()
    text = warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
    other = warnings.formatwarning("x", UserWarning, "f.py", 3)
  finally:
    warnings.formatwarning = default
  assert text.count("\n") == 1 and text.startswith("warning: implicit hypergradient at test_site: the neumann solve "
                                                   "(terms=5, damping=0) did not converge: relative residual 0.92"), text
  assert other.startswith("f.py:3: UserWarning: x")  # other libraries' warnings keep their format
