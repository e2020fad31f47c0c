"""Tabular tasks: attack detection from a numeric CSV file, and CTR prediction from Criteo's text format.

Both loaders return a ``RawTask`` whose ``finalize(train, val, test)`` runs after the stratified validation
hold-out (``data.load``), so everything fitted on data is fitted on the student's training part only:

* attack (``data.name='attack'``, docs/methods.md §6): MinMax scaling fitted on the training part and applied to
  validation and test (not clipped unless ``data.clip_scaled``: values outside the training range stay outside
  [0, 1], as with scikit-learn's ``MinMaxScaler``), then random oversampling of the training part only.
* criteo (``data.name='criteo'``): dense features MinMax-scaled on the training part with missing values -> 0,
  categoricals label-encoded with per-field vocabularies built on the training part (index 0 = missing, unseen or
  rarer than ``data.min_count``). The vocabulary sizes are only known after ``finalize``; it writes them into the
  ``RawTask``'s own ``model_kwargs`` (``data.load`` copies ``raw.model_kwargs`` after ``finalize`` ran), so
  ``models.create`` receives ``vocab_sizes`` and ``num_dense``.

Test split: ``data.test_file`` (a second file in the same format) when set, else a stratified ``data.test_fraction``
of ``data.file`` drawn with ``data.split_seed`` (the same for every run seed and method, like the validation split).
A teacher and its students must use the same data fields (file, split fractions, split seed, train subset): the
Criteo vocabulary, hence the teacher's embedding tables, depends on the training part.
"""

from __future__ import annotations

import csv
import os
import warnings

import numpy as np

from tgeo_jax import data as data_lib
from tgeo_jax.data import sources
from tgeo_jax.errors import UserError

__all__ = ["CRITEO_NUM_DENSE", "CRITEO_NUM_SPARSE", "CRITEO_NUM_FIELDS", "minmax_scale", "random_oversample",
           "read_numeric_csv", "attack", "file_digest", "read_criteo", "build_vocabularies", "encode", "criteo"]

# Offset of the test split's seed from data.split_seed (the validation split uses split_seed itself).
_TEST_SPLIT_SEED_OFFSET = 1_000_003
# Oversampling draws from its own stream of data.split_seed.
_OVERSAMPLE_SEED_OFFSET = 2_000_003

CRITEO_NUM_DENSE = 13
CRITEO_NUM_SPARSE = 26
CRITEO_NUM_FIELDS = 1 + CRITEO_NUM_DENSE + CRITEO_NUM_SPARSE


# ----------------------------------------------------------------------------------------------- helpers


def _field(data_config, name: str, config_file: str):
  if name not in data_config:
    raise UserError(f"data.{name}: missing from the config (start from {config_file})")
  return data_config[name]


def _path(data_config, field: str) -> str:
  name = data_config[field]
  if not name:
    raise UserError(f"data.{field}: set the file to read (a name inside data.dir or a path), "
                    f"e.g. --config.data.{field}=FILE")
  path = os.path.join(data_config.dir or "", name)
  if not os.path.isfile(path):
    raise UserError(f"data.{field}: no such file {path!r}")
  return path


