"""Bad input through the CLI: one line on stderr naming the field or file, exit status 2, no traceback.

Every case runs ``tgeo_jax.cli.main(argv)`` -- the flag parsing and the run that ``train.py`` calls -- in this
process; a few also run ``python train.py`` in a subprocess (the process contract: exit status, stderr, and the
cases that need another device count).
"""

import os
import re
import shutil
import sys

import numpy as np
import pytest

from conftest import TINY, device_flags, run_cli
from tgeo_jax import cli
from tgeo_jax.data import sources

KD = "--config=configs/fashion_mnist.py:kd"
TGEO = "--config=configs/fashion_mnist.py:tgeo"
FMNIST = "--config.data.name=fashion_mnist"


def fake_fashion_mnist(directory, kind):
  """Fashion-MNIST IDX files (as Debian's package lays them out) with one defect named by ``kind``."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  for split, n in (("train", 120), ("t10k", 40)):
    count = 0 if kind == "no_examples" else n
    size = 32 if kind == "images_32x32" else 28
    labels = np.arange(count) % 10
    if kind == "label_12" and split == "train":
      labels[5] = 12
    sources.write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte"), rng.integers(0, 256, (count, size, size)))
    label_path = os.path.join(directory, f"{split}-labels-idx1-ubyte")
    if kind == "zero_byte_labels" and split == "train":
      open(label_path, "wb").close()
    elif not (kind == "missing_labels" and split == "t10k"):
      sources.write_idx(label_path, labels)
  return directory


def corrupt_copy(run_dir, directory):
  """A copy of a finished run whose latest checkpoint has garbled array data."""
  shutil.copytree(run_dir, directory)
  ckpt_dir = os.path.join(directory, "checkpoints")
  latest = max(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  for root, _, files in os.walk(os.path.join(ckpt_dir, str(latest), "state")):
    for f in files:
      if os.path.basename(root) == "d":
        data = bytearray(open(os.path.join(root, f), "rb").read())
        for i in range(len(data) // 2, min(len(data), len(data) // 2 + 16)):
          data[i] ^= 0x5A
        open(os.path.join(root, f), "wb").write(bytes(data))
  return directory


# (case id, extra CLI args, regex the error line must match). "{teacher}" is the tiny teacher's work directory.
CASES = [
    ("unknown_cifar_pair", ["--config=configs/cifar100.py:resnet50_mobilenetv2:kd"],
     r"--config=configs/cifar100.py.*unknown pair 'resnet50_mobilenetv2'"),
    ("unknown_method", ["--config=configs/fashion_mnist.py:nope"], r"method: unknown method 'nope'"),
    ("unknown_model", ["--config.model.name=resnet1000"], r"model.name: unknown model 'resnet1000'"),
    ("unknown_dataset", ["--config.data.name=mnist3d"], r"data.name: unknown dataset 'mnist3d'"),
    ("missing_data_dir", ["--config.data.name=fashion_mnist", "--config.data.dir=/nonexistent"],
     r"data.dir: .*apt-get install dataset-fashion-mnist.*--config.data.dir"),
    ("zero_batch", ["--config.batch_size=0"], r"batch_size: expected a positive integer, got 0"),
    ("negative_epochs", ["--config.num_epochs=-1"], r"num_epochs: expected a positive integer"),
    ("wrong_type", ["--config.num_epochs=abc"], r"--config.num_epochs=abc"),
    ("unknown_field", ["--config.nope=1"], r"--config.nope: no such config field \(nope\)$"),
    ("field_typo", ["--config.kd.temprature=3"],
     r'^error: --config.kd.temprature: no such config field \(temprature; did you mean "temperature" instead of '
     r'"temprature"\?\)$'),
    ("no_teacher_cifar100", ["--config=configs/cifar100.py:resnet32x4_resnet8x4:kd", "--config.data.mock=True",
                             "--config.data.name=cifar100"],
     r"teacher.checkpoint: method 'kd' needs a trained teacher; train one with 'python train.py "
     r"--config=configs/cifar100.py:teacher:cnn_tiny --workdir=DIR --config.data.mock=True' and pass"),
    ("missing_config_file", ["--config=configs/nope.py:kd"], r"--config: .*configs/nope.py"),
    ("val_fraction", ["--config.data.val_fraction=1.5"], r"data.val_fraction: expected a fraction in \(0, 1\)"),
    ("learning_rate", ["--config.optimizer.learning_rate=0.0"], r"optimizer.learning_rate: expected a positive"),
    ("temperature", ["--config.kd.temperature=0.0"], r"kd.temperature: expected a positive number"),
    ("unknown_optimizer", ["--config.optimizer.name=lamb"], r"optimizer.name: unknown optimizer 'lamb'"),
    ("unknown_augment", ["--config.data.augment=mixup"], r"data.augment: unknown augmentation 'mixup'"),
    ("batch_exceeds_data", ["--config.batch_size=4096"], r"batch_size: 4096 exceeds the 462 training"),
    ("no_teacher", [], r"teacher.checkpoint: method 'kd' needs a trained teacher"),
    ("teacher_missing", ["--config.teacher.checkpoint=/nonexistent"], r"teacher.checkpoint: no checkpoint"),
    ("teacher_other_model", ["--config.teacher.checkpoint={teacher}", "--config.teacher.model=mlp_tiny"],
     r"teacher.checkpoint: .*does not match"),
    ("batch_not_divisible", ["--config.teacher.checkpoint={teacher}", "--config.batch_size=30"],
     r"batch_size: 30 must be a positive multiple of the device count \(4\)"),
    ("teacher_corrupt", ["--config.teacher.checkpoint={corrupt_teacher}"],
     r"teacher.checkpoint: checkpoint .*/checkpoints/28 is corrupt: "),
    # Data files: Fashion-MNIST IDX directories with one defect each.
    ("label_out_of_range", [FMNIST, "--config.data.dir={data:label_12}"],
     r"train-labels-idx1-ubyte: labels must be in \[0, 10\), found 12"),
    ("images_wrong_shape", [FMNIST, "--config.data.dir={data:images_32x32}"],
     r"train-images-idx3-ubyte: expected images of shape \[N, 28, 28\], got \(120, 32, 32\)"),
    ("no_examples", [FMNIST, "--config.data.dir={data:no_examples}"],
     r"data: the train split of 'fashion_mnist' is empty"),
    ("zero_byte_file", [FMNIST, "--config.data.dir={data:zero_byte_labels}"],
     r"/train-labels-idx1-ubyte: not an unsigned-byte IDX file"),
    ("missing_data_file", [FMNIST, "--config.data.dir={data:missing_labels}"],
     r"data.dir: Fashion-MNIST IDX files not found in .* \(expected t10k-labels-idx1-ubyte\[.gz\]\)"),
    # Numeric ranges and names.
    ("negative_weight_decay", ["--config.optimizer.weight_decay=-0.1"],
     r"optimizer.weight_decay: expected a number >= 0, got -0.1"),
    ("momentum_above_one", ["--config.optimizer.momentum=1.5"],
     r"optimizer.momentum: expected a momentum in \[0, 1\), got 1.5"),
    ("negative_checkpoint_interval", ["--config.checkpoint.every_steps=-2"],
     r"checkpoint.every_steps: expected an integer >= 0"),
    ("unknown_nonfinite_mode", ["--config.nonfinite=explode"], r"nonfinite: expected 'stop' or 'skip', got 'explode'"),
    ("unknown_tgeo_layout", [TGEO, "--config.tgeo.layout=nope"], r"tgeo.layout: expected one of \[.*'reference'.*\], "
                                                                  r"got 'nope'"),
    ("infinite_learning_rate", ["--config.optimizer.learning_rate=inf"],
     r"optimizer.learning_rate: expected a positive number, got inf"),
    ("infinite_temperature", ["--config.kd.temperature=inf"], r"kd.temperature: expected a positive number, got inf"),
    ("nan_weight_decay", ["--config.optimizer.weight_decay=nan"], r"optimizer.weight_decay: expected a number >= 0"),
    ("huge_seed", [f"--config.seed={2**63}"], r"seed: expected an integer in \[0, 2\*\*32\), got 9223372036854775808"),
    ("decay_epochs_not_numbers", ["--config.optimizer.decay_epochs=('a',)"],
     r"optimizer.decay_epochs: expected a list of epochs > 0"),
    ("empty_synthetic_shape", ["--config.data.synthetic.input_shape=(0,0,0)"],
     r"data.synthetic.input_shape: expected a shape of positive integers"),
    ("tfds_name_without_tfds", ["--config.data.tfds_name=cifar100"],
     r"data.tfds_name: 'cifar100' names a TFDS dataset, but data.name 'synthetic' does not read TFDS"),
    ("lock_is_a_symlink", ["{lock_symlink}"], r"workdir: .*/\.lock' is a symbolic link"),
    ("checkpoints_is_a_file", ["{checkpoints_file}"], r"workdir: .*/checkpoints' is a file, expected the checkpoint "
                                                      r"directory"),
    ("skip_with_unroll", [TGEO, "--config.tgeo.hypergrad=unroll", "--config.tgeo.unroll_steps=2",
                          "--config.nonfinite=skip"],
     r"^error: nonfinite: 'skip' cannot be combined with tgeo.hypergrad='unroll' \(a skipped step would leave the "
     r"unroll window's recorded steps out of line with the host's\); use nonfinite='stop'$"),
    ("unknown_tgeo_ordering", [TGEO, "--config.tgeo.ordering=nope"],
     r"tgeo.ordering: expected 'reuse' or 'lookahead', got 'nope'"),
    ("unknown_compute_dtype", ["--config.compute_dtype=float16"],
     r"compute_dtype: expected one of \['float32', 'bfloat16'\]"),
    ("negative_data_workers", ["--config.data.workers=-1"],
     r"data.workers: expected None \(auto\) or an integer >= 0 \(worker processes\), got -1"),
    ("label_noise_out_of_range", ["--config.data.label_noise=1.5"],
     r"data.label_noise: expected a fraction in \[0, 1\), got 1.5"),
    ("unknown_alpha_normalization", [TGEO, "--config.tgeo.alpha_normalization=softmax"],
     r"tgeo.alpha_normalization: expected 'none' or 'center', got 'softmax'"),
    # The hypergradient variants (docs/methods.md §7).
    ("unknown_hypergrad", [TGEO, "--config.tgeo.hypergrad=darts"],
     r"tgeo.hypergrad: expected one of \['one_step', 'unroll', 'implicit', 'head_only'\], got 'darts'"),
    ("unroll_zero_steps", [TGEO, "--config.tgeo.hypergrad=unroll", "--config.tgeo.unroll_steps=0"],
     r"tgeo.unroll_steps: expected a positive integer, got 0"),
    ("unroll_steps_without_unroll", [TGEO, "--config.tgeo.unroll_steps=4"],
     r"tgeo.unroll_steps: a window of 4 steps is used by tgeo.hypergrad='unroll' only"),
    ("unroll_with_lookahead", [TGEO, "--config.tgeo.hypergrad=unroll", "--config.tgeo.unroll_steps=2",
                               "--config.tgeo.ordering=lookahead"],
     r"tgeo.ordering: tgeo.hypergrad='unroll' takes the window's steps as the student's real steps"),
    ("window_longer_than_epoch", [TGEO, "--config.teacher.checkpoint={teacher}", "--config.tgeo.hypergrad=unroll",
                                  "--config.tgeo.unroll_steps=20"],
     r"tgeo.unroll_steps: a window of 20 steps is longer than an epoch \(14 steps of batch_size 32\)"),
    ("implicit_negative_terms", [TGEO, "--config.tgeo.hypergrad=implicit", "--config.tgeo.implicit_solver=neumann",
                                 "--config.tgeo.implicit_terms=-1"],
     r"tgeo.implicit_terms: expected an integer >= 0, got -1"),
    ("implicit_zero_damping", [TGEO, "--config.tgeo.hypergrad=implicit", "--config.tgeo.implicit_damping=0.0"],
     r"tgeo.implicit_damping: expected a positive number, got 0.0"),
    ("implicit_unknown_solver", [TGEO, "--config.tgeo.implicit_solver=gmres"],
     r"tgeo.implicit_solver: expected one of \['neumann', 'cg'\], got 'gmres'"),
    ("profile_steps_not_a_range", ["--config.log.profile_steps=5"],
     r"log.profile_steps: expected 'A:B' with 0 <= A < B \(the steps to trace\), got '5'"),
    ("profile_steps_reversed", ["--config.log.profile_steps=4:2"], r"log.profile_steps: expected 'A:B'.*got '4:2'"),
    ("profile_steps_outside_the_run", ["--config.teacher.checkpoint={teacher}", "--config.log.profile_steps=10:99"],
     r"log.profile_steps: 10:99 reaches past the run's 14 steps \(expected B <= 14\)"),
    ("compilation_cache_not_writable", ["--config.compilation_cache_dir={file}/cache"],
     r"compilation_cache_dir: cannot write in '.*/a_file/cache' \(.*\); expected a writable directory"),
]


# Cases that need a process of their own (another device count) or check the process contract end to end.
SUBPROCESS = {"batch_not_divisible", "unknown_field", "teacher_corrupt"}


def run_main(args, capsys):
  """``cli.main(["train.py", *args])`` in this process: (exit status, stdout, stderr)."""
  capsys.readouterr()
  rc = cli.main(["train.py", *args])
  out, err = capsys.readouterr()
  return rc, out, err


@pytest.mark.parametrize("name,args,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, args, pattern, tiny_teacher, tmp_path, capsys):
  args = [a.replace("{teacher}", tiny_teacher) for a in args]
  if any("{corrupt_teacher}" in a for a in args):
    corrupt = corrupt_copy(tiny_teacher, str(tmp_path / "corrupt_teacher"))
    args = [a.replace("{corrupt_teacher}", corrupt) for a in args]
  if any("{file}" in a for a in args):
    (tmp_path / "a_file").write_text("not a directory")
    args = [a.replace("{file}", str(tmp_path / "a_file")) for a in args]
  args = [re.sub(r"\{data:(\w+)\}", lambda m: fake_fashion_mnist(str(tmp_path / m.group(1)), m.group(1)), a)
          for a in args]
  if "{lock_symlink}" in args or "{checkpoints_file}" in args:  # a prepared work directory
    os.makedirs(tmp_path / "run")
    if "{lock_symlink}" in args:
      victim = tmp_path / "victim.txt"
      victim.write_text("precious")
      os.symlink(victim, tmp_path / "run" / ".lock")
    else:
      (tmp_path / "run" / "checkpoints").write_text("not a directory")
    args = [a for a in args if a not in ("{lock_symlink}", "{checkpoints_file}")]
  config = [a for a in args if a.startswith("--config=")] or [KD]
  rest = [a for a in args if not a.startswith("--config=")]
  argv = [*config, f"--workdir={tmp_path / 'run'}", *TINY, *rest]
  if name in SUBPROCESS:
    env = {"XLA_FLAGS": device_flags(4)} if name == "batch_not_divisible" else None
    proc = run_cli(argv, env=env, check=False, process=True)
    rc, stderr = proc.returncode, proc.stderr
  else:
    rc, _, stderr = run_main(argv, capsys)
  assert rc == 2, (rc, stderr)
  lines = [line for line in stderr.splitlines() if line.strip() and "warn" not in line.lower()]
  assert len(lines) == 1, stderr
  assert "Traceback" not in stderr
  assert lines[0].startswith("error: ")
  assert re.search(pattern, lines[0]), lines[0]
  if name == "lock_is_a_symlink":
    assert (tmp_path / "victim.txt").read_text() == "precious"  # the link's target untouched
  elif name != "checkpoints_is_a_file":  # (those two work directories existed before)
    assert not os.path.exists(tmp_path / "run"), os.listdir(tmp_path / "run")  # a refused run leaves no directory


def test_resume_with_another_config_is_refused(tiny_teacher, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  rc, _, err = run_main(["--config=configs/fashion_mnist.py:ce", f"--workdir={workdir}", *TINY], capsys)
  assert rc == 0, err
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  ce = "--config=configs/fashion_mnist.py:ce"
  changes = [  # (config + overrides, the difference the error names)
      ([ce, "--config.model.name=mlp_tiny"], "model.name: 'cnn_tiny' -> 'mlp_tiny'"),
      ([ce, "--config.data.synthetic.num_classes=5"], "data.synthetic.num_classes: 10 -> 5"),
      ([KD, f"--config.teacher.checkpoint={tiny_teacher}"], "method: 'ce' -> 'kd'"),
  ]
  for args, expected in changes:
    rc, _, err = run_main([*args[:1], f"--workdir={workdir}", *TINY, *args[1:]], capsys)
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip() and "warn" not in line.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0] and "nothing was read or written" in lines[0], lines[0]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def _assert_one_line_error(proc, pattern):
  assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
  lines = [line for line in proc.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert re.search(pattern, lines[0]), lines[0]


def test_a_stray_positional_argument_is_one_line(tmp_path):
  proc = run_cli(["--config=configs/fashion_mnist.py:ce", f"--workdir={tmp_path / 'run'}", "extra"], check=False,
                 process=True)
  _assert_one_line_error(proc, r"unexpected argument 'extra' \(every setting is a flag")


def test_missing_required_flags_are_one_line(capsys):
  rc, _, err = run_main(["--config=configs/fashion_mnist.py:ce"], capsys)
  assert rc == 2 and err.strip() == "error: --workdir: required, e.g. --workdir=runs/kd", err


def test_wandb_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, installed or not
  rc, _, err = run_main(["--config=configs/fashion_mnist.py:ce", f"--workdir={tmp_path / 'run'}", *TINY,
                         "--config.log.wandb=True"], capsys)
  _assert_one_line(rc, err, r"^error: log.wandb: True needs wandb: pip install 'tgeo_jax\[wandb\]' \(or set "
                            r"log.wandb=False\)$")


def test_data_mock_without_mock_data_is_one_line(tmp_path, capsys):
  rc, _, err = run_main(["--config=configs/fashion_mnist.py:ce", f"--workdir={tmp_path / 'run'}", *TINY,
                         "--config.data.mock=True"], capsys)
  _assert_one_line(rc, err, r"^error: data.mock: True works for the TFDS datasets \['cifar100', 'imagenet2012'\] "
                            r"only; data.name is 'synthetic'$")


def test_csv_with_a_non_numeric_column(tmp_path, capsys):
  rows = ["f1,f2,label"] + [f"{i},{'abc' if i == 3 else i * 2},{i % 3}" for i in range(12)]
  (tmp_path / "attack.csv").write_text("\n".join(rows) + "\n")
  rc, _, err = run_main(["--config=configs/attack.py:ce", f"--workdir={tmp_path / 'run'}",
                         f"--config.data.dir={tmp_path}", "--config.data.file=attack.csv",
                         "--config.log.progress=False"], capsys)
  _assert_one_line(rc, err, r"attack.csv.*line 5.*'abc'")


def test_criteo_line_with_the_wrong_field_count(tmp_path, capsys):
  good = "\t".join(["1"] + [str(i) for i in range(13)] + ["68fd1e64"] * 26)
  lines = [good] * 6 + ["0\t1\t2"] + [good] * 3
  (tmp_path / "dac.txt").write_text("\n".join(lines) + "\n")
  rc, _, err = run_main(["--config=configs/criteo.py:ce", f"--workdir={tmp_path / 'run'}",
                         f"--config.data.dir={tmp_path}", "--config.data.file=dac.txt",
                         "--config.log.progress=False"], capsys)
  _assert_one_line(rc, err, r"dac.txt: line 7 has 3 tab-separated fields, expected 40")


def _assert_one_line(rc, stderr, pattern):
  assert rc == 2, (rc, stderr)
  lines = [line for line in stderr.splitlines() if line.strip() and "warn" not in line.lower()]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr
  assert re.search(pattern, lines[0]), lines[0]
