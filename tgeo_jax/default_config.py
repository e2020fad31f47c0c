"""The defaults every config starts from (``configs/*.py`` override them).

The fields every run has are set here; each method's own group (``kd``, ``tgeo``, ...) comes from the method's
class (``Method.defaults()``), composed through the method registry, so a method's defaults live beside it.
Kept in the package so that config files, which are not a package, share one definition:
``from tgeo_jax.default_config import base_config``.
"""

import ml_collections

__all__ = ["method_groups", "base_config", "set_temperature", "load_config_file", "override",
           "CONFIG_FILES", "train_command"]

# The config file of each dataset's protocol (what a hint tells a user to run for this run's data).
CONFIG_FILES = {"fashion_mnist": "configs/fashion_mnist.py", "synthetic": "configs/fashion_mnist.py",
                "cifar100": "configs/cifar100.py", "imagenet2012": "configs/imagenet.py",
                "attack": "configs/attack.py", "criteo": "configs/criteo.py"}


def method_groups() -> dict:
  """``{config group: defaults}`` of every registered method that has a group."""
  from tgeo_jax import methods
  groups = {}
  for name in methods.available():
    cls = methods.get_class(name)
    if cls.config_group is not None and cls.config_group not in groups:
      groups[cls.config_group] = cls.defaults()
  return groups


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
  # Multi-host timeouts (seconds): how long a process waits for the others to start, and after how long without a
  # heartbeat a process counts as dead (every process then stops with one line, exit 1; nothing is lost).
  c.distributed_init_timeout = 300
  c.distributed_heartbeat_timeout = 100
  # float32 | bfloat16: the student's and teacher's convolutions and matmuls in bfloat16 (GPU/TPU); parameters,
  # BatchNorm statistics, heads, logits, losses, DIST's correlations and TGeo-KD's α machinery stay float32.
  c.compute_dtype = "float32"
  # JAX's persistent compilation cache: '' = off (or JAX_COMPILATION_CACHE_DIR, which JAX reads itself); a
  # directory = compiled steps are stored there and reused by the next run of the same program (compiles that
  # take over jax_persistent_cache_min_compile_time_secs, 1 s by default). A failed write warns and continues.
  c.compilation_cache_dir = ""

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
  # TFDS image datasets (cifar100, imagenet2012; tgeo_jax/data/tfds_sources.py). The TFDS name to read with that
  # protocol ('' = data.name), e.g. a dataset prepared locally with tgeo_jax.data.tfds_build (features image, label).
  c.data.tfds_name = ""
  # Decode the whole split once into memory (uint8, cached on disk): auto = on for cifar100, off for imagenet2012
  # | on | off. The batches are bit-identical either way.
  c.data.in_memory = "auto"
  # Processes decoding training batches (tgeo_jax.data.iterate): None = auto (0 for in-memory data, else
  # min(16, os.cpu_count() - 1) when that is >= 2, else 0) | an integer >= 0 (0 = threads in this process).
  c.data.workers = ml_collections.config_dict.placeholder(int)
  # Where decoded in-memory splits are cached ('' = .tgeo_cache in data.dir, or in TFDS's default data directory).
  c.data.cache_dir = ""
  # imagenet2012: decode each JPEG at the largest DCT scale whose shorter side stays >= 256 before the resize to 256
  # (PIL Image.draft): faster on large images, pixels differ slightly from a full decode (README, Data pipeline).
  c.data.jpeg_draft = False
  # Smoke-test a TFDS config (cifar100, imagenet2012) without its data: tfds.testing.mock_data, mock_examples random
  # examples per split, labelled as not real (a warning line, data.mock in summary.json, a mock- data digest).
  c.data.mock = False
  c.data.mock_examples = 128
  # Outlier probe: append this many Gaussian-noise examples with random labels to the training part (the α
  # analytics then report their mean α against normal examples; paper: outliers < 0.3, normal 0.4-0.6).
  c.data.outliers = 0
  c.data.synthetic = ml_collections.ConfigDict(
      dict(num_train=512, num_test=256, input_shape=(28, 28, 1), num_classes=10, seed=0))

  # The device-resident pipeline (tgeo_jax/data/device_pipeline.py): the training and validation parts stored on
  # the device(s), each batch gathered, augmented and normalised inside the jitted step, up to steps_per_dispatch
  # steps per dispatch (one lax.scan; a chunk ends at every log point, checkpoint and stop, so the loop acts
  # where it would step by step; a signal is honoured at the chunk's end). The same batches as the host pipeline
  # bit for bit, and on CPU the same training bit for bit. mode: auto (on where it can hold the task in a quarter
  # of the device's memory) | on (an error for a task it cannot hold: data read per record, an augmentation it
  # cannot apply, several processes) | off (the host pipeline: grain batches, one dispatch per step).
  c.device_pipeline = ml_collections.ConfigDict(dict(mode="auto", steps_per_dispatch=8))

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

  for group, defaults in method_groups().items():
    c[group] = defaults

  # Study only, off: a teacher made confidently wrong on a known set of training examples (tgeo_jax/study_teacher.py,
  # docs/study4.md). kind: none | random_examples (a fraction of the examples) | classes (every example of these).
  from tgeo_jax import study_teacher
  c.study_wrong_teacher = study_teacher.defaults()

  # every_steps: a 'kind: train' record (training averages, steps/s, examples/s) in metrics.jsonl/TensorBoard.
  # profile_steps: '' or 'A:B', a jax.profiler trace of steps A <= step < B into <workdir>/profile.
  # wandb: the same records to Weights & Biases (pip install 'tgeo_jax[wandb]'; WANDB_MODE respected; report.py).
  c.log = ml_collections.ConfigDict(dict(every_steps=50, progress=True, tensorboard=False, wandb=False,
                                         profile_steps=""))
  # async_save: the checkpoint is copied to host memory at the save point and written by a background thread
  # while training continues (single-process runs; multi-host saves stay synchronous).
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=0, max_to_keep=2, async_save=True))
  return c


