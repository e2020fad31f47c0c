"""Mixed precision (``compute_dtype='bfloat16'``, tgeo_jax/models/__init__.py): float32 parameters, bfloat16
convolutions and matmuls, float32 BatchNorm statistics, heads, logits and losses; on CPU the bfloat16 results are
finite and close to the float32 ones.

Tolerances come from measurements (in brackets) with about 5x margin or more. Near-identical results alone would
also come from a bfloat16 mode that silently ran in float32, so every test also checks that bfloat16 is in use.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist
from conftest import build_method_state as tgeo_build
from tgeo_jax import bilevel, data, methods, models, trainer
from tgeo_jax.errors import UserError
from tgeo_jax.models import conv

BF16 = jnp.bfloat16
BATCH = 8


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _cosine(a, b) -> float:
  a, b = _flat(a), _flat(b)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _relative_error(reference, value) -> float:
  """``‖value − reference‖ / ‖reference‖`` over all leaves."""
  a, b = _flat(reference), _flat(value)
  return float(np.linalg.norm(b - a) / np.linalg.norm(a))


def _float_dtypes(tree) -> set:
  return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


# ------------------------------------------------------------------------------------------------ the models

_apply_features = jax.jit(models.apply_features, static_argnums=0, static_argnames="train")

WIDE_DEEP_VOCABS = (3, 5, 7, 4)


def _model_and_inputs(name, dtype):
  key = jax.random.key(0)
  if name == "wide_deep_student":
    model = models.create(name, num_classes=2, input_shape=(len(WIDE_DEEP_VOCABS) + 13,),
                          vocab_sizes=WIDE_DEEP_VOCABS, num_dense=13, dtype=dtype)
    k1, k2 = jax.random.split(key)
    x = {"dense": jax.random.uniform(k1, (BATCH, 13)),
         "sparse": jax.random.randint(k2, (BATCH, len(WIDE_DEEP_VOCABS)), 0, min(WIDE_DEEP_VOCABS))}
    return model, x
  shape = (32, 32, 3) if name in ("resnet8", "wrn_16_1") else (28, 28, 1)
  model = models.create(name, num_classes=10, input_shape=shape, dtype=dtype)
  return model, jax.random.normal(key, (BATCH, *shape))


# Models whose float32 forward at initialisation is well conditioned. Not MobileNetV2 / ShuffleNets: at 32x32 with
# a batch of 8 their train-mode BatchNorms see 2x2 / 4x4 maps, and merely rounding the *input* to bfloat16 changes
# the float32 network's logits by 8% / 3% of their scale, so a comparison there measures the network, not the mode.
@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "cnn_small", "mlp", "wide_deep_student"])
def test_bfloat16_forward_is_close_to_float32(name):
  """Same float32 parameters; logits float32 and within 3% of the logit scale in train and eval mode
  (measured: resnet8 0.2% / 0.3%, wrn_16_1 0.6% / 0.4%, cnn_small 0.08%, mlp 0.5%)."""
  model32, x = _model_and_inputs(name, None)
  model16, _ = _model_and_inputs(name, BF16)
  fn32, fn16 = models.split(model32), models.split(model16)
  chex.assert_trees_all_equal(fn32.params, fn16.params)  # the compute dtype changes no parameter
  assert _float_dtypes(fn16.params) == {jnp.dtype(jnp.float32)}

  logits32, _, rest32 = _apply_features(fn32.graphdef, fn32.params, fn32.rest, x, train=True)
  logits16, fmap16, rest16 = _apply_features(fn16.graphdef, fn16.params, fn16.rest, x, train=True)
  if name != "wide_deep_student":  # its features end with the float32 wide logit
    assert fmap16.dtype == BF16  # the body really ran in bfloat16
  scale = float(jnp.max(jnp.abs(logits32)))
  assert logits16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits16)))
  diff = float(jnp.max(jnp.abs(logits16 - logits32)))
  assert 0 < diff <= 0.03 * scale, (diff, scale)

  # Eval mode, on the running statistics the train pass produced.
  eval32, _, _ = _apply_features(fn32.graphdef, fn32.params, rest32, x, train=False)
  eval16, _, _ = _apply_features(fn16.graphdef, fn16.params, rest16, x, train=False)
  assert eval16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(eval16 - eval32))) <= 0.03 * float(jnp.max(jnp.abs(eval32)))


def test_batchnorm_statistics_stay_float32():
  """Running statistics are stored, and batch statistics computed, in float32 (measured max difference to the
  float32 model's: 0.3% of each statistic)."""
  model32, x = _model_and_inputs("resnet8", None)
  model16, _ = _model_and_inputs("resnet8", BF16)
  fn32, fn16 = models.split(model32), models.split(model16)
  _, _, rest32 = _apply_features(fn32.graphdef, fn32.params, fn32.rest, x, train=True)
  _, _, rest16 = _apply_features(fn16.graphdef, fn16.params, fn16.rest, x, train=True)
  assert _float_dtypes(rest16) == {jnp.dtype(jnp.float32)}
  chex.assert_trees_all_close(rest16, rest32, rtol=0.02, atol=2e-3)


def test_bfloat16_convolutions_take_bfloat16_operands():
  """The compiled forward's convolutions run on bfloat16 operands (not float32 ones cast back afterwards)."""
  model, x = _model_and_inputs("resnet8", BF16)
  fn = models.split(model)
  jaxpr = jax.make_jaxpr(lambda p, r, x: models.apply(fn.graphdef, p, r, x, train=True)[0])(fn.params, fn.rest, x)
  convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("conv_general_dilated", conv.canonical_conv_p.name)]
  assert convs and all(v.aval.dtype == BF16 for e in convs for v in e.invars)