def _is_number(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def _split_off_test(data_config, labels: np.ndarray, path: str) -> tuple[np.ndarray, np.ndarray]:
  """``(train_indices, test_indices)``: a stratified ``data.test_fraction`` of the file is the test split."""
  fraction = data_config.test_fraction
  if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
    raise UserError(f"data.test_fraction: expected a fraction in (0, 1) (or set data.test_file), got {fraction!r}")
  train, test = data_lib.stratified_split(labels, fraction, data_config.split_seed + _TEST_SPLIT_SEED_OFFSET)
  if len(test) == 0 or len(train) == 0:
    raise UserError(f"{path}: {len(labels)} rows are too few to hold out data.test_fraction={fraction} as a test "
                    "split (set data.test_file or add rows)")
  return train, test


def _minmax(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-column ``(min, scale)`` over the finite training values; a constant (or all-missing) column gets
  scale 1 so it maps to 0 rather than dividing by zero."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing column: handled below
    lo, hi = np.nanmin(x_train, axis=0), np.nanmax(x_train, axis=0)
  lo = np.where(np.isfinite(lo), lo, 0.0)
  hi = np.where(np.isfinite(hi), hi, 0.0)
  with np.errstate(over="ignore"):  # a range that overflows stays inf: the callers refuse it by name
    span = hi - lo
  return lo, np.where(span > 0, span, 1.0)


def minmax_scale(x: np.ndarray, lo: np.ndarray, span: np.ndarray, *, clip: bool = False) -> np.ndarray:
  """``(x - lo) / span`` as float32 (NaN stays NaN); ``clip`` bounds it to [0, 1]."""
  with np.errstate(over="ignore", invalid="ignore"):  # an overflowing column: data.load refuses it by name
    out = (np.asarray(x, np.float64) - lo) / span
  if clip:
    out = np.clip(out, 0.0, 1.0)
  with np.errstate(over="ignore"):
    return out.astype(np.float32)


def random_oversample(labels: np.ndarray, seed: int) -> np.ndarray:
  """Indices that keep every example once and add examples drawn with replacement from each smaller class until
  every class present has as many as the largest (imbalanced-learn's ``RandomOverSampler``). Sorted."""
  rng = np.random.default_rng(seed)
  classes, counts = np.unique(labels, return_counts=True)
  extra = [rng.choice(np.flatnonzero(labels == c), size=counts.max() - n, replace=True)
           for c, n in zip(classes, counts) if n < counts.max()]
  return np.sort(np.concatenate([np.arange(len(labels)), *extra])) if extra else np.arange(len(labels))


# ----------------------------------------------------------------------------------------------- attack CSV


def read_numeric_csv(path: str, *, header: str = "auto", num_classes: int | None = None,
                     with_lines: bool = False) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
  """Reads a comma-separated file of numeric columns whose last column is the integer label (in
  ``[0, num_classes)`` when given).

  ``header``: ``'auto'`` (the first row is a header when any of its cells is not a number), ``'yes'`` or ``'no'``.
  Blank lines are skipped; a UTF-8 byte-order mark is not part of the first cell. Returns ``features [N, F]
  float64``, ``labels [N] int64`` and the column names (None without a header), and with ``with_lines`` the file
  line of each row. Raises ``UserError`` naming the file, the line and the column of the first bad cell.
  """
  if header not in ("auto", "yes", "no"):
    raise UserError(f"data.header: expected 'auto', 'yes' or 'no', got {header!r}")
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      rows, lines = [], []
      reader = csv.reader(f)
      for row in reader:
        if not row or all(not cell.strip() for cell in row):
          continue
        rows.append([cell.strip() for cell in row])
        lines.append(reader.line_num)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise UserError(f"{path}: cannot read CSV file ({e})") from None
  if not rows:
    raise UserError(f"{path}: the file is empty (expected numeric feature columns and a label column)")
  names = None
  if header == "yes" or (header == "auto" and not all(_is_number(cell) for cell in rows[0])):
    names, rows, lines = rows[0], rows[1:], lines[1:]
    if not rows:
      raise UserError(f"{path}: the file has a header but no data rows")
  width = len(names) if names is not None else len(rows[0])
  if width < 2:
    raise UserError(f"{path}: expected at least one feature column and a label column, found {width} column(s)")
  for row, line in zip(rows, lines):
    if len(row) != width:
      raise UserError(f"{path}: line {line} has {len(row)} columns, expected {width}")

  def column_name(j):
    return f"column {j + 1} ({names[j]!r})" if names is not None else f"column {j + 1}"

  try:
    values = np.array(rows, dtype=np.str_).astype(np.float64)
  except ValueError:
    values = None
  if values is None or not np.all(np.isfinite(values)):
    for row, line in zip(rows, lines):  # find and name the first bad cell
      for j, cell in enumerate(row):
        ok = _is_number(cell) and np.isfinite(float(cell))
        if not ok:
          raise UserError(f"{path}: line {line}, {column_name(j)}: {cell!r} is not a finite number")
  features, raw_labels = values[:, :-1], values[:, -1]
  bad = np.flatnonzero(raw_labels != np.round(raw_labels))
  if len(bad):
    i = bad[0]
    raise UserError(f"{path}: line {lines[i]}, {column_name(width - 1)} (the label): {rows[i][-1]!r} is not an "
                    "integer class")
  if num_classes is not None:
    bad = np.flatnonzero((raw_labels < 0) | (raw_labels >= num_classes))
    if len(bad):
      i = bad[0]
      raise UserError(f"{path}: line {lines[i]}, {column_name(width - 1)} (the label): {rows[i][-1]!r} is outside "
                      f"[0, {num_classes}) (data.num_classes={num_classes})")
  if with_lines:
    return features, raw_labels.astype(np.int64), names, np.asarray(lines)
  return features, raw_labels.astype(np.int64), names


def attack(data_config) -> data_lib.RawTask:
  """Attack detection: numeric features, the last CSV column the integer class (docs/methods.md §6)."""
  for name in ("num_classes", "file", "test_file", "test_fraction", "header", "oversample", "clip_scaled"):
    _field(data_config, name, "configs/attack.py")
  num_classes = data_config.num_classes
  if not (isinstance(num_classes, int) and num_classes >= 2):
    raise UserError(f"data.num_classes: expected an integer >= 2, got {num_classes!r}")
  path = _path(data_config, "file")
  features, labels, _, lines = read_numeric_csv(path, header=data_config.header, num_classes=num_classes,
                                                with_lines=True)
  files = [path]
  if data_config.test_file:
    test_path = _path(data_config, "test_file")
    test_features, test_labels, _, test_lines = read_numeric_csv(test_path, header=data_config.header,
                                                                 num_classes=num_classes, with_lines=True)
    if test_features.shape[1] != features.shape[1]:
      raise UserError(f"{test_path}: {test_features.shape[1]} feature columns, but {path} has "
                      f"{features.shape[1]}")
    files.append(test_path)
    train = sources.ArraySource(features, labels)
    test = sources.ArraySource(test_features, test_labels)
    # Example ids: row r of data.file is r, row r of data.test_file is TEST_ID_OFFSET + r.
    train_ids = np.arange(len(labels))
    test_ids = data_lib.TEST_ID_OFFSET + np.arange(len(test_labels))
  else:
    train_idx, test_idx = _split_off_test(data_config, labels, path)
    train = sources.ArraySource(features[train_idx], labels[train_idx])
    test = sources.ArraySource(features[test_idx], labels[test_idx])
    # Row numbers of the file: a teacher split with other data.* fields is compared row by row.
    train_ids, test_ids = train_idx, test_idx
    test_lines = None
  clip, oversample, seed = bool(data_config.clip_scaled), bool(data_config.oversample), data_config.split_seed

  def describe(example_id: int) -> str:
    if example_id >= data_lib.TEST_ID_OFFSET and test_lines is not None:
      return f"{files[1]} line {test_lines[example_id - data_lib.TEST_ID_OFFSET]}"
    return f"{path} line {lines[example_id]}"

  def finalize(train, val, test):
    lo, span = _minmax(train.inputs)
    scaled = [sources.ArraySource(minmax_scale(s.inputs, lo, span, clip=clip), s.labels) for s in (train, val, test)]
    train, val, test = scaled
    if oversample:
      raw.train_rows = random_oversample(train.labels, seed + _OVERSAMPLE_SEED_OFFSET)
      train = train.subset(raw.train_rows)
    return train, val, test

  raw = data_lib.RawTask(train, test, num_classes, (features.shape[1],), finalize, train_ids=train_ids,
                         test_ids=test_ids, digest=file_digest(files), describe=describe)
  return raw


def file_digest(paths) -> str:
  """sha256 over the bytes of ``paths`` (the dataset identity of a file-backed task)."""
  import hashlib
  digest = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    digest.update(b"\0")
  return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- Criteo


def read_criteo(path: str, *, with_lines: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads Criteo Display Advertising text: per line, tab-separated, ``label I1..I13 C1..C26``.

  Missing values are empty fields. Returns ``labels [N] int64`` (0/1), ``dense [N, 13] float64`` (NaN = missing)
  and ``sparse [N, 26] object`` (the raw category strings, '' = missing). Blank lines are skipped.
  """
  rows = []
  try:
    with open(path, encoding="utf-8", newline="") as f:
      for line_number, line in enumerate(f, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
          continue
        fields = line.split("\t")
        if len(fields) != CRITEO_NUM_FIELDS:
          raise UserError(f"{path}: line {line_number} has {len(fields)} tab-separated fields, expected "
                          f"{CRITEO_NUM_FIELDS} (label, I1..I13, C1..C26)")
        rows.append((line_number, fields))
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: cannot read Criteo file ({e})") from None
  if not rows:
    raise UserError(f"{path}: the file is empty (expected Criteo lines: label, I1..I13, C1..C26, tab-separated)")
  table = np.array([fields for _, fields in rows], dtype=object)
  labels = np.zeros(len(rows), np.int64)
  dense = np.full((len(rows), CRITEO_NUM_DENSE), np.nan)
  for i, (line_number, fields) in enumerate(rows):
    label = fields[0].strip()
    if label not in ("0", "1"):
      raise UserError(f"{path}: line {line_number}: label {fields[0]!r} is not 0 or 1")
    labels[i] = int(label)
    for j in range(CRITEO_NUM_DENSE):
      cell = fields[1 + j].strip()
      if cell:
        try:
          dense[i, j] = float(cell)
        except ValueError:
          raise UserError(f"{path}: line {line_number}, field I{j + 1}: {cell!r} is not a number") from None
        if not np.isfinite(dense[i, j]):
          raise UserError(f"{path}: line {line_number}, field I{j + 1}: {cell!r} is not a finite number")
  sparse = np.vectorize(str.strip, otypes=[object])(table[:, 1 + CRITEO_NUM_DENSE:])
  if with_lines:
    return labels, dense, sparse, np.array([line_number for line_number, _ in rows])
  return labels, dense, sparse


def _intern(sparse: np.ndarray) -> np.ndarray:
  """Raw category strings -> per-column integer codes (-1 = missing). The codes are arbitrary labels of distinct
  strings; which of them get an embedding is decided in ``finalize`` from the training part only."""
  codes = np.full(sparse.shape, -1, np.int64)
  for j in range(sparse.shape[1]):
    column = sparse[:, j].astype(np.str_)
    present = column != ""
    if present.any():
      _, inverse = np.unique(column[present], return_inverse=True)
      codes[present, j] = inverse
  return codes


def build_vocabularies(codes: np.ndarray, min_count: int = 1) -> list[np.ndarray]:
  """Per column, the sorted codes seen at least ``min_count`` times (missing = -1 excluded)."""
  vocabs = []
  for j in range(codes.shape[1]):
    values, counts = np.unique(codes[:, j][codes[:, j] >= 0], return_counts=True)
    vocabs.append(values[counts >= min_count])
  return vocabs


def encode(codes: np.ndarray, vocabs: list[np.ndarray]) -> np.ndarray:
  """Codes -> vocabulary indices ``[N, F] int32``: 1..V for known values, 0 for missing/unknown/rare."""
  out = np.zeros(codes.shape, np.int32)
  for j, vocab in enumerate(vocabs):
    if len(vocab) == 0:
      continue
    pos = np.searchsorted(vocab, codes[:, j])
    hit = (pos < len(vocab)) & (vocab[np.minimum(pos, len(vocab) - 1)] == codes[:, j])
    out[:, j] = np.where(hit, pos + 1, 0)
  return out


def criteo(data_config) -> data_lib.RawTask:
  """CTR prediction on Criteo Display Advertising text (e.g. the public 100k-line ``dac_sample.txt``).

  Model inputs: ``{"dense": [N, 13] float32, "sparse": [N, 26] int32}``; ``input_shape`` is ``(39,)``, the number
  of raw fields. ``finalize`` sets ``model_kwargs = {"vocab_sizes": (V_1 + 1, ..., V_26 + 1), "num_dense": 13}``.
  """
  for name in ("min_count", "file", "test_file", "test_fraction", "clip_scaled"):
    _field(data_config, name, "configs/criteo.py")
  min_count = data_config.min_count
  if not (isinstance(min_count, int) and min_count >= 1):
    raise UserError(f"data.min_count: expected an integer >= 1, got {min_count!r}")
  path = _path(data_config, "file")
  labels, dense, sparse, lines = read_criteo(path, with_lines=True)
  files, line_of = [path], [(path, line) for line in lines]
  if data_config.test_file:
    files.append(_path(data_config, "test_file"))
    test_labels, test_dense, test_sparse, test_lines = read_criteo(files[1], with_lines=True)
    line_of += [(files[1], line) for line in test_lines]
    n = len(labels)
    labels, dense = np.concatenate([labels, test_labels]), np.concatenate([dense, test_dense])
    codes = _intern(np.concatenate([sparse, test_sparse]))
    train_idx, test_idx = np.arange(n), np.arange(n, len(labels))
  else:
    codes = _intern(sparse)
    train_idx, test_idx = _split_off_test(data_config, labels, path)

  def source(idx):
    return sources.ArraySource({"dense": dense[idx], "sparse": codes[idx]}, labels[idx])

  clip = bool(data_config.clip_scaled)
  # Example ids: row numbers in data.file followed by data.test_file (blank lines not counted).
  raw = data_lib.RawTask(source(train_idx), source(test_idx), 2, (CRITEO_NUM_DENSE + CRITEO_NUM_SPARSE,),
                         train_ids=train_idx, test_ids=test_idx, digest=file_digest(files),
                         describe=lambda example_id: "{} line {}".format(*line_of[example_id]))

  def finalize(train, val, test):
    lo, span = _minmax(train.inputs["dense"])
    for j in np.flatnonzero(~np.isfinite(span)):  # NaN -> 0 below would hide the overflow: refuse it here
      raise UserError(f"{path}: field I{j + 1}: the training values span [{lo[j]:g}, {lo[j] + span[j]:g}], too wide to "
                      "MinMax-scale (the range overflows)")
    vocabs = build_vocabularies(train.inputs["sparse"], min_count)

    def transform(s):
      d = minmax_scale(s.inputs["dense"], lo, span, clip=clip)
      return sources.ArraySource({"dense": np.nan_to_num(d, nan=0.0),
                                  "sparse": encode(s.inputs["sparse"], vocabs)}, s.labels)

    # The model's embedding tables are sized here, from the training part: data.load reads raw.model_kwargs
    # after finalize.
    raw.model_kwargs.update(vocab_sizes=tuple(int(len(v)) + 1 for v in vocabs), num_dense=CRITEO_NUM_DENSE)
    return transform(train), transform(val), transform(test)

  raw.finalize = finalize
  return raw
