"""bench/torch_reference.py: the PyTorch rendering of TGeo-KD's bilevel step gives tgeo_jax's hypergradient.

Skipped unless PyTorch is installed (the ``test`` and ``bench`` extras install it). A tiny synthetic task and a
tiny CNN with train-mode BatchNorm, from the state after two meta steps (momentum, Adam moments and every
fusion-net layer non-trivial); the student's optimizer is the config default (clipping active, weight decay,
momentum).
"""

import importlib.util
import os

import pytest

from conftest import requires

pytestmark = requires("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reference():
  spec = importlib.util.spec_from_file_location("torch_reference", os.path.join(ROOT, "bench", "torch_reference.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  args = module.parse_args(["--data", "synthetic", "--input-shape", "8", "8", "1", "--batch", "16", "--val-batch",
                            "16", "--teacher", "cnn_tiny", "--pre-steps", "2"])
  from tgeo_jax import data
  task = data.load(module.make_config("cnn_tiny", args).data, seed=0)
  return module, args, task


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_hypergradient_matches_tgeo_jax(reference, dtype, tol):
  module, args, task = reference
  c = module.run_check("cnn_tiny", args, task, dtype, with_autodiff=False)
  assert c["hypergrad_torch_vs_jax"]["norm"] > 0
  assert c["hypergrad_torch_vs_jax"]["rel_l2"] <= tol, c["hypergrad_torch_vs_jax"]
  # every fusion-net parameter has a non-zero hypergradient that agrees
  for name, err in c["hypergrad_per_param"].items():
    assert err["norm"] > 0 and err["rel_l2"] <= 10 * tol, (name, err)
  assert abs(c["val_loss"]["torch"] - c["val_loss"]["jax"]) <= 10 * tol * abs(c["val_loss"]["jax"])
  assert c["student_update"]["rel_l2"] <= 10 * tol  # the real student step (reuse ordering) is the same too