# ----------------------------------------------------------------------------------- the config field


def test_compute_dtype_field():
  config = fashion_mnist.get_config("kd")
  assert models.compute_dtype(config) is None  # absent: float32, the code path without casts
  config.compute_dtype = "bfloat16"
  assert models.compute_dtype(config) == BF16
  methods.validate_config(config)
  for bad in ("float16", "bf16", ""):
    config.compute_dtype = bad
    with pytest.raises(UserError, match=r"^compute_dtype: expected one of \['float32', 'bfloat16'\], got "):
      methods.validate_config(config)


# ------------------------------------------------------------------------------------ training steps


def _build(method_name, teacher_dir, compute_dtype):
  """``(method, state, frozen, batch)`` on the tiny synthetic task (student and teacher ``cnn_tiny``), built by
  ``trainer.build_method`` in ``compute_dtype`` (it creates the student and loads the teacher in that dtype)."""
  return tgeo_build(method_name, teacher_dir, compute_dtype=compute_dtype)


def _step(method, state, frozen, batch, kind=None):
  """One jitted ``train_step``; checks first that the teacher runs in the method's compute dtype (its last
  feature map is bfloat16 in bfloat16 mode, its logits float32)."""
  t = frozen["teacher"]
  _, teacher_fmap, _ = models.apply_features(method.teacher.graphdef, t["params"], t["rest"], batch["inputs"],
                                             train=False)
  assert teacher_fmap.dtype == (BF16 if method.config.compute_dtype == "bfloat16" else jnp.float32)
  return jax.jit(method.train_step, static_argnums=3)(state, frozen, batch, kind)


@pytest.mark.parametrize("method_name", ["kd", "dist"])
def test_bfloat16_training_step_is_finite_float32_and_close(tiny_teacher, method_name):
  """One KD / DIST step: float32 metrics (DIST's correlations included), parameters, optimizer state and
  BatchNorm statistics; loss within 1% and the parameter update within 10% of float32's (measured: loss
  < 0.01%, update 1-2%)."""
  new32, m32 = _step(*_build(method_name, tiny_teacher, "float32"))
  method16, state, frozen, batch = _build(method_name, tiny_teacher, "bfloat16")
  new16, m16 = _step(method16, state, frozen, batch)
  for name, value in m16.items():
    assert value.dtype == jnp.float32 and bool(jnp.isfinite(value)), name
  if method_name == "dist":
    assert {"inter", "intra"} <= set(m16)
  for part in ("params", "rest", "opt_state"):
    assert _float_dtypes(new16[part]) == {jnp.dtype(jnp.float32)}, part
    chex.assert_tree_all_finite(new16[part])
  np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=1e-2)
  update32 = jax.tree.map(jnp.subtract, new32["params"], state["params"])
  update16 = jax.tree.map(jnp.subtract, new16["params"], state["params"])
  assert 0 < _relative_error(update32, update16) < 0.1


