"""TriKD (docs/methods.md §5): both losses against numpy, stop-gradient routing, one joint step of teacher and student
with a frozen anchor, the teacher's initialisation, bad input, one CLI run and a resumable two-generation run."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TINY, run_cli
from configs import fashion_mnist
from tgeo_jax import checkpoint, generations, methods, models
from tgeo_jax.data import TaskSpec
from tgeo_jax.errors import UserError
from tgeo_jax.methods import trikd

SPEC = TaskSpec("synthetic", 5, (8, 8, 1), 64)
WEIGHTS = dict(temperature=2.0, lambda_anchor=0.5, lambda_student_to_teacher=0.25, lambda_teacher_to_student=2.0)


def leaves(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def np_log_softmax(z, tau=1.0):
  z = np.asarray(z, np.float64) / tau
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_soft(student, target, tau):
  """tau^2 KL(p_target || p_student), batch mean."""
  lt, ls = np_log_softmax(target, tau), np_log_softmax(student, tau)
  return tau**2 * np.mean((np.exp(lt) * (lt - ls)).sum(-1))


def fake_run(directory, model_name, *, seed=3, finished=True):
  """A run's work directory holding a randomly initialised ``model_name`` (no training needed)."""
  fn = models.split(models.create(model_name, num_classes=SPEC.num_classes, input_shape=SPEC.input_shape, seed=seed))
  ckpt = checkpoint.Checkpointer(os.path.join(directory, "checkpoints"))
  ckpt.save(1, {"params": fn.params, "rest": fn.rest},
            {"num_classes": SPEC.num_classes, "finished": finished, "step": 1, "total_steps": 1,
             "config": {"model": {"name": model_name}}})
  ckpt.close()
  return str(directory), fn


def make_config(anchor, teacher_checkpoint=""):
  c = fashion_mnist.get_config("trikd")
  c.model.name, c.teacher.model = "cnn_tiny", "cnn_small"
  c.trikd.anchor_checkpoint, c.teacher.checkpoint = anchor, teacher_checkpoint
  return c


def make_method(config):
  methods.validate_config(config)
  st = models.split(models.create("cnn_tiny", num_classes=SPEC.num_classes, input_shape=SPEC.input_shape, seed=0))
  return trikd.TriKD(config, SPEC, student=st, tx=optax.sgd(0.1), teacher=None)


class LossTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.s, self.t, self.a = (rng.normal(size=(5, 4)).astype(np.float32) * 2 for _ in range(3))
    self.y = np.array([0, 1, 2, 3, 0], np.int32)

  def test_matches_numpy(self):
    loss_t, loss_s, m = trikd.trikd_losses(self.s, self.t, self.a, self.y, **WEIGHTS)
    tau = WEIGHTS["temperature"]
    ce = lambda z: -np.mean(np_log_softmax(z)[np.arange(5), self.y])  # noqa: E731
    want_t = ce(self.t) + 0.5 * np_soft(self.t, self.a, tau) + 0.25 * np_soft(self.t, self.s, tau)
    want_s = ce(self.s) + 2.0 * np_soft(self.s, self.t, tau)
    chex.assert_trees_all_close((loss_t, loss_s), (np.float32(want_t), np.float32(want_s)), rtol=1e-5)
    chex.assert_trees_all_close(m["kl_anchor"], np.float32(np_soft(self.t, self.a, tau)), rtol=1e-5)

  def test_gradient_routing(self):
    args = (jnp.asarray(self.s), jnp.asarray(self.t), jnp.asarray(self.a))
    g_teacher = jax.grad(lambda s, t, a: trikd.trikd_losses(s, t, a, self.y, **WEIGHTS)[0], argnums=(0, 1, 2))(*args)
    g_student = jax.grad(lambda s, t, a: trikd.trikd_losses(s, t, a, self.y, **WEIGHTS)[1], argnums=(0, 1, 2))(*args)
    # L_T moves only the teacher, L_S only the student; the anchor never moves.
    assert not np.any(g_teacher[0]) and np.any(g_teacher[1]) and not np.any(g_teacher[2])
    assert np.any(g_student[0]) and not np.any(g_student[1]) and not np.any(g_student[2])


