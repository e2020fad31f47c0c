"""A teacher trained in PyTorch as a tgeo_jax teacher work directory.

``python -m tgeo_jax.import_teacher --format=repdistiller|torchvision --model=MODEL --checkpoint=FILE --workdir=DIR
[--dataset=cifar100|imagenet2012]`` reads FILE's ``state_dict`` (``torch.load(..., weights_only=True)``: no pickled
code runs), maps every tensor onto the zoo model MODEL and writes DIR so that ``teacher.checkpoint=DIR`` loads it
like the work directory of a finished teacher run: ``checkpoints/0`` (orbax, with integrity records), the meta the
loader checks (model name, class count, ``finished``), ``config.json``, ``identity.json`` and ``membership.npz``.

Formats (the layouts the KD benchmarks publish their teachers in):

* ``repdistiller``: HobbitLong/RepDistiller's CIFAR models (also mdistiller's ``cifar_teachers``), a checkpoint
  ``{'model': state_dict, ...}`` such as ``ckpt_epoch_240.pth``: ``resnet8 .. resnet110``, ``resnet8x4``,
  ``resnet32x4``, ``wrn_*``, ``vgg*`` (their ``vgg*_bn``), ``resnet50_cifar`` (``resnetv2.ResNet50``),
  ``mobilenetv2`` (``mobile_half``), ``shufflev1``, ``shufflev2``;
* ``torchvision``: ``resnet18``, ``resnet34``, ``resnet50``, ``mobilenetv2_imagenet`` (``mobilenet_v2``).

A checkpoint may be the bare ``state_dict``, or wrap it as ``{'model': ...}`` or ``{'state_dict': ...}``; a
``module.`` prefix on every key (``nn.DataParallel``) is dropped.

Mapping, leaf by leaf over the flax model (a per-family rule names the torch module of each flax module): conv
weights OIHW -> HWIO (a grouped/depthwise conv's ``I = C_in / groups`` is already flax's ``feature_group_count``
layout), linear weights transposed, BatchNorm ``weight, bias, running_mean, running_var`` -> ``scale, bias, mean,
var``. ``running_var`` is copied as it is: PyTorch tracks the *unbiased* batch variance and normalises with that
running value in eval mode, exactly as flax's eval mode normalises with ``var``, so no n/(n-1) correction belongs
here. ``num_batches_tracked`` is ignored. Every torch key must find its place and every flax leaf its key, with the
same shape: anything else (another architecture's checkpoint, a missing or extra key, another class count) is one
``UserError`` line naming the key.

Provenance: the work directory records where the weights came from (the file, its sha256, the format) and what they
were trained on, as far as anyone can say: the publisher's training split of ``--dataset``, all of it
(``membership.npz`` lists every position of the published training split). The import never sees that data, so the
record is a claim, marked ``imported_from`` in the data identity; ``run_identity.check_teacher_provenance`` treats
it as such (see docs/import_teacher.md): such a teacher has seen every example of a student's validation part (a
slice of the same training split) and none of its test split, and a student refuses it unless
``teacher.verify_provenance=False``, which accepts it with a warning line saying so.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import sys
from typing import Callable

import numpy as np

from tgeo_jax import run_identity
from tgeo_jax.errors import UserError

__all__ = ["FORMATS", "CHECKPOINT_STEP", "IMPORT_EXTRA", "Dataset", "DATASETS", "DEFAULT_DATASET", "FAMILIES",
           "file_sha256", "read_state_dict", "Converted", "convert", "source_record", "data_identity",
           "TORCHVISION_CONSTRUCTORS", "CHECK_TOLERANCE", "check_against_torch", "import_teacher", "main"]

FORMATS = ("repdistiller", "torchvision")
CHECKPOINT_STEP = 0
IMPORT_EXTRA = "pip install -e '.[import]'"


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset a published teacher was trained on: what the import records of it.

  ``train_size``: the published training split's size; its examples are ids ``0 .. train_size - 1`` (their
  positions in the split, the ids ``tgeo_jax.data`` gives a TFDS training split).
  """

  name: str
  num_classes: int
  train_size: int
  input_shape: tuple[int, int, int]
  split: str


