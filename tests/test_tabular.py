"""Tabular tasks: the attack-detection CSV and Criteo readers, train-only preprocessing, binary metrics, CLI runs."""

import json
import math
import os

import numpy as np
import pytest

from conftest import ROOT, run_cli
from tgeo_jax import data, default_config, metrics
from tgeo_jax.data import tabular
from tgeo_jax.errors import UserError


def load_config(name: str, arg: str):
  return default_config.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), arg)


# ----------------------------------------------------------------------------------------------- files


def write_attack_csv(path, n=300, *, num_features=4, header=True, probs=(0.6, 0.3, 0.1), seed=0):
  """A learnable, imbalanced 3-class task: class prototypes plus noise; returns (features, labels) as written."""
  rng = np.random.default_rng(seed)
  labels = rng.choice(len(probs), size=n, p=probs)
  prototypes = 3.0 * rng.normal(size=(len(probs), num_features))
  features = np.round(prototypes[labels] + rng.normal(size=(n, num_features)), 4)
  with open(path, "w") as f:
    if header:
      f.write(",".join([f"f{i}" for i in range(num_features)] + ["label"]) + "\n")
    for x, y in zip(features, labels):
      f.write(",".join(f"{v:.4f}" for v in x) + f",{y}\n")
  return features, labels


def criteo_line(label, dense, cats):
  """One Criteo line: label, 13 dense (None = missing), 26 categoricals (None = missing)."""
  fields = [str(label)] + ["" if v is None else str(v) for v in dense] + ["" if c is None else c for c in cats]
  assert len(fields) == 40
  return "\t".join(fields)


def write_criteo(path, n=400, *, seed=0):
  """Lines in the exact Criteo text format with ~15% missing dense and ~10% missing categorical values; the label
  depends on I1 and C1 so a model can learn it."""
  rng = np.random.default_rng(seed)
  lines = []
  for _ in range(n):
    label = int(rng.random() < 0.3)
    dense = [None if rng.random() < 0.15 else int(rng.integers(0, 40)) + 30 * label * (j == 0) for j in range(13)]
    cats = [None if rng.random() < 0.1 else format(int(rng.integers(0, 12)) + 6 * label * (j == 0), "08x")
            for j in range(26)]
    lines.append(criteo_line(label, dense, cats))
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------- metrics


def test_average_ranks_ties():
  np.testing.assert_allclose(metrics.average_ranks(np.array([10, 20, 20, 5])), [2, 3.5, 3.5, 1])
  np.testing.assert_allclose(metrics.average_ranks(np.array([1.0, 1.0, 1.0])), [2, 2, 2])


def test_roc_auc_hand_values():
  assert metrics.roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
  # Pairs (pos, neg): (.5,.2)=1, (.5,.5)=1/2, (.9,.2)=1, (.9,.5)=1 -> 3.5 / 4.
  assert metrics.roc_auc(np.array([0, 0, 1, 1]), np.array([0.2, 0.5, 0.5, 0.9])) == pytest.approx(0.875)
  assert metrics.roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
  assert metrics.roc_auc(np.array([1, 0]), np.array([0.9, 0.1])) == 1.0
  assert metrics.roc_auc(np.array([1, 0]), np.array([0.1, 0.9])) == 0.0
  assert math.isnan(metrics.roc_auc(np.array([1, 1]), np.array([0.1, 0.9])))


