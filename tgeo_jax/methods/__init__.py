"""Method registry: ``get_class(name)`` gives a method's class. Adding a method = one module here + one entry in
``_METHODS``. Each method's module (``tgeo_jax.methods.dkd``, ...) is also reachable as an attribute of this package
(loaded on first use): its pure loss functions are documented in docs/api.md."""

from __future__ import annotations

import importlib

from tgeo_jax.errors import UserError

__all__ = ["available", "get_class", "register"]

# name -> "module:Class"
_METHODS = {
    "ce": "tgeo_jax.methods.ce:CE",
    "kd": "tgeo_jax.methods.kd:KD",
    "tgeo": "tgeo_jax.methods.tgeo:TGeoKD",
    "anl_kd": "tgeo_jax.methods.reweight:AnnealedKD",
    "ada_kd": "tgeo_jax.methods.reweight:AdaptiveKD",
    "wls_kd": "tgeo_jax.methods.reweight:WeightedSoftLabelKD",
    "rw_kd": "tgeo_jax.methods.reweight:RandomWeightKD",
    "dist": "tgeo_jax.methods.dist:DIST",
    "dkd": "tgeo_jax.methods.dkd:DKD",
    "simkd": "tgeo_jax.methods.simkd:SimKD",
    "atsc": "tgeo_jax.methods.atsc:ATSC",
    "trikd": "tgeo_jax.methods.trikd:TriKD",
}


def available() -> list[str]:
  return sorted(_METHODS)


def get_class(name: str):
  if name not in _METHODS:
    raise UserError(f"method: unknown method {name!r}; expected one of {available()}")
  module, cls = _METHODS[name].split(":")
  return getattr(importlib.import_module(module), cls)


def __getattr__(name: str):
  modules = {target.split(":")[0].rsplit(".", 1)[-1] for target in _METHODS.values()} | {"base"}
  if name in modules:
    return importlib.import_module(f"tgeo_jax.methods.{name}")
  raise AttributeError(f"module 'tgeo_jax.methods' has no attribute {name!r}")


def register(name: str, target: str) -> None:
  """Registers ``"package.module:Class"`` under ``name`` (for methods living outside this package)."""
  _METHODS[name] = target
