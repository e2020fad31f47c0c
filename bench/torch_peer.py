"""A KD training step of tgeo_jax against the same step in PyTorch (an mdistiller-style loop), on the same CPU.

    python bench/torch_peer.py [--out FILE.json] [--models resnet8x4,cnn_small] [--modes cached,live]
                               [--batch 64] [--rounds 6] [--inner 2] [--no-compile] [--threads 2]

Needs PyTorch (the ``test`` extra; the package never imports it). One process runs both sides; rounds interleave
every row (order rotated each round) so background load hits all alike; each round times ``--inner`` consecutive
steps of a row, and a row's figure is the median over rounds. Images/s = batch / median step time.

**tgeo_jax**: the trainer's own jitted loop step (``dispatch.build_train_step``: ``KD.train_step`` + the
non-finite guard + the running metric sums; state and sums donated), on a fixed device batch. ``cached``:
``teacher.cache_logits='on'`` (the teacher's logits over the training set computed once, looked up per batch);
``live``: ``'off'`` (the step runs the frozen teacher's forward in eval mode).

**PyTorch**: mdistiller's ``KD`` distiller and training loop, written out: ``student.train()``, the teacher in
``eval()`` under ``torch.no_grad()`` (or a lookup in a logits table, ``cached``), loss ``0.1 CE + 0.9 tau^2
KL_tau(t || s)`` at ``tau = 4`` (``F.kl_div(log_softmax(s / tau), softmax(t / tau)).sum(1).mean() * tau^2``),
``zero_grad``, ``backward``, ``SGD(lr, momentum=0.9, weight_decay=5e-4)``, float32, NCHW (PyTorch's default
layout; mdistiller does not switch to channels-last). ``eager`` and ``compile``: the student and the teacher each
wrapped in ``torch.compile`` (default mode, inductor; backward through AOTAutograd), the optimizer step eager.

**Same everything else**: architecture (``tests/torch_cifar_models.py`` for the ResNets, whose parameter counts
equal the zoo's; ``bench/torch_reference.py``'s mirror of ``cnn_small`` / ``cnn_teacher``), batch, optimizer
(both sides SGD-momentum 0.9, coupled weight decay 5e-4, no clipping), loss weights and temperature. Weights are
each framework's own initialisation (timing does not depend on them). Models: ``resnet8x4`` (CIFAR-100 shaped,
32x32x3, 100 classes; live teacher ``resnet32x4``) and ``cnn_small`` (Fashion-MNIST shaped, 28x28x1, 10 classes;
teacher ``cnn_teacher``, as ``bench/step_cost.py``).

``torch_ratio`` in the JSON: tgeo_jax images/s over torch eager images/s (and over torch.compile), per model and
mode; > 1 means tgeo_jax is faster. Threads: ``torch.set_num_threads(--threads)``; XLA:CPU uses every core the
process may use. ``OMP_WAIT_POLICY=PASSIVE`` is set (unless already set) before torch is imported: on a machine
shared with other jobs, OpenMP's spin-waiting otherwise makes multi-threaded torch slower (torch's best setting).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402

from bench.machine import interleaved_rounds, machine_info  # noqa: E402
from bench.torch_reference import torch_student_from  # noqa: E402
from configs import cifar100, fashion_mnist  # noqa: E402
from tgeo_jax import data, dispatch, models, optim, parallel  # noqa: E402
from tgeo_jax.health import initial_health  # noqa: E402
from tgeo_jax.methods.kd import KD  # noqa: E402
from tgeo_jax.teacher import Teacher  # noqa: E402


def _torch_cifar_models():
  # tests/ is not a package: load the module by path.
  spec = importlib.util.spec_from_file_location("torch_cifar_models", os.path.join(ROOT, "tests",
                                                                                   "torch_cifar_models.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# model -> (config maker, teacher, input shape HWC, classes)
SETUPS = {
    "resnet8x4": (lambda: cifar100.get_config("resnet32x4_resnet8x4:kd"), "resnet32x4", (32, 32, 3), 100),
    "cnn_small": (lambda: fashion_mnist.get_config("kd"), "cnn_teacher", (28, 28, 1), 10),
}
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


# =========================================================================================== the JAX side

def make_config(model: str, mode: str, args):
  make, teacher, shape, classes = SETUPS[model]
  c = make()
  c.model.name, c.teacher.model = model, teacher
  c.data.name = "synthetic"
  c.data.train_subset = 0
  c.data.augment = "none"
  c.data.synthetic.num_train = max(1024, 4 * args.batch)
  c.data.synthetic.num_test = 64
  c.data.synthetic.input_shape = shape
  c.data.synthetic.num_classes = classes
  c.batch_size = args.batch
  c.val_batch_size = args.batch
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = LR
  c.optimizer.momentum = MOMENTUM
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = WEIGHT_DECAY
  c.optimizer.clip_norm = 0.0
  c.optimizer.warmup_epochs = 0.0
  c.kd.temperature, c.kd.w_ce, c.kd.w_kd = 4.0, 0.1, 0.9
  c.teacher.cache_logits = "on" if mode == "cached" else "off"
  return c


def build_jax(model: str, mode: str, args, task=None):
  """``(run(n), host batch, task, method)``: ``run(n)`` does ``n`` loop steps of the trainer's jitted step."""
  config = make_config(model, mode, args)
  task = task or data.load(config.data, seed=config.seed)
  spec = task.spec
  steps = data.steps_per_epoch(len(task.train), config.batch_size)
  student = models.split(models.create(model, num_classes=spec.num_classes, input_shape=spec.input_shape,
                                       seed=config.seed))
  tfn = models.split(models.create(config.teacher.model, num_classes=spec.num_classes,
                                   input_shape=spec.input_shape, seed=config.seed + 100))
  teacher = Teacher(config.teacher.model, tfn.graphdef, {"params": tfn.params, "rest": tfn.rest})
  tx = optim.make_optimizer(config.optimizer, steps_per_epoch=steps, num_epochs=config.num_epochs)
  method = KD(config, spec, student=student, tx=tx, teacher=teacher, task=task)
  mesh = parallel.make_mesh()
  state, frozen = method.init(jax.random.PRNGKey(config.seed))
  state, frozen = parallel.replicate(state, mesh), parallel.replicate(frozen, mesh)
  step_fn, metric_zeros, _ = dispatch.build_train_step(method, mesh, skip_nonfinite=False)
  host = data.train_batches(task.train, batch_size=args.batch, seed=0, epoch=0)[0]
  batch = parallel.shard_batch(host, mesh)
  kind = method.step_kind(0)
  health = parallel.replicate(initial_health(0), mesh)
  holder = dict(state=state, health=health, sums=metric_zeros(state, frozen, batch, kind, health))

  def run(n):
    st, h, sums = holder["state"], holder["health"], holder["sums"]
    for _ in range(n):
      st, h, sums = step_fn(st, frozen, batch, kind, h, sums)
    jax.block_until_ready((st, sums))
    holder.update(state=st, health=h, sums=sums)
    return sums

  return run, host, task, dict(method=method, frozen=frozen, holder=holder)


