"""ATSC (docs/methods.md §4): Omega, gradient routing (into the adapting teacher, never into its pretrained copy; no
label ever reaches the student), the classifier step, predictions through projector + adapted head, multiple
teachers, bad input, and one multi-teacher run through the CLI."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import TINY, run_cli
from configs import fashion_mnist
from tgeo_jax import checkpoint, methods, models
from tgeo_jax.data import TaskSpec
from tgeo_jax.errors import UserError
from tgeo_jax.methods import atsc, base

SPEC = TaskSpec("synthetic", 5, (8, 8, 1), 64)
HEAD_BIAS, HEAD_KERNEL = "['head']['bias'].value", "['head']['kernel'].value"


def leaves(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shift(tree, path, delta):
  return jax.tree_util.tree_map_with_path(lambda k, x: x + delta if jax.tree_util.keystr(k) == path else x, tree)


def fake_run(directory, model_name, *, num_classes=SPEC.num_classes, seed=3):
  """A finished run's work directory holding a randomly initialised ``model_name`` (no training needed)."""
  fn = models.split(models.create(model_name, num_classes=num_classes, input_shape=SPEC.input_shape, seed=seed))
  ckpt = checkpoint.Checkpointer(os.path.join(directory, "checkpoints"))
  ckpt.save(1, {"params": fn.params, "rest": fn.rest},
            {"num_classes": num_classes, "finished": True, "step": 1, "total_steps": 1,
             "config": {"model": {"name": model_name}}})
  ckpt.close()
  return str(directory)


def make_method(*, teacher="cnn_tiny", tx=None, **atsc_overrides):
  c = fashion_mnist.get_config("atsc")
  c.model.name, c.teacher.model = "cnn_tiny", teacher
  for k, v in atsc_overrides.items():
    c.atsc[k] = v
  methods.validate_config(c)
  st = models.split(models.create("cnn_tiny", num_classes=SPEC.num_classes, input_shape=SPEC.input_shape, seed=0))
  t = models.split(models.create(teacher, num_classes=SPEC.num_classes, input_shape=SPEC.input_shape, seed=7))
  # Plain SGD: a parameter without gradient stays exactly where it was.
  return atsc.ATSC(c, SPEC, student=st, tx=tx or optax.sgd(0.1), teacher=base.Teacher(
      teacher, t.graphdef, {"params": t.params, "rest": t.rest}))


def make_batch(n=6, seed=0):
  rng = np.random.default_rng(seed)
  return {"inputs": jnp.asarray(rng.normal(size=(n, *SPEC.input_shape)), jnp.float32),
          "labels": jnp.asarray(np.arange(n) % SPEC.num_classes, jnp.int32)}


@pytest.fixture(scope="module")
def single():
  m = make_method()
  return (m, jax.jit(m.train_step), *m.init(jax.random.PRNGKey(0)), make_batch())  # m, step, state, frozen, batch


