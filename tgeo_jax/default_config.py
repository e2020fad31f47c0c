"""The defaults every config starts from (``configs/*.py`` override them).

Kept in the package so that config files, which are not a package, share one definition:
``from tgeo_jax.default_config import base_config``.
"""

import ml_collections


def meta_config() -> ml_collections.ConfigDict:
  """Bilevel settings shared by TGeo-KD and RW-KD (docs/methods.md §2)."""
  m = ml_collections.ConfigDict()
  m.temperature = 4.0
  m.fusion_lr = 1e-3  # the meta-parameters' own Adam(W)
  m.fusion_weight_decay = 0.0
  m.fusion_clip_norm = 0.0
  m.ordering = "reuse"  # reuse: the lookahead step is the real step | lookahead: Meta-Weight-Net order
  m.meta_interval = 1  # update the meta-parameters every k student steps
  m.unroll_steps = 1  # >1: hypergradient through n unrolled steps (research; needs ordering='lookahead')
  m.val_bn_mode = "train"  # BatchNorm mode of the validation forward at the lookahead parameters
  m.analysis_examples = 5000  # α-by-group analytics each epoch over this many training examples (0 = off)
  return m


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
  # A NaN/Inf loss, gradient or state: 'stop' (name the step and quantity, exit 1; nothing non-finite is ever
  # checkpointed) or 'skip' (keep the previous state for that step and count it in metrics/summary).
  c.nonfinite = "stop"
  c.distributed = False  # multi-host: call jax.distributed.initialize() first
  # float32 | bfloat16: the student's and teacher's convolutions and matmuls in bfloat16 (GPU/TPU); parameters,
  # BatchNorm statistics, heads, logits, losses, DIST's correlations and TGeo-KD's α machinery stay float32.
  c.compute_dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"
  c.data.dir = ""  # '' = /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist)
  c.data.val_fraction = 0.1  # stratified held-out validation part of the training split
  c.data.split_seed = 0  # the split is the same for every run seed
  c.data.train_subset = 0  # 0 = all; else a stratified subset of the training part of that many examples
  c.data.val_subset = 0  # 0 = all; else a stratified subset of the validation part of that many examples
  # Symmetric label noise on the student's training part only: this fraction of its examples (chosen by
  # data.split_seed, the same for every method and run seed) get a label drawn uniformly from the other classes.
  # The teacher's own run, the validation part and the test split keep clean labels.
  c.data.label_noise = 0.0
  # Control for methods that learn on the validation labels (TGeo-KD, RW-KD): train on train + validation.
  c.data.train_with_val = False
  c.data.augment = "none"  # none | flip | crop_flip
  # Outlier probe: append this many Gaussian-noise examples with random labels to the training part (the α
  # analytics then report their mean α against normal examples; paper: outliers < 0.3, normal 0.4-0.6).
  c.data.outliers = 0
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
  # The demo's teacher: 3 epochs of cnn_medium reach ~89% in about two minutes on a 2-core CPU; cnn_teacher (0.29M)
  # is ~2.5x slower per step.
  c.teacher.model = "cnn_medium"
  c.teacher.checkpoint = ""  # a teacher run's work directory
  # Compute the frozen teacher's logits once over the training part and look them up per batch:
  # auto = when data.augment is 'none' (the outputs are then fixed per example) | on | off.
  c.teacher.cache_logits = "auto"
  # When set, the cached training-part table is also stored in this directory (keyed by a hash of the teacher's
  # variables and the training inputs) and reused by later runs with the same teacher and training part.
  c.teacher.logits_cache_dir = ""
  # Refuse a teacher trained on another dataset, or on examples of this run's validation or test part (its run's
  # recorded data identity and training membership). False: accept it with a warning line.
  c.teacher.verify_provenance = True

  c.ce = ml_collections.ConfigDict(dict(label_smoothing=0.0))
  c.kd = ml_collections.ConfigDict(dict(temperature=4.0, w_ce=0.1, w_kd=0.9))
  c.tgeo = meta_config()
  c.tgeo.layout = "reference"  # relation features: reference (9K) | vertices | edges | intra | no_st | sg_tg | angles | scalar
  c.tgeo.fusion_hidden = (32, 16)  # fusion MLP 9K -> 32 -> 16 -> 1 (LeakyReLU, sigmoid)
  c.tgeo.alpha_init = 0.5  # α of every sample before the first meta step (the output layer's bias)
  # 'none' | 'center': α_i = sigmoid(z_i - mean_batch(z) + logit(alpha_init)); the batch's α level stays near
  # alpha_init and the meta-gradient can only move weight between samples (cf. Meta-Weight-Net's normalisation).
  c.tgeo.alpha_normalization = "none"
  # ANL-KD / ADA-KD / WLS-KD: rule-based alpha in the same convex combination.
  c.reweight = ml_collections.ConfigDict(dict(temperature=4.0))
  # RW-KD: a free per-sample alpha learned with the same lookahead (fusion_* fields apply to the alpha table).
  c.rwkd = meta_config()

  # DIST (docs/methods.md §3): L = w_ce CE + tau^2 (w_inter inter + w_intra intra); the paper's CIFAR-100 setting.
  c.dist = ml_collections.ConfigDict()
  c.dist.temperature = 4.0  # tau of both softmaxes (4 on CIFAR-100, 1 on ImageNet)
  c.dist.w_ce = 1.0  # weight of the label cross-entropy
  c.dist.w_inter = 2.0  # weight of tau^2 * inter-class relation loss (per sample, across classes)
  c.dist.w_intra = 2.0  # weight of tau^2 * intra-class relation loss (per class, across the global batch)

  # SimKD (docs/methods.md §4): projector + MSE to the frozen teacher's last feature map; predicts through its head.
  c.simkd = ml_collections.ConfigDict()
  c.simkd.factor = 2  # projector bottleneck r: C_s -> C_t / r -> C_t / r -> C_t

  # ATSC (docs/methods.md §4): SimKD whose teacher adapts (MSE + w * Omega), its classifier then takes a CE step.
  c.atsc = ml_collections.ConfigDict()
  c.atsc.factor = 2  # projector bottleneck r, as simkd.factor
  # Weight of Omega = sum ||theta_T - theta_T0||^2 over the teacher's conv kernels and classifier matrix
  # (1 on CIFAR-100, 10 on ImageNet).
  c.atsc.w = 1.0
  c.atsc.classifier_update = "bias"  # CE step on the teacher classifier: 'bias' (public code) or 'all' (+ matrix)
  # True: the adapting teacher's BatchNorm uses batch statistics and updates its running averages (public code);
  # False: it keeps the pretrained running statistics (scale/shift still train).
  c.atsc.teacher_train_mode = True
  # More teachers besides teacher.model/teacher.checkpoint: ('model', 'workdir') pairs or 'model:workdir' strings.
  # Each gets its own projector and Omega; the prediction is the mean of the teachers' classifier logits.
  c.atsc.extra_teachers = ()

  # TriKD (docs/methods.md §5, a reconstruction: the paper's weights are not public). The online teacher is
  # teacher.model, initialised from teacher.checkpoint when given, else from scratch.
  c.trikd = ml_collections.ConfigDict()
  c.trikd.temperature = 4.0  # tau of every KL term
  c.trikd.lambda_anchor = 1.0  # teacher loss: weight of tau^2 KL(p_anchor || p_teacher)
  c.trikd.lambda_student_to_teacher = 1.0  # teacher loss: weight of tau^2 KL(p_student || p_teacher)
  c.trikd.lambda_teacher_to_student = 1.0  # student loss: weight of tau^2 KL(p_teacher || p_student)
  c.trikd.anchor_checkpoint = ""  # work directory of a finished CE run of model.name (the generation-1 anchor)
  # Generations G >= 1, run by tgeo_jax.methods.trikd.run_generations in WORKDIR/gen_1..gen_G; each student
  # becomes the next anchor. One train.py run trains one generation (G = 1).
  c.trikd.generations = 1

  c.log = ml_collections.ConfigDict(dict(every_steps=50, progress=True, tensorboard=False))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=0, max_to_keep=2))
  return c


def set_temperature(c: ml_collections.ConfigDict, temperature: float) -> None:
  """Sets the distillation temperature of every method group that has one."""
  for group in ("kd", "tgeo", "reweight", "rwkd", "dist", "trikd"):
    c[group].temperature = temperature