# ========================================================================================= the torch side

def torch_models(model: str, jax_extra):
  """``(student, teacher)`` torch modules of the same architectures (torch's own initialisation)."""
  if model.startswith("resnet"):
    tcm = _torch_cifar_models()
    classes = SETUPS[model][3]
    return tcm.build(model, classes), tcm.build(SETUPS[model][1], classes)
  method = jax_extra["method"]
  student = nnx.merge(method.student.graphdef, method.student.params, method.student.rest)
  teacher = nnx.merge(method.teacher.graphdef, method.teacher.variables["params"], method.teacher.variables["rest"])
  return (torch_student_from(student, method.spec.num_classes), torch_student_from(teacher, method.spec.num_classes))


def kd_loss(student_logits, teacher_logits, labels, temperature=4.0, w_ce=0.1, w_kd=0.9):
  """mdistiller's ``KD`` loss: ``w_ce CE + w_kd tau^2 KL_tau(t || s)`` (``mdistiller/distillers/KD.py``)."""
  log_s = F.log_softmax(student_logits / temperature, dim=1)
  p_t = F.softmax(teacher_logits / temperature, dim=1)
  soft = F.kl_div(log_s, p_t, reduction="none").sum(1).mean() * temperature**2
  return w_ce * F.cross_entropy(student_logits, labels) + w_kd * soft


