"""DKD (docs/methods.md §8): the loss against an independent float64 numpy transcription of the official formula
(probabilities, target/non-target masks, the target's logit pushed down by 1000, sums over the batch / N), its
decomposition of Hinton's KL, extreme logits, gradients, the epoch warm-up, bad configs, and one CLI run."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from conftest import TINY, build_method_state, run_cli
from configs import cifar100, fashion_mnist
from tgeo_jax import losses, methods, report
from tgeo_jax.errors import UserError
from tgeo_jax.methods import dkd


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl_div_sum(log_input, target):
  """PyTorch's ``F.kl_div(log_input, target, reduction='sum')``: a zero target contributes 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(target > 0, target * (np.log(target) - log_input), 0.0).sum()


def np_dkd(s, t, y, *, tau, alpha, beta, w_ce=1.0, w=1.0, dtype=np.float64):
  """The official formula written out in numpy: ``(loss, ce, tckd, nckd)`` with tckd/nckd the batch means."""
  s, t = np.asarray(s, dtype), np.asarray(t, dtype)
  n, k = s.shape
  gt = np.zeros((n, k), bool)
  gt[np.arange(n), y] = True
  p_s, p_t = np_softmax(s / tau), np_softmax(t / tau)
  # Binary (target, everything else) probabilities from summed softmax entries, then their log.
  b_s = np.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], 1)
  b_t = np.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], 1)
  with np.errstate(divide="ignore"):
    tckd = np_kl_div_sum(np.log(b_s), b_t) * tau**2 / n
  # The target class left out of the second softmax by lowering its scaled logit by 1000.
  q_t = np_softmax(t / tau - 1000.0 * gt)
  nckd = np_kl_div_sum(np_log_softmax(s / tau - 1000.0 * gt), q_t) * tau**2 / n
  ce = -np_log_softmax(s)[np.arange(n), y].mean()
  return w_ce * ce + w * (alpha * tckd + beta * nckd), ce, tckd, nckd


def random_batch(seed, n=8, k=10, scale=3.0):
  rng = np.random.default_rng(seed)
  s = (rng.normal(size=(n, k)) * scale).astype(np.float32)
  t = (rng.normal(size=(n, k)) * scale).astype(np.float32)
  return s, t, rng.integers(0, k, size=n).astype(np.int32)


