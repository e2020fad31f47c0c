"""ImageNet (ILSVRC-2012) ResNet-34 -> ResNet-18 from a prepared TFDS dataset (docs/methods.md §6).

  python -m tgeo_jax.prepare imagefolder --root=ILSVRC2012 --data_dir=DIR   # ILSVRC2012/{train,val}/WNID/*.JPEG
  python train.py --config=configs/imagenet.py:teacher --workdir=runs/in/resnet34 --config.data.dir=DIR
  python train.py --config=configs/imagenet.py:kd --workdir=runs/in/r34_r18_kd --config.data.dir=DIR \
      --config.teacher.checkpoint=runs/in/resnet34

``get_config(arg)``: ``teacher`` (CE ResNet-34) or a method name for the ResNet-18 student. Protocol: 100 epochs,
batch 256, SGD momentum 0.9, lr 0.1, x0.1 every 30 epochs, weight decay 1e-4, no warm-up, no clipping. Train:
random-resized crop 224 + flip (taken from the 256x256 resized centre, see tgeo_jax/data/tfds_sources.py); eval:
resize 256 + centre crop 224. A stratified 1% of the training split is held out for validation. DIST uses tau = 1.

Published: KD 70.66-71.21 (ResNet-18), DIST 72.07.
"""

import ml_collections

from tgeo_jax.default_config import base_config

def get_config(arg: str = "kd") -> ml_collections.ConfigDict:
  c = base_config()
  c.data.name = "imagenet2012"
  c.data.dir = ""
  c.data.val_fraction = 0.01
  c.data.train_subset = 0
  c.data.augment = "imagenet_crop_flip"
  c.num_epochs = 100
  c.batch_size = 256
  c.val_batch_size = 256
  c.eval_batch_size = 500
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "step"
  c.optimizer.decay_epochs = (30, 60, 90)
  c.optimizer.decay_factor = 0.1
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.clip_norm = 0.0
  c.teacher.model = "resnet34"
  c.teacher.cache_logits = "off"
  c.dist.temperature = 1.0
  c.log.every_steps = 500
  if arg == "teacher":
    c.method = "ce"
    c.model.name = "resnet34"
  else:
    c.method = arg
    c.model.name = "resnet18"
  return c