DATASETS = {
    "cifar100": Dataset("cifar100", 100, 50_000, (32, 32, 3), "the CIFAR-100 training split (50,000 images)"),
    "imagenet2012": Dataset("imagenet2012", 1000, 1_281_167, (224, 224, 3),
                            "the ILSVRC-2012 training split (1,281,167 images)"),
}
DEFAULT_DATASET = {"repdistiller": "cifar100", "torchvision": "imagenet2012"}


# ------------------------------------------------------------------------------------ torch module names per family
# Each rule maps a flax module path (as ``nnx.iter_graph`` names it, e.g. ``('stages', 0, 1, 'conv1')``) to the name
# of the torch module holding the same weights (``'layer1.1.conv1'``).


def _staged(top: dict, stage: str, block: dict | None = None) -> Callable:
  """Models built as ``stages[s][b]``: top-level modules renamed by ``top``, ``stages.s.b.X`` ->
  ``<stage.format(s + 1)>.b.<block[X] or X>``."""
  block = block or {}

  def rule(path, model):
    del model
    if path[0] != "stages":
      return top[".".join(map(str, path))]
    tail = ".".join(map(str, path[3:]))
    return f"{stage.format(path[1] + 1)}.{path[2]}.{block.get(tail, tail)}"

  return rule


def _vgg(path, model):
  # RepDistiller's block<b> is nn.Sequential(conv, bn, relu, conv, bn, relu, ..., conv, bn): layer i at 3 i, 3 i + 1.
  del model
  if path == ("fc",):
    return "classifier"
  _, b, i, kind = path
  return f"block{b}.{3 * i + (0 if kind == 'conv' else 1)}"


# RepDistiller's InvertedResidual.conv: pw conv, bn, relu, dw conv, bn, relu, pw-linear conv, bn.
_MOBILE_CIFAR = {"expand.conv": "0", "expand.bn": "1", "depthwise.conv": "3", "depthwise.bn": "4", "project": "6",
                 "project_bn": "7"}


def _mobilenetv2_cifar(path, model):
  del model
  top = {"stem.conv": "conv1.0", "stem.bn": "conv1.1", "head_conv.conv": "conv2.0", "head_conv.bn": "conv2.1",
         "fc": "classifier.0"}
  name = ".".join(map(str, path))
  if path[0] != "stages":
    return top[name]
  return f"blocks.{path[1]}.{path[2]}.conv.{_MOBILE_CIFAR['.'.join(path[3:])]}"


def _mobilenetv2_torchvision(path, model):
  # torchvision numbers the stem, the 17 blocks and the head conv as features.0 .. features.18; a block's conv is
  # [ConvBNReLU6(expand)], ConvBNReLU6(dw), conv, bn: without the expansion (t = 1) everything moves up by one.
  blocks = [len(stage) for stage in model.stages]
  if path[0] == "stem":
    return f"features.0.{0 if path[1] == 'conv' else 1}"
  if path[0] == "head_conv":
    return f"features.{1 + sum(blocks)}.{0 if path[1] == 'conv' else 1}"
  if path == ("fc",):
    return "classifier.1"
  _, s, b, *tail = path
  k = 1 + sum(blocks[:s]) + b
  shift = 0 if model.stages[s][b].expand is None else 1
  part = {"expand": "0", "depthwise": str(shift), "project": str(1 + shift), "project_bn": str(2 + shift)}[tail[0]]
  sub = "" if len(tail) == 1 else f".{0 if tail[1] == 'conv' else 1}"
  return f"features.{k}.conv.{part}{sub}"


_RESNET = _staged({"stem_conv": "conv1", "stem_bn": "bn1", "fc": "fc"}, "layer{}",
                  {"shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"})
_RESNET50_CIFAR = _staged({"stem_conv": "conv1", "stem_bn": "bn1", "fc": "linear"}, "layer{}",
                          {"shortcut_conv": "shortcut.0", "shortcut_bn": "shortcut.1"})
