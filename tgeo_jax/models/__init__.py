"""Model registry and the functional (split/merge) use of NNX modules.

Every registered model is an ``nnx.Module`` with

* ``features(x, *, train) -> fmap``: the last-stage representation, ``[B, H, W, C]`` for
  convolutional models (what SimKD/ATSC project) or ``[B, D]`` for MLPs;
* ``classify(fmap) -> logits [B, K]``: global average pooling (conv models) + the linear head;
* ``__call__(x, *, train=False) -> logits``: ``classify(features(x))``.

BatchNorm runs on batch statistics when ``train=True`` and on its running averages otherwise; the mode is a
call argument (static under jit), never module state, so one graphdef serves both.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
from flax import nnx

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


def create(name: str, *, num_classes: int, input_shape: tuple[int, ...], seed: int = 0, **kwargs) -> nnx.Module:
  """Builds model ``name``; ``input_shape`` is one example's shape (no batch axis)."""
  _import_zoo()
  if name not in _REGISTRY:
    raise KeyError(f"unknown model {name!r}; expected one of {sorted(_REGISTRY)}")
  return _REGISTRY[name](num_classes=num_classes, input_shape=tuple(input_shape), rngs=nnx.Rngs(seed), **kwargs)


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


def apply_features(graphdef, params, rest, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array, Any]:
  """``(logits, fmap, new_rest)``: one forward pass giving both the head output and the last-stage features."""
  model = _merge(graphdef, params, rest)
  fmap = model.features(x, train=train)
  logits = model.classify(fmap)
  return logits, fmap, (_new_rest(model) if train else rest)


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
