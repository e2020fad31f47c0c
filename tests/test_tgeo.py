"""TGeo-KD and the re-weighting baselines as methods: the fusion net trains, α semantics, devices, rules."""

import hashlib
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgeo_jax.methods import reweight
from conftest import TINY, device_flags, final_arrays, run_cli
from conftest import build_method_state as build


def test_fusion_net_trains(tiny_teacher):
  """The official code's bug: its fusion network never gets a gradient. Ours must, and must move."""
  method, state, frozen, batch = build("tgeo", tiny_teacher, **{"tgeo.fusion_lr": 1e-2})
  step = jax.jit(method.train_step, static_argnums=3)
  init_meta = jax.tree.map(np.array, state["meta_params"])
  for i in range(3):
    state, metrics = step(state, frozen, batch, method.step_kind(i))
    assert float(metrics["meta_grad_norm"]) > 0
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - np.asarray(b)))), init_meta, state["meta_params"])
  assert max(jax.tree.leaves(moved)) > 1e-4
  assert 0 < float(metrics["alpha_mean"]) < 1


def test_alpha_fixed_by_construction_equals_kd(tiny_teacher):
  """Fresh fusion net: zero output layer, so α = 0.5 for every sample; a plain TGeo step is then a KD step
  with w_kd = w_ce = 0.5 at the same temperature."""
  method, state, frozen, batch = build("tgeo", tiny_teacher, **{"tgeo.meta_interval": 2})
  kd, kd_state, kd_frozen, _ = build("kd", tiny_teacher, **{"kd.w_kd": 0.5, "kd.w_ce": 0.5, "kd.temperature": 4.0})
  state["step"] = jnp.asarray(1)  # step 1 with meta_interval 2: a plain step
  kd_state["step"] = jnp.asarray(1)
  assert method.step_kind(1) == "plain"
  new, metrics = jax.jit(method.train_step, static_argnums=3)(state, frozen, batch, "plain")
  new_kd, kd_metrics = jax.jit(kd.train_step)(kd_state, kd_frozen, batch)
  np.testing.assert_allclose(float(metrics["alpha_mean"]), 0.5, atol=1e-7)
  np.testing.assert_allclose(float(metrics["loss"]), float(kd_metrics["loss"]), rtol=1e-6)
  chex.assert_trees_all_close(new["params"], new_kd["params"], atol=1e-6)
  chex.assert_trees_all_equal(new["meta_params"], state["meta_params"])  # no meta update on a plain step


def test_loss_is_differentiable_only_through_the_student(tiny_teacher):
  method, state, frozen, batch = build("tgeo", tiny_teacher)
  teacher_logits = method.teacher_logits(state, frozen, batch["inputs"])

  def fused(student_params, teacher_vars, meta_params):
    fr = dict(frozen, teacher=teacher_vars)
    t_logits = method.teacher_logits(state, fr, batch["inputs"])
    b = {"inputs": batch["inputs"], "labels": batch["labels"], "index": batch["index"], "teacher_logits": t_logits}
    (soft, hard), (_, context) = method.per_sample_fn(fr)(student_params, state["rest"], b)
    alpha = jax.lax.stop_gradient(method.weight_fn(meta_params, context))
    return jnp.mean(alpha * soft + (1 - alpha) * hard)

  g_student, g_teacher, g_meta = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(
      state["params"], frozen["teacher"], state["meta_params"])
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_student)) > 0
  for g in (g_teacher, g_meta):
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(g))
  assert teacher_logits.shape == (32, 10)


