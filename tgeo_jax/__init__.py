"""tgeo_jax: adaptive knowledge distillation in JAX / Flax NNX.

The pure loss math is importable from the package itself (the modules load on first use, so ``import tgeo_jax``
stays cheap)::

    import tgeo_jax
    tgeo_jax.losses.kd_loss(student_logits, teacher_logits, temperature=4.0)   # [N]
    tgeo_jax.methods.dkd.dkd_loss(...)                                           # one module per method
    tgeo_jax.geometry.relation_features(...)                                     # TGeo-KD's features
    tgeo_jax.bilevel.lookahead_hypergrad(...)                                    # meta-gradients

The reference page of the loss functions is docs/api.md.
"""

import importlib

__version__ = "0.1.0"

# The public submodules, loaded lazily by ``__getattr__`` (PEP 562).
_SUBMODULES = ("argchecks", "losses", "geometry", "bilevel", "methods", "models", "data", "metrics", "optim",
               "parallel", "checkpoint", "teacher", "trainer", "evaluation", "report", "compare", "errors")

__all__ = list(_SUBMODULES)


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"tgeo_jax.{name}")
  raise AttributeError(f"module 'tgeo_jax' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_SUBMODULES])