def test_joint_step_and_teacher_initialisation(tmp_path):
  anchor_dir, anchor = fake_run(tmp_path / "anchor", "cnn_tiny", seed=3)
  m = make_method(make_config(anchor_dir))
  state, frozen = m.init(jax.random.PRNGKey(0))
  chex.assert_trees_all_equal(frozen["anchor"]["params"], anchor.params)
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.normal(size=(6, *SPEC.input_shape)), jnp.float32),
           "labels": jnp.asarray(np.arange(6) % SPEC.num_classes, jnp.int32)}
  new, metrics = jax.jit(m.train_step)(state, frozen, batch)
  for key in ("loss", "teacher_loss", "kl_anchor", "kl_student_to_teacher", "kl_teacher_to_student", "accuracy",
              "teacher_accuracy"):
    assert np.isfinite(metrics[key]), key
  # Both trainable models moved, each with its own optimizer state; the anchor is frozen and outside the state
  # the trainer saves.
  for old, moved in ((state["params"], new["params"]), (state["teacher"]["params"], new["teacher"]["params"])):
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(old).values(), leaves(moved).values()))
  assert "opt_state" in new["teacher"] and "anchor" not in new
  student_logits, teacher_logits = jax.jit(lambda s, f, x: (m.predict(s, f, x), m.teacher_logits(s, f, x)))(
      new, frozen, batch["inputs"])
  chex.assert_shape(student_logits, (6, SPEC.num_classes))
  assert not np.allclose(teacher_logits, student_logits)  # evaluation reports the online teacher

  # From scratch by default; from teacher.checkpoint when given.
  teacher_dir, pretrained = fake_run(tmp_path / "teacher", "cnn_small", seed=11)
  assert not np.array_equal(leaves(state["teacher"]["params"])["['head']['kernel'].value"],
                            leaves(pretrained.params)["['head']['kernel'].value"])
  warm, _ = make_method(make_config(anchor_dir, teacher_dir)).init(jax.random.PRNGKey(0))
  chex.assert_trees_all_equal(warm["teacher"]["params"], pretrained.params)


def test_bad_input(tmp_path):
  c = make_config("")
  with pytest.raises(UserError, match=r"^trikd.anchor_checkpoint: TriKD needs a CE-trained anchor"):
    methods.validate_config(c)
  c = make_config("/somewhere")
  c.trikd.generations = 0
  with pytest.raises(UserError, match=r"^trikd.generations: expected an integer >= 1, got 0"):
    methods.validate_config(c)
  with pytest.raises(UserError, match=r"^trikd.generations: expected an integer >= 1, got 0"):
    generations.run(c, str(tmp_path / "run"))
  c.trikd.generations = 3
  with pytest.raises(UserError, match=r"^trikd.generations: 3 generations are trained by tgeo_jax.generations.run"):
    methods.validate_config(c)
  with pytest.raises(UserError, match=r"^trikd.anchor_checkpoint: no checkpoint directory"):
    make_method(make_config(str(tmp_path / "nowhere")))
  # An unfinished run is not an anchor. (A run of another architecture fails like teacher.checkpoint does, see
  # test_cli_errors; a failed restore in-process leaves orbax reads behind, so it is not repeated here.)
  unfinished, _ = fake_run(tmp_path / "unfinished", "cnn_tiny", finished=False)
  with pytest.raises(UserError, match=r"^trikd.anchor_checkpoint: the run in .* has not finished"):
    make_method(make_config(unfinished))


def test_cli_run(tiny_teacher, tmp_path):
  workdir = str(tmp_path / "trikd")
  # The tiny teacher is a finished CE run of cnn_tiny, the student's model: a valid anchor.
  proc = run_cli(["--config=configs/fashion_mnist.py:trikd", f"--workdir={workdir}", *TINY,
                  f"--config.trikd.anchor_checkpoint={tiny_teacher}"])
  assert "done: trikd test accuracy" in proc.stdout
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["method"] == "trikd" and 0 <= summary["accuracy"] <= 1 and "teacher_accuracy" in summary


def test_generations_chain_anchors_and_resume(tiny_teacher, tmp_path, capsys):
  c = fashion_mnist.get_config("trikd")
  c.data.name, c.data.train_subset, c.model.name, c.teacher.model = "synthetic", 0, "cnn_tiny", "cnn_tiny"
  c.batch_size, c.eval_batch_size, c.num_epochs, c.log.progress = 32, 64, 1, False
  c.trikd.anchor_checkpoint, c.trikd.generations = tiny_teacher, 2
  workdir = str(tmp_path / "gens")
  summary = generations.run(c, workdir)
  assert [g["anchor"] for g in summary["generations"]] == [tiny_teacher, os.path.join(workdir, "gen_1")]
  assert summary["finished"] and json.load(open(os.path.join(workdir, "summary.json"))) == summary
  for g in (1, 2):
    assert json.load(open(os.path.join(workdir, f"gen_{g}", "summary.json")))["finished"]
  meta = checkpoint.Checkpointer(os.path.join(workdir, "gen_2", "checkpoints"))
  saved_config = meta.read_meta(meta.steps()[-1])["config"]
  meta.close()
  assert saved_config["trikd"]["anchor_checkpoint"] == os.path.join(workdir, "gen_1")
  capsys.readouterr()
  # Running again trains nothing: both generations are skipped.
  again = generations.run(c, workdir)
  assert capsys.readouterr().out.count("already finished") == 2
  assert again["accuracy"] == summary["accuracy"]