def test_class_mean_teacher_is_computed_on_the_training_split(tiny_teacher):
  method, state, frozen, _ = build("tgeo", tiny_teacher)
  tbar = np.asarray(frozen["class_mean"])
  chex.assert_shape(tbar, (10, 10))
  np.testing.assert_allclose(tbar.sum(-1), 1.0, rtol=1e-5)
  source = method.task.train
  probs = jax.nn.softmax(method.teacher_logits(state, frozen, source.gather(np.arange(len(source)))))
  c = int(source.labels[0])
  np.testing.assert_allclose(tbar[c], np.asarray(probs)[source.labels == c].mean(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ordering", ["reuse", "lookahead"])
def test_orderings_run_and_reuse_is_the_lookahead_step(tiny_teacher, ordering):
  method, state, frozen, batch = build("tgeo", tiny_teacher, **{"tgeo.ordering": ordering})
  new, metrics = jax.jit(method.train_step, static_argnums=3)(state, frozen, batch, "meta")
  assert np.isfinite(float(metrics["val_loss"])) and int(new["step"]) == 1


def test_rw_kd_updates_only_the_batch_entries(tiny_teacher):
  method, state, frozen, batch = build("rw_kd", tiny_teacher, **{"rwkd.fusion_lr": 0.1})
  new, metrics = jax.jit(method.train_step, static_argnums=3)(state, frozen, batch, "meta")
  table = np.asarray(new["meta_params"]["alpha_logits"])
  changed = np.flatnonzero(table != 0)
  assert set(changed) <= set(np.asarray(batch["index"]).tolist()) and len(changed) > 0
  assert float(metrics["meta_grad_norm"]) > 0


def test_rule_alphas_hand_values():
  # ADA: p_T,y = 0.7 with K = 4 -> 0.7 - 0.3 / 3 = 0.6; p_T,y = 0.1 -> max(0, 0.1 - 0.3) = 0.
  t = jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]]))
  np.testing.assert_allclose(reweight.ada_alpha(t, jnp.array([0, 0])), [0.6, 0.0], atol=1e-6)
  # WLS: 1 - exp(-CE_s / CE_t).
  s = jnp.log(jnp.array([[0.5, 0.5, 1e-9, 1e-9], [0.25, 0.25, 0.25, 0.25]]))
  want = 1 - np.exp(-np.array([np.log(2), np.log(4)]) / np.array([-np.log(0.7), -np.log(0.1)]))
  np.testing.assert_allclose(reweight.wls_alpha(s, t, jnp.array([0, 0])), want, rtol=1e-5)
  # ANL: linear from 1 to 0.
  np.testing.assert_allclose([float(reweight.anl_alpha(jnp.asarray(k), 10)) for k in (0, 5, 10, 12)],
                             [1, 0.5, 0, 0])


@pytest.mark.parametrize("method", ["anl_kd", "ada_kd", "wls_kd"])
def test_rule_methods_step(tiny_teacher, method):
  m, state, frozen, batch = build(method, tiny_teacher)
  new, metrics = jax.jit(m.train_step)(state, frozen, batch)
  assert np.isfinite(float(metrics["loss"])) and 0 <= float(metrics["alpha_mean"]) <= 1


def test_tgeo_one_and_four_devices_agree(tiny_teacher, tmp_path):
  common = ["--config=configs/fashion_mnist.py:tgeo", *TINY, f"--config.teacher.checkpoint={tiny_teacher}",
            "--config.tgeo.fusion_lr=0.01"]
  one, four = str(tmp_path / "one"), str(tmp_path / "four")
  run_cli([*common, f"--workdir={one}"])  # in this process: one CPU device
  run_cli([*common, f"--workdir={four}"], env={"XLA_FLAGS": device_flags(4)})
  assert json.load(open(os.path.join(four, "summary.json")))["num_devices"] == 4
  _, a = final_arrays(one)
  _, b = final_arrays(four)
  assert any("meta_params" in k for k in a)
  for key in a:
    if a[key].dtype.kind == "f":
      np.testing.assert_allclose(a[key], b[key], atol=1e-5, rtol=1e-5, err_msg=key)


