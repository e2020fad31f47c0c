"""Model registry and the functional (split/merge) use of NNX modules.

Every registered model is an ``nnx.Module`` with

* ``features(x, *, train) -> fmap``: the last-stage representation, ``[B, H, W, C]`` for
  convolutional models or ``[B, D]`` for MLPs;
* ``classify(fmap) -> logits [B, K]``: global average pooling (conv models) + the linear head;
* ``__call__(x, *, train=False) -> logits``: ``classify(features(x))``;
* optionally ``feature_maps(x, *, train) -> {"pre_head": ..., "last": ...}`` (``FEATURE_STAGES``), for a model
  whose last stage is followed by a 1x1 head conv (MobileNetV2, ShuffleNetV2): ``"last"`` is ``features(x)``,
  ``"pre_head"`` the last stage's output before that conv (``[B, H, W, 160]`` / ``[B, H, W, 464]`` instead of
  1280 / 1024 channels), the map the official SimKD code projects (its ``feat[-2]``). For every other model both
  are ``features(x)`` (``feature_maps`` below).

BatchNorm runs on batch statistics when ``train=True`` and on its running averages otherwise; the mode is a
call argument (static under jit), never module state, so one graphdef serves both.

Mixed precision (``create(..., dtype=jnp.bfloat16)``, the config's ``compute_dtype``): parameters stay float32
(Flax's ``param_dtype``) and convolutions / matmuls run in ``dtype``; BatchNorm computes its statistics and its
normalisation in float32 and stores float32 running statistics; the head (global average pooling + the linear
classifier) runs in float32, so every model returns float32 logits and every loss reduces in float32.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tgeo_jax.errors import UserError

__all__ = ["register", "available", "create", "COMPUTE_DTYPES", "compute_dtype", "at_least_float32",
           "batch_norm_dtype_kwargs", "Functional", "split", "apply", "FEATURE_STAGES", "feature_maps",
           "apply_features", "apply_classifier", "num_params"]

_REGISTRY: dict[str, Callable[..., nnx.Module]] = {}


def register(name: str):
  """Class/function decorator adding a model constructor ``f(*, num_classes, rngs, **kw)`` to the registry."""

  def wrap(ctor):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = ctor
    return ctor

  return wrap


def available() -> list[str]:
  _import_zoo()
  return sorted(_REGISTRY)


def create(name: str, *, num_classes: int, input_shape: tuple[int, ...], seed: int = 0, dtype=None,
           **kwargs) -> nnx.Module:
  """Builds model ``name``; ``input_shape`` is one example's shape (no batch axis).

  ``dtype``: the compute dtype of the model's body (``None``: that of the parameters, float32); see the module
  docstring. It changes no parameter, so checkpoints are interchangeable between compute dtypes.
  """
  _import_zoo()
  if name not in _REGISTRY:
    raise KeyError(f"unknown model {name!r}; expected one of {sorted(_REGISTRY)}")
  return _REGISTRY[name](num_classes=num_classes, input_shape=tuple(input_shape), rngs=nnx.Rngs(seed), dtype=dtype,
                         **kwargs)


# ---------------------------------------------------------------------------------------------- mixed precision

# ``config.compute_dtype`` -> the ``dtype`` argument of ``create``. 'float32' maps to None (no cast at all) rather
# than to float32, so the default mode is exactly the code path without mixed precision.
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(config):
  """The models' compute dtype from ``config.compute_dtype`` ('float32', the default, or 'bfloat16').

  Raises a one-line ``UserError`` naming the field for any other value.
  """
  name = config.get("compute_dtype", "float32")
  if not isinstance(name, str) or name not in COMPUTE_DTYPES:
    raise UserError(f"compute_dtype: expected one of {list(COMPUTE_DTYPES)}, got {name!r}")
  return COMPUTE_DTYPES[name]


def at_least_float32(x: jax.Array) -> jax.Array:
  """``x`` promoted to float32 if it is a narrower float (bfloat16); float32/float64 are left as they are."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _promote_to_float32(args, *, dtype=None, inexact=True):
  # BatchNorm's ``promote_dtype`` hook: Flax's default casts the input, the running statistics, scale and bias
  # to the compute dtype first, so with bfloat16 the normalisation itself (and, in eval mode, the stored
  # statistics) would be rounded to 8 bits of mantissa. Keeping them at >= float32 costs nothing on GPU/TPU
  # (the casts fuse into the elementwise op) and BatchNorm still casts its output to ``dtype``.
  del dtype, inexact
  return tuple(None if a is None else at_least_float32(jnp.asarray(a)) for a in args)


