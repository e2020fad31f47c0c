"""The general meta-gradient API (tgeo_jax/hypergrad.py), in float64:

* the α-mix through the general path equals the fast path of tgeo_jax.bilevel (one_step, unroll, implicit);
* a KD temperature, a per-class weight vector and an optimizer hyperparameter (learning rate through
  optax.inject_hyperparams) against central differences of the lookahead's validation loss written out with optax,
  with SGD-momentum and Adam, one step and three unrolled steps;
* implicit against the closed form on a ridge problem (exact at the inner minimiser);
* inside jax.shard_map on 4 CPU devices with per-device batches (a subprocess: the device count is fixed at start)
  equal to the single-device and the jit/NamedSharding results.

Run as a script (``python tests/test_hypergrad.py``) it prints the three parallel results as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import device_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

D, H, K, N = 6, 5, 4, 16


def _data(seed=0, n=N):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(n, D)), "y": rng.integers(0, K, n), "t": 2 * rng.normal(size=(n, K))}


def _params(seed=1):
  rng = np.random.default_rng(seed)
  return {"w1": rng.normal(size=(D, H)) / np.sqrt(D), "b1": np.zeros(H), "w2": rng.normal(size=(H, K)) / np.sqrt(H),
          "b2": np.zeros(K)}


def _logits(params, x):
  import jax.numpy as jnp
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def _ce(logits, y):
  import jax
  import jax.numpy as jnp
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]


def _val_loss(params, rest, val_batch):
  import jax.numpy as jnp
  del rest
  return jnp.mean(_ce(_logits(params, val_batch["x"]), val_batch["y"]))


# Three inner problems whose meta-parameters sit inside the loss.
def _temperature_loss(params, rest, meta, batch):
  import jax.numpy as jnp
  from tgeo_jax import losses
  logits = _logits(params, batch["x"])
  tau = jnp.exp(meta["log_tau"])
  return jnp.mean(0.5 * losses.kd_loss(logits, batch["t"], temperature=tau) + 0.5 * _ce(logits, batch["y"])), (rest, {})


def _class_weight_loss(params, rest, meta, batch):
  import jax.numpy as jnp
  return jnp.mean(meta["class_w"][batch["y"]] * _ce(_logits(params, batch["x"]), batch["y"])), (rest, {})


def _plain_loss(params, rest, meta, batch):
  import jax.numpy as jnp
  del meta
  return jnp.mean(_ce(_logits(params, batch["x"]), batch["y"])), (rest, {})


PROBLEMS = {
    "temperature": (_temperature_loss, {"log_tau": np.log(3.0)}, None),
    "class_weights": (_class_weight_loss, {"class_w": np.array([0.5, 1.0, 1.5, 0.8])}, None),
    "learning_rate": (_plain_loss, {"log_lr": np.array(0.0)}, lambda m: _learning_rate(m)),
}


def _learning_rate(meta):
  """An optimizer hyperparameter as a meta-parameter: the learning rate 0.1 exp(log_lr)."""
  import jax.numpy as jnp
  return {"learning_rate": 0.1 * jnp.exp(meta["log_lr"])}


def _optimizer(name, injected):
  import optax
  make = {"sgd_momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
          "adam": lambda learning_rate: optax.adam(learning_rate)}[name]
  lr = 0.1 if name == "sgd_momentum" else 0.02
  return optax.inject_hyperparams(make)(learning_rate=lr) if injected else make(lr)


def _reference_val_loss(inner_loss_fn, meta, batches, val_batch, params, tx, opt_state, hyperparams_fn):
  """L_val after len(batches) real steps, written out with optax alone (no tgeo_jax.hypergrad)."""
  import jax
  for batch in batches:
    grads = jax.grad(lambda p, batch=batch: inner_loss_fn(p, None, meta, batch)[0])(params)
    if hyperparams_fn is not None:
      opt_state.hyperparams.update(hyperparams_fn(meta))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda a, b: a + b, params, updates)
  return _val_loss(params, None, val_batch)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("optimizer, steps", [("sgd_momentum", 1), ("adam", 3)])
def test_meta_gradient_equals_central_differences(problem, optimizer, steps):
  """Every problem with both optimizers; one_step with SGD-momentum, a 3-step unroll with Adam."""
  import jax
  import jax.numpy as jnp
  from conftest import central_differences
  from tgeo_jax import bilevel, hypergrad
  inner_loss_fn, meta, hyperparams_fn = PROBLEMS[problem]
  with jax.enable_x64(True):
    tx = _optimizer(optimizer, injected=hyperparams_fn is not None)
    params = jax.tree.map(jnp.asarray, _params())
    # A student one plain step in: momentum / Adam moments are non-zero.
    opt_state = tx.init(params)
    warm = _data(9)
    _, opt_state = jax.tree.map(jnp.asarray, bilevel.optimizer_step(
        tx, jax.grad(lambda p: _plain_loss(p, None, None, warm)[0])(params), opt_state, params))
    batches = [_data(s) for s in range(steps)]
    val_batch = _data(100)
    student = bilevel.StudentState(params, None, opt_state)
    meta_j = jax.tree.map(jnp.asarray, meta)
    if steps == 1:
      result = jax.jit(lambda m: hypergrad.one_step(inner_loss_fn, m, batches[0], _val_loss, val_batch, student, tx,
                                                    hyperparams_fn=hyperparams_fn))(meta_j)
    else:
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
      result = jax.jit(lambda m: hypergrad.unroll(inner_loss_fn, m, stacked, _val_loss, val_batch, student, tx,
                                                  hyperparams_fn=hyperparams_fn))(meta_j)

    def reference(m):
      state = jax.tree.map(lambda x: x, opt_state)  # the references mutate hyperparams dicts: copy
      return _reference_val_loss(inner_loss_fn, jax.tree.map(jnp.asarray, m), batches, val_batch, params, tx,
                                 state, hyperparams_fn)

    assert float(result.diagnostics["val_loss"]) == pytest.approx(float(reference(meta)), rel=1e-12)
    expected = central_differences(reference, {k: np.array(v, np.float64) for k, v in meta.items()}, eps=1e-6)
    for key in meta:
      got = np.asarray(result.meta_grad[key])
      assert np.all(np.abs(got) > 1e-6), (key, got)  # a meta-gradient that vanished would pass trivially
      np.testing.assert_allclose(got, expected[key], rtol=1e-6, atol=1e-10, err_msg=key)


def _mix_problem():
  """A tiny α-mix: soft = KD at τ = 2, hard = CE, α = sigmoid(features @ w + b) from the teacher's logits."""
  import jax
  import jax.numpy as jnp
  from tgeo_jax import losses

  def per_sample_fn(params, rest, batch):
    logits = _logits(params, batch["x"])
    soft = losses.kd_loss(logits, batch["t"], temperature=2.0)
    return (soft, _ce(logits, batch["y"])), (rest, {"student_logits": logits, "t": batch["t"]})

  def weight_fn(meta, context):
    return jax.nn.sigmoid(jax.nn.softmax(context["t"]) @ meta["w"] + meta["b"])

  meta = {"w": jnp.asarray(np.linspace(-1, 1, K)), "b": jnp.asarray(0.2)}
  return per_sample_fn, weight_fn, meta