# RepDistiller's NetworkBlock wraps its blocks in ``.layer``.
_WRN = _staged({"stem_conv": "conv1", "final_bn": "bn1", "fc": "fc"}, "block{}.layer",
               {"shortcut_conv": "convShortcut"})
_SHUFFLEV1 = _staged({"stem_conv": "conv1", "stem_bn": "bn1", "fc": "linear"}, "layer{}")
# The down unit's two branches are RepDistiller's conv1..conv5 (left: dw, pw; right: pw, dw, pw).
_SHUFFLEV2 = _staged({"stem_conv": "conv1", "stem_bn": "bn1", "head_conv": "conv2", "head_bn": "bn2", "fc": "linear"},
                     "layer{}", {"left_dw": "conv1", "left_dw_bn": "bn1", "left_pw": "conv2", "left_pw_bn": "bn2",
                               "right_pw1": "conv3", "right_pw1_bn": "bn3", "right_dw": "conv4",
                               "right_dw_bn": "bn4", "right_pw2": "conv5", "right_pw2_bn": "bn5"})


FAMILIES: dict[str, dict[str, Callable]] = {
    "repdistiller": {
        **{f"resnet{d}": _RESNET for d in (8, 14, 20, 32, 44, 56, 110)},
        "resnet8x4": _RESNET,
        "resnet32x4": _RESNET,
        **{f"wrn_{d}_{k}": _WRN for d in (16, 40) for k in (1, 2)},
        **{f"vgg{d}": _vgg for d in (8, 11, 13, 16, 19)},
        "resnet50_cifar": _RESNET50_CIFAR,
        "mobilenetv2": _mobilenetv2_cifar,
        "shufflev1": _SHUFFLEV1,
        "shufflev2": _SHUFFLEV2,
    },
    "torchvision": {
        "resnet18": _RESNET,
        "resnet34": _RESNET,
        "resnet50": _RESNET,
        "mobilenetv2_imagenet": _mobilenetv2_torchvision,
    },
}


# ------------------------------------------------------------------------------------------------ reading the file


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _torch():
  try:
    import torch
  except ImportError:
    raise UserError(f"--checkpoint: reading a PyTorch checkpoint needs torch, the 'import' extra ({IMPORT_EXTRA})"
                    ) from None
  return torch


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], str]:
  """``({key: float32 or integer array}, wrapper)`` of a PyTorch checkpoint file, read without running pickled code.

  ``wrapper``: ``'model'``, ``'state_dict'`` or ``'none'`` (a bare state_dict). Besides tensors and containers only
  ``argparse.Namespace`` is allowed in the file (RepDistiller's ``*_last.pth`` stores its options as one; building
  a Namespace runs no code of the file).
  """
  torch = _torch()
  if not os.path.isfile(path):
    raise UserError(f"--checkpoint: no file {path!r}")
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - whatever torch.load raises, the file is not a readable checkpoint
    text = " ".join(str(e).split())
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
      raise UserError(f"--checkpoint: {path!r} pickles {unsafe.group(1).rstrip('.,')}, which loading it would have "
                      "to run (refused: weights_only=True); save the model's state_dict instead "
                      "(torch.save(model.state_dict(), FILE))") from None
    # torch's weights-only refusal is a page of advice; its own reason is the line after "WeightsUnpickler error:".
    reason = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)", text)
    detail = reason.group(1) if reason else text
    raise UserError(f"--checkpoint: {path!r} is not a PyTorch checkpoint ({type(e).__name__}"
                    f"{': ' + detail[:120] if detail else ''})") from None
  wrapper = "none"
  if isinstance(obj, dict):
    for key in ("model", "state_dict"):
      if isinstance(obj.get(key), dict):
        obj, wrapper = obj[key], key
        break
  if not isinstance(obj, dict) or not obj:
    what = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise UserError(f"--checkpoint: {path!r} holds {what}, expected a state_dict (a dict of tensors, bare or under "
                    "'model' or 'state_dict')")
  not_tensors = [k for k, v in obj.items() if not torch.is_tensor(v)]
  if not_tensors:
    where = "" if wrapper == "none" else f" under {wrapper!r}"
    raise UserError(f"--checkpoint: {path!r} holds {not_tensors[0]!r}{where}, which is not a tensor (keys: "
                    f"{', '.join(map(repr, list(obj)[:6]))}{', ...' if len(obj) > 6 else ''}); expected a state_dict, "
                    "bare or under 'model' or 'state_dict'")
  keys = [str(k) for k in obj]
  if all(k.startswith("module.") for k in keys):  # nn.DataParallel's wrapper
    obj = {k[len("module."):]: v for k, v in zip(keys, obj.values())}
  out = {}
  for key, tensor in obj.items():
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
      array = tensor.to(torch.float32).numpy()
      # Weights a student would be distilled from: a NaN/Inf (a flipped byte, a diverged run) or a negative
      # BatchNorm variance gives garbage logits that no later guard sees, so the file is refused here.
      if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise UserError(f"--checkpoint: {key!r} in {path!r} holds {bad} non-finite value{'s' * (bad != 1)} (NaN or "
                        "Inf): a damaged file or a diverged run, refused")
      if str(key).endswith("running_var") and np.any(array < 0):
        raise UserError(f"--checkpoint: {key!r} in {path!r} holds a negative variance ({array.min():.4g}): a damaged "
                        "file, refused")
      out[str(key)] = array
    elif not (tensor.is_complex() or tensor.is_quantized):
      out[str(key)] = tensor.numpy()
    else:
      raise UserError(f"--checkpoint: {key!r} in {path!r} is a {tensor.dtype} tensor, expected real numbers")
  return out, wrapper


