"""SimKD (docs/methods.md §4): pooling, projector, loss and shapes; gradients reach student and projector but never the
frozen teacher; predictions go through projector + teacher head; one run through the CLI."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import TINY, run_cli
from configs import fashion_mnist
from tgeo_jax import models
from tgeo_jax.data import TaskSpec
from tgeo_jax.errors import UserError
from tgeo_jax.methods import base, simkd

SPEC = TaskSpec("synthetic", 5, (8, 8, 1), 64)


def make_teacher(name, seed=7):
  fn = models.split(models.create(name, num_classes=SPEC.num_classes, input_shape=SPEC.input_shape, seed=seed))
  return base.Teacher(name, fn.graphdef, {"params": fn.params, "rest": fn.rest})


def make_method(student="cnn_tiny", teacher="cnn_small"):
  c = fashion_mnist.get_config("simkd")
  c.model.name, c.teacher.model = student, teacher
  st = models.split(models.create(student, num_classes=SPEC.num_classes, input_shape=SPEC.input_shape, seed=0))
  # Plain SGD: a parameter that gets no gradient stays exactly where it was.
  return simkd.SimKD(c, SPEC, student=st, tx=optax.sgd(0.1), teacher=make_teacher(teacher))


def make_batch(n=6, seed=0):
  rng = np.random.default_rng(seed)
  return {"inputs": jnp.asarray(rng.normal(size=(n, *SPEC.input_shape)), jnp.float32),
          "labels": jnp.asarray(np.arange(n) % SPEC.num_classes, jnp.int32)}


def leaves(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shift(tree, path, delta):
  """``tree`` with ``delta`` added to the leaf whose key path is ``path`` (e.g. "['head']['bias'].value")."""
  return jax.tree_util.tree_map_with_path(lambda k, x: x + delta if jax.tree_util.keystr(k) == path else x, tree)


def saved_state(workdir):
  """The latest checkpoint's ``state`` as {key path: array} (restored without a target) and its meta."""
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta")) as mgr:
    to_host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fallback_sharding=to_host), meta=ocp.args.JsonRestore()))
  return leaves(restored["state"]), restored["meta"]


