"""TGeo-KD's exact bilevel step written the way a PyTorch user would, checked against tgeo_jax and timed beside it.

    python bench/torch_reference.py [--out FILE.json] [--models mlp,cnn_small] [--batch 128] [--val-batch 128]
                                    [--rounds 15] [--inner 5] [--pre-steps 3] [--torch-threads N] [--no-float64]
                                    [--data fashion_mnist|synthetic]

Needs PyTorch (``pip install torch==2.13.0``, the CPU wheel; the ``bench`` extra), which the package never imports.

**The step** (docs/methods.md §2, tgeo_jax's default ``reuse`` ordering): one meta step of TGeo-KD is

1. the lookahead θ′ = U(∇θ L_train(θ; φ)) with ``L_train = mean_i [α_i τ² KL_τ(t_i‖s_i) + (1 − α_i) CE(s_i, y_i)]``,
   α_i = f_φ(Δ_i) (fusion net on the 'reference' relation features of S, T, G and the class-mean teacher T̄, τ = 4),
   U the student's own optimizer (the config default: ``clip_by_global_norm(1.0) -> add_decayed_weights(5e-4) ->
   sgd(lr, momentum 0.9)``, PyTorch's ``SGD(momentum=0.9, weight_decay=5e-4)`` after ``clip_grad_norm_(1.0)``);
2. the hypergradient ∂ CE_val(θ′(φ)) / ∂φ on a validation batch (BatchNorm in train mode, as ``tgeo.val_bn_mode``);
3. the fusion net's Adam step (``tgeo.fusion_lr`` 1e-3);
4. the real student step, which in the reuse ordering *is* θ′ (params, momentum buffers, BatchNorm statistics).

tgeo_jax runs it as ``TGeoKD.train_step(state, frozen, batch, "meta")`` (``bilevel.one_step``: one
linearization of the train forward, its transpose and one JVP). The PyTorch version (``TorchTGeoKD`` below) is the
idiom of Meta-Weight-Net-style code: ``torch.func.functional_call`` of the student with its parameters,
``torch.autograd.grad(L_train, θ, create_graph=True)``, the optimizer written out differentiably, the validation
forward at θ′ by ``functional_call`` again, ``torch.autograd.grad(L_val, φ)`` (double backward), then
``torch.optim.Adam`` on φ and an in-place copy of θ′ into the model. Global-norm clipping is written as optax
computes it (``g if ‖g‖ < c else g·c/‖g‖``; ``torch.nn.utils.clip_grad_norm_`` differs only by its 1e-6 in the
denominator) so the two steps are the same function.

**Same everything**: the student (``mlp`` / ``cnn_small`` from ``tgeo_jax/models/small.py`` rebuilt in torch, with
the JAX initial weights copied in: Linear kernels ``[in, out]`` -> ``[out, in]``, conv kernels HWIO -> OIHW, the MLP's
first layer re-ordered from NHWC to NCHW flattening, BatchNorm ``momentum 0.9`` -> torch's ``0.1``, ε 1e-5), the
fusion net and its Adam state, the momentum buffers, the training batch, the validation batch, the learning rate,
the teacher logits (a frozen randomly initialised ``cnn_medium`` teacher whose logits are cached per example, as
``teacher.cache_logits`` does) and T̄. Both start from the state after ``--pre-steps`` JAX meta steps (so momentum,
Adam moments and every fusion-net layer are non-trivial: at initialisation the output layer is zero and the hidden
layers' hypergradient is exactly 0).

**Check**: the hypergradient of both frameworks (and of ``bilevel.one_step_autodiff``, nested
``jax.grad``), relative L2 error over all fusion-net parameters, in float32 and (unless ``--no-float64``) float64;
in float64 the per-sample losses are computed without tgeo_jax.losses' float32 cast (otherwise identical). Also
the losses, α, and the state after the whole step (student parameters, BatchNorm running statistics, fusion net).
One known difference: torch stores the *unbiased* batch variance in ``running_var``, Flax the biased one (factor
n/(n−1), n = B·H·W per channel); it does not enter the step's outputs (train-mode BatchNorm normalises with the
biased batch variance in both).

**Timing**: median wall time per meta step on the same CPU, the JAX step jitted (state donated, as the trainer
does; ``block_until_ready`` after each timed block) against torch eager. XLA:CPU uses every core this process may
use; torch is timed with ``torch.set_num_threads`` = that core count (the like-for-like setting) and with 1 thread
(``--torch-threads``): on a machine shared with other jobs, OpenMP's spin-waiting makes multi-threaded torch far
slower (run with ``OMP_WAIT_POLICY=PASSIVE`` to see that, recorded in the JSON), and the comparison should be
against torch's best setting. Rounds interleave the rows (rotated order each round) so background load hits all
alike; each round times ``--inner`` consecutive steps of one row. JAX rows: the trainer's own jitted step
(``trainer.make_guarded_step``: the method step plus its on-device NaN/Inf record) and the bare
``method.train_step``. Every row repeats the step on the same batch (no data loading).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.machine import interleaved_rounds, machine_info  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from configs import fashion_mnist  # noqa: E402
from tgeo_jax import bilevel, data, models, optim, trainer  # noqa: E402
from tgeo_jax.teacher import Teacher  # noqa: E402
from tgeo_jax.methods.tgeo import TGeoKD  # noqa: E402
from tgeo_jax.models import small  # noqa: E402

TARGET_RATIO = 1.0  # torch / jax wall time per meta step on CPU: tgeo_jax at least as fast
TOLERANCE_F32 = 1e-3  # relative L2 error of the hypergradient, float32
TOLERANCE_F64 = 1e-8


# ============================================================================================ the torch side

class TorchMLP(nn.Module):
  """``small.MLP``: flatten, Linear + LeakyReLU(0.01) per hidden layer, linear head. Input NCHW."""

  def __init__(self, dims, num_classes):
    super().__init__()
    self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
    self.head = nn.Linear(dims[-1], num_classes)

  def forward(self, x):
    h = x.flatten(1)
    for layer in self.layers:
      h = F.leaky_relu(layer(h), 0.01)
    return self.head(h)


class TorchCNN(nn.Module):
  """``small.CNN``: (3x3 conv without bias, BatchNorm, ReLU) x ``convs_per_stage[s]`` in stage s, 2x2 average
  pooling between stages, global average pooling, linear head. Input NCHW."""

  def __init__(self, in_channels, widths, convs_per_stage, num_classes, *, bn_momentum, bn_eps):
    super().__init__()
    convs, norms, pools, c_in = [], [], [], in_channels
    for stage, (width, count) in enumerate(zip(widths, convs_per_stage)):
      for j in range(count):
        convs.append(nn.Conv2d(c_in, width, 3, padding=1, bias=False))  # 'SAME' for a 3x3, stride 1
        norms.append(nn.BatchNorm2d(width, eps=bn_eps, momentum=bn_momentum))
        pools.append(j == count - 1 and stage < len(widths) - 1)
        c_in = width
    self.convs, self.norms, self.pools = nn.ModuleList(convs), nn.ModuleList(norms), pools
    self.head = nn.Linear(c_in, num_classes)

  def forward(self, x):
    h = x
    for conv, norm, pool in zip(self.convs, self.norms, self.pools):
      h = F.relu(norm(conv(h)))
      if pool:
        h = F.avg_pool2d(h, 2)
    return self.head(h.mean(dim=(2, 3)))


class TorchFusionNet(nn.Module):
  """``tgeo.FusionNet``: D -> hidden... -> 1, LeakyReLU(0.01), sigmoid (``logits`` is the pre-sigmoid output)."""

  def __init__(self, dims):
    super().__init__()
    self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
    self.out = nn.Linear(dims[-1], 1)

  def logits(self, feats):
    h = feats
    for layer in self.layers:
      h = F.leaky_relu(layer(h), 0.01)
    return self.out(h)[:, 0]


def relation_features(student_logits, teacher_logits, labels, class_mean):
  """The 'reference' layout (9K): [s, t, g, t̄, (t̄−s)², (g−s)², (t−s)², (t−g)², (t̄−g)²], all without gradient."""
  s = F.softmax(student_logits.detach(), dim=-1)
  t = F.softmax(teacher_logits, dim=-1)
  g = F.one_hot(labels, s.shape[-1]).to(s.dtype)
  tbar = class_mean[labels]
  return torch.cat([s, t, g, tbar, (tbar - s) ** 2, (g - s) ** 2, (t - s) ** 2, (t - g) ** 2, (tbar - g) ** 2], -1)


def per_sample_losses(logits, teacher_logits, labels, tau):
  """``(τ² KL_τ(t‖s), CE(s, y))`` per sample."""
  log_s = F.log_softmax(logits / tau, dim=-1)
  log_t = F.log_softmax(teacher_logits / tau, dim=-1)
  soft = tau**2 * (log_t.exp() * (log_t - log_s)).sum(-1)
  hard = F.cross_entropy(logits, labels, reduction="none")
  return soft, hard


class TorchTGeoKD:
  """One TGeo-KD meta step (reuse ordering) in PyTorch: lookahead with ``create_graph=True``, double backward to φ,
  Adam on φ, θ′ becomes the student's state."""

  def __init__(self, student, fusion, *, teacher_table, class_mean, lr, momentum, weight_decay, clip_norm,
               temperature, fusion_lr, val_bn_train=True, alpha_center=None):
    self.student, self.fusion = student, fusion
    self.teacher_table, self.class_mean = teacher_table, class_mean
    self.lr, self.momentum, self.weight_decay, self.clip_norm = lr, momentum, weight_decay, clip_norm
    self.tau, self.val_bn_train, self.alpha_center = temperature, val_bn_train, alpha_center
    self.names = [n for n, _ in student.named_parameters()]
    self.params = dict(student.named_parameters())
    self.buffers = dict(student.named_buffers())
    self.momentum_buffers = {n: torch.zeros_like(p) for n, p in self.params.items()}
    self.fusion_opt = torch.optim.Adam(fusion.parameters(), lr=fusion_lr, betas=(0.9, 0.999), eps=1e-8)

  def alpha(self, student_logits, teacher_logits, labels):
    z = self.fusion.logits(relation_features(student_logits, teacher_logits, labels, self.class_mean))
    if self.alpha_center is not None:  # tgeo.alpha_normalization = 'center'
      z = z - z.mean() + self.alpha_center
    return torch.sigmoid(z)

  def lookahead(self, x, y, index, xv, yv):
    """θ′(φ) and the hypergradient; returns a dict (θ′ and the new momentum buffers keep no graph)."""
    teacher_logits = self.teacher_table[index]
    self.student.train()
    # Train-mode BatchNorm updates the running statistics in place (self.buffers are the module's own tensors).
    logits = functional_call(self.student, (self.params, self.buffers), (x,))
    soft, hard = per_sample_losses(logits, teacher_logits, y, self.tau)
    alpha = self.alpha(logits.detach(), teacher_logits, y)
    train_loss = (alpha * soft + (1 - alpha) * hard).mean()
    grads = torch.autograd.grad(train_loss, [self.params[n] for n in self.names], create_graph=True)
    # The student's optimizer, differentiably: clip_by_global_norm -> + wd θ -> momentum SGD.
    if self.clip_norm:
      norm = torch.sqrt(sum((g * g).sum() for g in grads))
      grads = [torch.where(norm < self.clip_norm, g, g / norm * self.clip_norm) for g in grads]
    new_params, new_bufs = {}, {}
    for n, g in zip(self.names, grads):
      p = self.params[n]
      buf = g + self.weight_decay * p + self.momentum * self.momentum_buffers[n]
      new_bufs[n] = buf
      new_params[n] = p - self.lr * buf
    # The validation forward must not touch the running statistics: give it copies.
    self.student.train(self.val_bn_train)
    val_logits = functional_call(self.student, (new_params, {k: v.clone() for k, v in self.buffers.items()}), (xv,))
    self.student.train()
    val_loss = F.cross_entropy(val_logits, yv)
    hypergrad = torch.autograd.grad(val_loss, list(self.fusion.parameters()))
    return dict(hypergrad=hypergrad, new_params=new_params, new_bufs=new_bufs, train_loss=train_loss.detach(),
                val_loss=val_loss.detach(), alpha=alpha.detach())

  def meta_step(self, x, y, index, xv, yv):
    out = self.lookahead(x, y, index, xv, yv)
    for p, g in zip(self.fusion.parameters(), out["hypergrad"]):
      p.grad = g
    self.fusion_opt.step()
    with torch.no_grad():  # reuse ordering: the lookahead step is the real step
      for n in self.names:
        self.params[n].copy_(out["new_params"][n])
        self.momentum_buffers[n] = out["new_bufs"][n].detach()
    return out