def batch_norm_dtype_kwargs(dtype) -> dict:
  """``nnx.BatchNorm`` keyword arguments for compute dtype ``dtype``: output in ``dtype``, statistics and
  normalisation arithmetic in float32. Empty for ``None`` (Flax's default behaviour, unchanged)."""
  if dtype is None:
    return {}
  return {"dtype": dtype, "promote_dtype": _promote_to_float32}


class Functional(NamedTuple):
  """A model as pure pytrees: ``graphdef`` is static, ``params`` (nnx.Param) and ``rest`` (BatchNorm stats...)."""

  graphdef: Any
  params: Any
  rest: Any


def split(model: nnx.Module) -> Functional:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return Functional(graphdef, params, rest)


def _merge(graphdef, params, rest):
  # copy=True: merging inside jax.grad/jit must not alias the traced states, otherwise NNX raises a
  # TraceContextError when train-mode BatchNorm writes its running statistics.
  return nnx.merge(graphdef, params, rest, copy=True)


def _new_rest(model):
  return nnx.split(model, nnx.Param, ...)[2]


def apply(graphdef, params, rest, x: jax.Array, *, train: bool) -> tuple[jax.Array, Any]:
  """Logits ``[B, K]`` and the updated non-parameter state (BatchNorm statistics when ``train``)."""
  model = _merge(graphdef, params, rest)
  logits = model(x, train=train)
  return logits, (_new_rest(model) if train else rest)


# The feature maps a model exposes (see the module docstring): "last" is what its own head pools, "pre_head" the
# last stage's output before a final 1x1 head conv (the same map for models without one).
FEATURE_STAGES = ("pre_head", "last")


def feature_maps(model: nnx.Module, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
  """``{"pre_head": [B, H, W, C'], "last": [B, H, W, C]}`` of one forward pass (``[B, D]`` twice for MLPs)."""
  if hasattr(model, "feature_maps"):
    return model.feature_maps(x, train=train)
  fmap = model.features(x, train=train)
  return {"pre_head": fmap, "last": fmap}


def apply_features(graphdef, params, rest, x: jax.Array, *, train: bool,
                   stage: str = "last") -> tuple[jax.Array, jax.Array, Any]:
  """``(logits, fmap, new_rest)``: one forward pass giving both the head output and the feature map ``stage``
  (one of ``FEATURE_STAGES``). The logits always come from the model's own path (``classify`` of the "last"
  map): with ``stage="pre_head"`` the head conv still runs, and in train mode its BatchNorm statistics still
  update, as in the official SimKD code's full student forward."""
  model = _merge(graphdef, params, rest)
  maps = feature_maps(model, x, train=train)
  logits = model.classify(maps["last"])
  return logits, maps[stage], (_new_rest(model) if train else rest)


def apply_classifier(graphdef, params, rest, fmap: jax.Array) -> jax.Array:
  """The model's own head (GAP + linear) applied to a feature map of its last stage's shape."""
  return _merge(graphdef, params, rest).classify(fmap)


def num_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def _import_zoo():
  # Importing registers; kept lazy so `import tgeo_jax.models` stays cheap.
  from tgeo_jax.models import small  # noqa: F401
  from tgeo_jax.models import wide_deep  # noqa: F401
  from tgeo_jax.models import zoo  # noqa: F401