def set_temperature(c: ml_collections.ConfigDict, temperature: float) -> None:
  """Sets the distillation temperature of every method group that has one."""
  for group in method_groups():
    if "temperature" in c[group]:
      c[group].temperature = temperature


def train_command(config, model: str) -> str:
  """The command that trains a CE model ``model`` (a teacher, or TriKD's anchor) on this config's data, e.g.
  ``python train.py --config=configs/cifar100.py:teacher:resnet32x4 --workdir=DIR --config.data.dir=DIR``."""
  name = config.data.name
  path = CONFIG_FILES.get(name, "configs/fashion_mnist.py")
  arg = f"teacher:{model}" if name == "cifar100" else "teacher"
  extra = f" --config.model.name={model}" if name != "cifar100" else ""
  data = "".join(f" --config.data.{field}={config.data[field]}" for field in ("dir", "file", "tfds_name", "mock")
                 if field in config.data and config.data[field])
  return f"python train.py --config={path}:{arg} --workdir=DIR{extra}{data}"


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of a config file (e.g. ``configs/fashion_mnist.py``), imported by path: config files
  are not a package, and the demo, the study and the tests load them outside the CLI's ``config_flags``."""
  import importlib.util
  import os
  name = "tgeo_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def override(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Sets dotted fields in place and returns ``config``: ``overrides`` is a ``{"a.b": value}`` dict, or an
  iterable of ``"a.b=value"`` strings whose values are parsed as Python literals when they are one (``0.1``,
  ``True``, ``(32, 16)``), else kept as strings, as ``--config.a.b=value`` on the command line."""
  import ast
  if not isinstance(overrides, dict):
    items = {}
    for item in overrides:
      key, sep, text = item.partition("=")
      if not sep:
        raise ValueError(f"override {item!r}: expected FIELD=VALUE")
      try:
        items[key] = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        items[key] = text
    overrides = items
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config