def test_roc_auc_matches_pairwise_count_with_ties():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 2, size=300)
  scores = rng.integers(0, 12, size=300) / 12.0  # many ties
  pos, neg = scores[labels == 1], scores[labels == 0]
  diff = pos[:, None] - neg[None, :]
  expected = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
  assert metrics.roc_auc(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_log_loss_hand_values_and_clipping():
  expected = -(math.log(0.8) + math.log(0.7)) / 2
  assert metrics.log_loss(np.array([1, 0]), np.array([0.8, 0.3])) == pytest.approx(expected)
  # Confidently wrong predictions are clipped to eps = 1e-7 instead of +inf.
  assert metrics.log_loss(np.array([0, 1]), np.array([1.0, 0.0])) == pytest.approx(-math.log(1e-7), rel=1e-6)
  assert metrics.log_loss(np.array([1, 0]), np.array([1.0, 0.0])) == pytest.approx(-math.log1p(-1e-7))


# ----------------------------------------------------------------------------------------------- attack CSV


def test_read_numeric_csv_with_and_without_header(tmp_path):
  path = tmp_path / "h.csv"
  path.write_text("a,b,label\n1,2.5,0\n\n-3,4e1,2\n")
  x, y, names = tabular.read_numeric_csv(str(path))
  np.testing.assert_array_equal(x, [[1, 2.5], [-3, 40]])
  np.testing.assert_array_equal(y, [0, 2])
  assert names == ["a", "b", "label"]
  path.write_text("1,2.5,0\n-3,4e1,2\n")
  x, y, names = tabular.read_numeric_csv(str(path))
  assert names is None and x.shape == (2, 2)
  np.testing.assert_array_equal(y, [0, 2])
  # An all-numeric header (e.g. pandas' integer column names) needs data.header='yes'.
  path.write_text("0,1,2\n1,2.5,0\n")
  x, y, _ = tabular.read_numeric_csv(str(path), header="yes")
  np.testing.assert_array_equal(y, [0])


@pytest.mark.parametrize("text,message", [
    ("a,b,label\n1,2,0\n3,oops,1\n", ["line 3", "column 2 ('b')", "'oops'"]),
    ("1,2,0\n3,,1\n", ["line 2", "column 2", "''"]),
    ("1,2,0\n3,nan,1\n", ["line 2", "column 2", "'nan'"]),
    ("a,b,label\n1,2,0\n3,4\n", ["line 3", "2 columns, expected 3"]),
    ("a,b,label\n1,2,0.5\n", ["line 2", "the label", "'0.5'", "not an integer"]),
    ("", ["empty"]),
    ("\n\n", ["empty"]),
    ("a,b,label\n", ["header but no data rows"]),
])
def test_read_numeric_csv_errors_name_file_line_and_column(tmp_path, text, message):
  path = tmp_path / "bad.csv"
  path.write_text(text)
  with pytest.raises(UserError) as e:
    tabular.read_numeric_csv(str(path))
  for part in [str(path), *message]:
    assert part in str(e.value)


def test_attack_labels_outside_num_classes(tmp_path):
  path = tmp_path / "a.csv"
  path.write_text("1,2,0\n3,4,3\n5,6,1\n")
  c = load_config("attack", "ce")
  c.data.file = str(path)
  with pytest.raises(UserError, match=r"a.csv: line 2, column 3 \(the label\): '3' is outside \[0, 3\)"):
    data.load(c.data, seed=0)


def test_random_oversample_balances_and_keeps_every_example():
  labels = np.array([0] * 7 + [1] * 3 + [2] * 1)
  idx = tabular.random_oversample(labels, seed=5)
  assert np.bincount(labels[idx]).tolist() == [7, 7, 7]
  assert set(range(len(labels))) <= set(idx.tolist())
  np.testing.assert_array_equal(idx, tabular.random_oversample(labels, seed=5))


def test_attack_scaling_fitted_on_train_only_and_oversampling_on_train_only(tmp_path):
  features, labels = write_attack_csv(tmp_path / "train.csv", n=300)
  # A separate test file with values far outside the training range.
  test_x = np.array([[1000.0, -1000.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
  (tmp_path / "test.csv").write_text("".join(",".join(map(str, x)) + f",{i}\n" for i, x in enumerate(test_x)))
  c = load_config("attack", "ce")
  c.data.dir, c.data.file, c.data.test_file = str(tmp_path), "train.csv", "test.csv"
  c.data.val_fraction = 0.2
  task = data.load(c.data, seed=0)

  # Recompute the student's training part exactly as data.load splits it, before preprocessing.
  kept, held = data.stratified_split(labels, 0.2, c.data.split_seed)
  lo, hi = features[kept].min(0), features[kept].max(0)
  scale = lambda x: (x - lo) / (hi - lo)  # noqa: E731
  assert task.input_shape == (4,) and task.num_classes == 3
  np.testing.assert_allclose(task.val.inputs, scale(features[held]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(task.test.inputs, scale(test_x), rtol=1e-5, atol=1e-6)
  assert task.test.inputs.max() > 1 and task.test.inputs.min() < 0  # not refitted, not clipped
  np.testing.assert_allclose(task.train.inputs.min(0), 0.0, atol=1e-6)
  np.testing.assert_allclose(task.train.inputs.max(0), 1.0, atol=1e-6)
  # Oversampling: the training part is balanced; validation and test keep their own counts.
  train_counts = np.bincount(task.train.labels, minlength=3)
  assert train_counts.min() == train_counts.max() == np.bincount(labels[kept]).max()
  np.testing.assert_array_equal(np.bincount(task.val.labels, minlength=3), np.bincount(labels[held], minlength=3))
  np.testing.assert_array_equal(task.test.labels, [0, 1])

  c.data.clip_scaled = True
  c.data.oversample = False
  task = data.load(c.data, seed=0)
  assert task.test.inputs.min() == 0.0 and task.test.inputs.max() == 1.0
  assert len(task.train) == len(kept)


def test_attack_test_fraction_split_is_stratified_and_disjoint(tmp_path):
  features, labels = write_attack_csv(tmp_path / "a.csv", n=200, header=False)
  c = load_config("attack", "ce")
  c.data.file = str(tmp_path / "a.csv")
  c.data.oversample = False
  raw = tabular.attack(c.data)
  assert len(raw.train) + len(raw.test) == 200
  for k in range(3):
    n_k = int(np.sum(labels == k))
    assert np.sum(raw.test.labels == k) == round(0.2 * n_k)
  # Disjoint: every row lands in exactly one split (rows are distinct floats).
  rows = {tuple(r) for r in raw.train.inputs} | {tuple(r) for r in raw.test.inputs}
  assert len(rows) == 200
  c.data.test_fraction = 1.5
  with pytest.raises(UserError, match="data.test_fraction"):
    tabular.attack(c.data)


def test_attack_missing_file_fields(tmp_path):
  c = load_config("attack", "ce")
  with pytest.raises(UserError, match="data.file: set the file"):
    data.load(c.data, seed=0)
  c.data.file = str(tmp_path / "nope.csv")
  with pytest.raises(UserError, match="data.file: no such file"):
    data.load(c.data, seed=0)


# ----------------------------------------------------------------------------------------------- Criteo


def test_read_criteo_missing_values(tmp_path):
  path = tmp_path / "c.txt"
  dense = [1, None, -2, 3, None, 0, 5, 6, 7, 8, 9, 10, 11]
  cats = ["68fd1e64", None] + [format(j, "08x") for j in range(24)]
  path.write_text(criteo_line(1, dense, cats) + "\n" + criteo_line(0, [None] * 13, [None] * 26) + "\n")
  labels, d, s = tabular.read_criteo(str(path))
  np.testing.assert_array_equal(labels, [1, 0])
  np.testing.assert_array_equal(d[0], [np.nan if v is None else v for v in dense])
  assert np.all(np.isnan(d[1]))
  assert s[0, 0] == "68fd1e64" and s[0, 1] == "" and s.shape == (2, 26) and np.all(s[1] == "")


@pytest.mark.parametrize("line,message", [
    ("1\t2\t3", ["line 2 has 3 tab-separated fields, expected 40"]),
    (criteo_line(2, [1] * 13, ["a"] * 26), ["line 2", "label '2' is not 0 or 1"]),
    (criteo_line(1, [1, "x"] + [1] * 11, ["a"] * 26), ["line 2", "field I2", "'x'"]),
])
def test_read_criteo_errors_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "bad.txt"
  path.write_text(criteo_line(0, [1] * 13, ["a"] * 26) + "\n" + line + "\n")
  with pytest.raises(UserError) as e:
    tabular.read_criteo(str(path))
  for part in [str(path), *message]:
    assert part in str(e.value)


def test_read_criteo_empty_file(tmp_path):
  path = tmp_path / "empty.txt"
  path.write_text("")
  with pytest.raises(UserError, match="empty"):
    tabular.read_criteo(str(path))


def test_vocabulary_and_encoding():
  codes = np.array([[3, -1], [5, 7], [3, 7], [9, 7]])
  vocabs = tabular.build_vocabularies(codes[:3])
  np.testing.assert_array_equal(vocabs[0], [3, 5])
  np.testing.assert_array_equal(vocabs[1], [7])
  # 9 never appears in the training rows -> 0, missing (-1) -> 0.
  np.testing.assert_array_equal(tabular.encode(codes, vocabs), [[1, 0], [2, 1], [1, 1], [0, 1]])
  vocabs = tabular.build_vocabularies(codes[:3], min_count=2)
  np.testing.assert_array_equal(tabular.encode(codes, vocabs), [[1, 0], [0, 1], [1, 1], [0, 1]])


def test_criteo_preprocessing_fitted_on_train_only(tmp_path):
  write_criteo(tmp_path / "train.txt", n=200)
  # Test lines: a categorical never seen in training, a missing one, and a dense value above the training max.
  test_lines = [criteo_line(1, [1000] + [None] * 12, ["ffffffff", None] + ["00000001"] * 24),
                criteo_line(0, [0] * 13, ["00000000"] * 26)]
  (tmp_path / "test.txt").write_text("\n".join(test_lines) + "\n")
  c = load_config("criteo", "ce")
  c.data.dir, c.data.file, c.data.test_file = str(tmp_path), "train.txt", "test.txt"
  task = data.load(c.data, seed=0)

  labels, dense, sparse = tabular.read_criteo(str(tmp_path / "train.txt"))
  kept, held = data.stratified_split(labels, c.data.val_fraction, c.data.split_seed)
  lo, hi = np.nanmin(dense[kept], 0), np.nanmax(dense[kept], 0)
  expected_val = np.nan_to_num((dense[held] - lo) / (hi - lo), nan=0.0)
  np.testing.assert_allclose(task.val.inputs["dense"], expected_val, rtol=1e-5, atol=1e-6)
  assert task.test.inputs["dense"][0, 0] == pytest.approx((1000 - lo[0]) / (hi[0] - lo[0]), rel=1e-5)
  np.testing.assert_array_equal(task.test.inputs["dense"][0, 1:], 0.0)  # missing -> 0
  assert task.train.inputs["dense"].dtype == np.float32 and task.train.inputs["sparse"].dtype == np.int32
  assert task.train.inputs["dense"].shape == (len(kept), 13) and task.train.inputs["sparse"].shape == (len(kept), 26)
  assert task.input_shape == (39,) and task.num_classes == 2

  # Vocabulary sizes from the training part only (+1 for the missing/unknown index 0).
  sizes = [len({v for v in sparse[kept, j] if v}) + 1 for j in range(26)]
  assert task.model_kwargs == {"vocab_sizes": tuple(sizes), "num_dense": 13}
  assert task.test.inputs["sparse"][0, 0] == 0 and task.test.inputs["sparse"][0, 1] == 0  # unseen, missing
  for j in range(26):
    assert task.train.inputs["sparse"][:, j].max() < sizes[j]
  # A category in the held-out validation part but not in the training part gets index 0 there too.
  train_values = set(sparse[kept, 0])
  val_unseen = np.array([v not in train_values for v in sparse[held, 0]])
  np.testing.assert_array_equal(task.val.inputs["sparse"][val_unseen, 0], 0)
  assert np.all(task.val.inputs["sparse"][~val_unseen & (sparse[held, 0] != ""), 0] > 0)


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_attack_end_to_end(tmp_path):
  write_attack_csv(tmp_path / "attack.csv", n=300)
  workdir = tmp_path / "run"
  run_cli(["--config=configs/attack.py:ce", f"--workdir={workdir}", f"--config.data.dir={tmp_path}",
           "--config.data.file=attack.csv", "--config.model.name=attack_student", "--config.batch_size=64",
           "--config.optimizer.learning_rate=0.01", "--config.num_epochs=4", "--config.log.progress=False"])
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["finished"] and summary["model"] == "attack_student"
  assert summary["accuracy"] > 0.5  # three well-separated classes
  assert "auc" not in summary  # three classes: no binary metrics


def test_cli_criteo_teacher_and_kd_student(tmp_path):
  write_criteo(tmp_path / "dac.txt", n=600)
  common = [f"--config.data.dir={tmp_path}", "--config.data.file=dac.txt", "--config.batch_size=128",
            "--config.eval_batch_size=128", "--config.num_epochs=1", "--config.log.progress=False"]
  teacher = tmp_path / "teacher"
  run_cli(["--config=configs/criteo.py:teacher", f"--workdir={teacher}", *common])
  student = tmp_path / "kd"
  run_cli(["--config=configs/criteo.py:kd", f"--workdir={student}", f"--config.teacher.checkpoint={teacher}",
           *common])
  # TGeo-KD's lookahead differentiates through Adam's update, including embedding rows no batch has touched yet
  # (v = 0): it must stay finite (optim.ADAM_EPS_ROOT).
  tgeo = tmp_path / "tgeo"
  run_cli(["--config=configs/criteo.py:tgeo", f"--workdir={tgeo}", f"--config.teacher.checkpoint={teacher}",
           "--config.val_batch_size=32", *common])
  for workdir in (teacher, student, tgeo):
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["finished"]
    assert 0.0 <= summary["auc"] <= 1.0
    # log-loss is the evaluation cross-entropy of the two-class logits [0, z] (up to float32 rounding).
    assert summary["log_loss"] == pytest.approx(summary["loss"], rel=1e-4)
  assert json.loads((student / "summary.json").read_text())["model"] == "wide_deep_student"
  records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
  assert any("auc" in r and "log_loss" in r for r in records)


def test_criteo_column_whose_range_overflows_scaling_is_named(tmp_path):
  """Missing dense values become 0 after scaling, so an overflowing range (NaN after scaling) must be refused
  before that, naming the field: a silent 0 would be wrong data."""
  lines = [criteo_line(i % 2, [1e308 if i == 3 else (-1e308 if i == 5 else i)] + [1] * 12, ["0000000a"] * 26)
           for i in range(60)]
  (tmp_path / "dac.txt").write_text("\n".join(lines) + "\n")
  c = load_config("criteo", "ce")
  c.data.dir, c.data.file = str(tmp_path), "dac.txt"
  with pytest.raises(UserError, match=r"dac.txt: field I1: the training values span \[-1e\+308, .*too wide"):
    data.load(c.data, seed=0)