def test_parameter_drift_is_a_raw_sum_over_kernels():
  params = {"conv": {"kernel": jnp.full((1, 1, 2, 2), 2.0)}, "head": {"kernel": jnp.ones((2, 3)),
                                                                         "bias": jnp.ones(3)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  # 4 entries of 2^2 + 6 entries of 1^2; the bias (one axis) is not regularised.
  chex.assert_trees_all_close(atsc.parameter_drift(params, zeros), 22.0)
  chex.assert_trees_all_close(atsc.parameter_drift(params, params), 0.0)


def test_loss_gradients_reach_the_teacher_but_not_its_pretrained_copy():
  rng = np.random.default_rng(0)
  projected = [jnp.asarray(rng.normal(size=(2, 2, 2, 3)), jnp.float32)]
  fmaps = [jnp.asarray(rng.normal(size=(2, 2, 2, 3)), jnp.float32)]
  theta0 = [{"kernel": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)}]
  theta = [{"kernel": theta0[0]["kernel"] + 0.5}]
  loss, m = atsc.atsc_loss(projected, fmaps, theta, theta0, w=2.0)
  chex.assert_trees_all_close(m["omega"], 9 * 0.25, rtol=1e-6)
  chex.assert_trees_all_close(loss, m["mse"] + 2.0 * m["omega"], rtol=1e-6)
  g_theta, g_theta0, g_fmap = jax.grad(lambda a, b, f: atsc.atsc_loss(projected, f, a, b, w=2.0)[0],
                                       argnums=(0, 1, 2))(theta, theta0, fmaps)
  chex.assert_trees_all_close(g_theta[0]["kernel"], jnp.full((3, 3), 2.0 * 2 * 0.5), rtol=1e-6)
  chex.assert_trees_all_close(g_theta0[0]["kernel"], jnp.zeros((3, 3)))
  assert np.any(np.asarray(g_fmap[0]))  # the feature target is not stop-gradient: the teacher adapts


def test_step_gradients_flow_into_teacher_not_into_pretrained_copy(single):
  m, _, state, frozen, batch = single
  # Move the trainable teacher away from theta_0 so that Omega has a gradient on both sides.
  teachers = [jax.tree.map(lambda x: x + 0.01, state["params"]["teachers"][0])]
  state = dict(state, params=dict(state["params"], teachers=teachers))

  def loss(teachers, init):
    s = dict(state, params=dict(state["params"], teachers=teachers))
    return m.train_step(s, {"teachers_init": init}, batch)[1]["loss"]

  g_teacher, g_init = jax.jit(jax.grad(loss, argnums=(0, 1)))(teachers, frozen["teachers_init"])
  g_teacher, g_init = leaves(g_teacher), leaves(g_init)
  for name in ("[0]['convs'][0]['kernel'].value", "[0]['norms'][1]['scale'].value", f"[0]{HEAD_KERNEL}"):
    assert np.any(g_teacher[name]), name
  assert not np.any(g_teacher[f"[0]{HEAD_BIAS}"])  # no joint-loss term reaches the classifier bias
  for name, g in g_init.items():
    assert not np.any(g), name


def test_student_never_sees_labels(single):
  m, step, state, frozen, batch = single
  a, ma = step(state, frozen, batch)
  b, mb = step(state, frozen, dict(batch, labels=(batch["labels"] + 1) % SPEC.num_classes))
  la, lb = leaves(a["params"]), leaves(b["params"])
  for name in la:
    same = np.array_equal(la[name], lb[name])
    assert same == (name != f"['teachers'][0]{HEAD_BIAS}"), name  # only the classifier's CE step differs
  chex.assert_trees_all_close(ma["loss"], mb["loss"])
  assert float(ma["teacher_ce"]) != float(mb["teacher_ce"])


@pytest.mark.parametrize("update", ["bias", "all"])
def test_classifier_step(update, single):
  m = single[0] if update == "bias" else make_method(classifier_update="all")
  (state, frozen), batch = m.init(jax.random.PRNGKey(0)), single[4]
  new, metrics = (single[1] if update == "bias" else jax.jit(m.train_step))(state, frozen, batch)
  before, after = leaves(state["params"]["teachers"][0]), leaves(new["params"]["teachers"][0])
  assert not np.array_equal(before[HEAD_BIAS], after[HEAD_BIAS])
  # At theta = theta_0, Omega's gradient is 0: only the CE step ("all") can move the classifier's matrix.
  assert np.array_equal(before[HEAD_KERNEL], after[HEAD_KERNEL]) == (update == "bias")
  assert not np.array_equal(before["['convs'][1]['kernel'].value"], after["['convs'][1]['kernel'].value"])
  # Teacher BatchNorm runs in train mode by default: its running statistics move.
  assert not np.array_equal(leaves(state["rest"]["teachers"][0])["['norms'][0]['mean'].value"],
                            leaves(new["rest"]["teachers"][0])["['norms'][0]['mean'].value"])
  for key in ("loss", "mse", "omega", "teacher_ce", "accuracy", "teacher_accuracy"):
    assert np.isfinite(metrics[key]), key


def test_classifier_bias_is_decayed_in_both_steps():
  # The public code's two SGDs both hold the classifier bias: in the first its gradient is a zero tensor, so only
  # the weight decay moves it; the second takes the CE step, decaying it again with a momentum buffer of its own.
  lr, wd = 0.1, 0.5
  m = make_method(tx=optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9)))
  state, frozen = m.init(jax.random.PRNGKey(0))
  # A non-zero bias (it starts at 0, where decay is invisible); Omega does not cover biases, so theta_0 may differ.
  teachers = [shift(state["params"]["teachers"][0], HEAD_BIAS, 1.0 + jnp.arange(SPEC.num_classes) / 10)]
  state = dict(state, params=dict(state["params"], teachers=teachers))
  batch = make_batch()
  new, _ = jax.jit(m.train_step)(state, frozen, batch)
  b0 = leaves(teachers[0])[HEAD_BIAS]
  b1 = (1 - lr * wd) * b0  # step 1: gradient 0 + wd * b (a first momentum step is the gradient itself)
  # Step 2: CE at b1 on the updated teacher (train-mode BatchNorm, as the step runs it); only the bias moves there.
  t = new["params"]["teachers"][0]
  at_b1 = shift(t, HEAD_BIAS, b1 - leaves(t)[HEAD_BIAS])

  @jax.jit
  def ce_grad(p):
    def ce(p):
      logits, _ = models.apply(m.teacher.graphdef, p, new["rest"]["teachers"][0], batch["inputs"], train=True)
      return jnp.mean(atsc.losses.cross_entropy(logits, batch["labels"]))
    return jax.grad(ce)(p)

  g = leaves(ce_grad(at_b1))[HEAD_BIAS]
  np.testing.assert_allclose(leaves(t)[HEAD_BIAS], b1 - lr * (g + wd * b1), rtol=1e-5, atol=1e-6)
  # Two momentum buffers: the joint optimizer's holds wd * b0, the classifier optimizer's g + wd * b1.
  traces = [leaves(s) for s in (new["opt_state"], new["head_opt_state"][0])]
  joint = next(v for k, v in traces[0].items() if "teachers'][0]" in k and "['head']['bias']" in k)
  head = next(v for k, v in traces[1].items() if "['head']['bias']" in k and v.shape == b0.shape)
  np.testing.assert_allclose(joint, wd * b0, rtol=1e-6)
  np.testing.assert_allclose(head, g + wd * b1, rtol=1e-5, atol=1e-6)


