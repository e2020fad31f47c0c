"""Method registry: ``get_class(name)`` gives a method's class. Adding a method = one module here + one entry in
``_METHODS``. Each method's module (``tgeo_jax.methods.dkd``, ...) is also reachable as an attribute of this package
(loaded on first use): its pure loss functions are documented in docs/api.md."""

from __future__ import annotations

import importlib

from tgeo_jax.errors import UserError

__all__ = ["available", "get_class", "reads_field", "register", "validate_config"]

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


def validate_config(config) -> None:
  """Checks every field a run of ``config.method`` uses: an unknown method first, then the fields common to every
  run (``config_checks.validate``), then the method's own (``Method.validate_config``); the first bad field is a
  one-line ``UserError`` naming it."""
  from tgeo_jax import config_checks
  method_cls = get_class(config_checks.field(config, "method"))
  config_checks.validate(config)
  method_cls.validate_config(config)


def reads_field(method: str, field: str) -> bool:
  """Whether a run of ``method`` reads the config ``field`` (dotted): a method reads its own config group and no
  other method's, ``val_batch_size`` only when it draws validation batches, ``teacher.*`` only when it has a
  teacher (``reads_teacher_fields``); every other field is common to all. An unknown method reads everything.
  Only the fields a method reads identify its runs (``run_identity.config_record``)."""
  if method not in _METHODS:
    return True
  cls = get_class(method)
  top = field.split(".", 1)[0]
  method_groups = {get_class(m).config_group for m in _METHODS} - {None}
  if top in method_groups:
    return top == cls.config_group
  if field == "val_batch_size":
    return bool(cls.uses_validation_batch)
  if top == "teacher":
    return bool(getattr(cls, "reads_teacher_fields", True))
  return True


def __getattr__(name: str):
  modules = {target.split(":")[0].rsplit(".", 1)[-1] for target in _METHODS.values()} | {"base"}
  if name in modules:
    return importlib.import_module(f"tgeo_jax.methods.{name}")
  raise AttributeError(f"module 'tgeo_jax.methods' has no attribute {name!r}")


def register(name: str, target: str) -> None:
  """Registers ``"package.module:Class"`` under ``name`` (for methods living outside this package)."""
  _METHODS[name] = target
