"""The study-only wrong teacher (tgeo_jax/study_teacher.py): the transform, the set S, where methods see it, the
oracle's loss, the α analytics that score it, its checks, and that an off group leaves every fingerprint alone."""

import numpy as np
import pytest

from conftest import build_method_state, tiny_config
from tgeo_jax import alpha_report, default_config, run_identity, study_teacher
from tgeo_jax.errors import UserError


def test_shift_logits_rotates_each_row_by_its_own_shift():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  shift = np.array([0, 1, 2, 3, 4, 1])
  out = np.asarray(study_teacher.shift_logits(logits, shift))
  for b in range(6):
    for c in range(5):
      assert out[b, c] == logits[b, (c + shift[b]) % 5]
  # The same confidence on another class: the values are a permutation, the top class moves by -shift.
  np.testing.assert_array_equal(np.sort(out, -1), np.sort(logits, -1))
  np.testing.assert_array_equal(out.argmax(-1), (logits.argmax(-1) - shift) % 5)


def test_random_examples_set_is_the_fraction_with_nonzero_shifts_and_fixed_by_its_seed():
  labels = np.arange(1000) % 10
  d = study_teacher.wrong_teacher_shift(labels, 10, kind="random_examples", fraction=0.3, seed=3)
  assert d.dtype == np.int32 and d.shape == (1000,)
  assert np.count_nonzero(d) == 300 and d.min() == 0 and d.max() <= 9
  assert set(np.unique(d[d > 0])) == set(range(1, 10))
  np.testing.assert_array_equal(d, study_teacher.wrong_teacher_shift(labels, 10, kind="random_examples",
                                                                     fraction=0.3, seed=3))
  other = study_teacher.wrong_teacher_shift(labels, 10, kind="random_examples", fraction=0.3, seed=4)
  assert not np.array_equal(d > 0, other > 0)
  assert np.count_nonzero(study_teacher.wrong_teacher_shift(labels, 10, kind="none")) == 0


def test_classes_set_is_every_example_of_the_classes():
  labels = np.array([0, 1, 2, 3, 1, 4, 2, 9])
  d = study_teacher.wrong_teacher_shift(labels, 10, kind="classes", classes=(1, 2))
  np.testing.assert_array_equal(d > 0, np.isin(labels, [1, 2]))
  with pytest.raises(ValueError, match="kind"):
    study_teacher.wrong_teacher_shift(labels, 10, kind="flip")


def test_an_off_group_is_not_part_of_the_fingerprint_an_on_one_is():
  config = default_config.base_config()
  without = default_config.base_config()
  del without["study_wrong_teacher"]
  assert run_identity.config_fingerprint(config) == run_identity.config_fingerprint(without)
  config.study_wrong_teacher.fraction = 0.5  # still off: nothing the run does changes
  assert run_identity.config_fingerprint(config) == run_identity.config_fingerprint(without)
  config.study_wrong_teacher.kind = "random_examples"
  on = run_identity.config_fingerprint(config)
  assert on != run_identity.config_fingerprint(without)
  config.study_wrong_teacher.fraction = 0.3
  assert run_identity.config_fingerprint(config) != on


@pytest.mark.parametrize("overrides, message", [
    (dict(method="ce", **{"study_wrong_teacher.kind": "classes", "study_wrong_teacher.classes": (1,)}),
     "study_wrong_teacher.kind: the study's wrong teacher works with the methods"),
    (dict(method="kd", **{"study_wrong_teacher.kind": "flip"}), "study_wrong_teacher.kind: expected one of"),
    (dict(method="kd", **{"study_wrong_teacher.oracle": True}), "study_wrong_teacher.oracle: True needs"),
    (dict(method="tgeo", **{"study_wrong_teacher.kind": "random_examples", "study_wrong_teacher.oracle": True}),
     "study_wrong_teacher.oracle: True works with method 'kd' only"),
    (dict(method="kd", **{"study_wrong_teacher.kind": "random_examples", "study_wrong_teacher.fraction": 0.0}),
     "study_wrong_teacher.fraction: expected a fraction in (0, 1]"),
    (dict(method="kd", **{"study_wrong_teacher.kind": "classes"}),
     "study_wrong_teacher.classes: expected a non-empty list of class ids >= 0"),
])
def test_bad_fields_are_one_line(overrides, message):
  from tgeo_jax import methods
  config = tiny_config(overrides.pop("method"))
  default_config.override(config, overrides)
  with pytest.raises(UserError) as e:
    methods.validate_config(config)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_class_id_outside_the_task_is_one_line(tiny_teacher):
  with pytest.raises(UserError, match=r"^study_wrong_teacher.classes: expected a non-empty list of class ids in "
                                      r"\[0, 10\), got \(3, 10\)$"):
    build_method_state("kd", tiny_teacher, **{"study_wrong_teacher.kind": "classes",
                                              "study_wrong_teacher.classes": (3, 10)})