def build_torch(model: str, mode: str, compiled: bool, host, num_train: int, jax_extra, device: str = "cpu"):
  student, teacher = torch_models(model, jax_extra)
  student, teacher = student.to(device), teacher.to(device)
  student.train()
  teacher.eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  x = torch.from_numpy(np.ascontiguousarray(np.asarray(host["inputs"], np.float32).transpose(0, 3, 1, 2))).to(device)
  y = torch.from_numpy(np.asarray(host["labels"], np.int64)).to(device)
  index = torch.from_numpy(np.asarray(host["index"], np.int64)).to(device)
  with torch.no_grad():  # the cached teacher logits, one row per training example
    table = torch.randn(num_train, SETUPS[model][3], device=device)
  s_fn = torch.compile(student) if compiled else student
  t_fn = torch.compile(teacher) if compiled else teacher

  def step():
    logits = s_fn(x)
    if mode == "cached":
      t_logits = table[index]
    else:
      with torch.no_grad():
        t_logits = t_fn(x)
    loss = kd_loss(logits, t_logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  def run(n):
    for _ in range(n):
      loss = step()
    return float(loss.detach())  # waits for the device

  return run, sum(p.numel() for p in student.parameters())


# ============================================================================================== the run

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="", help="write the results as JSON to this file")
  p.add_argument("--models", default="resnet8x4,cnn_small")
  p.add_argument("--modes", default="cached,live")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--inner", type=int, default=2, help="consecutive steps per row and round (resnets; x4 for CNNs)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
  p.add_argument("--device", default="cpu", help="the torch side's device (cuda on a GPU machine, where JAX "
                                                  "takes the GPU too)")
  return p.parse_args(argv)


def time_model(model: str, args) -> dict:
  runners, info, task = {}, {}, None
  for mode in args.modes.split(","):
    t0 = time.perf_counter()
    run, host, task, extra = build_jax(model, mode, args, task)
    run(1)
    info[f"jax_{mode}_compile_s"] = time.perf_counter() - t0
    runners[f"tgeo_jax/{mode}"] = run
    info["jax_params"] = models.num_params(extra["holder"]["state"]["params"])
    for compiled in ([False] if args.no_compile else [False, True]):
      name = f"torch_{'compile' if compiled else 'eager'}/{mode}"
      t0 = time.perf_counter()
      try:
        trun, n_params = build_torch(model, mode, compiled, host, len(task.train), extra, args.device)
        trun(1)
      except Exception as e:  # noqa: BLE001 - torch.compile needs a C++ toolchain; report and go on
        info[f"{name}_error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"  {model} {name}: failed: {info[f'{name}_error']}", file=sys.stderr, flush=True)
        continue
      info[f"{name}_compile_s"] = time.perf_counter() - t0
      info["torch_params"] = n_params
      runners[name] = trun
    print(f"  {model} {mode}: built", file=sys.stderr, flush=True)
  inner = args.inner * (1 if model.startswith("resnet") else 4)
  for fn in runners.values():
    fn(args.warmup)

  def report(r, times):
    print(f"  {model} round {r + 1}/{args.rounds}: " + " ".join(f"{k}={1e3 * v[-1]:.0f}ms" for k, v in times.items()),
          file=sys.stderr, flush=True)

  times = interleaved_rounds(runners, rounds=args.rounds, inner=inner, on_round=report)
  med = {k: statistics.median(v) for k, v in times.items()}
  ips = {k: args.batch / v for k, v in med.items()}
  ratio = {}
  for mode in args.modes.split(","):
    ours = f"tgeo_jax/{mode}"
    ratio[mode] = {f"over_{k.split('/')[0]}": ips[ours] / ips[k] for k in ips if k.endswith(f"/{mode}")
                   and k != ours}
  return dict(model=model, teacher=SETUPS[model][1], input_shape=SETUPS[model][2], num_classes=SETUPS[model][3],
              batch=args.batch, inner=inner, rounds=args.rounds, images_per_s=ips,
              median_ms={k: 1e3 * v for k, v in med.items()},
              times_ms={k: [round(1e3 * t, 2) for t in v] for k, v in times.items()}, torch_ratio=ratio, **info)


def main(argv=None):
  args = parse_args(argv)
  torch.set_num_threads(args.threads)
  results = [time_model(m, args) for m in args.models.split(",")]
  print(f"\n{'model':10s} {'mode':7s} " + " ".join(f"{k:>16s}" for k in ("tgeo_jax", "torch_eager", "torch_compile"))
        + "  ratio/eager  ratio/compile  (images/s)")
  for res in results:
    for mode, r in res["torch_ratio"].items():
      ips = res["images_per_s"]
      cells = [ips.get(f"{k}/{mode}", float("nan")) for k in ("tgeo_jax", "torch_eager", "torch_compile")]
      print(f"{res['model']:10s} {mode:7s} " + " ".join(f"{c:16.1f}" for c in cells)
            + f"  {r.get('over_torch_eager', float('nan')):11.2f}  {r.get('over_torch_compile', float('nan')):13.2f}")
  out = dict(command="python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None
                                                                                else sys.argv[1:])),
             env={k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                                                  "XLA_FLAGS")},
             device=machine_info(torch=torch.__version__, torch_threads=torch.get_num_threads()),
             results=results)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
