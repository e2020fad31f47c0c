"""Float32 precision of tgeo_jax's losses against the official PyTorch formulas, both measured against float64.

For each loss with an official counterpart (KD: RepDistiller's ``DistillKL``; DKD: mdistiller's ``dkd_loss``;
DIST: the authors' ``DIST`` module; SimKD: ``nn.MSELoss``; TGeo-KD: the official feature concatenation), the same
float32 inputs go through

* tgeo_jax in float32 (jitted, value and gradient with respect to the student's logits / features),
* the official formula in PyTorch float32,
* the official formula in PyTorch float64 (the reference: exact to ~1e-16 where the formula is well conditioned),

and the relative errors against the reference are reported: the loss value ``|l - l64| / |l64|`` and the gradient
``max |g - g64| / max |g64|`` (features: ``max |f - f64|``), as the median over random batches.

    python bench/loss_precision.py [--batches 50] [--scale 5]

``tests/test_loss_contract.py`` runs ``measure`` on fewer batches and asserts tgeo_jax is at the official level or
better.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from tgeo_jax import geometry, losses
from tgeo_jax.methods import dist, dkd, simkd

TAU = 4.0


# ----------------------------------------------------------------------------------- the official formulas (torch)
def official_kd(torch, s, t, y):
  """RepDistiller ``DistillKL``: ``kl_div(log_softmax(s/T), softmax(t/T), sum) T^2 / B``."""
  F = torch.nn.functional
  return F.kl_div(F.log_softmax(s / TAU, dim=1), F.softmax(t / TAU, dim=1), reduction="sum") * TAU**2 / s.shape[0]


def official_dkd(torch, s, t, y, alpha=1.0, beta=8.0):
  """mdistiller ``dkd_loss`` (``mdistiller/distillers/DKD.py``), without the CE term."""
  F = torch.nn.functional
  gt = torch.zeros_like(s).scatter_(1, y.unsqueeze(1), 1).bool()
  other = ~gt

  def cat_mask(p):
    return torch.cat([(p * gt).sum(1, keepdims=True), (p * other).sum(1, keepdims=True)], dim=1)

  p_s = cat_mask(F.softmax(s / TAU, dim=1))
  p_t = cat_mask(F.softmax(t / TAU, dim=1))
  tckd = F.kl_div(torch.log(p_s), p_t, reduction="sum") * TAU**2 / y.shape[0]
  p_t2 = F.softmax(t / TAU - 1000.0 * gt, dim=1)
  log_p_s2 = F.log_softmax(s / TAU - 1000.0 * gt, dim=1)
  nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * TAU**2 / y.shape[0]
  return alpha * tckd + beta * nckd


def official_dist(torch, s, t, y, beta=2.0, gamma=2.0):
  """The DIST authors' module (``hunto/DIST_KD``, ``losses/dist_kd.py``) with tau = 4."""
  def cosine(a, b, eps=1e-8):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

  def pearson(a, b):
    return cosine(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1))

  y_s, y_t = (s / TAU).softmax(dim=1), (t / TAU).softmax(dim=1)
  inter = 1 - pearson(y_s, y_t).mean()
  intra = 1 - pearson(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean()
  return TAU**2 * (beta * inter + gamma * intra)


def official_mse(torch, f_s, f_t, y):
  """SimKD's feature loss: ``nn.MSELoss()(trans_feat_s, trans_feat_t)``."""
  return torch.nn.functional.mse_loss(f_s, f_t)


def official_features(torch, s, t, y, tbar):
  """The official TGeo-KD concatenation: [s, t, g, t̄, (t̄-s)², (g-s)², (t-s)², (t-g)², (t̄-g)²]."""
  F = torch.nn.functional
  s, t = F.softmax(s, dim=1), F.softmax(t, dim=1)
  g = F.one_hot(y, s.shape[1]).to(s.dtype)
  tb = tbar[y]
  return torch.cat([s, t, g, tb, (tb - s) ** 2, (g - s) ** 2, (t - s) ** 2, (t - g) ** 2, (tb - g) ** 2], dim=1)


# ------------------------------------------------------------------------------------------------- tgeo_jax's side
def ours_kd(s, t, y):
  return jnp.mean(losses.kd_loss(s, t, temperature=TAU))


def ours_dkd(s, t, y):
  tckd, nckd = dkd.dkd_terms(s, t, y, temperature=TAU)
  return jnp.mean(tckd) + 8.0 * jnp.mean(nckd)


def ours_dist(s, t, y):
  return dist.dist_loss(s, t, y, temperature=TAU, w_ce=0.0)[0]


def ours_mse(f_s, f_t, y):
  return simkd.feature_mse(f_s, f_t)


LOSSES = {"KD (tau=4)": (ours_kd, official_kd), "DKD (tau=4, beta=8)": (ours_dkd, official_dkd),
          "DIST (tau=4)": (ours_dist, official_dist), "SimKD MSE": (ours_mse, official_mse)}


def _batch(rng, n, k, scale, offset):
  s = (rng.normal(size=(n, k)) * scale + offset).astype(np.float32)
  t = (rng.normal(size=(n, k)) * scale + offset).astype(np.float32)
  y = rng.integers(0, k, size=n)
  return s, t, y


def _torch_value_grad(torch, fn, s, t, y, dtype):
  s_ = torch.tensor(s, dtype=dtype, requires_grad=True)
  loss = fn(torch, s_, torch.tensor(t, dtype=dtype), torch.tensor(y))
  loss.backward()
  return float(loss.detach()), s_.grad.detach().double().numpy()


def _rel(value, ref):
  return abs(value - ref) / max(abs(ref), 1e-30)


def _grad_err(g, ref):
  return float(np.max(np.abs(np.asarray(g, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


def measure(batches: int = 50, *, n: int = 64, k: int = 100, scale: float = 5.0, offset: float = 0.0,
            seed: int = 0) -> list[dict]:
  """Median relative errors per loss: ``[{"loss", "ours_value", "official_value", "ours_grad", "official_grad"}]``.

  ``offset`` shifts every logit (large offsets test the row-maximum handling: the math is shift-invariant).
  """
  import torch
  rows = []
  for name, (ours, official) in LOSSES.items():
    value_and_grad = jax.jit(jax.value_and_grad(ours))
    errs = {"ours_value": [], "official_value": [], "ours_grad": [], "official_grad": []}
    rng = np.random.default_rng(seed)
    for _ in range(batches):
      s, t, y = _batch(rng, n, k, scale, offset)
      ref_v, ref_g = _torch_value_grad(torch, official, s, t, y, torch.float64)
      off_v, off_g = _torch_value_grad(torch, official, s, t, y, torch.float32)
      our_v, our_g = value_and_grad(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y))
      errs["ours_value"].append(_rel(float(our_v), ref_v))
      errs["official_value"].append(_rel(off_v, ref_v))
      errs["ours_grad"].append(_grad_err(our_g, ref_g))
      errs["official_grad"].append(_grad_err(off_g, ref_g))
    rows.append({"loss": name, **{key: float(np.median(v)) for key, v in errs.items()}})
  rows.append(_measure_features(torch, batches, n, k, scale, offset, seed))
  return rows


def _measure_features(torch, batches, n, k, scale, offset, seed):
  features = jax.jit(lambda s, t, y, tbar: geometry.relation_features(s, t, y, tbar, layout="reference"))
  errs = {"ours_value": [], "official_value": []}
  rng = np.random.default_rng(seed)
  for _ in range(batches):
    s, t, y = _batch(rng, n, k, scale / 2, offset)
    tbar = np.asarray(geometry.class_mean_teacher(jax.nn.softmax(jnp.asarray(t)), jnp.asarray(y), k), np.float32)
    ref = official_features(torch, *(torch.tensor(a, dtype=torch.float64) for a in (s, t)), torch.tensor(y),
                            torch.tensor(tbar, dtype=torch.float64)).numpy()
    off = official_features(torch, *(torch.tensor(a) for a in (s, t)), torch.tensor(y), torch.tensor(tbar)).numpy()
    got = np.asarray(features(s, t, y, tbar), np.float64)
    errs["ours_value"].append(float(np.max(np.abs(got - ref))))
    errs["official_value"].append(float(np.max(np.abs(off.astype(np.float64) - ref))))
  return {"loss": "TGeo-KD features (max abs)", **{key: float(np.median(v)) for key, v in errs.items()},
          "ours_grad": float("nan"), "official_grad": float("nan")}


def table(rows) -> str:
  lines = ["| loss | value: tgeo_jax | value: official | gradient: tgeo_jax | gradient: official |",
           "|---|---:|---:|---:|---:|"]
  for r in rows:
    cells = [f"{r[key]:.2e}" if np.isfinite(r[key]) else "—"
             for key in ("ours_value", "official_value", "ours_grad", "official_grad")]
    lines.append(f"| {r['loss']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--scale", type=float, default=5.0, help="standard deviation of the random logits")
  parser.add_argument("--offset", type=float, default=0.0, help="added to every logit")
  args = parser.parse_args(argv)
  print(f"float32 relative errors against float64, median of {args.batches} batches [64, 100], "
        f"logits N({args.offset:g}, {args.scale:g}^2)")
  print(table(measure(args.batches, scale=args.scale, offset=args.offset)))


if __name__ == "__main__":
  main()