# =================================================================================== JAX <-> torch layouts

def _np(x):
  return np.asarray(jax.device_get(x))


def _t(x, dtype=None):
  """A torch tensor holding a *copy* of ``x`` (never a view of a JAX buffer: torch may write in place)."""
  return torch.tensor(np.array(x), dtype=dtype)


def student_tensors(module, params, rest, input_shape):
  """``{torch name: array in torch layout}`` for a small.MLP / small.CNN from its parameter/statistics states;
  ``input_shape`` is one example's NHWC shape."""
  p, r = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  out = {}
  if isinstance(module, small.MLP):
    for i in range(len(module.layers)):
      k = _np(p["layers"][i]["kernel"])  # [in, out]
      if i == 0:
        # NHWC flattening (JAX) -> NCHW flattening (torch): rows reordered (a no-op for one channel).
        h, w, c = input_shape
        k = k.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
      out[f"layers.{i}.weight"] = k.T
      out[f"layers.{i}.bias"] = _np(p["layers"][i]["bias"])
  elif isinstance(module, small.CNN):
    for i in range(len(module.convs)):
      out[f"convs.{i}.weight"] = _np(p["convs"][i]["kernel"]).transpose(3, 2, 0, 1)  # HWIO -> OIHW
      out[f"norms.{i}.weight"] = _np(p["norms"][i]["scale"])
      out[f"norms.{i}.bias"] = _np(p["norms"][i]["bias"])
      out[f"norms.{i}.running_mean"] = _np(r["norms"][i]["mean"])
      out[f"norms.{i}.running_var"] = _np(r["norms"][i]["var"])
  else:
    raise ValueError(f"no torch mirror for {type(module).__name__}")
  out["head.weight"] = _np(p["head"]["kernel"]).T
  out["head.bias"] = _np(p["head"]["bias"])
  return out


