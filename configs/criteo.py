"""CTR prediction on Criteo Display Advertising data (docs/methods.md §6): Wide&Deep teacher and student.

  python train.py --config=configs/criteo.py:teacher --workdir=runs/criteo/teacher --config.data.dir=DATA
  python train.py --config=configs/criteo.py:kd --workdir=runs/criteo/kd --config.data.dir=DATA \
      --config.teacher.checkpoint=runs/criteo/teacher
  python train.py --config=configs/criteo.py:tgeo --workdir=runs/criteo/tgeo --config.data.dir=DATA \
      --config.teacher.checkpoint=runs/criteo/teacher

``data.file`` (default ``dac_sample.txt``, the public 100k-line sample) is Criteo's text format: per line,
tab-separated, the 0/1 label, integer features I1..I13, hashed categoricals C1..C26, missing values empty.
Dense features are MinMax-scaled on the student's training part with missing -> 0; categoricals are label-encoded
with per-field vocabularies of the training part (index 0 = missing, unseen, or seen fewer than
``data.min_count`` times). ``get_config(arg)``: ``teacher`` (CE, ``wide_deep_teacher``: embeddings 16,
DNN [64, 64, 64]) or a method name for ``wide_deep_student`` (DNN [64, 64]). The teacher and its students must
share every ``data.*`` field (the vocabularies, hence the embedding tables, depend on the training part).
Evaluation reports accuracy, AUC and log-loss (``auc``, ``log_loss`` in metrics.jsonl and summary.json).
The epoch count is not part of the protocol; CTR embeddings overfit after a few passes: 5 here.
"""

import ml_collections

from tgeo_jax.default_config import base_config, set_temperature

TEMPERATURE = 2.0  # docs/methods.md §6


def get_config(arg: str = "kd") -> ml_collections.ConfigDict:
  c = base_config()
  c.data.name = "criteo"
  c.data.dir = ""  # directory of data.file / data.test_file
  c.data.file = "dac_sample.txt"
  c.data.test_file = ""  # '' = hold out data.test_fraction of data.file as the test split
  c.data.test_fraction = 0.1  # stratified on the label, drawn with data.split_seed
  c.data.min_count = 1  # categories seen fewer times in the training part map to index 0
  c.data.clip_scaled = False  # clip MinMax-scaled validation/test dense features to [0, 1]
  c.data.train_subset = 0

  c.num_epochs = 5
  c.batch_size = 1024
  c.val_batch_size = 1024
  c.eval_batch_size = 4096
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.clip_norm = 1.0

  c.teacher.model = "wide_deep_teacher"
  set_temperature(c, TEMPERATURE)

  if arg == "teacher":
    c.method = "ce"
    c.model.name = "wide_deep_teacher"
  else:
    c.method = arg
    c.model.name = "wide_deep_student"
  return c