class DKDLossTest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters(
      # (seed, logit scale, tau, alpha, beta, w_ce, kd weight, K)
      (0, 1.0, 4.0, 1.0, 8.0, 1.0, 1.0, 10),  # mdistiller's CIFAR defaults
      (1, 3.0, 4.0, 1.0, 2.0, 1.0, 0.35, 100),  # resnet56 -> resnet20's beta, mid warm-up, 100 classes
      (2, 5.0, 1.0, 0.5, 0.5, 1.0, 1.0, 7),  # ImageNet-like tau = 1
      (3, 20.0, 4.0, 1.0, 6.0, 0.0, 1.0, 10),  # large logits: gaps of ~100 between classes
      (4, 60.0, 4.0, 2.0, 8.0, 0.3, 1.0, 5),  # larger still (scaled gaps up to ~60)
  )
  def test_matches_numpy_transcription(self, seed, scale, tau, alpha, beta, w_ce, w, k):
    s, t, y = random_batch(seed, k=k, scale=scale)
    loss, m = jax.jit(lambda s, t, y: dkd.dkd_loss(s, t, y, temperature=tau, alpha=alpha, beta=beta, w_ce=w_ce,
                                                    kd_weight=w))(s, t, y)
    want = np_dkd(s, t, y, tau=tau, alpha=alpha, beta=beta, w_ce=w_ce, w=w)
    assert all(np.isfinite(want))
    np.testing.assert_allclose([loss, m["ce"], m["tckd"], m["nckd"]], want, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(m["kd_weight"], w)

  def test_extreme_logits_stay_finite_where_float32_probabilities_do_not(self):
    # A target 400 above the rest at tau = 1: 1 - p_y = e^-400 underflows in float32 (the official formula's
    # log(0) = -inf), not in float64 (1e-174) nor in log space.
    s, t, y = random_batch(5, k=6)
    s[np.arange(8), y] += 400.0
    t[np.arange(8), (y + 1) % 6] += 30.0
    want = np_dkd(s, t, y, tau=1.0, alpha=1.0, beta=8.0)
    assert all(np.isfinite(want))
    assert not np.isfinite(np_dkd(s, t, y, tau=1.0, alpha=1.0, beta=8.0, dtype=np.float32)[0])
    loss, m = dkd.dkd_loss(s, t, y, temperature=1.0, alpha=1.0, beta=8.0)
    np.testing.assert_allclose([loss, m["ce"], m["tckd"], m["nckd"]], want, rtol=1e-5)
    g = jax.grad(lambda z: dkd.dkd_loss(z, t, y, temperature=1.0, alpha=1.0, beta=8.0)[0])(s)
    assert np.all(np.isfinite(g)) and np.any(g != 0)

  def test_decomposes_hinton_kl(self):
    # The paper's Eq. (5): tau^2 KL(p_t || p_s) = TCKD + (1 - p_t,y) NCKD, per sample.
    s, t, y = random_batch(6, k=12)
    tckd, nckd = dkd.dkd_terms(s, t, y, temperature=4.0)
    p_ty = np_softmax(t.astype(np.float64) / 4.0)[np.arange(8), y]
    np.testing.assert_allclose(tckd + (1 - p_ty) * nckd, losses.kd_loss(s, t, temperature=4.0), rtol=1e-5)

  def test_hand_values(self):
    # Identical logits: both KL terms vanish and only the CE remains.
    s, _, y = random_batch(7)
    loss, m = dkd.dkd_loss(s, s, y, temperature=4.0, alpha=1.0, beta=8.0)
    chex.assert_trees_all_close((m["tckd"], m["nckd"]), (0.0, 0.0), atol=1e-6)
    chex.assert_trees_all_close(loss, m["ce"], atol=1e-5)
    # Two classes: no non-target distribution to compare (NCKD = 0) and TCKD is all of Hinton's KD. One sample by
    # hand: student (0, 0), teacher (ln 3, 0), tau = 1, label 0: b_s = (1/2, 1/2), b_t = (3/4, 1/4),
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2).
    tckd, nckd = dkd.dkd_terms(jnp.zeros((1, 2)), jnp.array([[np.log(3.0), 0.0]]), jnp.array([0]), temperature=1.0)
    np.testing.assert_allclose(tckd, [0.75 * np.log(1.5) + 0.25 * np.log(0.5)], rtol=1e-6)
    np.testing.assert_allclose(nckd, [0.0], atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradients(self):
    s, t, y = random_batch(8, k=5, scale=2.0)
    fn = self.variant(lambda s, t: dkd.dkd_loss(s, t, y, temperature=4.0, alpha=1.0, beta=8.0, kd_weight=0.5)[0])
    check_grads(lambda z: fn(z, t), (s,), order=1, modes=["rev"], eps=1e-2, atol=5e-3, rtol=5e-3)
    g_t = jax.grad(fn, argnums=1)(s, t)
    chex.assert_trees_all_close(g_t, jnp.zeros_like(g_t))  # no gradient reaches the teacher
    # The target's entry is dropped from the non-target softmax: its student logit gets no NCKD gradient.
    g_nckd = jax.grad(lambda z: jnp.sum(dkd.dkd_terms(z, t, y, temperature=4.0)[1]))(s)
    np.testing.assert_allclose(np.asarray(g_nckd)[np.arange(8), y], 0.0, atol=1e-7)

  def test_bfloat16_logits_reduce_in_float32(self):
    s, t, y = random_batch(9)
    loss, m = dkd.dkd_loss(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), y, temperature=4.0,
                           alpha=1.0, beta=8.0)
    assert loss.dtype == jnp.float32 and m["nckd"].dtype == jnp.float32 and np.isfinite(loss)


def test_warmup_schedule():
  w = jax.jit(lambda step: dkd.warmup_weight(step, steps_per_epoch=10, warmup_epochs=20.0))
  # mdistiller: min(epoch / 20, 1) with epoch = 1, 2, ... constant over an epoch's steps.
  steps = np.array([0, 9, 10, 19, 100, 189, 190, 500], np.int32)
  np.testing.assert_allclose([w(s) for s in steps], [0.05, 0.05, 0.1, 0.1, 0.55, 0.95, 1.0, 1.0], rtol=1e-6)
  half = [dkd.warmup_weight(s, steps_per_epoch=4, warmup_epochs=2.5) for s in (0, 4, 8, 12)]
  np.testing.assert_allclose(half, [0.4, 0.8, 1.0, 1.0], rtol=1e-6)
  assert dkd.warmup_weight(0, steps_per_epoch=4, warmup_epochs=0.0) == 1.0  # 0: no warm-up