def fusion_tensors(meta_params):
  p = nnx.to_pure_dict(meta_params)
  out = {}
  for i in range(len(p["layers"])):
    out[f"layers.{i}.weight"] = _np(p["layers"][i]["kernel"]).T
    out[f"layers.{i}.bias"] = _np(p["layers"][i]["bias"])
  out["out.weight"] = _np(p["out"]["kernel"]).T
  out["out.bias"] = _np(p["out"]["bias"])
  return out


def torch_student_from(module, num_classes):
  if isinstance(module, small.MLP):
    dims = [module.layers[0].in_features] + [layer.out_features for layer in module.layers]
    return TorchMLP(dims, num_classes)
  if isinstance(module, small.CNN):
    if isinstance(module, small.CNNDenseHead):
      raise ValueError("no torch mirror for the dense-head CNN")
    norm = module.norms[0]
    widths, counts, n = [], [], 0  # the stages: a stage ends at each pool, and at the last conv
    for i, (conv, pool) in enumerate(zip(module.convs, module.pool_after)):
      n += 1
      if pool or i == len(module.convs) - 1:
        widths.append(conv.out_features)
        counts.append(n)
        n = 0
    return TorchCNN(module.convs[0].in_features, widths, counts, num_classes,
                    bn_momentum=1.0 - norm.momentum, bn_eps=norm.epsilon)
  raise ValueError(f"no torch mirror for {type(module).__name__}")


