"""Attack detection (the TGeo-KD paper's "HIL" task, docs/methods.md §6): MLP teacher and student on a numeric CSV.

  python train.py --config=configs/attack.py:teacher --workdir=runs/attack/teacher \
      --config.data.dir=DATA --config.data.file=FILE.csv
  python train.py --config=configs/attack.py:kd --workdir=runs/attack/kd \
      --config.data.dir=DATA --config.data.file=FILE.csv --config.teacher.checkpoint=runs/attack/teacher
  python train.py --config=configs/attack.py:tgeo --workdir=runs/attack/tgeo \
      --config.data.dir=DATA --config.data.file=FILE.csv --config.teacher.checkpoint=runs/attack/teacher

``get_config(arg)``: ``teacher`` (CE, ``attack_teacher`` MLP in→512→256→128→64→32→3) or a method name for the
``attack_student`` MLP in→64→32→3 (both LeakyReLU). Data (``data/tabular.py``): numeric feature columns, the
integer class in the last column, an optional header row (detected: ``data.header='auto'``); the test split is
``data.test_file`` or else a stratified ``data.test_fraction`` of ``data.file``; MinMax scaling fitted on the
student's training part (after the validation hold-out) and applied unclipped to validation and test; random
oversampling of the training part only. The teacher and its students must share every ``data.*`` field.

Published (TGeo-KD, ICLR 2024, attack detection accuracy): teacher 88.19%, TGeo-KD student 92.39%. The paper gives
τ = 1.5; its optimizer, batch size and epoch count are not published: Adam 1e-3, batch 256, 30 epochs here.
"""

import ml_collections

from tgeo_jax.default_config import base_config, set_temperature

TEMPERATURE = 1.5  # docs/methods.md §6


def get_config(arg: str = "kd") -> ml_collections.ConfigDict:
  c = base_config()
  c.data.name = "attack"
  c.data.dir = ""  # directory of data.file / data.test_file ('' = the current directory or absolute paths)
  c.data.file = ""  # the CSV (required)
  c.data.test_file = ""  # '' = hold out data.test_fraction of data.file as the test split
  c.data.test_fraction = 0.2  # stratified, drawn with data.split_seed
  c.data.num_classes = 3  # labels must be integers in [0, num_classes)
  c.data.header = "auto"  # auto (first row is a header when any cell is not a number) | yes | no
  c.data.oversample = True  # random oversampling of the training part to the largest class (never val/test)
  c.data.clip_scaled = False  # clip MinMax-scaled validation/test features to [0, 1]
  c.data.train_subset = 0

  c.num_epochs = 30
  c.batch_size = 256
  c.val_batch_size = 256
  c.eval_batch_size = 1024
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.clip_norm = 1.0

  c.teacher.model = "attack_teacher"
  set_temperature(c, TEMPERATURE)

  if arg == "teacher":
    c.method = "ce"
    c.model.name = "attack_teacher"
  else:
    c.method = arg
    c.model.name = "attack_student"
  return c
