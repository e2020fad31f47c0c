"""Batched numpy augmentations (the pipeline's augmentation hook). Each is ``f(batch [B, H, W, C], rng) -> batch``.

They run in the input pipeline on the host; the generator is seeded from (seed, epoch, step), so augmentation is
reproducible and a resumed run sees exactly the batches it would have seen.

An augmentation may carry ``on_raw``: the same augmentation on the stored uint8 pixels, drawing the same random
numbers, for sources whose ``to_model`` is pixel-wise (``ArraySource.pixelwise``): crops and flips commute with a
per-pixel normalisation, so ``to_model(aug.on_raw(raw)) == aug(to_model(raw))`` bit for bit, at a quarter of the
memory traffic. ``raw_fill() ->`` the normalised padding value (when there is padding), which must equal
``to_model(0)`` for the raw variant (zero padding) to be exact; ``train_batches`` checks it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tgeo_jax.errors import UserError

__all__ = ["flip", "flip_draws", "crop_flip", "crop_flip_draws", "crop_flip_raw", "device_form", "AUGMENTATIONS", "get", "crop_flip_fill", "crop_flip_cifar100",
           "random_resized_crop_box", "imagenet_crop_flip"]


def flip_draws(rng: np.random.Generator, b: int) -> np.ndarray:
  """The random numbers of ``flip`` for a batch of ``b``: which examples are flipped (``[b] bool``)."""
  return rng.random(b) < 0.5


def crop_flip_draws(rng: np.random.Generator, b: int, padding: int = 4):
  """The random numbers of ``crop_flip`` (and its variants) for a batch of ``b``, in their order: the crop
  window's top-left corner in the padded image (``dy, dx: [b] int64`` in ``[0, 2 * padding]``), then ``flip``'s."""
  dy = rng.integers(0, 2 * padding + 1, size=b)
  dx = rng.integers(0, 2 * padding + 1, size=b)
  return dy, dx, flip_draws(rng, b)


def flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Random horizontal flip with probability 1/2 per example."""
  mask = flip_draws(rng, len(images))
  out = images.copy()
  out[mask] = out[mask][:, :, ::-1]
  return out


def crop_flip(images: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
  """Random crop of the original size from a zero-padded image (CIFAR protocol: pad 4), then random flip."""
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  dy = rng.integers(0, 2 * padding + 1, size=b)
  dx = rng.integers(0, 2 * padding + 1, size=b)
  rows = dy[:, None] + np.arange(h)[None, :]  # [B, H]
  cols = dx[:, None] + np.arange(w)[None, :]  # [B, W]
  cropped = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
  return flip(cropped, rng)


def crop_flip_raw(images: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
  """``crop_flip`` (zero padding) drawing the same numbers in the same order, by slicing each example's window
  (faster than one fancy-index gather over the batch)."""
  b, h, w = images.shape[:3]
  dy, dx, flipped = crop_flip_draws(rng, b, padding)
  padded = np.zeros((b, h + 2 * padding, w + 2 * padding, *images.shape[3:]), images.dtype)
  padded[:, padding:padding + h, padding:padding + w] = images
  out = np.empty_like(images)
  for i in range(b):
    window = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    out[i] = window[:, ::-1] if flipped[i] else window
  return out


flip.on_raw = flip
crop_flip.on_raw = crop_flip_raw
crop_flip.raw_fill = lambda: np.float32(0.0)


AUGMENTATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray] | None] = {
    "none": None,
    "flip": flip,
    "crop_flip": crop_flip,
}


def get(name: str):
  if name not in AUGMENTATIONS:
    raise UserError(f"data.augment: unknown augmentation {name!r}; expected one of {sorted(AUGMENTATIONS)}")
  return AUGMENTATIONS[name]


# ------------------------------------------------------------------ TFDS image tasks (tgeo_jax.data.tfds_sources)

def crop_flip_fill(images: np.ndarray, rng: np.random.Generator, fill, padding: int = 4) -> np.ndarray:
  """``crop_flip`` with the padding filled with the per-channel value ``fill`` instead of zeros."""
  b, h, w, c = images.shape
  padded = np.empty((b, h + 2 * padding, w + 2 * padding, c), images.dtype)
  padded[...] = np.asarray(fill, images.dtype)
  padded[:, padding:padding + h, padding:padding + w] = images
  dy = rng.integers(0, 2 * padding + 1, size=b)
  dx = rng.integers(0, 2 * padding + 1, size=b)
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  cropped = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
  return flip(cropped, rng)


def crop_flip_cifar100(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """RepDistiller's CIFAR-100 crop: pad 4 with black *raw* pixels (normalised: -mean/std), crop 32, flip."""
  from tgeo_jax.data.tfds_sources import CIFAR100_MEAN, CIFAR100_STD
  return crop_flip_fill(images, rng, -CIFAR100_MEAN / CIFAR100_STD)


def random_resized_crop_box(rng: np.random.Generator, h: int, w: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop box ``(top, left, height, width)`` (10 tries, then the central fallback)."""
  area = h * w
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  in_ratio = w / h
  if in_ratio < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def imagenet_crop_flip(images: np.ndarray, rng: np.random.Generator, size: int = 224) -> np.ndarray:
  """Random-resized crop (bilinear, Pillow per channel) of each ``[H, W, C]`` float image to ``size``, then flip."""
  from PIL import Image
  b, h, w, c = images.shape
  out = np.empty((b, size, size, c), np.float32)
  for i in range(b):
    top, left, ch, cw = random_resized_crop_box(rng, h, w)
    crop = np.asarray(images[i, top:top + ch, left:left + cw], np.float32)
    for k in range(c):
      out[i, :, :, k] = np.asarray(Image.fromarray(np.ascontiguousarray(crop[:, :, k]), mode="F").resize(
          (size, size), Image.BILINEAR))
  return flip(out, rng)


crop_flip_cifar100.on_raw = crop_flip_raw
# CIFAR-100's normalised black pixel (the padding of the float variant); equal to its to_model(0) bit for bit.
crop_flip_cifar100.raw_fill = lambda: _cifar100_black()


def _cifar100_black() -> np.ndarray:
  from tgeo_jax.data.tfds_sources import CIFAR100_MEAN, CIFAR100_STD
  return -CIFAR100_MEAN / CIFAR100_STD

AUGMENTATIONS["crop_flip_cifar100"] = crop_flip_cifar100
AUGMENTATIONS["imagenet_crop_flip"] = imagenet_crop_flip


def _flip_only_draws(rng: np.random.Generator, b: int):
  return np.zeros(b, np.int64), np.zeros(b, np.int64), flip_draws(rng, b)


def device_form(augmentation):
  """How the device-resident pipeline applies ``augmentation`` inside the jitted step, on model inputs:
  ``(padding, draws, fill)``. ``draws(rng, b) -> (dy [b], dx [b], flipped [b])`` draws exactly the numbers the
  host function draws; the step crops each example's window at ``(dy, dx)`` of its image padded by ``padding``
  with ``fill`` (the normalised padding value, per channel) and mirrors it where ``flipped``: the host's batch,
  bit for bit. None for an augmentation that runs on the host only."""
  if augmentation is flip:
    return 0, _flip_only_draws, None
  if augmentation in (crop_flip, crop_flip_cifar100):
    return 4, crop_flip_draws, np.asarray(augmentation.raw_fill(), np.float32)
  return None