def load_into(module: nn.Module, arrays, dtype):
  named = dict(module.named_parameters()) | dict(module.named_buffers())
  with torch.no_grad():
    for name, value in arrays.items():
      t = named[name]
      if tuple(t.shape) != value.shape:
        raise ValueError(f"{name}: torch {tuple(t.shape)} vs jax {value.shape}")
      t.copy_(_t(value, dtype))


def torch_batch(batch, dtype):
  """Host batch (NHWC numpy) -> torch tensors (NCHW)."""
  def images(x):
    return _t(np.asarray(x).transpose(0, 3, 1, 2), dtype).contiguous()
  return dict(x=images(batch["inputs"]), y=_t(batch["labels"], torch.int64), index=_t(batch["index"], torch.int64),
              xv=images(batch["val"]["inputs"]), yv=_t(batch["val"]["labels"], torch.int64))


def build_torch(method, state, frozen, dtype):
  """The torch mirror of ``method`` at JAX ``state`` (student, momentum, fusion net, its Adam state, lr)."""
  module = nnx.merge(method.student.graphdef, state["params"], state["rest"])
  shape = tuple(method.spec.input_shape)
  student = torch_student_from(module, method.spec.num_classes).to(dtype)
  load_into(student, student_tensors(module, state["params"], state["rest"], shape), dtype)
  fnet = nnx.merge(method.fusion_graphdef, state["meta_params"])
  fusion = TorchFusionNet([fnet.layers[0].in_features] + [layer.out_features for layer in fnet.layers]).to(dtype)
  load_into(fusion, fusion_tensors(state["meta_params"]), dtype)

  cfg, opt = method.cfg, method.config.optimizer
  if opt.name != "sgd" or opt.nesterov:
    raise ValueError("the torch mirror implements the SGD-momentum student optimizer only")
  # The schedule evaluated on the optimizer's own count, as inside the step: in the run's float dtype (float64
  # under x64, so this program and the step's agree to float64 rounding, not to float32's).
  count = optax.tree_utils.tree_get(state["opt_state"], "count")
  steps_per_epoch = data.steps_per_epoch(len(method.task.train), method.config.batch_size)
  schedule = optim.make_schedule(opt, steps_per_epoch=steps_per_epoch, num_epochs=method.config.num_epochs)
  lr = float(jax.jit(schedule)(count))
  normalization = cfg.get("alpha_normalization", "none")
  alpha_init = cfg.get("alpha_init", 0.5)
  table = _t(frozen["teacher_logits_table"], dtype)
  step = TorchTGeoKD(student, fusion, teacher_table=table,
                     class_mean=_t(frozen["class_mean"], dtype), lr=lr,
                     momentum=opt.momentum, weight_decay=opt.weight_decay, clip_norm=opt.clip_norm,
                     temperature=cfg.temperature, fusion_lr=cfg.fusion_lr, val_bn_train=cfg.val_bn_mode == "train",
                     alpha_center=math.log(alpha_init / (1 - alpha_init)) if normalization == "center" else None)
  if cfg.fusion_weight_decay or cfg.fusion_clip_norm:
    raise ValueError("the torch mirror implements the fusion net's plain Adam only")
  # Momentum buffers and the fusion net's Adam moments.
  trace = optax.tree_utils.tree_get(state["opt_state"], "trace")
  trace_t = student_tensors(module, trace, state["rest"], shape)
  for n in step.names:
    step.momentum_buffers[n] = _t(trace_t[n], dtype)
  mu = fusion_tensors(optax.tree_utils.tree_get(state["meta_opt_state"], "mu"))
  nu = fusion_tensors(optax.tree_utils.tree_get(state["meta_opt_state"], "nu"))
  adam_count = int(optax.tree_utils.tree_get(state["meta_opt_state"], "count"))
  if adam_count:
    for n, p in fusion.named_parameters():
      step.fusion_opt.state[p] = {"step": torch.tensor(float(adam_count)),
                                  "exp_avg": _t(mu[n], dtype), "exp_avg_sq": _t(nu[n], dtype)}
  return step, module, lr


# ============================================================================================= the JAX side