def test_eval_mode_teacher_keeps_its_statistics():
  m = make_method(teacher_train_mode=False)
  state, frozen = m.init(jax.random.PRNGKey(0))
  new, _ = jax.jit(m.train_step)(state, frozen, make_batch())
  chex.assert_trees_all_equal(state["rest"]["teachers"], new["rest"]["teachers"])


def test_predict_goes_through_projector_and_adapted_head(single):
  m, step, state, frozen, batch = single
  state, _ = step(state, frozen, batch)
  predict = jax.jit(m.predict)
  logits = predict(state, frozen, batch["inputs"])
  chex.assert_shape(logits, (6, SPEC.num_classes))
  projected, _, _ = m.project(state["params"], state["rest"], batch["inputs"], train=False)
  head = leaves(state["params"]["teachers"][0])
  want = jnp.mean(projected[0], axis=(1, 2)) @ head[HEAD_KERNEL] + head[HEAD_BIAS]
  chex.assert_trees_all_close(logits, want, rtol=1e-5, atol=1e-5)
  # The adapted (checkpointed) head is the one used; the pretrained copy in "frozen" plays no part.
  delta = jnp.arange(SPEC.num_classes, dtype=jnp.float32)
  params = dict(state["params"], teachers=[shift(state["params"]["teachers"][0], HEAD_BIAS, delta)])
  chex.assert_trees_all_close(predict(dict(state, params=params), frozen, batch["inputs"]), logits + delta,
                              rtol=1e-5, atol=1e-5)
  shifted = {"teachers_init": [shift(frozen["teachers_init"][0], HEAD_BIAS, 100.0)]}
  chex.assert_trees_all_close(predict(state, shifted, batch["inputs"]), logits)