@pytest.mark.parametrize("variant", ["one_step", "unroll", "implicit"])
def test_the_alpha_mix_through_the_general_path_equals_the_fast_path(variant):
  import jax
  import jax.numpy as jnp
  import optax
  from tgeo_jax import bilevel, hypergrad
  with jax.enable_x64(True):
    per_sample_fn, weight_fn, meta = _mix_problem()
    tx = optax.sgd(0.1, momentum=0.9)
    params = jax.tree.map(jnp.asarray, _params())
    student = bilevel.StudentState(params, None, tx.init(params))
    val_batch = jax.tree.map(jnp.asarray, _data(100))
    inner = hypergrad.mix_inner_loss(weight_fn, per_sample_fn)
    if variant == "unroll":
      batch = jax.tree.map(lambda *xs: jnp.stack(xs), *[_data(s) for s in range(3)])
      fast = bilevel.unroll(weight_fn, meta, per_sample_fn, batch, _val_loss, val_batch, student, tx)
      general = hypergrad.unroll(inner, meta, batch, _val_loss, val_batch, student, tx, path="general")
    elif variant == "implicit":
      batch = jax.tree.map(jnp.asarray, _data(0))
      kw = dict(solver="neumann", terms=4, neumann_lr=0.1, damping=0.01, tol=1e-3)
      fast = bilevel.implicit(weight_fn, meta, per_sample_fn, batch, _val_loss, val_batch, student, tx, **kw)
      general = hypergrad.implicit(inner, meta, batch, _val_loss, val_batch, student, tx, path="general", **kw)
      assert float(general.diagnostics["solve_residual"]) == pytest.approx(
          float(fast.diagnostics["solve_residual"]), rel=1e-10)
    else:
      batch = jax.tree.map(jnp.asarray, _data(0))
      fast = bilevel.one_step(weight_fn, meta, per_sample_fn, batch, _val_loss, val_batch, student, tx)
      general = hypergrad.one_step(inner, meta, batch, _val_loss, val_batch, student, tx, path="general")
    assert "aux" in general.diagnostics and "aux" not in fast.diagnostics  # two different programs
    for key in meta:
      assert np.abs(np.asarray(fast.meta_grad[key])).max() > 1e-6
      np.testing.assert_allclose(np.asarray(general.meta_grad[key]), np.asarray(fast.meta_grad[key]), rtol=1e-10,
                                 atol=1e-14, err_msg=key)
    for a, b in zip(jax.tree.leaves(general.student.params), jax.tree.leaves(fast.student.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    assert float(general.diagnostics["val_loss"]) == pytest.approx(float(fast.diagnostics["val_loss"]), rel=1e-12)


def test_an_alpha_mix_takes_the_fast_path_by_default_and_by_name():
  """``path='auto'`` runs bilevel's fast path for an AlphaMix (the same program: identical results), the general
  path where only it applies (hyperparams_fn); ``path='fast'`` refuses what it cannot do, in one line."""
  import jax
  import jax.numpy as jnp
  import optax
  from tgeo_jax import bilevel, hypergrad
  per_sample_fn, weight_fn, meta = _mix_problem()
  tx = optax.sgd(0.1, momentum=0.9)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _params())
  student = bilevel.StudentState(params, None, tx.init(params))
  batch, val_batch = (jax.tree.map(jnp.asarray, _data(s)) for s in (0, 100))
  mix = hypergrad.AlphaMix(weight_fn, per_sample_fn)
  auto = hypergrad.one_step(mix, meta, batch, _val_loss, val_batch, student, tx)
  fast = bilevel.one_step(weight_fn, meta, per_sample_fn, batch, _val_loss, val_batch, student, tx)
  assert set(auto.diagnostics) == set(fast.diagnostics)  # the fast path's own result
  for a, b in zip(jax.tree.leaves(auto.meta_grad), jax.tree.leaves(fast.meta_grad)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  injected = optax.inject_hyperparams(lambda learning_rate: optax.sgd(learning_rate, momentum=0.9))(learning_rate=0.1)
  general = hypergrad.one_step(mix, meta, batch, _val_loss, val_batch,
                               bilevel.StudentState(params, None, injected.init(params)), injected,
                               hyperparams_fn=lambda m: {"learning_rate": 0.1})
  assert "aux" in general.diagnostics
  with pytest.raises(ValueError, match=r"^one_step: path='fast' has no hyperparams_fn; use path='auto' or "
                                       r"'general'$"):
    hypergrad.one_step(mix, meta, batch, _val_loss, val_batch, student, injected,
                       hyperparams_fn=lambda m: {"learning_rate": 0.1}, path="fast")
  with pytest.raises(ValueError, match=r"^unroll: path='fast' needs an AlphaMix inner loss"):
    hypergrad.unroll(_plain_loss, meta, batch, _val_loss, val_batch, student, tx, path="fast")
  with pytest.raises(ValueError, match=r"^implicit: path 'quick', expected one of \('auto', 'general', 'fast'\)$"):
    hypergrad.implicit(mix, meta, batch, _val_loss, val_batch, student, tx, path="quick")


def test_implicit_is_exact_at_the_minimiser_of_a_ridge_problem():
  """Inner: min_θ mean (Xθ - y)² / 2 + exp(φ)/2 |θ|², at its minimiser θ*(φ); outer: mean (X_v θ - y_v)² / 2.
  dL_val/dφ in closed form: -exp(φ) g_v^T A^-1 θ*, A = X^T X / n + exp(φ) I."""
  import jax
  import jax.numpy as jnp
  import optax
  from tgeo_jax import bilevel, hypergrad
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(40, 5)), rng.normal(size=40)
  xv, yv = rng.normal(size=(30, 5)), rng.normal(size=30)
  log_lam = np.log(0.3)
  a = x.T @ x / 40 + np.exp(log_lam) * np.eye(5)
  theta = np.linalg.solve(a, x.T @ y / 40)
  g_val = xv.T @ (xv @ theta - yv) / 30
  expected = -np.exp(log_lam) * g_val @ np.linalg.solve(a, theta)
  with jax.enable_x64(True):
    def inner(p, rest, meta, batch):
      r = batch["x"] @ p["theta"] - batch["y"]
      return jnp.mean(r ** 2) / 2 + jnp.exp(meta["log_lam"]) / 2 * jnp.sum(p["theta"] ** 2), (rest, {})

    def val(p, rest, vb):
      return jnp.mean((vb["x"] @ p["theta"] - vb["y"]) ** 2) / 2

    tx = optax.sgd(0.1)
    p = {"theta": jnp.asarray(theta)}
    result = hypergrad.implicit(inner, {"log_lam": jnp.asarray(log_lam)}, {"x": x, "y": y}, val, {"x": xv, "y": yv},
                                bilevel.StudentState(p, None, tx.init(p)), tx, solver="cg", terms=20, tol=1e-12)
  assert bool(result.diagnostics["solve_converged"])
  assert float(result.meta_grad["log_lam"]) == pytest.approx(expected, rel=1e-9)


def test_bad_calls_are_one_line():
  import jax.numpy as jnp
  import optax
  from tgeo_jax import bilevel, hypergrad
  params = jax_params = {"w": jnp.ones(3)}
  del jax_params
  tx = optax.sgd(0.1)
  student = bilevel.StudentState(params, None, tx.init(params))

  def inner(p, rest, meta, batch):
    return jnp.sum(p["w"] * meta["s"]), (rest, {})

  def val(p, rest, vb):
    return jnp.sum(p["w"] ** 2)

  with pytest.raises(ValueError, match=r"^one_step: hyperparams_fn needs the student's optimizer built with "
                                       r"optax.inject_hyperparams"):
    hypergrad.one_step(inner, {"s": jnp.ones(3)}, None, val, None, student, tx,
                       hyperparams_fn=lambda m: {"learning_rate": 0.1})
  injected = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  with pytest.raises(ValueError, match=r"^one_step: hyperparams_fn returned \['lr'\], not hyperparameters of the "
                                       r"optimizer \(\['learning_rate'"):
    hypergrad.one_step(inner, {"s": jnp.ones(3)}, None, val, None,
                       bilevel.StudentState(params, None, injected.init(params)), injected,
                       hyperparams_fn=lambda m: {"lr": 0.1})
  with pytest.raises(ValueError, match=r"^one_step: inner_loss_fn must return a scalar loss first; got shape \(3,\)"):
    hypergrad.one_step(lambda p, r, m, b: (p["w"] * m["s"], (r, {})), {"s": jnp.ones(3)}, None, val, None, student,
                       tx)
  with pytest.raises(ValueError, match=r"^solver: expected one of"):
    hypergrad.implicit(inner, {"s": jnp.ones(3)}, None, val, None, student, tx, solver="lu")


@pytest.mark.parametrize("variant", ["one_step", "unroll", "implicit"])
def test_fast_path_ergonomics_scalar_weight_and_a_context_without_student_logits(variant):
  """bilevel's α-mix: a scalar α (one weight for the batch) equals the same α broadcast to [N]; a context without
  'student_logits' is accepted (diagnostics then report None for it); a context that is not a dict is one line."""
  import jax
  import jax.numpy as jnp
  import optax
  from tgeo_jax import bilevel
  with jax.enable_x64(True):
    per_sample_fn, _, _ = _mix_problem()
    tx = optax.sgd(0.1, momentum=0.9)
    params = jax.tree.map(jnp.asarray, _params())
    student = bilevel.StudentState(params, None, tx.init(params))
    val_batch = jax.tree.map(jnp.asarray, _data(100))
    meta = {"a": jnp.asarray(0.3)}

    def bare(params, rest, batch):  # the context holds only what the weight reads
      (soft, hard), (rest, _) = per_sample_fn(params, rest, batch)
      return (soft, hard), (rest, {})

    scalar = lambda m, c: jax.nn.sigmoid(m["a"])  # noqa: E731
    broadcast = lambda m, c: jnp.full(N, jax.nn.sigmoid(m["a"]))  # noqa: E731
    if variant == "unroll":
      batch = jax.tree.map(lambda *xs: jnp.stack(xs), *[_data(s) for s in range(3)])
    else:
      batch = jax.tree.map(jnp.asarray, _data(0))
    fn = {"one_step": bilevel.one_step, "unroll": bilevel.unroll,
          "implicit": lambda *a: bilevel.implicit(*a, terms=3, neumann_lr=0.1, damping=0.1, tol=0.9)}[variant]
    a = fn(scalar, meta, bare, batch, _val_loss, val_batch, student, tx)
    b = fn(broadcast, meta, per_sample_fn, batch, _val_loss, val_batch, student, tx)
    assert abs(float(b.meta_grad["a"])) > 1e-6
    assert float(a.meta_grad["a"]) == pytest.approx(float(b.meta_grad["a"]), rel=1e-12)
    assert a.diagnostics["student_logits"] is None and b.diagnostics["student_logits"] is not None
    with pytest.raises(ValueError, match=r"context a dict \(what weight_fn reads; 'student_logits' \[N, K\] is "
                                         r"reported in diagnostics when present\); got tuple"):
      fn(scalar, meta, lambda p, r, bt: (per_sample_fn(p, r, bt)[0], (r, ())), batch, _val_loss, val_batch,
         student, tx)


# ------------------------------------------------------------------------------------------- parallel programs


def _variants(inner, meta, hyperparams_fn, student, tx) -> dict:
  """``{variant: fn(batch, val_batch, axis_name=None) -> HypergradResult}`` of one problem."""
  from tgeo_jax import hypergrad
  variants = {"one_step": lambda b, v, axis=None: hypergrad.one_step(
      inner, meta, b, _val_loss, v, student, tx, hyperparams_fn=hyperparams_fn, axis_name=axis)}
  if hyperparams_fn is None:
    variants["unroll"] = lambda b, v, axis=None: hypergrad.unroll(inner, meta, b, _val_loss, v, student, tx,
                                                                  axis_name=axis)
    variants["implicit"] = lambda b, v, axis=None: hypergrad.implicit(
        inner, meta, b, _val_loss, v, student, tx, solver="neumann", terms=3, neumann_lr=0.1, damping=0.1, tol=0.5,
        axis_name=axis)
  return variants


def parallel_results() -> dict:
  """The temperature problem (one_step, unroll K = 2, implicit) and the learning-rate problem (one_step, SGD
  momentum): single device; jit over a 4-device NamedSharding (global batch); shard_map with per-device batches."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from tgeo_jax import bilevel, hypergrad
  jax.config.update("jax_enable_x64", True)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # as the trainer's
  params = jax.tree.map(jnp.asarray, _params())
  out = {}
  for name, problem, tx in (
      ("temperature", "temperature", optax.sgd(0.1, momentum=0.9)),
      ("learning_rate", "learning_rate", optax.inject_hyperparams(lambda learning_rate: optax.sgd(
          learning_rate, momentum=0.9))(learning_rate=0.1))):
    inner, meta, hyperparams_fn = PROBLEMS[problem]
    meta = jax.tree.map(jnp.asarray, meta)
    student = bilevel.StudentState(params, None, tx.init(params))
    batch, batches, val_batch = (jax.tree.map(jnp.asarray, _data(0)),
                                 jax.tree.map(lambda *xs: jnp.stack(xs), *[_data(s) for s in range(2)]),
                                 jax.tree.map(jnp.asarray, _data(100)))
    variants = _variants(inner, meta, hyperparams_fn, student, tx)
    for variant, fn in variants.items():
      data = batches if variant == "unroll" else batch
      batch_axis = 1 if variant == "unroll" else 0
      spec = P(*([None] * batch_axis), "data")

      def grads_of(result):
        return [np.asarray(x).ravel().tolist() for x in jax.tree.leaves((result.meta_grad, result.student.params))]

      single = grads_of(jax.jit(fn)(data, val_batch))
      sharded_data = jax.device_put(data, NamedSharding(mesh, spec))
      sharded_val = jax.device_put(val_batch, NamedSharding(mesh, P("data")))
      sharded = grads_of(jax.jit(fn)(sharded_data, sharded_val))
      mapped = jax.jit(jax.shard_map(lambda b, v, fn=fn: fn(b, v, "data"), mesh=mesh, in_specs=(spec, P("data")),
                                     out_specs=P()))
      in_shard_map = grads_of(mapped(data, val_batch))
      out[f"{name}/{variant}"] = {"single": single, "named_sharding": sharded, "shard_map": in_shard_map}
  # reduce_rest: per-device statistics (a running mean of the inputs, as BatchNorm keeps) averaged over the axis
  # equal the statistics of the global batch.
  def stats_loss(params, rest, meta, batch):
    loss, _ = _temperature_loss(params, None, meta, batch)
    return loss, ({"mean": 0.9 * rest["mean"] + 0.1 * jnp.mean(batch["x"], 0)}, {})

  tx = optax.sgd(0.1)
  stats_student = bilevel.StudentState(params, {"mean": jnp.zeros(D)}, tx.init(params))
  log_tau = {"log_tau": jnp.asarray(np.log(3.0))}

  def stats_fn(b, v, axis=None):
    result = hypergrad.one_step(stats_loss, log_tau, b, _val_loss, v, stats_student, tx, axis_name=axis,
                                reduce_rest=axis is not None)
    return result.meta_grad, result.student.rest

  batch, val_batch = jax.tree.map(jnp.asarray, _data(0)), jax.tree.map(jnp.asarray, _data(100))
  stats_mapped = jax.jit(jax.shard_map(lambda b, v: stats_fn(b, v, "data"), mesh=mesh,
                                       in_specs=(P("data"), P("data")), out_specs=P()))
  leaves = lambda tree: [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(tree)]  # noqa: E731
  out["reduce_rest/one_step"] = {"single": leaves(jax.jit(stats_fn)(batch, val_batch)),
                                 "named_sharding": leaves(jax.jit(stats_fn)(
                                     jax.device_put(batch, NamedSharding(mesh, P("data"))),
                                     jax.device_put(val_batch, NamedSharding(mesh, P("data"))))),
                                 "shard_map": leaves(stats_mapped(batch, val_batch))}

  # The α-mix: on one device the fast path (bilevel.one_step), inside shard_map the general path (axis_name).
  per_sample_fn, weight_fn, meta = _mix_problem()
  tx = optax.sgd(0.1, momentum=0.9)
  student = bilevel.StudentState(params, None, tx.init(params))
  mix = hypergrad.AlphaMix(weight_fn, per_sample_fn)
  batch, val_batch = jax.tree.map(jnp.asarray, _data(0)), jax.tree.map(jnp.asarray, _data(100))

  def fn(b, v, axis=None):
    return hypergrad.one_step(mix, meta, b, _val_loss, v, student, tx, axis_name=axis)

  def grads_of(result):  # the per-example diagnostics (α) stay on their devices: compare what is global
    return [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(result)]

  def global_part(b, v, axis=None):
    result = fn(b, v, axis)
    return result.meta_grad, result.student.params

  mapped = jax.jit(jax.shard_map(lambda b, v: global_part(b, v, "data"), mesh=mesh,
                                 in_specs=(P("data"), P("data")), out_specs=P()))
  out["alpha_mix/one_step"] = {"single": grads_of(jax.jit(global_part)(batch, val_batch)),
                               "named_sharding": grads_of(jax.jit(global_part)(
                                   jax.device_put(batch, NamedSharding(mesh, P("data"))),
                                   jax.device_put(val_batch, NamedSharding(mesh, P("data"))))),
                               "shard_map": grads_of(mapped(batch, val_batch))}
  return out


def test_shard_map_equals_one_device_and_named_sharding():
  env = dict(os.environ, XLA_FLAGS=device_flags(4), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                        timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  assert sorted(results) == ["alpha_mix/one_step", "learning_rate/one_step", "reduce_rest/one_step",
                             "temperature/implicit", "temperature/one_step", "temperature/unroll"]
  for key, r in results.items():
    single = np.concatenate([np.asarray(x) for x in r["single"]])
    assert np.abs(single).max() > 1e-3, key
    for other in ("named_sharding", "shard_map"):
      got = np.concatenate([np.asarray(x) for x in r[other]])
      np.testing.assert_allclose(got, single, rtol=1e-6, atol=1e-9, err_msg=f"{key} {other}")


if __name__ == "__main__":
  print(json.dumps(parallel_results()))