def make_config(model: str, args):
  config = fashion_mnist.get_config("tgeo")
  config.model.name = model
  config.batch_size = args.batch
  config.val_batch_size = args.val_batch
  config.teacher.model = args.teacher
  config.teacher.cache_logits = "on"
  config.tgeo.analysis_examples = 0
  if args.data == "synthetic":
    config.data.name = "synthetic"
    config.data.train_subset = 0
    n = max(2048, int(np.ceil(1.25 * args.val_batch / config.data.val_fraction)), 2 * args.batch)
    config.data.synthetic.num_train = n
    config.data.synthetic.num_test = 64
    config.data.synthetic.input_shape = tuple(args.input_shape)
  return config


def build_jax(model: str, args, task=None):
  """``(method, state, task)``: TGeoKD on ``model`` with a randomly initialised, cached-logits teacher."""
  config = make_config(model, args)
  if task is None:
    task = data.load(config.data, seed=config.seed)
  spec = task.spec
  steps = data.steps_per_epoch(len(task.train), config.batch_size)
  student = models.split(models.create(model, num_classes=spec.num_classes, input_shape=spec.input_shape,
                                       seed=config.seed))
  tfn = models.split(models.create(config.teacher.model, num_classes=spec.num_classes, input_shape=spec.input_shape,
                                   seed=config.seed + 100))
  teacher = Teacher(config.teacher.model, tfn.graphdef, {"params": tfn.params, "rest": tfn.rest})
  tx = optim.make_optimizer(config.optimizer, steps_per_epoch=steps, num_epochs=config.num_epochs)
  method = TGeoKD(config, spec, student=student, tx=tx, teacher=teacher, task=task)
  state, frozen = method.init(jax.random.PRNGKey(config.seed))
  return method, state, frozen, task


def host_batch(task, args, k):
  batch = data.train_batches(task.train, batch_size=args.batch, seed=0, epoch=0)[k]
  batch["val"] = data.validation_batches(task.val, batch_size=args.val_batch, seed=0)[k]
  return batch


def to_dtype(tree, dtype):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
                      else jnp.asarray(x), tree)


def _exact_losses(logits, teacher_logits, labels, tau):
  # tgeo_jax.losses computes in float32 whatever the input; the float64 check needs it in the input's dtype.
  log_s = jax.nn.log_softmax(logits / tau, axis=-1)
  log_t = jax.nn.log_softmax(teacher_logits / tau, axis=-1)
  soft = tau**2 * jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  hard = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None].astype(jnp.int32), -1)[:, 0]
  return soft, hard


def jax_hypergrads(method, state, frozen, batch, *, exact_dtype: bool, with_autodiff: bool = True):
  """``{"fast": HypergradResult, "autodiff": HypergradResult}`` of the meta step's lookahead, as the method's
  meta step computes it (``bilevel.one_step``; ``one_step_autodiff``, nested ``jax.grad``)."""

  def pieces():
    if not exact_dtype:
      return method.per_sample_fn(frozen), method.val_loss_fn
    tau, val_train = method.cfg.temperature, method.cfg.val_bn_mode == "train"

    def per_sample(params, rest, b):
      logits, new_rest = method.student_forward(params, rest, b["inputs"])
      return (_exact_losses(logits, b["teacher_logits"], b["labels"], tau),
              (new_rest, method.context(frozen, b, logits)))

    def val_loss(params, rest, val_batch):
      logits, _ = method.student_forward(params, rest, val_batch["inputs"], train=val_train)
      log_p = jax.nn.log_softmax(logits, -1)
      return -jnp.mean(jnp.take_along_axis(log_p, val_batch["labels"][:, None].astype(jnp.int32), -1))

    return per_sample, val_loss

  def run(fn):
    def f(st, b):
      per_sample, val_loss = pieces()
      student = bilevel.StudentState(st["params"], st["rest"], st["opt_state"])
      return fn(method.weight_fn, st["meta_params"], per_sample, method.step_batch(st, frozen, b), val_loss,
                b["val"], student, method.tx)
    return jax.jit(f)(state, batch)

  out = {"fast": run(bilevel.one_step)}
  if with_autodiff:
    out["autodiff"] = run(bilevel.one_step_autodiff)
  return out


# ============================================================================================ comparisons

def rel_err(a_list, b_list):
  """``‖a − b‖ / ‖b‖`` over all leaves concatenated, and the max abs difference."""
  a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in a_list])
  b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in b_list])
  return dict(rel_l2=float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)),
              max_abs=float(np.max(np.abs(a - b))), norm=float(np.linalg.norm(b)))