def _hypergradients(method, state, frozen, batch):
  """The TGeo-KD meta-gradient dL_val/dφ and the per-sample dL_val/dα_i at the current state."""
  b = method.step_batch(state, frozen, batch)
  student = bilevel.StudentState(state["params"], state["rest"], state["opt_state"])

  def hypergrad(weight_fn, meta):
    return bilevel.one_step(weight_fn, meta, method.per_sample_fn(frozen), b, method.val_loss_fn, batch["val"],
                            student, method.tx).meta_grad

  meta_grad = hypergrad(method.weight_fn, state["meta_params"])
  # α itself as the meta-parameter: the gradient is the vector dL_val/dα_i of the N inner products (one JVP
  # through the bfloat16 student), a sharper comparison than the fusion net's few output weights.
  dalpha = hypergrad(lambda alpha, context: alpha, jnp.full(batch["labels"].shape, 0.5))
  return meta_grad, dalpha


def test_bfloat16_tgeo_meta_step_and_hypergradient(tiny_teacher):
  """A TGeo-KD meta step in bfloat16 is finite and float32 (fusion net, relation features, hypergradient); the
  hypergradient is close to float32's: cosine > 0.99 and relative error < 5% (measured: cosine 0.999998,
  relative error 0.2%, both for dL/dφ and dL/dα)."""
  grads = {}
  for compute_dtype in ("float32", "bfloat16"):
    method, state, frozen, batch = _build("tgeo", tiny_teacher, compute_dtype)
    features = method.features(frozen, batch["labels"], method.predict(state, frozen, batch["inputs"]),
                               method.teacher_logits(state, frozen, batch["inputs"]))
    assert features.dtype == jnp.float32
    grads[compute_dtype] = jax.jit(_hypergradients, static_argnums=0)(method, state, frozen, batch)

  new16, m16 = _step(method, state, frozen, batch, "meta")  # bfloat16
  for name, value in m16.items():
    assert value.dtype == jnp.float32 and bool(jnp.isfinite(value)), name
  assert float(m16["meta_grad_norm"]) > 0
  assert _float_dtypes(new16["meta_params"]) == _float_dtypes(new16["params"]) == {jnp.dtype(jnp.float32)}
  chex.assert_tree_all_finite((new16["meta_params"], new16["meta_opt_state"], new16["params"]))

  (phi32, alpha32), (phi16, alpha16) = grads["float32"], grads["bfloat16"]
  assert _float_dtypes((phi16, alpha16)) == {jnp.dtype(jnp.float32)}
  for ref, value in ((phi32, phi16), (alpha32, alpha16)):
    assert _cosine(ref, value) > 0.99
    assert 0 < _relative_error(ref, value) < 0.05


# ------------------------------------------------------------------------------------------- the trainer


def test_trainer_builds_the_student_in_the_compute_dtype():
  """``trainer.build_method`` passes ``models.compute_dtype(config)`` to the student it creates."""
  config = fashion_mnist.get_config("ce")
  config.data.name = "synthetic"
  config.data.train_subset = 0
  config.model.name = "cnn_tiny"
  config.compute_dtype = "bfloat16"
  task = data.load(config.data, seed=0)
  method = trainer.build_method(config, task, steps_per_epoch=10)
  x = jnp.zeros((2, *task.spec.input_shape))
  _, fmap, _ = models.apply_features(*method.student, x, train=False)
  assert fmap.dtype == BF16
