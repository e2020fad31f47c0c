"""The teacher-logit cache gives the same training as the online teacher."""

import chex
import jax
import numpy as np
import pytest

from conftest import build_method_state as build


@pytest.mark.parametrize("method", ["kd", "tgeo"])
def test_cached_and_online_teacher_train_alike(tiny_teacher, method):
  cached, state_c, frozen_c, batch = build(method, tiny_teacher, **{"teacher.cache_logits": "on"})
  online, state_o, frozen_o, _ = build(method, tiny_teacher, **{"teacher.cache_logits": "off"})
  assert "teacher_logits_table" in frozen_c and "teacher_logits_table" not in frozen_o
  # The table holds exactly the teacher's outputs for the batch's examples.
  chex.assert_trees_all_close(cached.batch_teacher_logits(state_c, frozen_c, batch),
                              online.teacher_logits(state_o, frozen_o, batch["inputs"]), atol=1e-5, rtol=1e-5)
  step_c = jax.jit(cached.train_step, static_argnums=3)
  step_o = jax.jit(online.train_step, static_argnums=3)
  for i in range(3):
    kind = cached.step_kind(i)
    state_c, metrics_c = step_c(state_c, frozen_c, batch, kind)
    state_o, metrics_o = step_o(state_o, frozen_o, batch, kind)
  chex.assert_trees_all_close(state_c["params"], state_o["params"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(metrics_c["loss"]), float(metrics_o["loss"]), rtol=1e-5)


def test_auto_follows_augmentation(tiny_teacher):
  _, _, frozen, _ = build("kd", tiny_teacher, **{"data.augment": "none"})
  assert "teacher_logits_table" in frozen
  _, _, frozen, _ = build("kd", tiny_teacher, **{"data.augment": "flip"})
  assert "teacher_logits_table" not in frozen
