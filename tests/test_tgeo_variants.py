"""TGeo-KD's hypergradient variants (``tgeo.hypergrad``) as a method: the unroll window is K real steps whose
meta-gradient is ``bilevel.unroll``'s, the step kinds of a window, implicit / head-only meta steps, exact resume in
the middle of a window, and 1 vs 4 devices. The hypergradients' own exactness is in test_hypergrad_variants.py."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np

from conftest import ROOT, TINY, assert_same_run, build_method_state, device_flags, run_cli
from tgeo_jax import bilevel, data

WINDOW = 3


def _batches(method, n):
  """The first ``n`` training batches of epoch 0, each with the first validation batch."""
  task = method.task
  train = data.train_batches(task.train, batch_size=32, seed=0, epoch=0)
  val = data.validation_batches(task.val, batch_size=32, seed=0)[0]
  return [jax.tree.map(jnp.asarray, dict(train[k], val=val)) for k in range(n)]


def test_unroll_window_is_the_real_steps_and_bilevel_unroll(tiny_teacher):
  """K train_step calls (record, record, window_end) take the student's real steps with φ fixed and then update φ
  by exactly ``bilevel.unroll``'s meta-gradient over the same K batches (float32: to rounding)."""
  method, state, frozen, _ = build_method_state("tgeo", tiny_teacher, **{
      "tgeo.hypergrad": "unroll", "tgeo.unroll_steps": WINDOW, "tgeo.fusion_lr": 1e-2})
  batches = _batches(method, WINDOW)
  kinds = [method.step_kind(k) for k in range(2 * WINDOW)]
  assert kinds == ["record", "record", "window_end"] * 2
  step = jax.jit(method.train_step, static_argnums=3)
  s = state
  for k in range(WINDOW):
    s, metrics = step(s, frozen, batches[k], kinds[k])
    if k < WINDOW - 1:
      chex.assert_trees_all_equal(s["meta_params"], state["meta_params"])  # φ fixed inside the window
  assert float(metrics["meta_grad_norm"]) > 0 and int(s["step"]) == WINDOW

  @jax.jit
  def reference(state):
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *[method.step_batch(state, frozen, b) for b in batches])
    student = bilevel.StudentState(state["params"], state["rest"], state["opt_state"])
    result = bilevel.unroll(method.weight_fn, state["meta_params"], method.per_sample_fn(frozen), stacked,
                            method.val_loss_fn, batches[-1]["val"], student, method.tx)
    updates, _ = method.meta_tx.update(result.meta_grad, state["meta_opt_state"], state["meta_params"])
    return result, jax.tree.map(jnp.add, state["meta_params"], updates)

  result, meta_params = reference(state)
  chex.assert_trees_all_close(s["params"], result.student.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s["meta_params"], meta_params, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(float(metrics["val_loss"]), float(result.diagnostics["val_loss"]), rtol=1e-5)


def test_step_kinds_with_meta_interval(tiny_teacher):
  method, *_ = build_method_state("tgeo", tiny_teacher, **{"tgeo.hypergrad": "unroll", "tgeo.unroll_steps": 2,
                                                           "tgeo.meta_interval": 2})
  assert [method.step_kind(k) for k in range(8)] == ["record", "window_end", "plain", "plain"] * 2
  method, *_ = build_method_state("tgeo", tiny_teacher, **{"tgeo.hypergrad": "implicit", "tgeo.meta_interval": 3})
  assert [method.step_kind(k) for k in range(6)] == ["meta", "plain", "plain"] * 2


def test_implicit_and_head_only_meta_steps(tiny_teacher):
  """Both update φ on a meta step; the implicit one reports its solve; head-only's meta-gradient points the way
  the exact one-step one does (cosine > 0) at a fraction of its cost (bench/step_cost.py)."""
  grads = {}
  for variant in ("one_step", "implicit", "head_only"):
    method, state, frozen, batch = build_method_state("tgeo", tiny_teacher, **{"tgeo.hypergrad": variant})
    new, metrics = jax.jit(method.train_step, static_argnums=3)(state, frozen, batch, "meta")
    assert float(metrics["meta_grad_norm"]) > 0 and np.isfinite(float(metrics["val_loss"])), variant
    assert ("solve_residual" in metrics) == (variant == "implicit")
    if variant == "implicit":
      assert np.isfinite(float(metrics["solve_residual"])) and float(metrics["solve_converged"]) in (0.0, 1.0)
    # The student's step is the real step with α(φ_t): a plain step on the same batch gives the same parameters.
    plain, _ = jax.jit(method.train_step, static_argnums=3)(state, frozen, batch, "plain")
    chex.assert_trees_all_close(new["params"], plain["params"], rtol=1e-5, atol=1e-6)
    grads[variant] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        jax.tree.map(jnp.subtract, new["meta_params"], state["meta_params"]))])
  a, b = grads["head_only"], grads["one_step"]
  assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0


COMMON = ["--config=configs/fashion_mnist.py:tgeo", *TINY, "--config.num_epochs=2", "--config.tgeo.fusion_lr=0.01",
          "--config.tgeo.hypergrad=unroll", f"--config.tgeo.unroll_steps={WINDOW}"]


def test_unroll_resumes_exactly_in_the_middle_of_a_window(tiny_teacher, tmp_path):
  """The window (recorded states and batches) is part of the checkpointed state: a run stopped after step 4 (one
  step into the second window) and resumed ends bit-identical to an uninterrupted run."""
  args = [*COMMON, f"--config.teacher.checkpoint={tiny_teacher}"]
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  run_cli([*args, f"--workdir={whole}"])
  run_cli([*args, f"--workdir={split}", "--config.steps_per_run=4"])
  run_cli([*args, f"--workdir={split}"])
  assert_same_run(whole, split)


def _four_device_meta_grads(teacher_dir):
  out = subprocess.run([sys.executable, __file__, teacher_dir], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, XLA_FLAGS=device_flags(4)))
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


def meta_updates(teacher_dir):
  """``{variant: flat φ update after its meta step(s)}`` with the batch sharded over every device."""
  from tgeo_jax import parallel
  mesh = parallel.make_mesh()
  out = {}
  # head_only shares one_step's sharded code path (tests/test_tgeo.py checks one_step on 1 and 4 devices); unroll
  # (the replicated window) and implicit (the Hessian-vector products) have their own.
  for variant in ("unroll", "implicit"):
    overrides = {"tgeo.hypergrad": variant, "tgeo.fusion_lr": 1e-2}
    if variant == "unroll":
      overrides["tgeo.unroll_steps"] = 2
    method, state, frozen, _ = build_method_state("tgeo", teacher_dir, **overrides)
    state, frozen = parallel.replicate((state, frozen), mesh)
    step = jax.jit(method.train_step, static_argnums=3)
    s = state
    for k, batch in enumerate(_batches(method, 2 if variant == "unroll" else 1)):
      s, _ = step(s, frozen, parallel.shard_batch(jax.device_get(batch), mesh), method.step_kind(k))
    update = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), s["meta_params"], state["meta_params"])
    out[variant] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(update)]).tolist()
  return out


def test_variants_agree_on_one_and_four_devices(tiny_teacher):
  one = meta_updates(tiny_teacher)
  four = _four_device_meta_grads(tiny_teacher)
  for variant in one:
    np.testing.assert_allclose(four[variant], one[variant], rtol=1e-5, atol=1e-7, err_msg=variant)


if __name__ == "__main__":  # one process with the devices XLA_FLAGS asks for
  sys.path.insert(0, ROOT)  # configs/
  assert jax.device_count() == 4, jax.device_count()
  print(json.dumps(meta_updates(sys.argv[1])))
