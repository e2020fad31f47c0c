"""Fashion-MNIST: a CNN teacher and small students (the embedded default task; runs on a 2-core CPU).

  python train.py --config=configs/fashion_mnist.py:teacher --workdir=runs/fmnist/teacher
  python train.py --config=configs/fashion_mnist.py:kd --workdir=runs/fmnist/kd \
      --config.teacher.checkpoint=runs/fmnist/teacher

``get_config(arg)``: ``arg`` is ``teacher`` (CE on the full training part, teacher-sized CNN) or a method name
(``ce``, ``kd``, ...). Students train on a 5,000-example stratified subset by default (``data.train_subset``),
where the teacher's soft labels matter; set it to 0 for the whole training part.
"""

import ml_collections

# Defaults shared by every paper-setting config (the other configs start from this one and override).


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "ce"
  c.seed = 0
  c.num_epochs = 10
  c.batch_size = 128
  c.eval_batch_size = 1000
  # Validation batch per meta step (methods that learn on the held-out split, e.g. TGeo-KD).
  c.val_batch_size = 128
  # Stop (with a checkpoint) after this many steps in one process; 0 = run to the end. For time-limited job
  # slots: the same command continues where it stopped.
  c.steps_per_run = 0
  c.distributed = False  # multi-host: call jax.distributed.initialize() first

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"
  c.data.dir = ""  # '' = /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist)
  c.data.val_fraction = 0.1  # stratified held-out validation part of the training split
  c.data.split_seed = 0  # the split is the same for every run seed
  c.data.train_subset = 0  # 0 = all; else a stratified subset of the training part of that many examples
  c.data.augment = "none"  # none | flip | crop_flip
  c.data.synthetic = ml_collections.ConfigDict(
      dict(num_train=512, num_test=256, input_shape=(28, 28, 1), num_classes=10, seed=0))

  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn_small"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "cosine"  # constant | cosine | step
  c.optimizer.decay_epochs = ()  # for schedule='step'
  c.optimizer.decay_factor = 0.1
  # A short warm-up and global-norm clipping keep KD (tau^2 = 16) from collapsing small students.
  c.optimizer.warmup_epochs = 1.0
  c.optimizer.clip_norm = 1.0

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = "cnn_teacher"
  c.teacher.checkpoint = ""  # a teacher run's work directory

  c.ce = ml_collections.ConfigDict(dict(label_smoothing=0.0))
  c.kd = ml_collections.ConfigDict(dict(temperature=4.0, w_ce=0.1, w_kd=0.9))

  c.log = ml_collections.ConfigDict(dict(every_steps=50, progress=True, tensorboard=False))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=0, max_to_keep=2))
  return c


def get_config(arg: str = "kd") -> ml_collections.ConfigDict:
  c = base_config()
  if arg == "teacher":
    c.method = "ce"
    c.model.name = "cnn_teacher"
    c.num_epochs = 2
    c.optimizer.learning_rate = 0.1
    c.optimizer.warmup_epochs = 0.2
    return c
  c.method = arg
  c.num_epochs = 10
  c.data.train_subset = 5000
  return c
