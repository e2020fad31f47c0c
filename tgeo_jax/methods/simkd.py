"""SimKD — "Knowledge Distillation with the Reused Teacher Classifier" (Chen et al., CVPR 2022; docs/methods.md §4).

The student's last-stage feature map ``F_s [B, H_s, W_s, C_s]`` goes through a projector ``P`` (1x1 conv
``C_s -> C_t / r``, BN, ReLU; 3x3 conv, BN, ReLU; 1x1 conv ``-> C_t``, BN, ReLU) and is regressed onto the frozen
teacher's last-stage map ``F_t [B, H_t, W_t, C_t]``:

    L = MSE(P(F_s), F_t)                      (mean over every element)
    predict(x) = teacher_classifier(GAP(P(F_s)))

in training and at test time: the student's own head is never used. When the spatial sizes differ, the larger map
is average-pooled to the smaller (PyTorch's ``adaptive_avg_pool2d``, implemented here for integer size ratios).
The labels are not used either: the teacher's classifier carries the class knowledge.

Which student map (``simkd.student_feature``; docs/methods.md §4): ``'pre_head'`` (default) is the
official code's ``feat_s[-2]``, the last stage's output *before* a final 1x1 head conv where the student has one
(MobileNetV2: 160 channels instead of 1280, ShuffleNetV2: 464 instead of 1024; every other zoo model has no such
conv and gives the same map both ways); ``'last'`` is the map the student's own head pools (``features(x)``). The
student's forward is unchanged either way (its head conv still runs and its BatchNorm statistics still update, as
in the official full forward; only the loss ignores it). The teacher's map is always its ``"last"`` one: its
classifier must read the projected map, and for the teachers of the benchmarks (ResNets, WRNs, VGGs) the two agree.

State: ``params``/``rest``/``opt_state`` hold ``{"student", "projector"}``, trained together by the one optimizer
the trainer builds; the frozen teacher (backbone and classifier) stays in ``frozen["teacher"]``.
This module also holds the pieces ATSC reuses (projector, alignment, feature MSE, shape checks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from tgeo_jax import argchecks, config_checks, models
from tgeo_jax.errors import UserError
from tgeo_jax.methods import base
from tgeo_jax.models.cifar_resnet import TORCH_DEFAULT, batch_norm, conv2d

__all__ = ["Projector", "make_projector", "adaptive_avg_pool", "feature_mse", "feature_map_shape",
           "validate_student_feature", "common_size", "projector_channels", "SimKD"]


class Projector(nnx.Module):
  """SimKD's bottleneck projector ``[B, H, W, C_in] -> [B, H, W, C_out]``.

  1x1 conv ``C_in -> C_out // factor``, BN, ReLU; 3x3 conv (padding 1), BN, ReLU; 1x1 conv ``-> C_out``, BN, ReLU.
  Convolutions have no bias and PyTorch's default initialisation (the reference module keeps it).
  """

  def __init__(self, in_channels: int, out_channels: int, *, factor: int = 2, rngs: nnx.Rngs):
    mid = out_channels // factor
    self.conv1 = conv2d(in_channels, mid, 1, kernel_init=TORCH_DEFAULT, rngs=rngs)
    self.bn1 = batch_norm(mid, rngs=rngs)
    self.conv2 = conv2d(mid, mid, 3, padding=1, kernel_init=TORCH_DEFAULT, rngs=rngs)
    self.bn2 = batch_norm(mid, rngs=rngs)
    self.conv3 = conv2d(mid, out_channels, 1, kernel_init=TORCH_DEFAULT, rngs=rngs)
    self.bn3 = batch_norm(out_channels, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    use_running = not train
    h = nnx.relu(self.bn1(self.conv1(x), use_running_average=use_running))
    h = nnx.relu(self.bn2(self.conv2(h), use_running_average=use_running))
    return nnx.relu(self.bn3(self.conv3(h), use_running_average=use_running))


def make_projector(in_channels: int, out_channels: int, *, factor: int, seed: int) -> models.Functional:
  return models.split(Projector(in_channels, out_channels, factor=factor, rngs=nnx.Rngs(seed)))


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """PyTorch's ``adaptive_avg_pool2d`` for integer ratios: ``[B, H, W, C] -> [B, h, w, C]``, ``H % h == W % w == 0``.

  Each output cell is the mean of a disjoint ``(H / h) x (W / w)`` window (a reshape and a mean: no windowed
  reduction, cheap to differentiate). The identity when the size already matches.
  """
  b, height, width, c = x.shape
  h, w = size
  if height % h or width % w:
    raise ValueError(f"adaptive_avg_pool: {height}x{width} -> {h}x{w} needs integer ratios")
  if (height, width) == (h, w):
    return x
  return x.reshape(b, h, height // h, w, width // w, c).mean(axis=(2, 4))


def feature_mse(projected: jax.Array, target: jax.Array) -> jax.Array:
  """``mean((projected - target)^2)`` over every element (PyTorch's ``nn.MSELoss()``, SimKD's feature loss).

  Gradients reach both sides: callers decide.

  Args:
    projected, target: arrays of one shape, e.g. ``[B, h, w, C]``.
  Returns:
    a scalar in ``promote_types(inputs' dtype, float32)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from tgeo_jax.methods import simkd
    >>> print(simkd.feature_mse(jnp.array([[1.0, 2.0]]), jnp.array([[0.0, 0.0]])))   # (1 + 4) / 2
    2.5
  """
  argchecks.check_same_shape("feature_mse", "target", target, "projected", projected)
  dtype = argchecks.compute_dtype(projected, target)
  diff = projected.astype(dtype) - target.astype(dtype)
  return jnp.mean(diff * diff)


def feature_map_shape(graphdef, params, rest, input_shape, *, stage: str = "last") -> tuple[int, ...]:
  """The shape of feature map ``stage`` (``models.FEATURE_STAGES``) for one example (``(H, W, C)`` for conv
  models, ``(D,)`` for MLPs); no FLOPs (``params``/``rest`` may be abstract)."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  fmap = jax.eval_shape(lambda p, r, x: models.apply_features(graphdef, p, r, x, train=False, stage=stage)[1],
                        params, rest, x)
  return tuple(fmap.shape[1:])


