"""Batched numpy augmentations (the pipeline's augmentation hook). Each is ``f(batch [B, H, W, C], rng) -> batch``.

They run in the input pipeline on the host; the generator is seeded from (seed, epoch, step), so augmentation is
reproducible and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tgeo_jax.errors import UserError


def flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Random horizontal flip with probability 1/2 per example."""
  mask = rng.random(len(images)) < 0.5
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


AUGMENTATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray] | None] = {
    "none": None,
    "flip": flip,
    "crop_flip": crop_flip,
}


def get(name: str):
  if name not in AUGMENTATIONS:
    raise UserError(f"data.augment: unknown augmentation {name!r}; expected one of {sorted(AUGMENTATIONS)}")
  return AUGMENTATIONS[name]
