"""Rules that recurse: `jit` is inlined, remat and `scan` are re-emitted through public JAX calls
(`jax.checkpoint`, `lax.scan`) with the factors travelling alongside the kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from .core import eval_jaxpr, materialize, pack, rule, unpack
from .tracked import Tracked


def _concrete(outs, ctx, why):
  return [materialize(o, ctx, why) for o in outs]


@rule(P.jit_p)
def _jit(eqn, invals, ctx):
  closed = eqn.params["jaxpr"]
  return eval_jaxpr(closed.jaxpr, closed.consts, invals, ctx)


@rule(P.remat_p)
def _remat(eqn, invals, ctx):
  jaxpr = eqn.params["jaxpr"]
  flat, specs = pack(invals)
  key = ctx.next_key()

  # The key is an argument, so recomputation in the backward pass redraws the same dropout mask.
  def region(key, *flat):
    return _concrete(eval_jaxpr(jaxpr, (), unpack(specs, flat), ctx.child(key)), ctx, "remat output")

  region = jax.checkpoint(region, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
  return region(key, *flat)


@rule(P.scan_p)
def _scan(eqn, invals, ctx):
  p = eqn.params
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts = invals[:n_consts]
  init = _concrete(invals[n_consts:n_consts + n_carry], ctx, "scan carry")
  xs = invals[n_consts + n_carry:]
  # A stacked kernel enters as a scanned input: scan its A and B along the same stack axis.
  outer, inner = [], []
  for x in xs:
    role, k = x.axes[0] if isinstance(x, Tracked) else (None, None)
    if isinstance(x, Tracked) and role != "s":
      x = materialize(x, ctx, "scan over a non-stack axis")
    if isinstance(x, Tracked):
      outer.append(x.replace(a=jnp.moveaxis(x.a, k, 0), b=jnp.moveaxis(x.b, k, 0)))
      inner.append(x.replace(axes=tuple((r, j - (r == "s" and j > k)) for r, j in x.axes[1:])))
    else:
      outer.append(x)
      inner.append(None)
  xs_flat, _ = pack(outer)
  keys = None if ctx.key is None else jax.random.split(ctx.next_key(), p["length"])
  body_jaxpr = p["jaxpr"]

  def body(carry, step):
    step_key, xs_step = step
    vals = [*consts, *carry, *unpack(inner, xs_step)]
    outs = eval_jaxpr(body_jaxpr.jaxpr, body_jaxpr.consts, vals, ctx.child(step_key))
    outs = _concrete(outs, ctx, "scan output")
    return outs[:n_carry], outs[n_carry:]

  carry, ys = lax.scan(body, init, (keys, xs_flat), length=p["length"], reverse=p["reverse"],
                       unroll=p["unroll"])
  return [*carry, *ys]