def check(model: str, args, task, dtype_name: str, *, with_autodiff: bool = True):
  """Agreement of one meta step between tgeo_jax and the torch mirror, from the state after ``pre_steps``."""
  jdtype = {"float32": jnp.float32, "float64": jnp.float64}[dtype_name]
  tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
  method, state, frozen, _ = build_jax(model, args, task)
  state, frozen = to_dtype(state, jdtype), to_dtype(frozen, jdtype)
  step_fn = jax.jit(lambda st, b: method.train_step(st, frozen, b, "meta"))
  for k in range(args.pre_steps):
    state, _ = step_fn(state, to_dtype(host_batch(task, args, k), jdtype))
  hb = host_batch(task, args, args.pre_steps)
  batch = to_dtype(hb, jdtype)
  exact = dtype_name == "float64"
  shape = tuple(method.spec.input_shape)
  jx = jax_hypergrads(method, state, frozen, batch, exact_dtype=exact, with_autodiff=with_autodiff)
  tstep, module, lr = build_torch(method, state, frozen, tdtype)
  tb = torch_batch(hb, tdtype)
  out = tstep.meta_step(tb["x"], tb["y"], tb["index"], tb["xv"], tb["yv"])

  fnames = [n for n, _ in tstep.fusion.named_parameters()]
  fast = jx["fast"].diagnostics
  t_hyper = [g.detach().numpy() for g in out["hypergrad"]]

  def jax_hyper(res):
    ft = fusion_tensors(res.meta_grad)
    return [ft[n] for n in fnames]

  result = dict(model=model, dtype=dtype_name, pre_steps=args.pre_steps, lr=lr,
                exact_losses_in_jax=exact,
                hypergrad_torch_vs_jax=rel_err(t_hyper, jax_hyper(jx["fast"])),
                hypergrad_per_param={n: rel_err([t], [j]) for n, t, j in zip(fnames, t_hyper, jax_hyper(jx["fast"]))},
                val_loss=dict(torch=float(out["val_loss"]), jax=float(fast["val_loss"])),
                train_loss=dict(torch=float(out["train_loss"]), jax=float(fast["train_loss"])),
                alpha=rel_err([out["alpha"].numpy()], [_np(fast["alpha"])]),
                alpha_mean=float(np.mean(_np(fast["alpha"]))), alpha_std=float(np.std(_np(fast["alpha"]))))
  if with_autodiff:
    result["hypergrad_torch_vs_jax_autodiff"] = rel_err(t_hyper, jax_hyper(jx["autodiff"]))
    result["hypergrad_jax_vs_jax_autodiff"] = rel_err(jax_hyper(jx["fast"]), jax_hyper(jx["autodiff"]))
  # The lookahead θ′ (= the real step's student parameters).
  jt = student_tensors(module, jx["fast"].student.params, jx["fast"].student.rest, shape)
  j0 = student_tensors(module, state["params"], state["rest"], shape)
  tp = {n: p.detach().numpy() for n, p in tstep.student.named_parameters()}
  result["student_params_after_step"] = rel_err([tp[n] for n in tstep.names], [jt[n] for n in tstep.names])
  # θ′ − θ: the step itself, without the (identical) starting point.
  result["student_update"] = rel_err([tp[n] - j0[n] for n in tstep.names], [jt[n] - j0[n] for n in tstep.names])
  buffers = {n: b.detach().numpy() for n, b in tstep.student.named_buffers() if "running" in n}
  if buffers:
    result["running_mean_after_step"] = rel_err([buffers[n] for n in buffers if "mean" in n],
                                                [jt[n] for n in buffers if "mean" in n])
    result["running_var_after_step"] = rel_err([buffers[n] for n in buffers if "var" in n],
                                               [jt[n] for n in buffers if "var" in n])
  if not exact and with_autodiff:
    # The whole library step (its losses are float32): the fusion net after its Adam step.
    new_state, _ = step_fn(state, batch)
    jf = fusion_tensors(new_state["meta_params"])
    tf = {n: p.detach().numpy() for n, p in tstep.fusion.named_parameters()}
    f0 = fusion_tensors(state["meta_params"])
    result["fusion_update_after_adam"] = rel_err([tf[n] - f0[n] for n in fnames], [jf[n] - f0[n] for n in fnames])
  return result


# ================================================================================================= timing