def test_adaptive_avg_pool_matches_windows():
  x = np.random.default_rng(0).normal(size=(2, 6, 4, 3)).astype(np.float32)
  want = np.zeros((2, 3, 2, 3), np.float32)
  for i in range(3):
    for j in range(2):
      want[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
  chex.assert_trees_all_close(simkd.adaptive_avg_pool(jnp.asarray(x), (3, 2)), want, atol=1e-6)
  chex.assert_trees_all_close(simkd.adaptive_avg_pool(jnp.asarray(x), (1, 1))[:, 0, 0], x.mean(axis=(1, 2)),
                              atol=1e-6)
  chex.assert_trees_all_close(simkd.adaptive_avg_pool(jnp.asarray(x), (6, 4)), x)
  with pytest.raises(ValueError, match="integer ratios"):
    simkd.adaptive_avg_pool(jnp.asarray(x), (4, 2))


def test_projector_layout():
  proj = simkd.Projector(8, 64, factor=2, rngs=nnx.Rngs(0))
  shapes = {k: v.shape for k, v in leaves(models.split(proj).params).items() if "kernel" in k}
  assert shapes == {"['conv1']['kernel'].value": (1, 1, 8, 32), "['conv2']['kernel'].value": (3, 3, 32, 32),
                    "['conv3']['kernel'].value": (1, 1, 32, 64)}
  out = proj(jnp.ones((2, 4, 4, 8)), train=True)
  chex.assert_shape(out, (2, 4, 4, 64))
  assert float(jnp.min(out)) >= 0.0  # ends with ReLU


def test_feature_mse_and_size_checks():
  p, t = np.arange(8.0).reshape(1, 2, 2, 2), np.ones((1, 2, 2, 2))
  chex.assert_trees_all_close(simkd.feature_mse(jnp.asarray(p), jnp.asarray(t)), ((p - t) ** 2).mean(), rtol=1e-6)
  kw = dict(method="simkd", student_model="s", teacher_model="t")
  assert simkd.common_size((14, 14, 8), (7, 7, 128), **kw) == (7, 7)
  assert simkd.common_size((4, 4, 8), (8, 8, 16), **kw) == (4, 4)
  with pytest.raises(UserError, match=r"^model.name: simkd needs a student with 4-D feature maps"):
    simkd.common_size((32,), (7, 7, 128), **kw)
  with pytest.raises(UserError, match=r"^teacher.model: simkd needs a teacher with 4-D"):
    simkd.common_size((7, 7, 8), (32,), **kw)
  with pytest.raises(UserError, match=r"^model.name: .*integer size ratio.*7x7.*3x3"):
    simkd.common_size((7, 7, 8), (3, 3, 8), **kw)


def test_mlp_student_is_refused():
  with pytest.raises(UserError, match=r"^model.name: simkd needs a student with 4-D feature maps.*'mlp_tiny'"):
    make_method(student="mlp_tiny")


def test_loss_shapes_and_gradient_routing():
  # Student cnn_tiny: [B, 4, 4, 8]; teacher cnn_small: [B, 2, 2, 64]: the student's map is pooled to 2x2.
  m = make_method()
  assert m.size == (2, 2)
  (state, frozen), batch = m.init(jax.random.PRNGKey(0)), make_batch()
  new_state, metrics = jax.jit(m.train_step)(state, frozen, batch)

  _, s_fmap, _ = models.apply_features(m.student.graphdef, state["params"]["student"], state["rest"]["student"],
                                       batch["inputs"], train=True)
  chex.assert_shape(s_fmap, (6, 4, 4, 8))
  projected, _ = models.apply(m.projector.graphdef, state["params"]["projector"], state["rest"]["projector"],
                              simkd.adaptive_avg_pool(s_fmap, (2, 2)), train=True)
  chex.assert_shape(projected, (6, 2, 2, 64))
  t = m.teacher.variables
  _, t_fmap, _ = models.apply_features(m.teacher.graphdef, t["params"], t["rest"], batch["inputs"], train=False)
  chex.assert_trees_all_close(metrics["loss"], jnp.mean((projected - t_fmap) ** 2), rtol=1e-5)

  # No gradient into the frozen teacher (backbone or head) through the whole step.
  def loss_wrt_teacher(tp):
    return m.train_step(state, {"teacher": {"params": tp, "rest": t["rest"]}}, batch)[1]["loss"]

  for name, g in leaves(jax.jit(jax.grad(loss_wrt_teacher))(t["params"])).items():
    assert not np.any(g), name
  # Student backbone and projector move; the student's own head is never used, so it gets no gradient.
  before, after = leaves(state["params"]), leaves(new_state["params"])
  for name in before:
    moved = not np.array_equal(before[name], after[name])
    assert moved == ("['student']['head']" not in name), name
  bn_mean = "['projector']['bn3']['mean'].value"
  assert not np.array_equal(leaves(state["rest"])[bn_mean], leaves(new_state["rest"])[bn_mean])
  assert int(new_state["step"]) == 1 and "teacher" in frozen and "teacher" not in new_state


def test_predict_goes_through_projector_and_teacher_head():
  m = make_method()
  (state, frozen), batch = m.init(jax.random.PRNGKey(0)), make_batch()
  state, _ = jax.jit(m.train_step)(state, frozen, batch)
  predict = jax.jit(m.predict)
  logits = predict(state, frozen, batch["inputs"])
  chex.assert_shape(logits, (6, SPEC.num_classes))
  projected, _ = m.project(state["params"], state["rest"], batch["inputs"], train=False)
  head = leaves(frozen["teacher"]["params"])
  want = jnp.mean(projected, axis=(1, 2)) @ head["['head']['kernel'].value"] + head["['head']['bias'].value"]
  chex.assert_trees_all_close(logits, want, rtol=1e-5, atol=1e-5)
  # Shifting the teacher's classifier bias shifts the prediction by exactly that; the student's head is unused.
  t = frozen["teacher"]
  delta = jnp.arange(SPEC.num_classes, dtype=jnp.float32)
  shifted = {"teacher": dict(t, params=shift(t["params"], "['head']['bias'].value", delta))}
  chex.assert_trees_all_close(predict(state, shifted, batch["inputs"]), logits + delta,
                              rtol=1e-5, atol=1e-5)
  params = shift(state["params"], "['student']['head']['bias'].value", 100.0)
  chex.assert_trees_all_close(predict(dict(state, params=params), frozen, batch["inputs"]), logits)


def test_cli_run(tiny_teacher, tmp_path):
  workdir = str(tmp_path / "simkd")
  proc = run_cli(["--config=configs/fashion_mnist.py:simkd", f"--workdir={workdir}", *TINY,
                  f"--config.teacher.checkpoint={tiny_teacher}"])
  assert "done: simkd test accuracy" in proc.stdout
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["method"] == "simkd" and 0 <= summary["accuracy"] <= 1
  teacher_summary = json.load(open(os.path.join(tiny_teacher, "summary.json")))
  assert summary["teacher_accuracy"] == pytest.approx(teacher_summary["accuracy"])  # the frozen teacher
  arrays, meta = saved_state(workdir)
  assert meta["finished"] and meta["method"] == "simkd"
  assert any("['params']['projector']" in k for k in arrays) and any("['rest']['projector']" in k for k in arrays)
  assert not any("frozen" in k for k in arrays)  # the teacher is never re-saved