# ------------------------------------------------------------------------------------------------------ conversion

_CONV_LEAVES = {"kernel": "weight", "bias": "bias"}
_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _flat(tree: dict, prefix: tuple = ()) -> list[tuple[tuple, object]]:
  out = []
  for key, value in tree.items():
    if isinstance(value, dict):
      out += _flat(value, (*prefix, key))
    else:
      out.append(((*prefix, key), value))
  return out


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _torch_shape(kind: str, leaf: str, flax_shape: tuple) -> tuple:
  """The torch tensor shape that maps onto a flax leaf of ``flax_shape``."""
  if leaf == "kernel" and kind == "conv":
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if leaf == "kernel" and kind == "linear":
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def _to_flax(kind: str, leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and kind == "conv":
    return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO; I is C_in / groups in both
  if leaf == "kernel" and kind == "linear":
    return array.T
  return array


@dataclasses.dataclass
class Converted:
  """A converted model: ``model`` (an ``nnx.Module`` holding the weights), its ``params`` and ``rest`` states, and
  ``tensors`` (how many torch tensors were used; ``num_batches_tracked`` not counted)."""

  model: object
  params: object
  rest: object
  tensors: int


def convert(state_dict: dict[str, np.ndarray], model_name: str, *, fmt: str, num_classes: int,
            input_shape=(32, 32, 3), source: str = "the checkpoint", classes_from: str = "") -> Converted:
  """The zoo model ``model_name`` with the weights of ``state_dict`` (``read_state_dict``) in format ``fmt``.

  Walks every flax leaf (parameters and BatchNorm statistics), finds its torch key by the family's rule and takes
  that tensor transposed to the flax layout. Refuses (one ``UserError`` line naming the key) a key missing from
  ``state_dict``, a key no flax leaf takes, or a shape other than the model's. ``classes_from``: where
  ``num_classes`` comes from, for the message about a classifier of another size.
  """
  import jax.numpy as jnp
  from flax import nnx

  from tgeo_jax import models

  rule = _family_rule(fmt, model_name)
  abstract = nnx.eval_shape(lambda: models.create(model_name, num_classes=num_classes, input_shape=input_shape))
  kinds = {}
  for path, node in nnx.iter_graph(abstract):
    if isinstance(node, nnx.Conv):
      kinds[path] = "conv"
    elif isinstance(node, nnx.Linear):
      kinds[path] = "linear"
    elif isinstance(node, nnx.BatchNorm):
      kinds[path] = "bn"
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  pure = {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)}

  expected, missing, mismatched, bn_prefixes = [], [], [], set()
  for path, spec in _flat(pure):
    module_path, leaf = path[1:-1], path[-1]
    kind = kinds.get(module_path)
    if kind is None:  # a zoo model with a layer type this converter does not know: a gap in this file, not input
      raise ValueError(f"{model_name}: no PyTorch mapping for the layer at {module_path} (leaf {leaf!r})")
    prefix = rule(module_path, abstract)
    key = f"{prefix}.{(_BN_LEAVES if kind == 'bn' else _CONV_LEAVES)[leaf]}"
    if kind == "bn":
      bn_prefixes.add(prefix)
    expected.append(key)
    if key not in state_dict:
      missing.append(key)
      continue
    want = _torch_shape(kind, leaf, tuple(spec.shape))
    got = tuple(state_dict[key].shape)
    if got != want:
      mismatched.append((key, got, want, kind == "linear" and module_path == ("fc",)))
      continue
    _set(pure, path, jnp.asarray(_to_flax(kind, leaf, state_dict[key]), dtype=spec.dtype))
  taken = set(expected) | {f"{p}.num_batches_tracked" for p in bn_prefixes}
  extra = [k for k in state_dict if k not in taken]

  what = f"a {model_name} state_dict in {fmt}'s layout"
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"key {missing[0]!r} is missing" if len(missing) == 1 else
                   f"{len(missing)} of the {len(expected)} keys {model_name} needs are missing (first {missing[0]!r})")
    if extra:
      parts.append(f"key {extra[0]!r} has no place in {model_name}" if len(extra) == 1 else
                   f"{len(extra)} of its keys have no place in {model_name} (first {extra[0]!r})")
    if mismatched:
      key, got, want, _ = mismatched[0]
      parts.append(f"{len(mismatched)} tensors have other shapes (first {key!r}: {got}, expected {want})")
    hint = (" (a checkpoint of another architecture?)"
            if len(missing) > len(expected) // 4 or len(mismatched) > len(expected) // 4 else "")
    raise UserError(f"--checkpoint: {source} is not {what}: {'; '.join(parts)}{hint}")
  if mismatched:
    key, got, want, _ = mismatched[0]
    more = f" ({len(mismatched) - 1} more tensors of other shapes)" if len(mismatched) > 1 else ""
    if all(is_head for *_, is_head in mismatched):
      raise UserError(f"--checkpoint: the classifier {key!r} in {source} has shape {got}, a {got[0]}-class model, "
                      f"but {classes_from or 'the model'} has {num_classes} classes (expected {want})")
    raise UserError(f"--checkpoint: {key!r} has shape {got} in {source}, but {model_name} with {num_classes} classes "
                    f"expects {want}{more} (a checkpoint of another width or architecture?)")
  nnx.replace_by_pure_dict(params, pure["params"])
  nnx.replace_by_pure_dict(rest, pure["rest"])
  model = nnx.merge(graphdef, params, rest)
  return Converted(model, params, rest, len(expected))


def _family_rule(fmt: str, model_name: str) -> Callable:
  if fmt not in FAMILIES:
    raise UserError(f"--format: expected one of {', '.join(FAMILIES)}, got {fmt!r}")
  if model_name not in FAMILIES[fmt]:
    other = next((f for f, names in FAMILIES.items() if model_name in names), None)
    hint = f" ({model_name!r} is a {other} model: --format={other})" if other else ""
    raise UserError(f"--model: {fmt} checkpoints are imported as one of {', '.join(FAMILIES[fmt])}; got "
                    f"{model_name!r}{hint}")
  return FAMILIES[fmt][model_name]


# ------------------------------------------------------------------------------------------------- work directory


def source_record(fmt: str, path: str, sha256: str, wrapper: str, dataset: Dataset) -> dict:
  """What the data identity of an imported teacher says about its origin (``data.imported_from``)."""
  return {"format": fmt, "file": os.path.abspath(path), "sha256": sha256, "wrapper": wrapper,
          "training_data": dataset.split, "training_data_checked": False}


def data_identity(dataset: Dataset, source: dict) -> dict:
  """The data identity of an imported teacher: the dataset's name, no content digest (the import never reads the
  data), the claimed training membership (the whole published training split), and where the claim comes from."""
  train_ids = np.arange(dataset.train_size, dtype=np.int64)
  return {"name": dataset.name, "digest": None, "sizes": {"train": dataset.train_size, "val": 0, "test": 0},
          "membership": {"train": run_identity.ids_digest(train_ids)}, "imported_from": source}


def _checkpoint_steps(ckpt_dir: str) -> list[int]:
  # Without constructing a Checkpointer, which would create the directory.
  try:
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  except (FileNotFoundError, NotADirectoryError):
    return []


def _existing_import(workdir: str, config_dict: dict) -> bool:
  """True when ``workdir`` already holds this very import; a ``UserError`` when it holds anything else."""
  if not _checkpoint_steps(os.path.join(workdir, "checkpoints")):
    return False
  saved = run_identity.read_json_file(os.path.join(workdir, run_identity.IDENTITY_FILE)) or {}
  if saved.get("config") == run_identity.config_record(config_dict):
    return True
  source = (saved.get("data") or {}).get("imported_from")
  what = (f"the import of {source.get('file')!r} as {saved.get('config', {}).get('model.name')!r}" if source
          else "a checkpoint of another run")
  raise UserError(f"--workdir: {workdir!r} already holds {what}; use another --workdir (nothing was changed)")


# zoo name -> torchvision.models constructor (the ``torchvision`` format's reference for ``--check``)
TORCHVISION_CONSTRUCTORS = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
                            "mobilenetv2_imagenet": "mobilenet_v2"}