def test_alpha_init_and_batch_centring(tiny_teacher):
  """``alpha_init`` sets every sample's α before the first meta step; ``alpha_normalization='center'`` keeps the
  batch's mean pre-sigmoid output at logit(alpha_init) while the meta steps move α between samples."""
  method, state, frozen, batch = build("tgeo", tiny_teacher, **{"tgeo.alpha_init": 0.9})
  _, metrics = jax.jit(method.train_step, static_argnums=3)(state, frozen, batch, "plain")
  np.testing.assert_allclose(float(metrics["alpha_mean"]), 0.9, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["alpha_std"]), 0.0, atol=1e-6)

  method, state, frozen, batch = build("tgeo", tiny_teacher, **{"tgeo.alpha_init": 0.8, "tgeo.fusion_lr": 1e-2,
                                                        "tgeo.alpha_normalization": "center"})
  step = jax.jit(method.train_step, static_argnums=3)
  for _ in range(3):
    state, metrics = step(state, frozen, batch, "meta")
    assert float(metrics["meta_grad_norm"]) > 0
  logits = method.predict(state, frozen, batch["inputs"])
  alpha = np.asarray(method.alpha(state["meta_params"], frozen, batch, logits,
                                  method.batch_teacher_logits(state, frozen, batch)), np.float64)
  z = np.log(alpha / (1 - alpha))
  np.testing.assert_allclose(z.mean(), np.log(0.8 / 0.2), atol=1e-4)
  assert alpha.std() > 1e-4  # the samples' α differ after the meta steps


def test_teacher_logits_disk_cache(tiny_teacher, tmp_path):
  """``teacher.logits_cache_dir``: the second run reads the table the first one stored, and it is the same."""
  cache = str(tmp_path / "cache")
  method, state, frozen, _ = build("kd", tiny_teacher, **{"teacher.logits_cache_dir": cache})
  files = os.listdir(cache)
  assert len(files) == 1 and files[0].endswith(".npz")
  path = os.path.join(cache, files[0])
  with np.load(path) as f:  # mark the stored table (with a matching checksum: a garbled one is recomputed)
    marked = np.ascontiguousarray(f["logits"] + 1.0)
  np.savez(path, logits=marked, sha256=np.frombuffer(hashlib.sha256(marked.tobytes()).digest(), np.uint8))
  _, _, again, _ = build("tgeo", tiny_teacher, **{"teacher.logits_cache_dir": cache})
  np.testing.assert_allclose(np.asarray(again["teacher_logits_table"]),
                             np.asarray(frozen["teacher_logits_table"]) + 1.0)
  _, _, fresh, _ = build("kd", tiny_teacher)  # no cache: computed, equal to the first run's table
  np.testing.assert_array_equal(np.asarray(fresh["teacher_logits_table"]),
                                np.asarray(frozen["teacher_logits_table"]))


def test_alpha_analytics_same_with_cached_and_online_teacher(tiny_teacher, tmp_path):
  """``epoch_report`` reads the teacher's logits from the cached table when there is one; same α by group."""
  reports = []
  for mode in ("on", "off"):
    method, state, frozen, batch = build("tgeo", tiny_teacher, **{"teacher.cache_logits": mode, "tgeo.fusion_lr": 1e-2})
    assert ("teacher_logits_table" in frozen) == (mode == "on")
    step = jax.jit(method.train_step, static_argnums=3)
    for _ in range(3):
      state, _ = step(state, frozen, batch, "meta")
    os.makedirs(tmp_path / mode)
    reports.append(method.epoch_report(state, frozen, str(tmp_path / mode), 1))
  cached, online = reports
  assert cached.keys() == online.keys() and cached["alpha_std"] > 0
  for key in cached:
    if cached[key] is not None:
      np.testing.assert_allclose(cached[key], online[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_teacher_logits_disk_cache_is_keyed_by_compute_dtype(tiny_teacher, tmp_path):
  """A bfloat16 student runs its teacher in bfloat16: it must not read a float32 run's table (nor the reverse)."""
  cache = str(tmp_path / "cache")
  _, _, f32, _ = build("kd", tiny_teacher, **{"teacher.logits_cache_dir": cache})
  _, _, bf16, _ = build("kd", tiny_teacher, **{"teacher.logits_cache_dir": cache, "compute_dtype": "bfloat16"})
  assert len(os.listdir(cache)) == 2  # one table per compute path
  _, _, bf16_fresh, _ = build("kd", tiny_teacher, compute_dtype="bfloat16")  # no cache
  np.testing.assert_array_equal(np.asarray(bf16["teacher_logits_table"]), np.asarray(bf16_fresh["teacher_logits_table"]))
  assert not np.array_equal(np.asarray(bf16["teacher_logits_table"]), np.asarray(f32["teacher_logits_table"]))
