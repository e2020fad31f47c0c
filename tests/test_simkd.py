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


def make_method(student="cnn_tiny", teacher="cnn_small", *, student_feature="pre_head", **student_kwargs):
  c = fashion_mnist.get_config("simkd")
  c.model.name, c.teacher.model = student, teacher
  c.simkd.student_feature = student_feature
  st = models.split(models.create(student, num_classes=SPEC.num_classes, input_shape=SPEC.input_shape, seed=0,
                                  **student_kwargs))
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


def abstract_model(name, spec):
  """Model ``name`` as a ``Functional`` of ``ShapeDtypeStruct`` leaves: shapes only, nothing allocated."""
  return models.split(nnx.eval_shape(lambda: models.create(name, num_classes=spec.num_classes,
                                                           input_shape=spec.input_shape)))


def projector_count(c_s, c_t):
  """Parameters of ``Projector(c_s, c_t, factor=2)``: three bias-free convs and three BatchNorms (scale + shift;
  the running statistics are not parameters)."""
  mid = c_t // 2
  return c_s * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * c_t + 2 * c_t


# The official SimKD counts (docs/methods.md §4), by hand from the projector's structure:
#   resnet50_cifar (C_t = 2048) <- mobilenetv2 (CIFAR, width 0.5; 'pre_head' C_s = 160):
#     160*1024 + 2*1024 + 9*1024^2 + 2*1024 + 1024*2048 + 2*2048 = 163,840 + 2,048 + 9,437,184 + 2,048 + 2,097,152
#     + 4,096 = 11,706,368; with 'last' (C_s = 1280) the first conv is 1,310,720: 12,853,248.
#     The count depends on the channels only, and 11.71M is the CIFAR MobileNetV2's: torchvision's (320 channels
#     before its head conv) would give 11,870,208.
#   resnet32x4 (C_t = 256) <- shufflev2 ('pre_head' C_s = 464):
#     464*128 + 2*128 + 9*128^2 + 2*128 + 128*256 + 2*256 = 59,392 + 256 + 147,456 + 256 + 32,768 + 512 = 240,640;
#     with 'last' (C_s = 1024): 131,072 + 181,248 = 312,320.
def test_projector_counts_of_the_official_student_maps(monkeypatch):
  # Shapes only: the projectors are built abstractly (an eager 11.7M-parameter init costs seconds on CPU).
  monkeypatch.setattr(simkd, "make_projector", lambda c_in, c_out, *, factor, seed: models.split(
      nnx.eval_shape(lambda: simkd.Projector(c_in, c_out, factor=factor, rngs=nnx.Rngs(seed)))))
  cifar = TaskSpec("cifar100", 100, (32, 32, 3), 64)
  cases = {("resnet50_cifar", "mobilenetv2"): (2048, {"pre_head": (160, 11_706_368), "last": (1280, 12_853_248)}),
           ("resnet32x4", "shufflev2"): (256, {"pre_head": (464, 240_640), "last": (1024, 312_320)})}
  for (teacher, student), (c_t, stages) in cases.items():
    t, st = abstract_model(teacher, cifar), abstract_model(student, cifar)
    for stage, (c_s, count) in stages.items():
      c = fashion_mnist.get_config("simkd")
      c.model.name, c.teacher.model, c.simkd.student_feature = student, teacher, stage
      m = simkd.SimKD(c, cifar, student=st, tx=optax.sgd(0.1),
                      teacher=base.Teacher(teacher, t.graphdef, {"params": t.params, "rest": t.rest}))
      assert projector_count(c_s, c_t) == count
      assert models.num_params(m.projector.params) == count, (teacher, student, stage)
      assert jax.tree.leaves(m.projector.params["conv1"]["kernel"])[0].shape == (1, 1, c_s, c_t // 2)


def test_pre_head_student_map_trains_and_keeps_the_students_own_path():
  # A small ShuffleNetV2 (stages of 8, 16, 32 channels, head conv to 64): on 8x8 inputs its maps are 1x1, and the
  # teacher's 2x2 map is pooled to that. 'pre_head' projects the 32-channel map, 'last' the 64-channel one.
  m = make_method("shufflev2", out_channels=(8, 16, 32, 64), num_blocks=(1, 1, 1))
  assert m.size == (1, 1) and leaves(m.projector.params)["['conv1']['kernel'].value"].shape == (1, 1, 32, 32)
  (state, frozen), batch = m.init(jax.random.PRNGKey(0)), make_batch()
  new_state, metrics = jax.jit(m.train_step)(state, frozen, batch)

  @jax.jit
  def expected_loss(state, inputs):  # jitted: an eager ShuffleNet forward compiles op by op
    _, pre_head, _ = models.apply_features(m.student.graphdef, state["params"]["student"], state["rest"]["student"],
                                           inputs, train=True, stage="pre_head")
    chex.assert_shape(pre_head, (6, 1, 1, 32))
    projected, _ = models.apply(m.projector.graphdef, state["params"]["projector"], state["rest"]["projector"],
                                pre_head, train=True)
    t = m.teacher.variables
    _, t_fmap, _ = models.apply_features(m.teacher.graphdef, t["params"], t["rest"], inputs, train=False)
    return jnp.mean((projected - simkd.adaptive_avg_pool(t_fmap, (1, 1))) ** 2)

  chex.assert_trees_all_close(metrics["loss"], expected_loss(state, batch["inputs"]), rtol=1e-5)
  before, after = leaves(state["params"]["student"]), leaves(new_state["params"]["student"])
  assert not np.array_equal(before["['stages'][2][0]['left_pw']['kernel'].value"],
                            after["['stages'][2][0]['left_pw']['kernel'].value"])
  # The head conv gets no gradient from the loss (plain SGD: unchanged), but it still runs in the student's train
  # forward: its BatchNorm statistics move, so the student's own head stays usable, as in the official code.
  assert np.array_equal(before["['head_conv']['kernel'].value"], after["['head_conv']['kernel'].value"])
  bn = "['head_bn']['mean'].value"
  assert not np.array_equal(leaves(state["rest"]["student"])[bn], leaves(new_state["rest"]["student"])[bn])
  assert np.isfinite(np.asarray(jax.jit(m.predict)(new_state, frozen, batch["inputs"]))).all()


def test_student_feature_is_checked():
  c = fashion_mnist.get_config("simkd")
  c.simkd.student_feature = "penultimate"
  with pytest.raises(UserError, match=r"^simkd.student_feature: expected one of \['pre_head', 'last'\]"):
    simkd.SimKD.validate_config(c)


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