def validate_student_feature(config, field: str) -> None:
  """``field`` (``simkd.student_feature`` / ``atsc.student_feature``) is one of ``models.FEATURE_STAGES``."""
  config_checks.require(config, field, lambda v: v in models.FEATURE_STAGES,
                        f"one of {list(models.FEATURE_STAGES)} ('pre_head': the official SimKD/ATSC code's map)")


def common_size(student_shape, teacher_shape, *, method: str, student_model: str, teacher_model: str,
                teacher_field: str = "teacher.model") -> tuple[int, int]:
  """The spatial size ``(h, w)`` both feature maps are pooled to: the smaller one's, per axis.

  Raises a one-line ``UserError`` for a model without 4-D feature maps (naming ``model.name`` or
  ``teacher_field``) and for sizes without an integer ratio.
  """
  for field, name, shape, who in (("model.name", student_model, student_shape, "student"),
                                   (teacher_field, teacher_model, teacher_shape, "teacher")):
    if len(shape) != 3:
      raise UserError(f"{field}: {method} needs a {who} with 4-D feature maps [B, H, W, C]; {name!r} gives "
                      f"[B, {', '.join(map(str, shape))}]")
  (hs, ws, _), (ht, wt, _) = student_shape, teacher_shape
  h, w = min(hs, ht), min(ws, wt)
  if hs % h or ht % h or ws % w or wt % w:
    raise UserError(f"model.name: {method} pools the larger feature map to the smaller, which needs an integer "
                    f"size ratio; the student {student_model!r} gives {hs}x{ws}, the teacher {teacher_model!r} "
                    f"gives {ht}x{wt}")
  return h, w


def projector_channels(student_shape, teacher_shape, *, factor: int, factor_field: str) -> tuple[int, int]:
  """``(C_s, C_t)``; checks the bottleneck ``C_t // factor`` keeps at least one channel."""
  c_s, c_t = student_shape[-1], teacher_shape[-1]
  if c_t // factor < 1:
    raise UserError(f"{factor_field}: expected at most the teacher's {c_t} channels, got {factor}")
  return c_s, c_t