@pytest.fixture(scope="module")
def wrong_kd(tiny_teacher):
  """KD with the teacher made wrong on half the examples, through the cached table and through live forwards."""
  on = {"study_wrong_teacher.kind": "random_examples", "study_wrong_teacher.fraction": 0.5}
  cached = build_method_state("kd", tiny_teacher, **on)
  live = build_method_state("kd", tiny_teacher, **on, **{"teacher.cache_logits": "off"})
  real = build_method_state("kd", tiny_teacher)
  return cached, live, real


def test_every_teacher_path_sees_the_same_wrong_teacher(wrong_kd):
  (method, state, frozen, batch), (live, live_state, live_frozen, _), (real, real_state, real_frozen, _) = wrong_kd
  assert "teacher_logits_table" in frozen and "teacher_logits_table" not in live_frozen
  shift = method.study_teacher_shift
  assert 0 < np.count_nonzero(shift[np.asarray(batch["index"])]) < len(batch["index"])
  truth = np.asarray(real.batch_teacher_logits(real_state, real_frozen, batch))
  expected = truth[np.arange(len(truth))[:, None], (np.arange(truth.shape[1]) + shift[np.asarray(batch["index"])][:, None])
                   % truth.shape[1]]
  np.testing.assert_allclose(np.asarray(method.batch_teacher_logits(state, frozen, batch)), expected, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(live.batch_teacher_logits(live_state, live_frozen, batch)), expected,
                             rtol=1e-5, atol=1e-5)
  # Off, nothing changes: the real method's table is the teacher's own.
  assert real.study_teacher_shift is None and "study_teacher_shift" not in real_frozen


def test_the_oracle_puts_alpha_zero_on_the_wrong_set(tiny_teacher, wrong_kd):
  import jax
  (method, state, frozen, batch), _, _ = wrong_kd
  oracle, o_state, o_frozen, _ = build_method_state(
      "kd", tiny_teacher, **{"study_wrong_teacher.kind": "random_examples", "study_wrong_teacher.fraction": 0.5,
                             "study_wrong_teacher.oracle": True, "kd.w_ce": 0.3, "kd.w_kd": 0.7})
  student = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (len(batch["labels"]), 10)), np.float64)
  teacher = np.asarray(oracle.batch_teacher_logits(o_state, o_frozen, batch), np.float64)
  labels = np.asarray(batch["labels"])
  wrong = oracle.study_teacher_shift[np.asarray(batch["index"])] > 0
  loss, _ = oracle.loss(student, teacher, dict(batch, study_teacher_wrong=wrong), 0)

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  ce = -log_softmax(student)[np.arange(len(labels)), labels]
  tau = 4.0
  pt = np.exp(log_softmax(teacher / tau))
  kl = tau ** 2 * (pt * (log_softmax(teacher / tau) - log_softmax(student / tau))).sum(-1)
  expected = np.where(wrong, ce, 0.3 * ce + 0.7 * kl).mean()
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  # The oracle's batch field comes from the step itself (LossMethod.train_step), never from the data.
  _, metrics = jax.jit(oracle.train_step)(o_state, o_frozen, batch)
  assert float(metrics["alpha_mean"]) == pytest.approx(0.7 * np.mean(~wrong), rel=1e-6)


def test_alpha_report_scores_finding_the_wrong_set():
  rng = np.random.default_rng(0)
  wrong = np.arange(100) < 30
  alpha = np.where(wrong, 0.2, 0.6) + rng.uniform(-0.01, 0.01, 100)
  p_label = np.where(wrong, 0.05, 0.9)
  p_label[0] = 0.95  # one example of S the trivial detector misses
  out = alpha_report.summarize(alpha, np.ones(100, bool), rng.uniform(size=100), None, wrong, p_label)
  assert out["auc_alpha_wrong_teacher"] == 1.0
  assert out["alpha_wrong_teacher"] == pytest.approx(alpha[:30].mean())
  assert out["alpha_right_teacher"] == pytest.approx(alpha[30:].mean())
  assert out["auc_disbelief_wrong_teacher"] == pytest.approx(1 - 70 / (30 * 70))
  # α that ranks S last scores 0: the AUC is of a low α finding S.
  assert alpha_report.summarize(1 - alpha, np.ones(100, bool), rng.uniform(size=100), None, wrong)[
      "auc_alpha_wrong_teacher"] == 0.0


def test_docstring_examples():
  import doctest
  result = doctest.testmod(study_teacher)
  assert result.failed == 0 and result.attempted >= 6
