"""tgeo_jax/import_teacher.py: PyTorch teachers (RepDistiller's CIFAR layouts, torchvision's ImageNet ones) become
teacher work directories whose flax models compute the torch models' eval-mode logits; bad files are one line.

Every family is checked against a torch model with randomised BatchNorm statistics and affine parameters (so that
a swapped or mis-transposed tensor shows): RepDistiller's modules as transcribed in ``torch_cifar_models.py``,
torchvision's own (random init, nothing downloaded). Skipped without torch (the ``import`` extra); the torchvision
cases also without torchvision.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from conftest import LazyModule, error_lines, relative_l2, requires, run_inprocess, tiny_config

from tgeo_jax import import_teacher, run_identity

pytestmark = requires("torch")
torch = LazyModule("torch")
torch_cifar_models = LazyModule("torch_cifar_models")  # imports torch

TOLERANCE = 1e-4
CIFAR_MODELS = ("resnet8", "resnet8x4", "wrn_16_1", "vgg8", "resnet50_cifar", "mobilenetv2", "shufflev1",
                "shufflev2")
# zoo name -> torchvision constructor
TORCHVISION_MODELS = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
                      "mobilenetv2_imagenet": "mobilenet_v2"}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
  """One intra-op thread: torch's first forward of a model through a thread pool competing with XLA's took ~7x as
  long on a 2-core machine (1.6 s vs 0.23 s for resnet50_cifar)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded():
  """The same initial torch weights on every run (module constructors draw from torch's global generator)."""
  torch.manual_seed(0)


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Random BatchNorm running statistics and affine parameters (a fresh BatchNorm is the identity up to 1/sqrt(1 +
  eps), which would hide a mapping that swaps or drops them); eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=gen)
        m.bias.normal_(0.0, 0.2, generator=gen)
        m.running_mean.normal_(0.0, 0.2, generator=gen)
        m.running_var.uniform_(0.5, 2.0, generator=gen)
        m.num_batches_tracked.fill_(1000)
  return module.eval()


