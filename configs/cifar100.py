"""CIFAR-100 (RepDistiller / mdistiller / DIST protocol, docs/methods.md §6) from a prepared TFDS dataset.

Prepare the data once from the published archive (torchvision's download, or the binary version), no TensorFlow:

  python -m tgeo_jax.prepare cifar100 --archive=cifar-100-python.tar.gz --data_dir=DIR

Then a teacher, and a student distilled from it:

  python train.py --config=configs/cifar100.py:teacher:resnet32x4 --workdir=runs/c100/resnet32x4 \
      --config.data.dir=DIR
  python train.py --config=configs/cifar100.py:resnet32x4_resnet8x4:kd --workdir=runs/c100/r32x4_r8x4_kd \
      --config.data.dir=DIR --config.teacher.checkpoint=runs/c100/resnet32x4

``get_config(arg)``: ``arg`` is ``PAIR:METHOD`` (PAIR one of ``PAIRS``, METHOD any method: ce, kd, dist, tgeo,
simkd, ...) or ``teacher:MODEL``. Protocol: 240 epochs, batch 64, SGD momentum 0.9, lr 0.05 (0.01 for MobileNetV2 /
ShuffleNet students), x0.1 at epochs 150/180/210, weight decay 5e-4, no warm-up, no clipping, random crop 32 pad 4
(black raw pixels, as RepDistiller) + flip, a stratified 10% of the training split held out for validation
(RepDistiller trains on all 50k: set data.val_fraction small for a closer match; methods that learn on the held-out
split, e.g. TGeo-KD, need it). The teacher's logits are recomputed per augmented batch (teacher.cache_logits='off').

Published numbers (test accuracy %, docs/methods.md §6, §3 and §8; teacher -> student, CE student, KD, DIST, DKD):
  resnet32x4 (79.42) -> resnet8x4  (72.50): KD 73.33, DIST 76.31 +- 0.19, DKD 76.32
  wrn_40_2   (75.61) -> wrn_40_1   (71.98): KD 73.54, DIST 74.43, DKD 74.81
  resnet56   (72.34) -> resnet20   (69.06): KD 70.66, DIST 71.75, DKD 71.97
  wrn_40_2   (75.61) -> wrn_16_2   (73.26): KD 74.92, DKD 76.23
  resnet32x4 (79.42) -> shufflev1  (70.50): KD 74.07, DIST 76.34, DKD 76.45
  resnet32x4 (79.42) -> shufflev2  (71.82): KD 74.45, DIST 77.35, DKD 77.07
  resnet50_cifar (79.34) -> mobilenetv2 (64.60): KD 67.35, DIST 68.66, DKD 70.35
  vgg13      (74.64) -> vgg8       (70.36): KD 72.98, DKD 74.68
  vgg13      (74.64) -> mobilenetv2 (64.60): KD 67.37, DKD 69.71
The ResNet-50 pair is RepDistiller's CIFAR ResNet-50 (models/resnetv2.py: 3x3 stem, no max-pool, 23.71M
parameters; train it with teacher:resnet50_cifar, not resnet50, torchvision's ImageNet network) and its
MobileNetV2 ('mobile_half', width 0.5, 0.81M); its teacher, student and KD numbers are from RepDistiller's README
(the CRD paper's Table 2), DIST's from docs/methods.md §3. The VGGs are RepDistiller's ``vgg*_bn`` (models/vgg.py,
BatchNorm, 4x4 last map on 32x32 inputs); their teacher, student and KD numbers are RepDistiller's README. The DKD
numbers are mdistiller's README (its tables of the DKD paper's results; it prints 76.23 for WRN-40-2 -> WRN-16-2);
DKD runs with mdistiller's CIFAR settings: w_ce 1, alpha 1, tau 4, the KD weight warmed up over 20 epochs, beta per
pair (``DKD_BETA``, from mdistiller's configs/cifar100/dkd/*.yaml: 8 unless the file sets it).
"""

import ml_collections

from tgeo_jax.default_config import base_config

# pair name -> (teacher, student)
PAIRS = {
    "resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4"),
    "wrn_40_2_wrn_40_1": ("wrn_40_2", "wrn_40_1"),
    "resnet56_resnet20": ("resnet56", "resnet20"),
    "wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "resnet32x4_shufflev1": ("resnet32x4", "shufflev1"),
    "resnet32x4_shufflev2": ("resnet32x4", "shufflev2"),
    "resnet50_cifar_mobilenetv2": ("resnet50_cifar", "mobilenetv2"),
    "vgg13_vgg8": ("vgg13", "vgg8"),
    "vgg13_mobilenetv2": ("vgg13", "mobilenetv2"),
}
# DKD's NCKD weight beta per pair (mdistiller configs/cifar100/dkd/*.yaml; the method's default 8 elsewhere).
DKD_BETA = {"resnet56_resnet20": 2.0, "wrn_40_2_wrn_40_1": 6.0, "wrn_40_2_wrn_16_2": 6.0, "vgg13_vgg8": 6.0,
            "vgg13_mobilenetv2": 6.0}
SMALL_LR_MODELS = ("mobilenetv2", "shufflev1", "shufflev2")


def protocol() -> ml_collections.ConfigDict:
  c = base_config()
  c.data.name = "cifar100"
  c.data.dir = ""  # TFDS data_dir ('' = TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.val_fraction = 0.1
  c.data.train_subset = 0
  c.data.augment = "crop_flip_cifar100"
  c.num_epochs = 240
  c.batch_size = 64
  c.val_batch_size = 64
  c.eval_batch_size = 500  # divides the 10k test images and any power-of-two device count up to 4
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "step"
  c.optimizer.decay_epochs = (150, 180, 210)
  c.optimizer.decay_factor = 0.1
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.clip_norm = 0.0
  c.teacher.cache_logits = "off"
  c.dist.temperature = 4.0
  c.log.every_steps = 200
  return c


def get_config(arg: str = "resnet32x4_resnet8x4:kd") -> ml_collections.ConfigDict:
  c = protocol()
  first, _, second = arg.partition(":")
  if not second:
    raise ValueError(f"configs/cifar100.py: expected 'PAIR:METHOD' or 'teacher:MODEL', got {arg!r}")
  if first == "teacher":
    c.method = "ce"
    c.model.name = second
    c.teacher.model = second
  else:
    if first not in PAIRS:
      raise ValueError(f"configs/cifar100.py: unknown pair {first!r}; expected one of {sorted(PAIRS)}")
    c.teacher.model, c.model.name = PAIRS[first]
    c.method = second
    c.dkd.beta = DKD_BETA.get(first, c.dkd.beta)
  if c.model.name in SMALL_LR_MODELS:
    c.optimizer.learning_rate = 0.01
  return c