def test_method_warms_up_by_the_trainers_epoch(tiny_teacher):
  method, state, frozen, batch = build_method_state("dkd", tiny_teacher, **{"num_epochs": 4,
                                                                            "dkd.warmup_epochs": 4.0})
  spe = method.steps_per_epoch
  assert spe == len(method.task.train) // 32
  t = method.batch_teacher_logits(state, frozen, batch)
  s, _ = method.student_forward(state["params"], state["rest"], batch["inputs"], train=False)
  weights = [float(method.loss(s, t, batch, jnp.int32(step))[1]["kd_weight"]) for step in (0, spe - 1, spe, 3 * spe)]
  np.testing.assert_allclose(weights, [0.25, 0.25, 0.5, 1.0], rtol=1e-6)
  new_state, metrics = jax.jit(method.train_step)(state, frozen, batch)
  assert int(new_state["step"]) == 1
  for key in ("loss", "ce", "tckd", "nckd", "grad_norm"):
    assert np.isfinite(metrics[key]), key


def test_defaults_and_cifar_settings():
  c = fashion_mnist.base_config().dkd
  assert (c.alpha, c.beta, c.temperature, c.warmup_epochs, c.w_ce) == (1.0, 8.0, 4.0, 20.0, 1.0)
  # mdistiller configs/cifar100/dkd/*.yaml: beta 8 unless set (2 for resnet56 -> resnet20, 6 for the WRN pairs,
  # vgg13 -> vgg8 and vgg13 -> MobileNetV2).
  betas = {pair: cifar100.get_config(f"{pair}:dkd").dkd.beta for pair in cifar100.PAIRS}
  assert betas == {"resnet32x4_resnet8x4": 8.0, "wrn_40_2_wrn_40_1": 6.0, "resnet56_resnet20": 2.0,
                   "wrn_40_2_wrn_16_2": 6.0, "resnet32x4_shufflev1": 8.0, "resnet32x4_shufflev2": 8.0,
                   "resnet50_cifar_mobilenetv2": 8.0, "vgg13_vgg8": 6.0, "vgg13_mobilenetv2": 6.0}
  c = cifar100.get_config("vgg13_mobilenetv2:dkd")
  assert (c.dkd.alpha, c.dkd.temperature, c.dkd.warmup_epochs, c.dkd.w_ce, c.optimizer.learning_rate) == (
      1.0, 4.0, 20.0, 1.0, 0.01)
  methods.validate_config(c)


@pytest.mark.parametrize("field,value,message", [
    ("temperature", 0.0, r"^dkd.temperature: expected a positive number, got 0.0$"),
    ("beta", -1.0, r"^dkd.beta: expected a number >= 0, got -1.0$"),
    ("alpha", -0.5, r"^dkd.alpha: expected a number >= 0, got -0.5$"),
    ("warmup_epochs", 11.0, r"^dkd.warmup_epochs: expected a number in \[0, num_epochs=10\] .*, got 11.0$"),
])
def test_bad_config_names_the_field(field, value, message):
  c = fashion_mnist.get_config("dkd")
  c.dkd[field] = value
  with pytest.raises(UserError, match=message):
    methods.validate_config(c)


def test_cli_run(tiny_teacher, tmp_path):
  workdir = str(tmp_path / "dkd")
  proc = run_cli(["--config=configs/fashion_mnist.py:dkd", f"--workdir={workdir}", *TINY,
                  f"--config.teacher.checkpoint={tiny_teacher}"])
  assert "done: dkd test accuracy" in proc.stdout
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["method"] == "dkd" and 0 <= summary["accuracy"] <= 1 and "teacher_accuracy" in summary
  record = report.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]
  for key in ("train_loss", "train_ce", "train_tckd", "train_nckd"):
    assert np.isfinite(record[key]), key
  assert record["train_kd_weight"] == 1.0  # warm-up 1 epoch on Fashion-MNIST: full weight from epoch 1