def torch_logits(module, x_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return module(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def flax_logits(model, x_nhwc: np.ndarray) -> np.ndarray:
  import jax
  from flax import nnx

  from tgeo_jax import models
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  forward = jax.jit(lambda p, r, x: models.apply(graphdef, p, r, x, train=False)[0])
  return np.asarray(forward(params, rest, x_nhwc))


def inputs(size: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)


def check_logits(module, model_name: str, fmt: str, tmp_path, *, size: int, wrap) -> float:
  path = str(tmp_path / "teacher.pth")
  torch.save(wrap(module.state_dict()), path)
  state_dict, _ = import_teacher.read_state_dict(path)
  converted = import_teacher.convert(state_dict, model_name, fmt=fmt, num_classes=10)
  x = inputs(size)
  expected = torch_logits(module, x)
  error = relative_l2(flax_logits(converted.model, x), expected)
  print(f"{model_name}: relative logit error {error:.2e} (|logits| max {np.abs(expected).max():.3f})")
  return error


@pytest.mark.parametrize("model_name", CIFAR_MODELS)
def test_repdistiller_logits(model_name, tmp_path):
  module = perturb(torch_cifar_models.build(model_name, 10))
  # RepDistiller's ckpt_epoch_240.pth layout: the state_dict under 'model', beside the optimizer's state.
  error = check_logits(module, model_name, "repdistiller", tmp_path, size=32,
                       wrap=lambda sd: {"epoch": 240, "model": sd, "accuracy": 0.5, "optimizer": {"state": {}}})
  assert error <= TOLERANCE


def test_a_bessel_corrected_variance_would_show():
  """The logit tests can tell the BatchNorm variance mapping apart: rescaling ``running_var`` by a batch-64 Bessel
  factor (the 'unbiased -> biased' correction that does not belong in the mapping) moves the logits far past the
  tolerance, while the variance copied as it is matches."""
  module = perturb(torch_cifar_models.build("resnet8", 10))
  x = inputs(32)
  expected = torch_logits(module, x)
  state_dict = {k: v.numpy() for k, v in module.state_dict().items()}
  corrected = {k: v * (63 / 64) if k.endswith("running_var") else v for k, v in state_dict.items()}
  for sd, close in ((state_dict, True), (corrected, False)):
    converted = import_teacher.convert(sd, "resnet8", fmt="repdistiller", num_classes=10)
    assert (relative_l2(flax_logits(converted.model, x), expected) <= TOLERANCE) == close


@pytest.mark.parametrize("model_name", TORCHVISION_MODELS)
def test_torchvision_logits(model_name, tmp_path):
  try:
    import torchvision
  except Exception as e:  # noqa: BLE001 - absent, or built for another torch ("operator torchvision::nms does not exist")
    pytest.skip(f"torchvision is not usable here ({type(e).__name__}: {e})")
  module = perturb(getattr(torchvision.models, TORCHVISION_MODELS[model_name])(weights=None, num_classes=10))
  # 64x64 inputs: the same weights as at 224 (global average pooling), an 8th of the arithmetic.
  assert check_logits(module, model_name, "torchvision", tmp_path, size=64, wrap=lambda sd: sd) <= TOLERANCE


# Members whose layouts the logit tests' smallest models do not show: stages of several blocks (the blocks after the
# first have no shortcut conv), VGG blocks of 2 and 4 convs. The other members differ from these only in counts.
LAYOUT_MEMBERS = ("resnet20", "resnet32x4", "wrn_40_2", "vgg11", "vgg19")


def test_larger_repdistiller_members_find_all_their_keys():
  """The key rules cover more than the smallest member of each family: each of ``LAYOUT_MEMBERS``' RepDistiller
  state_dicts maps completely, with the expected shapes. Built on PyTorch's meta device: shapes only, no weights."""
  for name in LAYOUT_MEMBERS:
    with torch.device("meta"):
      module = torch_cifar_models.build(name, 100)
    state_dict = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in module.state_dict().items()}
    converted = import_teacher.convert(state_dict, name, fmt="repdistiller", num_classes=100)
    assert converted.tensors == sum(not k.endswith("num_batches_tracked") for k in state_dict), name


def test_checkpoint_wrappers_are_unwrapped(tmp_path):
  sd = perturb(torch_cifar_models.build("resnet8", 10)).state_dict()
  expected = {k: v.numpy() for k, v in sd.items()}
  cases = {
      "bare": (sd, "none"),
      "model": ({"model": sd, "epoch": 240}, "model"),
      "state_dict": ({"state_dict": sd, "epoch": 3}, "state_dict"),
      "data_parallel": ({"model": {f"module.{k}": v for k, v in sd.items()}}, "model"),
      # RepDistiller's <model>_last.pth also stores its argparse options.
      "last": ({"opt": argparse.Namespace(model="resnet8", epochs=240), "model": sd}, "model"),
  }
  for name, (obj, wrapper) in cases.items():
    path = str(tmp_path / f"{name}.pth")
    torch.save(obj, path)
    got, got_wrapper = import_teacher.read_state_dict(path)
    assert got_wrapper == wrapper and list(got) == list(expected), name
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{name}: {key}")


# ------------------------------------------------------------------------------------------------- bad input


def run_import(capsys, *args) -> tuple[int, str, str]:
  capsys.readouterr()
  rc = import_teacher.main(list(args))
  out, err = capsys.readouterr()
  return rc, out, err


@pytest.fixture(scope="module")
def resnet8_100():
  """A RepDistiller resnet8 with 100 classes (CIFAR-100's count): its state_dict (torch tensors)."""
  return perturb(torch_cifar_models.build("resnet8", 100)).state_dict()


def _bad(state_dict, drop=(), add=None, reshape=None):
  sd = {k: v for k, v in state_dict.items() if k not in drop}
  sd.update(add or {})
  for key, shape in (reshape or {}).items():
    sd[key] = torch.zeros(shape)
  return {"model": sd}


@pytest.mark.parametrize("case,model,expected", [
    ("another_architecture", "wrn_16_1", "(a checkpoint of another architecture?)"),
    ("missing_key", "resnet8", "key 'layer2.0.bn2.running_var' is missing"),
    ("extra_key", "resnet8", "key 'layer4.0.conv1.weight' has no place in resnet8"),
    ("shape", "resnet8", "'layer1.0.conv2.weight' has shape (16, 16, 5, 5)"),
    ("classes", "resnet8", "classifier 'fc.bias' in {path} has shape (10,), a 10-class model, but --dataset=cifar100 has 100"),
    ("not_a_checkpoint", "resnet8", "is not a PyTorch checkpoint"),
    ("pickled_module", "resnet8", "pickles torch_cifar_models.ResNet, which loading it would have to run"),
    ("not_a_state_dict", "resnet8", "holds 'epoch', which is not a tensor"),
    ("other_format", "resnet18", "('resnet18' is a torchvision model: --format=torchvision)"),
    ("no_file", "resnet8", "--checkpoint: no file"),
    ("nan_weight", "resnet8", "--checkpoint: 'layer1.0.conv1.weight' in {path} holds 1 non-finite value (NaN or Inf)"),
    ("inf_weight", "resnet8", "--checkpoint: 'fc.weight' in {path} holds 2 non-finite values (NaN or Inf)"),
    ("negative_variance", "resnet8", "--checkpoint: 'bn1.running_var' in {path} holds a negative variance (-0.5)"),
])
def test_bad_input_is_one_line(case, model, expected, resnet8_100, tmp_path, capsys):
  path = tmp_path / "in.pth"
  if case in ("another_architecture", "other_format"):
    torch.save({"model": resnet8_100}, path)
  elif case == "missing_key":
    torch.save(_bad(resnet8_100, drop=("layer2.0.bn2.running_var",)), path)
  elif case == "extra_key":
    torch.save(_bad(resnet8_100, add={"layer4.0.conv1.weight": torch.zeros(3, 3)}), path)
  elif case == "shape":
    torch.save(_bad(resnet8_100, reshape={"layer1.0.conv2.weight": (16, 16, 5, 5)}), path)
  elif case == "classes":
    torch.save({"model": torch_cifar_models.build("resnet8", 10).state_dict()}, path)
  elif case == "not_a_checkpoint":
    path.write_bytes(b"these are not the weights you are looking for\n" * 10)
  elif case == "pickled_module":
    torch.save(torch_cifar_models.build("resnet8", 100), path)
  elif case == "not_a_state_dict":
    torch.save({"epoch": 240, "weights": resnet8_100}, path)
  elif case in ("nan_weight", "inf_weight", "negative_variance"):
    sd = {k: v.clone() for k, v in resnet8_100.items()}
    if case == "nan_weight":
      sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    elif case == "inf_weight":
      sd["fc.weight"][0, :2] = float("inf")
    else:
      sd["bn1.running_var"][3] = -0.5
    torch.save({"model": sd}, path)
  workdir = tmp_path / "teacher"
  checkpoint = str(path) if case != "no_file" else str(tmp_path / "absent.pth")
  rc, out, err = run_import(capsys, "--format=repdistiller", f"--model={model}", f"--checkpoint={checkpoint}",
                            f"--workdir={workdir}")
  lines = error_lines(err)
  assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --"), err
  assert expected.format(path=repr(str(path))) in lines[0], lines[0]
  assert "Traceback" not in err and not workdir.exists()  # refused before anything was written


def test_missing_torch_names_the_extra(monkeypatch, tmp_path):
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(import_teacher.UserError, match=r"needs torch, the 'import' extra \(pip install"):
    import_teacher.read_state_dict(str(tmp_path / "x.pth"))


# ------------------------------------------------------------------------------------------------- end to end


def fitted_teacher(task) -> torch.nn.Module:
  """A RepDistiller resnet8 worth distilling from on the synthetic task: random (perturbed) features, with its
  classifier fitted to the training part by ridge regression (~28% test accuracy on 100 classes, chance is 1%), so
  that its test accuracy tells a correctly loaded teacher from a wrongly loaded one."""
  module = perturb(torch_cifar_models.build("resnet8", 100), seed=3)
  features = []
  hook = module.fc.register_forward_hook(lambda mod, args, out: features.append(args[0].numpy()))
  torch_logits(module, task.train.inputs)
  hook.remove()
  f = features[0]
  mu, sd = f.mean(0), f.std(0) + 1e-6
  a = np.c_[(f - mu) / sd, np.ones(len(f))]
  w = np.linalg.solve(a.T @ a + 0.1 * np.eye(a.shape[1]), a.T @ np.eye(100)[task.train.labels])
  with torch.no_grad():  # the standardisation folded into the layer
    module.fc.weight.copy_(torch.from_numpy((w[:-1] / sd[:, None]).T.astype(np.float32)))
    module.fc.bias.copy_(torch.from_numpy((w[-1] - (mu / sd) @ w[:-1]).astype(np.float32)))
  return module


def test_import_then_kd_student(tmp_path, capsys, monkeypatch):
  """Import -> a KD student through the CLI on a 32x32x3, 100-class synthetic task: refused by default (the claimed
  training split holds the student's validation part), accepted with teacher.verify_provenance=False and a
  warning; the student's teacher_accuracy is the torch model's test accuracy."""
  from tgeo_jax import data

  config = tiny_config("kd", **{"data.synthetic.input_shape": (32, 32, 3), "data.synthetic.num_classes": 100,
                                "teacher.model": "resnet8"})
  task = data.load(config.data, seed=config.seed)
  module = fitted_teacher(task)
  torch_accuracy = float(np.mean(torch_logits(module, task.test.inputs).argmax(-1) == task.test.labels))
  assert torch_accuracy > 0.1
  # The synthetic task stands in for CIFAR-100: a "published" teacher trained on its whole training split.
  monkeypatch.setitem(import_teacher.DATASETS, "synthetic", import_teacher.Dataset(
      "synthetic", 100, config.data.synthetic.num_train, (32, 32, 3), "the synthetic task's training split"))
  ckpt = tmp_path / "ckpt_epoch_240.pth"
  torch.save({"epoch": 240, "model": module.state_dict()}, ckpt)
  teacher_dir = tmp_path / "teacher"
  args = ("--format=repdistiller", "--model=resnet8", f"--checkpoint={ckpt}", f"--workdir={teacher_dir}",
          "--dataset=synthetic")
  rc, out, err = run_import(capsys, *args)
  assert rc == 0, err
  assert "imported resnet8 (repdistiller, 83,892 parameters" in out and "warning:" in err
  identity = json.loads((teacher_dir / run_identity.IDENTITY_FILE).read_text())
  source = identity["data"]["imported_from"]
  assert source["sha256"] == import_teacher.file_sha256(str(ckpt)) and source["format"] == "repdistiller"
  assert source["wrapper"] == "model" and identity["data"]["digest"] is None
  with np.load(teacher_dir / run_identity.MEMBERSHIP_FILE) as f:
    np.testing.assert_array_equal(f["train"], np.arange(config.data.synthetic.num_train))
  rc, out, _ = run_import(capsys, *args)  # the same import again: already there
  assert rc == 0 and "already holds this import" in out

  config.teacher.checkpoint = str(teacher_dir)
  rc, _, err = run_inprocess(config, tmp_path / "refused", capsys)
  lines = error_lines(err)
  assert rc == 2 and len(lines) == 1, err
  assert f"by that claim it has seen {len(task.val)} of this run's {len(task.val)} validation and 0 of" in lines[0]
  assert "set teacher.verify_provenance=False to accept it" in lines[0]

  config.teacher.verify_provenance = False
  student_dir = tmp_path / "student"
  rc, _, err = run_inprocess(config, student_dir, capsys)
  assert rc == 0, err
  assert any(line.startswith("warning: teacher.checkpoint:") and "imported from" in line and
             "accepted (teacher.verify_provenance=False)" in line for line in err.splitlines()), err
  summary = json.loads((student_dir / "summary.json").read_text())
  assert summary["teacher_accuracy"] == pytest.approx(torch_accuracy, abs=1e-9)
  student_identity = json.loads((student_dir / run_identity.IDENTITY_FILE).read_text())
  assert student_identity["teachers"][0]["run_fingerprint"] == identity["fingerprint"]


# ------------------------------------------------------------------------------------------------------ --check
def doubled_logits(num_classes):
  """RepDistiller's resnet8 whose forward doubles the logits: same keys, another function (a wrong definition)."""

  class DoubledLogits(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.net = torch_cifar_models.build("resnet8", num_classes)

    def forward(self, x):
      return 2 * self.net(x)

    def load_state_dict(self, state_dict, strict=True):
      return self.net.load_state_dict(state_dict, strict=strict)

  return DoubledLogits()


def resnet8(num_classes):
  return torch_cifar_models.build("resnet8", num_classes)


def test_check_compares_the_logits_with_torch_before_writing(resnet8_100, tmp_path, capsys):
  path = tmp_path / "ckpt_epoch_240.pth"
  torch.save({"model": resnet8_100}, path)
  here = __name__
  workdir = tmp_path / "teacher"
  base = ["--format=repdistiller", "--model=resnet8", f"--checkpoint={path}", f"--workdir={workdir}", "--check"]
  rc, out, err = run_import(capsys, *base)
  assert rc == 2 and error_lines(err) == [
      "error: --check: a repdistiller model is checked against its PyTorch definition: pass "
      "--torch_model=MODULE:FUNCTION (e.g. models.resnet:resnet32x4 from a RepDistiller checkout on the Python path), "
      "called with num_classes=K"] and not workdir.exists()
  rc, out, err = run_import(capsys, *base, f"--torch_model={here}:doubled_logits")
  assert rc == 2 and len(error_lines(err)) == 1 and error_lines(err)[0].startswith(
      "error: --check: the imported resnet8's logits differ from PyTorch's on 4 random inputs (relative L2 0.5 > "
      "0.0001"), err
  assert not workdir.exists()
  rc, out, err = run_import(capsys, *base, "--torch_model=no_such_module:f")
  assert rc == 2 and error_lines(err)[0].startswith("error: --torch_model: cannot import 'no_such_module:f'")
  rc, out, err = run_import(capsys, *base, f"--torch_model={here}:resnet8")
  assert rc == 0, err
  check = [line for line in out.splitlines() if line.startswith("check: ")]
  assert len(check) == 1 and "logits equal PyTorch's on 4 random inputs to relative L2" in check[0], out
  assert float(check[0].split("relative L2 ")[1].split()[0]) < 1e-5
  assert workdir.exists()