def test_multi_teacher(tmp_path):
  # A second teacher of another architecture (cnn_small: [B, 2, 2, 64]) beside cnn_tiny ([B, 4, 4, 8]). The
  # two-teacher training step itself runs in test_cli_run_with_two_teachers.
  extra = fake_run(tmp_path / "extra", "cnn_small")
  m = make_method(extra_teachers=(f"cnn_small:{extra}",))
  assert m.sizes == [(4, 4), (2, 2)] and len(m.projectors) == 2
  (state, frozen), batch = m.init(jax.random.PRNGKey(0)), make_batch()
  assert len(state["head_opt_state"]) == 2 and len(frozen["teachers_init"]) == 2
  project = jax.jit(lambda p, r, x: m.project(p, r, x, train=False))
  projected, _, _ = project(state["params"], state["rest"], batch["inputs"])
  assert [p.shape for p in projected] == [(6, 4, 4, 8), (6, 2, 2, 64)]
  heads = [leaves(t) for t in state["params"]["teachers"]]
  want = sum(jnp.mean(p, axis=(1, 2)) @ h[HEAD_KERNEL] + h[HEAD_BIAS] for p, h in zip(projected, heads)) / 2
  chex.assert_trees_all_close(jax.jit(m.predict)(state, frozen, batch["inputs"]), want, rtol=1e-5, atol=1e-5)


def test_bad_input(tmp_path):
  other = fake_run(tmp_path / "three_classes", "cnn_tiny", num_classes=3)
  with pytest.raises(UserError, match=r"^atsc.extra_teachers\[0\]: .* was trained on 3 classes, this task has 5"):
    make_method(extra_teachers=(("cnn_tiny", other),))
  with pytest.raises(UserError, match=r"^atsc.extra_teachers: entry 0 is 'cnn_tiny'; expected"):
    make_method(extra_teachers=("cnn_tiny",))
  with pytest.raises(UserError, match=r"^atsc.extra_teachers\[0\]: no checkpoint directory"):
    make_method(extra_teachers=(("cnn_tiny", str(tmp_path / "nowhere")),))
  with pytest.raises(UserError, match=r"^atsc.classifier_update: expected one of \['bias', 'all'\], got 'head'"):
    make_method(classifier_update="head")
  with pytest.raises(UserError, match=r"^teacher.model: atsc needs a teacher with 4-D feature maps"):
    make_method(teacher="mlp_tiny")


def test_cli_run_with_two_teachers(tiny_teacher, tmp_path):
  workdir = str(tmp_path / "atsc")
  proc = run_cli(["--config=configs/fashion_mnist.py:atsc", f"--workdir={workdir}", *TINY,
                  f"--config.teacher.checkpoint={tiny_teacher}",
                  f"--config.atsc.extra_teachers=cnn_tiny:{tiny_teacher}"])
  assert "done: atsc test accuracy" in proc.stdout
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["method"] == "atsc" and 0 <= summary["accuracy"] <= 1 and "teacher_accuracy" in summary
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta")) as mgr:
    to_host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = leaves(mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fallback_sharding=to_host)))["state"])
  with ocp.CheckpointManager(os.path.join(tiny_teacher, "checkpoints"), item_names=("state", "meta")) as mgr:
    pretrained = leaves(mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fallback_sharding=to_host)))["state"])
  # The adapted teachers (what the predictor needs) are checkpointed; the pretrained copies are not.
  assert not any("frozen" in k or "teachers_init" in k for k in saved)
  for j in (0, 1):
    assert f"['head_opt_state'][{j}]" in str(saved.keys())
    # Restored without a target, variables are plain dicts: "...['bias']['value']".
    bias = "['head']['bias']['value']"
    assert not np.array_equal(saved[f"['params']['teachers'][{j}]{bias}"], pretrained[f"['params']{bias}"])