def time_model(model: str, args, task, torch_threads):
  method, state, frozen, _ = build_jax(model, args, task)
  step_fn = jax.jit(lambda st, b: method.train_step(st, frozen, b, "meta"))
  for k in range(args.pre_steps):
    state, _ = step_fn(state, jax.tree.map(jnp.asarray, host_batch(task, args, k)))
  hb = host_batch(task, args, args.pre_steps)
  batch = jax.tree.map(jnp.asarray, hb)
  tstep, _, _ = build_torch(method, state, frozen, torch.float32)
  tb = torch_batch(hb, torch.float32)

  guarded, _ = trainer.make_guarded_step(method, skip_nonfinite=False)
  trainer_step = jax.jit(guarded, donate_argnums=(0,), static_argnums=(3,))

  def bare(st, fr, b):
    return method.train_step(st, fr, b, "meta")

  bare_step = jax.jit(bare, donate_argnums=(0,))
  copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)  # noqa: E731
  s_trainer = copy(state)
  s_bare = copy(s_trainer)
  health = trainer.initial_health(int(state["step"]))
  holder = dict(trainer=(s_trainer, health), bare=s_bare)

  def run_trainer(n):
    st, h = holder["trainer"]
    for _ in range(n):
      st, m, h = trainer_step(st, frozen, batch, "meta", h)
    jax.block_until_ready((st, m, h))
    holder["trainer"] = (st, h)

  def run_bare(n):
    st = holder["bare"]
    for _ in range(n):
      st, m = bare_step(st, frozen, batch)
    jax.block_until_ready((st, m))
    holder["bare"] = st

  t0 = time.perf_counter()
  run_trainer(1)  # compiles
  compile_trainer = time.perf_counter() - t0
  t0 = time.perf_counter()
  run_bare(1)
  compile_bare = time.perf_counter() - t0

  def run_torch(n, threads):
    torch.set_num_threads(threads)
    for _ in range(n):
      tstep.meta_step(tb["x"], tb["y"], tb["index"], tb["xv"], tb["yv"])

  runners = {"jax_trainer_step": run_trainer, "jax_method_step": run_bare}
  for threads in torch_threads:
    runners[f"torch_eager_{threads}t"] = lambda n, threads=threads: run_torch(n, threads)
  for fn in runners.values():  # warm-up (oneDNN primitive caches, first-call allocations)
    fn(args.warmup)
  times = interleaved_rounds(runners, rounds=args.rounds, inner=args.inner)
  torch.set_num_threads(torch_threads[0])
  med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
  torch_keys = [k for k in med if k.startswith("torch")]
  best_torch = min(torch_keys, key=med.get)
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(holder["bare"]["params"])) and all(
      bool(torch.isfinite(p).all()) for p in tstep.student.parameters())
  return dict(model=model, num_params=models.num_params(state["params"]),
              fusion_params=models.num_params(state["meta_params"]), batch=args.batch, val_batch=args.val_batch,
              compile_s=dict(jax_trainer_step=compile_trainer, jax_method_step=compile_bare),
              median_ms=med, times_ms={k: [1e3 * t for t in v] for k, v in times.items()},
              torch_threads=list(torch_threads), best_torch=best_torch,
              ratio_torch_over_jax_trainer={k: med[k] / med["jax_trainer_step"] for k in torch_keys},
              ratio_torch_over_jax_method={k: med[k] / med["jax_method_step"] for k in torch_keys},
              ratio_best_torch_over_jax_trainer=med[best_torch] / med["jax_trainer_step"],
              states_finite_after_timing=finite)


# ================================================================================================= output

def device_info(torch_threads):
  return machine_info(torch=torch.__version__, torch_threads=torch_threads,
                      torch_interop_threads=torch.get_num_interop_threads(),
                      mkldnn=torch.backends.mkldnn.is_available(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                      omp_num_threads=os.environ.get("OMP_NUM_THREADS"), xla_flags=os.environ.get("XLA_FLAGS"))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="", help="write the results as JSON to this file")
  p.add_argument("--models", default="mlp,cnn_small", help="students, comma-separated (default mlp,cnn_small)")
  p.add_argument("--teacher", default="cnn_medium", help="teacher model, random weights, cached logits")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--val-batch", type=int, default=128)
  p.add_argument("--data", default="fashion_mnist", choices=("fashion_mnist", "synthetic"),
                 help="fashion_mnist: the student config's 5,000-example subset (default); synthetic: no files")
  p.add_argument("--input-shape", type=int, nargs=3, default=(28, 28, 1), help="synthetic data only")
  p.add_argument("--pre-steps", type=int, default=3, help="JAX meta steps before the compared/timed state")
  p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default 15)")
  p.add_argument("--inner", type=int, default=5, help="steps per framework per round (default 5)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps per framework first")
  p.add_argument("--torch-threads", default="",
                 help="torch.set_num_threads values to time, comma-separated (default: the usable CPU cores, and 1)")
  p.add_argument("--no-float64", action="store_true", help="skip the float64 agreement check")
  p.add_argument("--no-timing", action="store_true", help="only the agreement checks")
  p.add_argument("--no-check", action="store_true", help="only the timing")
  return p.parse_args(argv)


def run_check(model, args, task, dtype_name, *, with_autodiff=True):
  """``check`` with float64 scoped to the call (``jax.enable_x64`` and torch's default dtype)."""
  if dtype_name != "float64":
    return check(model, args, task, dtype_name, with_autodiff=with_autodiff)
  with jax.enable_x64(True):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
      return check(model, args, task, dtype_name, with_autodiff=with_autodiff)
    finally:
      torch.set_default_dtype(old)


