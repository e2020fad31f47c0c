"""Filter gradient of one conv layer per resnet8x4 shape, batch 64: XLA's window convolution (jax.vjp of
lax.conv_general_dilated) vs ``conv_filter_grad.filter_grad`` (k*k matrix products) vs torch.nn.grad.conv2d_weight.

    OMP_WAIT_POLICY=PASSIVE python bench/conv_filter_grad.py

Medians of 7 interleaved rounds (ms); relerr = max |new - xla| / max |xla| in float32.
"""
import time, statistics, sys
sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.dirname(__import__('os').path.abspath(__file__))))
import jax, jax.numpy as jnp, numpy as np
from jax import lax
import torch
torch.set_num_threads(2)
from tgeo_jax.models.conv_filter_grad import filter_grad
DN = ('NHWC', 'HWIO', 'NHWC')
def fg_xla(x, dy, ws, s, p):
  _, vjp = jax.vjp(lambda w: lax.conv_general_dilated(x, w, (s, s), p, dimension_numbers=DN), jnp.zeros(ws, x.dtype))
  return vjp(dy)[0]
def fg_new(x, dy, ws, s, p):
  return filter_grad(x, dy, ws[:2], (s, s), p)
cases = [(32, 32, 3, 32, 3, 1), (32, 32, 32, 64, 3, 1), (32, 32, 64, 64, 3, 1), (32, 32, 64, 128, 3, 2), (32, 32, 64, 128, 1, 2), (16, 16, 128, 128, 3, 1), (16, 16, 128, 256, 3, 2), (8, 8, 256, 256, 3, 1)]
rng = np.random.default_rng(0)
tot = {}
for (h, w, ci, co, k, s) in cases:
  n = 64
  p = ((k // 2, k // 2),) * 2
  x = jnp.asarray(rng.standard_normal((n, h, w, ci), np.float32))
  ws = (k, k, ci, co); ho = (h + 2 * (k // 2) - k) // s + 1
  dy = jnp.asarray(rng.standard_normal((n, ho, ho, co), np.float32))
  fx = jax.jit(fg_xla, static_argnums=(2, 3, 4)); fn = jax.jit(fg_new, static_argnums=(2, 3, 4))
  ref = fx(x, dy, ws, s, p); new = fn(x, dy, ws, s, p)
  err = float(jnp.max(jnp.abs(ref - new)) / jnp.max(jnp.abs(ref)))
  tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()); tdy = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy())
  runs = {'xla': lambda: jax.block_until_ready(fx(x, dy, ws, s, p)), 'new': lambda: jax.block_until_ready(fn(x, dy, ws, s, p)),
          'torch': lambda: torch.nn.grad.conv2d_weight(tx, (co, ci, k, k), tdy, stride=s, padding=k // 2)}
  for f in runs.values(): f()
  t = {kk: [] for kk in runs}
  for r in range(7):
    for kk, f in runs.items():
      t0 = time.perf_counter(); f(); t[kk].append(time.perf_counter() - t0)
  med = {kk: 1e3 * statistics.median(v) for kk, v in t.items()}
  for kk, v in med.items(): tot[kk] = tot.get(kk, 0) + v
  print((h, w, ci, co, k, s), f"relerr={err:.1e}", ' '.join(f"{kk}={v:.1f}" for kk, v in med.items()), f"new/xla={med['new']/med['xla']:.2f} new/torch={med['new']/med['torch']:.2f}", flush=True)
print('total', {k: round(v, 1) for k, v in tot.items()})
