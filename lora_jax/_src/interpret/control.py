"""Higher-order primitives: the driver recurses into their sub-jaxprs in both modes.

`jit`/`closed_call` are inlined; `custom_jvp_call`/`custom_vjp_call` are inlined too (their
primal body is evaluated, so gradients flow through that body rather than the custom rule);
remat is re-emitted with `jax.checkpoint` (same policy; tracked values, outputs included, cross
the boundary as packed `w, a, b`), `scan` with `lax.scan` (a stacked kernel's `A`/`B` are scanned
alongside it), `cond`/`switch` with `lax.switch` and `while` with `lax.while_loop` (kernels
closed over as loop constants stay tracked). `shard_map` is re-emitted with `jax.shard_map` (same
mesh, specs, manual axes and `check_vma`): a kernel passed in enters with its factors, each
given the kernel's in-spec carried over to its axes as `lj.attach` places factors
(`Layout.factor_axes`: `A` the kernel's entries for its stack and in axes, `B` for its stack and
out axes, the rank axis replicated), so inside the body each device holds the factor blocks
that match its block of `W` and the low-rank terms are computed per shard (a row-parallel
kernel's partial `x_s·A_s·B` terms are summed by the body's own `psum`, like its base term). A
kernel returned by the body is materialised. Any other primitive carrying a sub-jaxpr is walked
for layout inference and materialises its kernels when applied (`core.Infer.fallback`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P
from jax.sharding import PartitionSpec

from ..layout import Layout, Role
from .core import (
  Apply,
  Infer,
  applies,
  applies_to_parts,
  assign,
  dense,
  eval_jaxpr,
  infers,
  materialize,
  pack,
  primitive_of,
  unpack,
)
from .values import Parts, QuantizedBase, Tracked, View

_INLINE = {P.jit_p: "jaxpr", P.closed_call_p: "call_jaxpr", P.custom_jvp_call_p: "call_jaxpr",
           P.custom_vjp_call_p: "call_jaxpr"}


def _concrete(outs, ctx: Apply, why: str, primitive: str) -> list:
  return [materialize(o, ctx, why, primitive) for o in outs]


@infers(*_INLINE)
@applies(*_INLINE)
@applies_to_parts(*_INLINE)
def _inline(eqn, invals, ctx):
  closed = eqn.params[_INLINE[eqn.primitive]]
  return eval_jaxpr(closed.jaxpr, ctx.consts(closed), invals, ctx)


@infers(P.remat_p)
def _remat_infer(eqn, views, ctx: Infer):
  return eval_jaxpr(eqn.params["jaxpr"], (), views, ctx)


@applies(P.remat_p)
@applies_to_parts(P.remat_p)
def _remat(eqn, invals, ctx: Apply):
  flat, specs = pack(invals)
  out_specs: list = []

  # The key is an argument, so recomputation in the backward pass redraws the same dropout mask.
  def region(key, *flat):
    outs = eval_jaxpr(eqn.params["jaxpr"], (), unpack(specs, flat), ctx.child(key))
    flat_out, out_specs[:] = pack(outs)  # a kernel returned by the region stays tracked
    return flat_out

  region = jax.checkpoint(region, prevent_cse=eqn.params["prevent_cse"],
                          policy=eqn.params["policy"])
  return unpack(out_specs, region(ctx.next_key(), *flat))


@infers(P.scan_p)
def _scan_infer(eqn, views, ctx: Infer):
  """A kernel scanned over (an `xs` input) has its leading axis as a stack axis."""
  n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
  inner = []
  for i, v in enumerate(views):
    if isinstance(v, View) and i >= n_consts + n_carry:
      roles = assign(v, {Role.STACK: [0]})
      v = None if roles is None else v.replace(axes=v.axes[1:], fixed=tuple(roles.items()))
    inner.append(v)
  body = eqn.params["jaxpr"]
  outs = eval_jaxpr(body.jaxpr, ctx.consts(body), inner, ctx)
  return [*outs[:n_carry], *([None] * (len(outs) - n_carry))]


@applies(P.scan_p)
@applies_to_parts(P.scan_p)
def _scan(eqn, invals, ctx: Apply):
  p = eqn.params
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts = invals[:n_consts]
  init = _concrete(invals[n_consts:n_consts + n_carry], ctx, "scan carry", "scan")
  xs = invals[n_consts + n_carry:]
  # A stacked kernel enters as a scanned input: scan its A and B along the same stack axis.
  outer, inner = [], []
  for x in xs:
    pieces = x.tracked() if isinstance(x, Parts) else [x] if isinstance(x, Tracked) else []
    if isinstance(x, Parts) and x.axis == 0:
      x = materialize(x, ctx, "scan over the concatenated axis", "scan")
    elif any(t.axes[0][0] is not Role.STACK for t in pieces):
      x = materialize(x, ctx, "scan over a non-stack axis", "scan")
    if isinstance(x, Parts):  # each piece scanned along its own stack axis
      scanned = [_scanned(t) if isinstance(t, Tracked) else (t, None) for t in x.pieces]
      outer.append(x.replace(pieces=tuple(o for o, _ in scanned)))
      inner.append(x.replace(pieces=tuple(i for _, i in scanned), axis=x.axis - 1))
    elif isinstance(x, Tracked):
      o, i = _scanned(x)
      outer.append(o)
      inner.append(i)
    else:
      outer.append(x)
      inner.append(None)
  xs_flat, _ = pack(outer)
  key = ctx.next_key()
  keys = None if key is None else jax.random.split(key, p["length"])
  body_jaxpr = p["jaxpr"]
  ys_specs: list = []

  def body(carry, step):
    step_key, xs_step = step
    vals = [*consts, *carry, *unpack(inner, xs_step)]
    outs = eval_jaxpr(body_jaxpr.jaxpr, body_jaxpr.consts, vals, ctx.child(step_key))
    # A kernel stacked as an output (nnx.scan hands the layers' state back) stays tracked.
    ys_flat, ys_specs[:] = pack([materialize(y, ctx, "scan output", "scan") if isinstance(y, Parts)
                                 else y for y in outs[n_carry:]])
    return _concrete(outs[:n_carry], ctx, "scan carry", "scan"), ys_flat

  carry, ys_flat = lax.scan(body, init, (keys, xs_flat), length=p["length"], reverse=p["reverse"],
                            unroll=p["unroll"])
  return [*carry, *unpack([_stacked(s) for s in ys_specs], ys_flat)]


def _scanned(x: Tracked) -> tuple[Tracked, Tracked]:
  """A kernel scanned along its first view axis (a stack axis): its value outside the scan, with
  that stack axis moved to the front of A and B, and its per-step spec inside."""
  k = x.axes[0][1]
  if isinstance(x.w, QuantizedBase) and (k or x.w.ops or x.w.source.layout.stack_axes[:1] != (0,)):
    x = x.replace(w=dense(x.w))  # its codes do not lead with the scanned axis: dequantize
  return (x.replace(a=jnp.moveaxis(x.a, k, 0), b=jnp.moveaxis(x.b, k, 0)),
          x.replace(axes=tuple((r, j - (r is Role.STACK and j > k)) for r, j in x.axes[1:])))


def _stacked(spec: Tracked | None) -> Tracked | None:
  """A tracked scan output: its per-step view gains the scanned axis in front, a stack axis
  (the factors were stacked along their axis 0 with it)."""
  if spec is None:
    return None
  rest = tuple((r, k + 1 if r is Role.STACK else k) for r, k in spec.axes)
  return spec.replace(axes=((Role.STACK, 0), *rest))


@infers(P.cond_p)
def _cond_infer(eqn, views, ctx: Infer):
  outs = [eval_jaxpr(b.jaxpr, ctx.consts(b), views[1:], ctx) for b in eqn.params["branches"]]
  return [next((o for o in per_out if o is not None), None) for per_out in zip(*outs)]


@applies(P.cond_p)
@applies_to_parts(P.cond_p)
def _cond(eqn, invals, ctx: Apply):
  index, *operands = invals
  flat, specs = pack(operands)

  def branch(closed):
    def run(key, *flat):
      outs = eval_jaxpr(closed.jaxpr, closed.consts, unpack(specs, flat), ctx.child(key))
      return _concrete(outs, ctx, "cond output", "cond")
    return run

  return list(lax.switch(index, [branch(b) for b in eqn.params["branches"]], ctx.next_key(), *flat))


def _while_parts(eqn, vals):
  cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
  return vals[:cn], vals[cn:cn + bn], vals[cn + bn:]


@infers(P.while_p)
def _while_infer(eqn, views, ctx: Infer):
  cond_consts, body_consts, carry = _while_parts(eqn, views)
  cj, bj = eqn.params["cond_jaxpr"], eqn.params["body_jaxpr"]
  eval_jaxpr(cj.jaxpr, ctx.consts(cj), [*cond_consts, *carry], ctx)
  return eval_jaxpr(bj.jaxpr, ctx.consts(bj), [*body_consts, *carry], ctx)


@applies(P.while_p)
@applies_to_parts(P.while_p)
def _while(eqn, invals, ctx: Apply):
  cond_consts, body_consts, carry = _while_parts(eqn, invals)
  carry = _concrete(carry, ctx, "while carry", "while")
  cj, bj = eqn.params["cond_jaxpr"], eqn.params["body_jaxpr"]

  def cond_fn(state):
    return eval_jaxpr(cj.jaxpr, cj.consts, [*cond_consts, *state[1]], ctx.child(None))[0]

  def body_fn(state):
    key, carry = state
    step_key = None
    if key is not None:  # a fresh dropout key per iteration
      key, step_key = jax.random.split(key)
    outs = eval_jaxpr(bj.jaxpr, bj.consts, [*body_consts, *carry], ctx.child(step_key))
    return key, _concrete(outs, ctx, "while carry", "while")

  return list(lax.while_loop(cond_fn, body_fn, (ctx.next_key(), list(carry)))[1])


def _shard_map_probe(x):
  mesh = jax.sharding.AbstractMesh((1,), ("i",))  # abstract: finding the primitive needs no devices
  return jax.shard_map(lambda y: y, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec())(x)


_shard_map_p = primitive_of(_shard_map_probe, jax.ShapeDtypeStruct((1,), jnp.float32))


@infers(_shard_map_p)
def _shard_map_infer(eqn, views, ctx: Infer):
  return eval_jaxpr(eqn.params["jaxpr"], (), views, ctx)


def _factor_specs(t: Tracked, spec: PartitionSpec) -> tuple[PartitionSpec, PartitionSpec]:
  """The in-specs of a kernel's `A` and `B` from the kernel's (view's) in-spec `spec`."""
  per_axis = (*spec, *(None,) * (t.w.ndim - len(spec)))
  layout = Layout(*(tuple(t.view_axes(role)) for role in (Role.STACK, Role.IN, Role.OUT)))
  a_spec, b_spec = layout.factor_axes(per_axis)
  return PartitionSpec(*a_spec), PartitionSpec(*b_spec)


@applies(_shard_map_p)
def _shard_map(eqn, invals, ctx: Apply):
  p = eqn.params
  flat, specs = pack(invals)
  in_specs: list = []
  for x, spec in zip(invals, p["in_specs"]):
    in_specs.extend([spec, *_factor_specs(x, spec)] if isinstance(x, Tracked) else [spec])
  # One dropout key for every shard: a replicated activation then gets the same mask on every
  # device, as it would unsharded.
  key = ctx.next_key()
  keys = [] if key is None else [key]

  def body(*args):
    outs = eval_jaxpr(p["jaxpr"], (), unpack(specs, args[len(keys):]),
                      ctx.child(args[0] if keys else None))
    return tuple(_concrete(outs, ctx, "shard_map output", "shard_map"))

  fn = jax.shard_map(body, mesh=p["mesh"], in_specs=(*[PartitionSpec()] * len(keys), *in_specs),
                     out_specs=p["out_specs"], axis_names=p.get("newly_manual_axes", frozenset()),
                     check_vma=p["check_vma"])
  return list(fn(*keys, *flat))