def main(argv=None):
  args = parse_args(argv)

  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count() or 1
  torch_threads = [int(t) for t in args.torch_threads.split(",") if t] or sorted({cores, 1}, reverse=True)
  torch.set_num_threads(torch_threads[0])
  t_start = time.perf_counter()
  info = device_info(torch_threads)
  print(f"{info['date']}: jax {info['jax']} on {info['device_kind']} ({info['platform']}), torch {info['torch']} "
        f"timed with {torch_threads} intra-op threads (OMP_WAIT_POLICY={info['omp_wait_policy']}); CPUs "
        f"{info['cpu_count']} (affinity {info['cpu_affinity']}), load {info['loadavg_start']}", flush=True)
  config = make_config("mlp", args)
  task = data.load(config.data, seed=config.seed)
  print(f"data {task.name}: {len(task.train)} train / {len(task.val)} val; batch {args.batch}, val batch "
        f"{args.val_batch}; teacher {args.teacher} (random weights, cached logits); optimizer SGD(momentum "
        f"{config.optimizer.momentum}) + clip {config.optimizer.clip_norm} + wd {config.optimizer.weight_decay}; "
        f"fusion Adam lr {config.tgeo.fusion_lr}; state after {args.pre_steps} JAX meta steps", flush=True)

  checks, timings = [], []
  model_names = [m for m in args.models.split(",") if m]
  for model in model_names:
    for dtype_name in () if args.no_check else ("float32",) + (() if args.no_float64 else ("float64",)):
      c = run_check(model, args, task, dtype_name)
      checks.append(c)
      h = c["hypergrad_torch_vs_jax"]
      print(f"  check {model:10s} {dtype_name}: hypergradient rel. L2 error torch vs tgeo_jax {h['rel_l2']:.2e} "
            f"(max abs {h['max_abs']:.1e}, norm {h['norm']:.2e}); vs jax autodiff "
            f"{c['hypergrad_torch_vs_jax_autodiff']['rel_l2']:.2e}; jax fast vs autodiff "
            f"{c['hypergrad_jax_vs_jax_autodiff']['rel_l2']:.2e}; student θ′ "
            f"{c['student_params_after_step']['rel_l2']:.1e}, update {c['student_update']['rel_l2']:.1e}; val loss "
            f"{c['val_loss']['torch']:.6f} / {c['val_loss']['jax']:.6f}; α {c['alpha_mean']:.4f} ± "
            f"{c['alpha_std']:.4f} (rel. error {c['alpha']['rel_l2']:.1e})"
            + (f"; fusion-net Adam update {c['fusion_update_after_adam']['rel_l2']:.1e}"
               if "fusion_update_after_adam" in c else ""), flush=True)
    if not args.no_timing:
      t = time_model(model, args, task, torch_threads)
      timings.append(t)
      print(f"  timing {model:10s}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in t["median_ms"].items())
            + f" -> best torch / jax trainer step {t['ratio_best_torch_over_jax_trainer']:.2f}x", flush=True)

  print()
  if checks:
    print("| student | dtype | hypergradient rel. L2 error, torch vs tgeo_jax | torch vs jax autodiff | "
          "tgeo_jax fast vs autodiff | θ′ rel. error |")
    print("|---|---|---:|---:|---:|---:|")
  for c in checks:
    print(f"| {c['model']} | {c['dtype']} | {c['hypergrad_torch_vs_jax']['rel_l2']:.2e} | "
          f"{c['hypergrad_torch_vs_jax_autodiff']['rel_l2']:.2e} | {c['hypergrad_jax_vs_jax_autodiff']['rel_l2']:.2e}"
          f" | {c['student_params_after_step']['rel_l2']:.1e} |")
  if timings:
    print()
    head = " | ".join(f"torch eager, {n} thread{'s' if n > 1 else ''} ms | ÷ jax" for n in torch_threads)
    print(f"| student | params | tgeo_jax trainer step ms | tgeo_jax method step ms | {head} |")
    print("|---|---:|---:|---:|" + "---:|---:|" * len(torch_threads))
    for t in timings:
      m = t["median_ms"]
      cells = " | ".join(f"{m[f'torch_eager_{n}t']:.2f} | {t['ratio_torch_over_jax_trainer'][f'torch_eager_{n}t']:.2f}x"
                         for n in torch_threads)
      print(f"| {t['model']} | {t['num_params']:,} | {m['jax_trainer_step']:.2f} | {m['jax_method_step']:.2f} | "
            f"{cells} |")
    print("(÷ jax: torch time over the tgeo_jax trainer step's)")
  tol_ok = (all(c["hypergrad_torch_vs_jax"]["rel_l2"] <= (TOLERANCE_F32 if c["dtype"] == "float32" else TOLERANCE_F64)
                for c in checks) if checks else None)
  print(f"\nhypergradient agreement (float32 <= {TOLERANCE_F32}, float64 <= {TOLERANCE_F64}): "
        f"{'not checked (--no-check)' if tol_ok is None else 'MET' if tol_ok else 'NOT MET'}")
  if timings:
    fast = all(t["ratio_best_torch_over_jax_trainer"] >= TARGET_RATIO for t in timings)
    print(f"target tgeo_jax at least as fast as torch on CPU (fastest torch setting / jax trainer step >= "
          f"{TARGET_RATIO}): "
          f"{'MET' if fast else 'NOT MET'}")
  total = time.perf_counter() - t_start
  print(f"total benchmark time: {total:.1f} s")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    settings = dict(vars(args), data_examples=dict(train=len(task.train), val=len(task.val)),
                    optimizer="config default: clip_by_global_norm(1.0) -> add_decayed_weights(5e-4) -> "
                              "sgd(schedule, momentum 0.9); torch: the same written differentiably",
                    ordering="reuse (tgeo_jax default)", layout="reference", temperature=config.tgeo.temperature)
    with open(args.out, "w") as f:
      json.dump(dict(device=info, settings=settings, checks=checks, timings=timings, total_seconds=total,
                     hypergrad_agreement_met=tol_ok), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
