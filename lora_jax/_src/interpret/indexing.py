"""Indexing and size-1 axes: slices of a kernel keep their own slices of the factors.

Slicing a view axis slices the factor that carries it: a stack axis slices `A` and `B` alike (so
`W[l]` of a layer stack, or expert `e` of an MoE stack, keeps its own factors), an in axis slices
`A` (an in-side split of a fused kernel), an out axis slices `B` (`jnp.split` of a fused qkv
kernel). `slice`, `dynamic_slice` (traced indices inside `fori_loop`/`while_loop`) and `split` are
covered; `squeeze` drops a size-1 axis from its factor, and `broadcast_in_dim` that only adds
size-1 axes (`W[None]`, `expand_dims`) adds them as size-1 stack axes.

For layout inference, an axis indexed away (`squeeze` after a slice of size 1) is a stack axis:
one layer or expert is picked out of it.

`dynamic_update_slice` (`lax.dynamic_update_index_in_dim`: a layer written into a stack) keeps
the factors when the update replaces whole layers: it spans every in and out axis, and the
operand and update (adapted or not) have the same layout. Then `W' = W` with `U` written at
`starts`, and `ΔW'` is `ΔW` with `ΔU` written there, so the same update on `A` and on `B`
(along their stack axes; ranks zero-padded to the larger, differing scales folded into `A`, a
plain operand or update contributing zero factors) gives exactly `ΔW'`. Writing into part of a
layer's in/out block does not make sense to keep: `ΔW'` mixes two low-rank matrices inside one
layer, which is not `A'·B'` for any rank-r factors of that layer, so that use is materialised,
as is an update whose layout differs from the operand's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from ..layout import Role
from .core import Apply, Infer, applies, bind, infers, materialize_all, primitive_of
from .values import Parts, Tracked

_SAME_VIEW = (P.slice_p, P.dynamic_slice_p)


_split_p = primitive_of(lambda x: jnp.split(x, 2), jnp.zeros(2))


def _factor_position(t: Tracked, j: int) -> tuple[bool, bool, int]:
  """For view axis `j`: `(in A?, in B?, position)` of the factor axis that carries it."""
  role, k = t.axes[j]
  n_s = t.count(Role.STACK)
  if role is Role.STACK:
    return True, True, k
  if role is Role.IN:
    return True, False, n_s + k
  return False, True, n_s + 1 + k


def on_factors(t: Tracked, j: int, fn: Callable[[jax.Array, int], jax.Array]) -> Tracked:
  """`t` with `fn(factor, axis)` applied to the factor axis carrying view axis `j`."""
  in_a, in_b, pos = _factor_position(t, j)
  return t.replace(a=fn(t.a, pos) if in_a else t.a, b=fn(t.b, pos) if in_b else t.b)


@infers(*_SAME_VIEW)
def _slice_infer(eqn, views, ctx: Infer):
  return [views[0]]


@applies(P.slice_p)
def _slice(eqn, invals, ctx: Apply):
  (t,) = invals
  p = eqn.params
  strides = p["strides"] or (1,) * len(t.axes)
  for j, (start, limit, stride) in enumerate(zip(p["start_indices"], p["limit_indices"], strides)):
    if (start, limit, stride) != (0, t.w.shape[j], 1):
      t = on_factors(t, j, lambda x, ax, s=start, e=limit, st=stride:
                      lax.slice_in_dim(x, s, e, st, axis=ax))
  return [t.replace(w=bind(eqn, [t.w])[0])]


@applies(P.dynamic_slice_p)
def _dynamic_slice(eqn, invals, ctx: Apply):
  t, *starts = invals
  if any(isinstance(s, Tracked) for s in starts):
    return materialize_all(eqn, invals, ctx, "dynamic_slice indexed by a kernel")
  sizes = eqn.params["slice_sizes"]
  w = bind(eqn, [t.w, *starts])[0]
  for j, (start, size) in enumerate(zip(starts, sizes)):
    if size != t.w.shape[j]:  # same clamping as W's: the factor axis has W's size
      t = on_factors(t, j, lambda x, ax, s=start, n=size: lax.dynamic_slice_in_dim(x, s, n, axis=ax))
  return [t.replace(w=w)]


@infers(_split_p)
def _split_infer(eqn, views, ctx: Infer):
  return [views[0]] * len(eqn.outvars)


@applies(_split_p)
def _split(eqn, invals, ctx: Apply):
  (t,) = invals
  axis, sizes = eqn.params["axis"], eqn.params["sizes"]
  ws = bind(eqn, [t.w])
  outs, start = [], 0
  for w, size in zip(ws, sizes):
    piece = on_factors(t, axis, lambda x, ax, s=start, n=size: lax.slice_in_dim(x, s, s + n, axis=ax))
    outs.append(piece.replace(w=w))
    start += size
  return outs


@infers(P.squeeze_p)
def _squeeze_infer(eqn, views, ctx: Infer):
  """The kernel axes under a squeezed axis were indexed down to one entry: stack axes."""
  (v,) = views
  dims = set(eqn.params["dimensions"])
  fixed = dict(v.fixed)
  for j in dims:
    for k in v.axes[j]:
      fixed.setdefault(k, Role.STACK)
  return [v.replace(axes=tuple(a for j, a in enumerate(v.axes) if j not in dims),
                    fixed=tuple(fixed.items()))]


@applies(P.squeeze_p)
def _squeeze(eqn, invals, ctx: Apply):
  (t,) = invals
  dims = sorted(eqn.params["dimensions"], reverse=True)
  for j in dims:
    role, k = t.axes[j]
    if role is not Role.STACK and t.count(role) == 1:
      return materialize_all(eqn, invals, ctx, f"squeeze of the kernel's only {role.value} axis")
    t = on_factors(t, j, lambda x, ax: x.squeeze(ax))
    axes = [(r, kk - (r is role and kk > k)) for r, kk in t.axes]
    del axes[j]
    t = t.replace(axes=tuple(axes))
  return [t.replace(w=bind(eqn, [invals[0].w])[0])]


def _added_axes(eqn) -> list[int] | None:
  """The new axes of a `broadcast_in_dim` that only inserts size-1 axes, else None."""
  shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
  in_shape = eqn.invars[0].aval.shape
  if any(shape[d] != n for d, n in zip(dims, in_shape)):
    return None
  added = [j for j in range(len(shape)) if j not in dims]
  return added if all(shape[j] == 1 for j in added) else None


@infers(P.broadcast_in_dim_p)
def _broadcast_infer(eqn, views, ctx: Infer):
  v = views[0]
  if _added_axes(eqn) is None:
    return [None]
  axes = [frozenset()] * len(eqn.params["shape"])
  for src, dst in enumerate(eqn.params["broadcast_dimensions"]):
    axes[dst] = v.axes[src]
  return [v.replace(axes=tuple(axes))]


@applies(P.broadcast_in_dim_p)
def _broadcast(eqn, invals, ctx: Apply):
  t = invals[0]
  added = _added_axes(eqn)
  if added is None or any(isinstance(x, Tracked) for x in invals[1:]):
    return materialize_all(eqn, invals, ctx, "broadcast_in_dim that copies the kernel")
  n_s = t.count(Role.STACK)
  axes: list = [None] * len(eqn.params["shape"])
  for src, dst in enumerate(eqn.params["broadcast_dimensions"]):
    axes[dst] = t.axes[src]
  a, b = t.a, t.b
  for m, j in enumerate(added):  # a new size-1 stack axis, last in the stack group
    axes[j] = (Role.STACK, n_s + m)
    a, b = jnp.expand_dims(a, n_s + m), jnp.expand_dims(b, n_s + m)
  return [t.replace(w=bind(eqn, [t.w, *invals[1:]])[0], a=a, b=b, axes=tuple(axes))]


def joint_factors(values: list, axes: tuple) -> tuple[list[tuple[jax.Array, jax.Array]], Any, Any]:
  """Factors of `values` (tracked values with view layout `axes`, or plain arrays of a shape that
  layout fits) made joinable along a stack axis: ranks zero-padded to the largest (zero columns
  add nothing to ΔW), scales folded into `A` where they differ (`s_i·A_i·B_i` stays each piece's
  ΔW), zero factors for a plain array.

  Returns:
    `([(A_i, B_i)], scale, site)`: `A_i: (*S_i, *I, r)`, `B_i: (*S_i, r, *O)`, the scale to use
    with them, and the site (a tuple of sites when several kernels are joined).
  """
  tracked = [t for t in values if isinstance(t, Tracked)]
  first = tracked[0]
  rank = max(t.a.shape[-1] for t in tracked)
  same_scale = all(t.scale is first.scale or (isinstance(t.scale, float) and t.scale == first.scale)
                   for t in tracked)
  dtype = jnp.result_type(*(t.a for t in tracked))
  n_s = first.count(Role.STACK)
  out = []
  for v in values:
    if isinstance(v, Tracked):
      a = v.a.astype(dtype) if same_scale else v.a.astype(dtype) * jnp.asarray(v.scale, dtype)
      pad = rank - v.a.shape[-1]
      a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
      b = jnp.pad(v.b.astype(dtype), [(0, pad) if j == n_s else (0, 0) for j in range(v.b.ndim)])
    else:
      sizes = {role: [v.shape[j] for _, j in sorted((k, j) for j, (r, k) in enumerate(axes) if r is role)]
               for role in Role}
      a = jnp.zeros((*sizes[Role.STACK], *sizes[Role.IN], rank), dtype)
      b = jnp.zeros((*sizes[Role.STACK], rank, *sizes[Role.OUT]), dtype)
    out.append((a, b))
  sites: list[int] = []
  for t in tracked:
    sites.extend(t.site if isinstance(t.site, tuple) else (t.site,))
  return out, first.scale if same_scale else 1.0, tuple(sites) if len(sites) > 1 else sites[0]


@infers(P.dynamic_update_slice_p)
def _dynamic_update_slice_infer(eqn, views, ctx: Infer):
  return [Parts.of_views(views[:2])]


@applies(P.dynamic_update_slice_p)
def _dynamic_update_slice(eqn, invals, ctx: Apply):
  op, up, *starts = invals
  if any(isinstance(s, Tracked) for s in starts):
    return materialize_all(eqn, invals, ctx, "dynamic_update_slice indexed by a kernel")
  first = op if isinstance(op, Tracked) else up
  if any(isinstance(t, Tracked) and t.axes != first.axes for t in (op, up)):
    return materialize_all(eqn, invals, ctx, "dynamic_update_slice of kernels with different layouts")
  base = lambda x: x.w if isinstance(x, Tracked) else x
  if any(base(up).shape[j] != base(op).shape[j] for j, (r, _) in enumerate(first.axes)
         if r is not Role.STACK):
    return materialize_all(eqn, invals, ctx, "dynamic_update_slice of part of a layer's in/out axes")
  factors, scale, site = joint_factors([op, up], first.axes)
  (a_op, b_op), (a_up, b_up) = factors
  n_s = first.count(Role.STACK)
  zero = jnp.zeros((), jnp.result_type(starts[0]))  # in/out starts: the update spans those axes
  s_starts = [starts[j] for j in first.view_axes(Role.STACK)]
  a = lax.dynamic_update_slice(a_op, a_up, [*s_starts] + [zero] * (a_op.ndim - n_s))
  b = lax.dynamic_update_slice(b_op, b_up, [*s_starts] + [zero] * (b_op.ndim - n_s))
  w = bind(eqn, [base(op), base(up), *starts])[0]
  return [first.replace(w=w, a=a, b=b, scale=scale, site=site)]
