"""TFDS-backed CIFAR-100 / ImageNet sources and configs, on ``tfds.testing.mock_data`` (no download)."""

import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import ROOT, run_cli

tfds = pytest.importorskip("tensorflow_datasets")

from tgeo_jax import methods, run_identity  # noqa: E402
from tgeo_jax import data as data_lib  # noqa: E402
from tgeo_jax.data import augment, tfds_sources  # noqa: E402
from tgeo_jax.errors import UserError  # noqa: E402


def _config_module(name):
  spec = importlib.util.spec_from_file_location(f"test_cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _mock(n):
  # USE_CODE: mock records generated from the builder's feature spec (no metadata files needed).
  return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


def test_cifar100_source_shapes_labels_normalisation():
  config = _config_module("cifar100").get_config("resnet32x4_resnet8x4:kd")
  config.data.in_memory = "off"  # the per-record source (in memory: tests/test_tfds_local.py)
  with _mock(40):
    raw = tfds_sources.cifar100(config.data)
    assert raw.num_classes == 100 and raw.input_shape == (32, 32, 3)
    assert len(raw.train) == 40 and raw.train.labels.dtype == np.int32
    assert raw.train.labels.min() >= 0 and raw.train.labels.max() < 100
    x = raw.train.gather(np.array([3, 0, 7]))
    assert x.shape == (3, 32, 32, 3) and x.dtype == np.float32
    record = raw.train.src[3]
    assert int(record["label"]) == raw.train.labels[3]
    expected = (np.asarray(record["image"], np.float32) / 255.0 - tfds_sources.CIFAR100_MEAN) / \
        tfds_sources.CIFAR100_STD
    np.testing.assert_allclose(x[0], expected, rtol=1e-5, atol=1e-5)
    config.data.in_memory = "auto"  # on for CIFAR-100: decoded once, the same pixels
    in_memory = tfds_sources.cifar100(config.data)
    assert isinstance(in_memory.train, data_lib.sources.ArraySource) and in_memory.digest == raw.digest
    np.testing.assert_array_equal(in_memory.train.gather(np.array([3, 0, 7])), x)
    task = data_lib.load(config.data, seed=0)
    assert len(task.train) + len(task.val) == 40
    assert task.augment is augment.crop_flip_cifar100


def test_crop_flip_cifar100_pads_with_black_raw_pixels():
  images = np.full((8, 32, 32, 3), 5.0, np.float32)
  out = augment.crop_flip_cifar100(images, np.random.default_rng(0))
  black = -tfds_sources.CIFAR100_MEAN / tfds_sources.CIFAR100_STD
  assert out.shape == images.shape
  values = out.reshape(-1, 3)
  is_pad = np.all(np.isclose(values, black), axis=1)
  assert np.all(is_pad | np.all(values == 5.0, axis=1)) and is_pad.any()


def test_imagenet_sources_and_crop():
  config = _config_module("imagenet").get_config("kd")
  assert (config.model.name, config.teacher.model) == ("resnet18", "resnet34")
  with _mock(6):
    raw = tfds_sources.imagenet2012(config.data)
    assert raw.input_shape == (224, 224, 3)
    train = raw.train.gather(np.array([0, 1]))
    test = raw.test.gather(np.array([0, 1, 2]))
    assert train.shape == (2, 256, 256, 3) and test.shape == (3, 224, 224, 3)
    from tgeo_jax.data import sources
    _, val, _ = raw.finalize(sources.subset(raw.train, [2, 3, 4, 5]), sources.subset(raw.train, [0, 1]), raw.test)
    assert val.gather(np.arange(2)).shape == (2, 224, 224, 3)
  crops = augment.imagenet_crop_flip(train, np.random.default_rng(0))
  assert crops.shape == (2, 224, 224, 3) and crops.dtype == np.float32 and np.isfinite(crops).all()


def test_cifar100_configs():
  module = _config_module("cifar100")
  c = module.get_config("resnet32x4_shufflev2:dist")
  assert (c.teacher.model, c.model.name, c.method) == ("resnet32x4", "shufflev2", "dist")
  assert c.optimizer.learning_rate == 0.01 and c.num_epochs == 240 and c.batch_size == 64
  assert tuple(c.optimizer.decay_epochs) == (150, 180, 210) and c.teacher.cache_logits == "off"
  t = module.get_config("teacher:resnet32x4")
  assert (t.method, t.model.name, t.optimizer.learning_rate) == ("ce", "resnet32x4", 0.05)
  for pair in module.PAIRS:
    module.get_config(f"{pair}:kd")
  with pytest.raises(ValueError):
    module.get_config("resnet50_mobilenetv2:kd")


def test_cifar100_config_smoke_test_with_data_mock(tmp_path):
  """The paper configs from the CLI on ``data.mock=True`` (no data anywhere): a CE teacher, then KD from it with the
  teacher re-run on every augmented batch (teacher.cache_logits='off'); both labelled as mock data."""
  tiny = ["--config.data.mock=True", "--config.data.mock_examples=64", "--config.num_epochs=1",
          "--config.batch_size=16", "--config.val_batch_size=8", "--config.eval_batch_size=64",
          "--config.log.progress=False", "--config.optimizer.schedule=constant"]
  teacher = str(tmp_path / "teacher")
  proc = run_cli(["--config=configs/cifar100.py:teacher:resnet8", f"--workdir={teacher}", *tiny])
  assert "warning: data.mock=True: 'cifar100' is TFDS MOCK data (64 random examples per split)" in proc.stderr
  kd = str(tmp_path / "kd")
  proc = run_cli(["--config=configs/cifar100.py:resnet32x4_resnet8x4:kd", f"--workdir={kd}", *tiny,
                  "--config.model.name=resnet8", "--config.teacher.model=resnet8",
                  f"--config.teacher.checkpoint={teacher}"])
  assert "NOT the real dataset" in proc.stderr.splitlines()[0]  # the first thing the run says
  for workdir, method in ((teacher, "ce"), (kd, "kd")):
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    assert summary["method"] == method and summary["finished"] and 0.0 <= summary["accuracy"] <= 1.0
    assert summary["data_mock"] is True and summary["config"]["data.mock"] is True and summary["data"]["digest"].startswith("mock-")
    assert summary["data"]["sizes"]["train"] + summary["data"]["sizes"]["val"] == 64
  assert summary["teachers"][0]["model"] == "resnet8" and "teacher_accuracy" in summary
  # Never the fingerprint of a real-data run: the config part differs (data.mock), and so does the data digest.
  real = _config_module("cifar100").get_config("resnet32x4_resnet8x4:kd")
  assert run_identity.config_fingerprint(real) != summary["config_fingerprint"]


def test_mock_data_is_for_tfds_datasets_only():
  config = _config_module("cifar100").get_config("teacher:resnet8")
  config.data.mock = True
  config.data.name = "fashion_mnist"
  with pytest.raises(UserError, match=r"^data.mock: True works for the TFDS datasets \['cifar100', "
                                      r"'imagenet2012'\] only; data.name is 'fashion_mnist'$"):
    methods.validate_config(config)


def test_imagenet_config_opens_on_data_mock(capsys):
  config = _config_module("imagenet").get_config("kd")
  config.data.mock, config.data.mock_examples = True, 4
  raw = tfds_sources.imagenet2012(config.data)
  assert "warning: data.mock=True: 'imagenet2012' is TFDS MOCK data" in capsys.readouterr().err
  assert len(raw.train) == len(raw.test) == 4 and raw.digest.startswith("mock-")
  assert raw.test.gather(np.arange(2)).shape == (2, 224, 224, 3)  # records still readable after the mock context


def test_missing_dataset_is_one_line(tmp_path):
  empty = str(tmp_path / "tfds")
  os.makedirs(empty)
  with pytest.raises(UserError, match="not prepared"):
    tfds_sources.open_split("cifar100", "train", empty)
  proc = run_cli(["--config=configs/cifar100.py:resnet32x4_resnet8x4:kd", f"--workdir={tmp_path / 'w'}",
                  f"--config.data.dir={empty}"], check=False)
  assert proc.returncode == 2, proc.stderr
  lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "python -m tgeo_jax.prepare cifar100 --archive=" in lines[0] and empty in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr


# Every registered method on mock CIFAR-100 through the CLI, with the paper config's own defaults (DKD's 20-epoch
# warm-up, a validation batch of 64) and the smallest model the path allows: data.mock adapts what a one-epoch
# smoke test cannot satisfy, with a warning line per change.
MOCK_SMOKE = ["--config.data.mock=True", "--config.data.mock_examples=64", "--config.num_epochs=1",
              "--config.batch_size=16", "--config.log.progress=False", "--config.model.name=cnn_tiny",
              "--config.teacher.model=cnn_tiny"]


@pytest.fixture(scope="module")
def mock_teacher(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mock_teacher"))
  proc = run_cli(["--config=configs/cifar100.py:teacher:resnet8", f"--workdir={workdir}", *MOCK_SMOKE])
  assert proc.returncode == 0, proc.stderr
  return workdir


def _methods():
  from tgeo_jax import methods
  return methods.available()


@pytest.mark.parametrize("method", _methods())
def test_every_method_smoke_tests_on_mock_data(method, mock_teacher, tmp_path):
  workdir = str(tmp_path / method)
  extra = [f"--config.trikd.anchor_checkpoint={mock_teacher}"] if method == "trikd" else []
  proc = run_cli([f"--config=configs/cifar100.py:resnet32x4_resnet8x4:{method}", f"--workdir={workdir}",
                  *MOCK_SMOKE, f"--config.teacher.checkpoint={mock_teacher}", *extra], check=False)
  assert proc.returncode == 0, proc.stderr
  notes = [line for line in proc.stderr.splitlines() if line.startswith("warning: data.mock=True: ") and "->" in line]
  from tgeo_jax import methods
  expected = []
  if method == "dkd":
    expected.append("warning: data.mock=True: dkd.warmup_epochs 20 -> 1 (num_epochs), so the smoke test can run")
  if methods.get_class(method).uses_validation_batch:
    expected.append("warning: data.mock=True: val_batch_size 64 -> 12 (the mock split holds out 12 validation "
                    "examples), so the smoke test can run")
  assert notes == expected, proc.stderr
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["finished"] and summary["data_mock"] is True and summary["method"] == method
  if method == "tgeo":  # the same command resumes: the fitted batch is part of the recorded config
    again = run_cli([f"--config=configs/cifar100.py:resnet32x4_resnet8x4:{method}", f"--workdir={workdir}",
                     *MOCK_SMOKE, f"--config.teacher.checkpoint={mock_teacher}"], check=False)
    assert again.returncode == 0, again.stderr