CHECK_TOLERANCE = 1e-4  # relative L2 of the logits; float32 conversions agree to ~1e-6


def _torch_constructor(fmt: str, model_name: str, torch_model: str | None):
  import importlib
  if torch_model:
    module, _, name = torch_model.partition(":")
    try:
      return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
      raise UserError(f"--torch_model: cannot import {torch_model!r} ({type(e).__name__}: {e}); expected "
                      "MODULE:FUNCTION on the Python path, e.g. models.resnet:resnet32x4 from a RepDistiller "
                      "checkout") from None
  if fmt == "torchvision":
    try:
      import torchvision.models
    except Exception as e:  # noqa: BLE001 - absent, or broken beside this torch
      raise UserError(f"--check: needs torchvision for the torchvision format ({type(e).__name__})") from None
    return getattr(torchvision.models, TORCHVISION_CONSTRUCTORS[model_name])
  raise UserError("--check: a repdistiller model is checked against its PyTorch definition: pass "
                  "--torch_model=MODULE:FUNCTION (e.g. models.resnet:resnet32x4 from a RepDistiller checkout on the "
                  "Python path), called with num_classes=K")


def check_against_torch(converted: "Converted", state_dict: dict[str, np.ndarray], fmt: str, model_name: str,
                        dataset: "Dataset", torch_model: str | None = None, *, samples: int = 4,
                        seed: int = 0) -> dict:
  """The imported model's eval-mode logits against the PyTorch model's on ``samples`` random inputs.

  The PyTorch model is ``torch_model`` (``MODULE:FUNCTION``, called with ``num_classes=K``) or, for the torchvision
  format, torchvision's own constructor; it loads the same state_dict (strictly). Returns ``{"max_abs",
  "relative_l2", "samples"}``; a difference above ``CHECK_TOLERANCE`` is a ``UserError``.
  """
  torch = _torch()
  ctor = _torch_constructor(fmt, model_name, torch_model)
  try:
    net = ctor(num_classes=dataset.num_classes)
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=True)
  except Exception as e:  # noqa: BLE001 - another architecture, a constructor with other arguments, ...
    first = " ".join(str(e).split())[:200]
    raise UserError(f"--torch_model: the PyTorch model does not take this checkpoint ({type(e).__name__}: {first})"
                    ) from None
  net.eval()
  x = np.random.default_rng(seed).normal(size=(samples, *dataset.input_shape)).astype(np.float32)  # NHWC
  with torch.no_grad():
    reference = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  reference = np.asarray((reference[-1] if isinstance(reference, (tuple, list)) else reference).numpy(), np.float64)
  got = np.asarray(converted.model(x, train=False), np.float64)
  result = {"samples": samples, "max_abs": float(np.max(np.abs(got - reference))),
            "relative_l2": float(np.linalg.norm(got - reference) / max(np.linalg.norm(reference), 1e-30))}
  if not result["relative_l2"] <= CHECK_TOLERANCE:
    raise UserError(f"--check: the imported {model_name}'s logits differ from PyTorch's on {samples} random inputs "
                    f"(relative L2 {result['relative_l2']:.3g} > {CHECK_TOLERANCE:g}, max |diff| "
                    f"{result['max_abs']:.3g}): nothing was written")
  return result