class SimKD(base.Method):
  """Student + projector trained on the feature MSE to a frozen teacher; predicts through the teacher's head."""

  name = "simkd"
  config_group = "simkd"

  @classmethod
  def defaults(cls):
    # Projector + MSE to the frozen teacher's last feature map; predicts through its head (docs/methods.md §4).
    c = ml_collections.ConfigDict()
    c.factor = 2  # projector bottleneck r: C_s -> C_t / r -> C_t / r -> C_t
    # The student map projected: 'pre_head' = the official code's feat_s[-2] (before MobileNetV2's / ShuffleNetV2's
    # final 1x1 conv: 160 / 464 channels), 'last' = the map its own head pools (1280 / 1024). Other models: the same.
    c.student_feature = "pre_head"
    return c

  @classmethod
  def validate_config(cls, config) -> None:
    config_checks.positive_int(config, "simkd.factor")
    validate_student_feature(config, "simkd.student_feature")

  def __init__(self, config, spec, **kwargs):
    super().__init__(config, spec, **kwargs)
    self.student_stage = config.simkd.student_feature
    s_shape = feature_map_shape(*self.student, spec.input_shape, stage=self.student_stage)
    t = self.teacher
    t_shape = feature_map_shape(t.graphdef, t.variables["params"], t.variables["rest"], spec.input_shape)
    self.size = common_size(s_shape, t_shape, method=self.name, student_model=config.model.name,
                            teacher_model=t.name)
    c_s, c_t = projector_channels(s_shape, t_shape, factor=config.simkd.factor, factor_field="simkd.factor")
    # seed + 1: the student was built with config.seed; the projector must not share its initial stream.
    self.projector = make_projector(c_s, c_t, factor=config.simkd.factor, seed=config.seed + 1)

  def init(self, rng):
    del rng  # the projector's initial values come from config.seed + 1
    state = base.trainable_state({"student": self.student.params, "projector": self.projector.params},
                                 {"student": self.student.rest, "projector": self.projector.rest}, self.tx)
    return state, {"teacher": self.teacher.variables}

  def project(self, params, rest, inputs, *, train: bool):
    """``(P(F_s) [B, h, w, C_t], new_rest)``: student features, pooled to the common size, through the projector."""
    _, fmap, student_rest = models.apply_features(self.student.graphdef, params["student"], rest["student"], inputs,
                                                  train=train, stage=self.student_stage)
    projected, projector_rest = models.apply(self.projector.graphdef, params["projector"], rest["projector"],
                                             adaptive_avg_pool(fmap, self.size), train=train)
    return projected, {"student": student_rest, "projector": projector_rest}

  def classify(self, frozen, projected):
    t = frozen["teacher"]
    return models.apply_classifier(self.teacher.graphdef, t["params"], t["rest"], projected)

  def train_step(self, state, frozen, batch, kind=None):
    del kind  # a single compiled variant
    t = frozen["teacher"]
    _, teacher_fmap, _ = models.apply_features(self.teacher.graphdef, t["params"], t["rest"], batch["inputs"],
                                               train=False)
    target = jax.lax.stop_gradient(adaptive_avg_pool(teacher_fmap, self.size))

    def objective(params):
      projected, new_rest = self.project(params, state["rest"], batch["inputs"], train=True)
      return feature_mse(projected, target), (new_rest, projected)

    loss, (new_rest, projected), params, opt_state, grads = base.minimize_step(self.tx, objective, state["params"],
                                                                               state["opt_state"])
    logits = self.classify(frozen, jax.lax.stop_gradient(projected))
    new_state = dict(state, params=params, rest=new_rest, opt_state=opt_state, step=state["step"] + 1)
    return new_state, {"loss": loss, "mse": loss, "accuracy": base.batch_accuracy(logits, batch["labels"]),
                       "grad_norm": optax.tree.norm(grads)}

  def predict(self, state, frozen, inputs):
    projected, _ = self.project(state["params"], state["rest"], inputs, train=False)
    return self.classify(frozen, projected)
