"""Mixed-adapter batches: which kernel computes `y_b = s_i·(x_b·A_i)·B_i`, `i = ids[b]`, fastest.

Side by side, one process, the low-rank term of one projection for a batch whose examples use
different adapters of a bank (`A: (N, D, r)`, `B: (N, r, O)`, `s: (N,)`), x `(batch, T, D)`:

- `gather`: `A[ids]`, `B[ids]` per example, then two batched einsums (what `lj.unmerged(...,
  adapter_ids=)` emits: the function is vmapped over examples with each one's factors gathered).
- `onehot_select`: the same batched einsums on factors picked by a one-hot matmul
  (`one_hot(ids) · A`, a gather written as a contraction).
- `onehot_rows`: every row through every adapter, masked by the one-hot (sglang-jax style): N×
  the low-rank FLOPs.
- `ragged`: rows grouped by adapter (argsort of ids), two `lax.ragged_dot`s, rows put back.
- `single`: one adapter for the whole batch (the target: a mixed batch should cost about this).

Reported per strategy: forward and forward+backward (gradients for x, A and B) best-of-reps wall
time, and the ratio to `single`. Also the base projection `x·W` for scale.

  python benchmarks/mixed_strategy.py [--quick] [--reps 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from jax import lax


def gather(x, a, b, s, ids):
  h = jnp.einsum("btd,bdr->btr", x, a[ids]) * s[ids][:, None, None]
  return jnp.einsum("btr,bro->bto", h, b[ids])


def onehot_select(x, a, b, s, ids):
  oh = jax.nn.one_hot(ids, a.shape[0], dtype=x.dtype)
  a_b, b_b = jnp.einsum("bn,ndr->bdr", oh, a), jnp.einsum("bn,nro->bro", oh, b)
  h = jnp.einsum("btd,bdr->btr", x, a_b) * (oh @ s)[:, None, None]
  return jnp.einsum("btr,bro->bto", h, b_b)


def onehot_rows(x, a, b, s, ids):
  oh = jax.nn.one_hot(ids, a.shape[0], dtype=x.dtype) * s
  h = jnp.einsum("btd,ndr->btnr", x, a) * oh[:, None, :, None]
  return jnp.einsum("btnr,nro->bto", h, b)


def ragged(x, a, b, s, ids):
  batch, t, d = x.shape
  order = jnp.argsort(ids, stable=True)
  rows = x[order].reshape(batch * t, d)
  sizes = jnp.bincount(ids, length=a.shape[0]).astype(jnp.int32) * t
  h = lax.ragged_dot(rows, a, sizes) * jnp.repeat(s[ids[order]], t)[:, None]
  y = lax.ragged_dot(h, b, sizes).reshape(batch, t, -1)
  return y[jnp.argsort(order)]


def single(x, a, b, s, ids):
  del ids
  return jnp.einsum("btr,ro->bto", jnp.einsum("btd,dr->btr", x, a[0]) * s[0], b[0])


STRATEGIES = {"gather": gather, "onehot_select": onehot_select, "onehot_rows": onehot_rows,
              "ragged": ragged, "single": single}


def _time(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times)  # best of reps: the machine is shared, the minimum is the least disturbed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  batch, seq, d, o, r = (4, 16, 64, 128, 4) if args.quick else (8, 128, 512, 2048, 8)
  key = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(key[0], (batch, seq, d))
  w = jax.random.normal(key[1], (d, o)) / d ** 0.5
  results = {"shape": dict(batch=batch, seq=seq, d_in=d, d_out=o, rank=r), "device": str(jax.devices()[0]),
             "rows": []}
  base_fwd = _time(jax.jit(lambda x, w: x @ w), (x, w), args.reps)
  print(f"base x·W {batch}x{seq}x{d} -> {o}: {base_fwd * 1e3:.3f} ms forward")
  for n in (8, 32):
    a = jax.random.normal(key[2], (n, d, r)) / d ** 0.5
    b = jax.random.normal(key[3], (n, r, o))
    s = jnp.linspace(0.5, 2.0, n)
    ids = jnp.arange(batch, dtype=jnp.int32) * 3 % n  # batch distinct adapters (min(batch, n))
    ref = jnp.einsum("btd,bdr,bro->bto", x, a[ids], b[ids]) * s[ids][:, None, None]
    timed = {}
    for name, fn in STRATEGIES.items():
      if name != "single":
        err = float(jnp.abs(jax.jit(fn)(x, a, b, s, ids) - ref).max())
        assert err < 1e-3 * float(jnp.abs(ref).max()), (name, err)
      loss = lambda x, a, b, fn=fn, s=s, ids=ids: jnp.sum(fn(x, a, b, s, ids) ** 2)
      fwd = _time(jax.jit(fn), (x, a, b, s, ids), args.reps)
      bwd = _time(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (x, a, b), args.reps)
      timed[name] = (fwd, bwd)
    for name, (fwd, bwd) in timed.items():
      row = dict(adapters=n, strategy=name, fwd_ms=fwd * 1e3, fwd_bwd_ms=bwd * 1e3,
                 fwd_vs_single=fwd / timed["single"][0], fwd_bwd_vs_single=bwd / timed["single"][1])
      results["rows"].append(row)
      print(f"N={n:3d} {name:14s} fwd {fwd * 1e3:8.3f} ms ({row['fwd_vs_single']:5.2f}x single)   "
            f"fwd+bwd {bwd * 1e3:8.3f} ms ({row['fwd_bwd_vs_single']:5.2f}x)")
  results["base_fwd_ms"] = base_fwd * 1e3
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