def import_teacher(fmt: str, model_name: str, checkpoint_path: str, workdir: str, dataset_name: str | None = None,
                   *, check: bool = False, torch_model: str | None = None, log=print) -> dict:
  """Writes the teacher work directory ``workdir`` from ``checkpoint_path``; returns its identity record.

  ``check``: before writing, compare the converted model's logits with the PyTorch model's
  (``check_against_torch``) and print the error. Idempotent: the same import into the same directory finds it done
  and returns its record.
  """
  dataset_name = dataset_name or DEFAULT_DATASET.get(fmt, "")
  if dataset_name not in DATASETS:
    raise UserError(f"--dataset: expected one of {', '.join(DATASETS)}, got {dataset_name!r}")
  dataset = DATASETS[dataset_name]
  _family_rule(fmt, model_name)
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir: {workdir!r} is a file, expected a directory to write the teacher into")
  if os.path.isdir(workdir) and not _checkpoint_steps(os.path.join(workdir, "checkpoints")) and \
      [n for n in os.listdir(workdir) if n != run_identity.LOCK_FILE]:
    raise UserError(f"--workdir: {workdir!r} already holds other files ({', '.join(sorted(os.listdir(workdir))[:3])}, "
                    "...) and no import; choose an empty or new directory (nothing was changed)")
  if not os.path.isfile(checkpoint_path):
    raise UserError(f"--checkpoint: no file {checkpoint_path!r}")
  sha256 = file_sha256(checkpoint_path)
  config_dict = {"method": "imported", "model": {"name": model_name}, "data": {"name": dataset.name},
                 "import": {"format": fmt, "sha256": sha256}}
  if os.path.isdir(workdir) and _existing_import(workdir, config_dict):
    log(f"{workdir} already holds this import ({model_name} from {checkpoint_path}, sha256 {sha256[:12]})")
    return run_identity.read_json_file(os.path.join(workdir, run_identity.IDENTITY_FILE))

  state_dict, wrapper = read_state_dict(checkpoint_path)
  converted = convert(state_dict, model_name, fmt=fmt, num_classes=dataset.num_classes,
                      input_shape=dataset.input_shape, source=repr(checkpoint_path),
                      classes_from=f"--dataset={dataset.name}")
  if check:
    result = check_against_torch(converted, state_dict, fmt, model_name, dataset, torch_model)
    log(f"check: the imported model's logits equal PyTorch's on {result['samples']} random inputs to relative L2 "
        f"{result['relative_l2']:.2e} (max |diff| {result['max_abs']:.2e}; tolerance {CHECK_TOLERANCE:g})")
  source = source_record(fmt, checkpoint_path, sha256, wrapper, dataset)
  # Where the file lay is recorded beside the fingerprinted fields, not in them: its sha256 says what it is, so the
  # same file imported from another path is the same teacher.
  where = source.pop("file")
  identity = run_identity.make_identity(config_dict, data_identity(dataset, source), [])
  identity["data"]["imported_from"] = {"file": where, **source}
  config_file = {**config_dict, "import": {**config_dict["import"], "file": where}}

  from tgeo_jax import checkpoint, models
  run_identity.prepare_workdir(workdir)
  with run_identity.WorkdirLock(workdir).acquire():
    if _existing_import(workdir, config_dict):  # another process finished it while this one converted
      return run_identity.read_json_file(os.path.join(workdir, run_identity.IDENTITY_FILE))
    # The run files first and the checkpoint last: a directory with a checkpoint is a complete import.
    run_identity.write_run_files(workdir, config_file, identity,
                                 {"train": np.arange(dataset.train_size, dtype=np.int64)})
    meta = {"step": CHECKPOINT_STEP, "total_steps": CHECKPOINT_STEP, "epoch": 0, "finished": True,
            "method": "imported", "num_classes": dataset.num_classes, "config": config_file, "identity": identity}
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1)
    try:
      ckpt.save(CHECKPOINT_STEP, {"params": converted.params, "rest": converted.rest}, meta)
    finally:
      ckpt.close()
  log(f"imported {model_name} ({fmt}, {models.num_params(converted.params):,} parameters, {converted.tensors} "
      f"tensors, {dataset.num_classes} classes) from {checkpoint_path} (sha256 {sha256[:12]}) into {workdir}")
  log(f"use it with --config.teacher.model={model_name} --config.teacher.checkpoint={workdir}")
  print(f"warning: {workdir}: imported weights, trained by their publisher on {dataset.split} (a claim this import "
        f"cannot check): the teacher has seen every example of a student's validation part (a slice of that split) "
        "and none of the test split; a student run refuses it unless teacher.verify_provenance=False, and then says "
        "so in a warning line", file=sys.stderr, flush=True)
  return identity


# ------------------------------------------------------------------------------------------------------------ CLI


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one ``UserError`` line (argparse prints its usage too, and exits on its own)."""

  def error(self, message):
    # "argument --format: invalid choice: ..." -> "--format: invalid choice: ...", the shape of every other error.
    raise UserError(re.sub(r"^argument (--[\w-]+): ", r"\1: ", message))


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m tgeo_jax.import_teacher",
              description="Import a PyTorch teacher checkpoint as a tgeo_jax teacher work directory "
                          "(docs/import_teacher.md).")
  p.add_argument("--format", required=True, choices=FORMATS, help="the checkpoint's layout")
  p.add_argument("--model", required=True, help="the zoo model: " + "; ".join(
      f"{fmt}: {', '.join(names)}" for fmt, names in FAMILIES.items()))
  p.add_argument("--checkpoint", required=True, metavar="FILE", help="the .pth/.pt file (read with weights_only=True)")
  p.add_argument("--workdir", required=True, metavar="DIR", help="the teacher work directory to write")
  p.add_argument("--check", action="store_true",
                 help="before writing, compare the imported model's logits with the PyTorch model's on random inputs "
                      "(torchvision's constructor, or --torch_model)")
  p.add_argument("--torch_model", default=None, metavar="MODULE:FUNCTION",
                 help="the PyTorch constructor for --check (called with num_classes=K), e.g. models.resnet:resnet32x4")
  p.add_argument("--dataset", default=None, choices=tuple(DATASETS),
                 help="what the teacher was trained on (default: cifar100 for repdistiller, imagenet2012 for "
                      "torchvision); sets the class count and the recorded training data")
  return p


def main(argv: list[str] | None = None) -> int:
  """``python -m tgeo_jax.import_teacher ARGS`` (``argv`` without the program name); returns the exit status."""
  argv = sys.argv[1:] if argv is None else argv
  parser = _parser()
  if any(a in ("-h", "--help") for a in argv):
    parser.print_help()
    return 0
  try:
    args = parser.parse_args(argv)
    if args.torch_model and not args.check:
      raise UserError("--torch_model: only used with --check")
    import_teacher(args.format, args.model, args.checkpoint, args.workdir, args.dataset, check=args.check,
                   torch_model=args.torch_model)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a disk fault while writing: one line, never a traceback
    where = f"{e.filename}: " if e.filename else ""
    print(f"error: {where}{e.strerror or e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
