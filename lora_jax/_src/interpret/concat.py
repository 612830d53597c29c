"""Concatenated kernels: `jnp.concatenate([wq, wk, wv], axis=1)` (a fused qkv built from separately
stored projections, some of them maybe not adapted) and `jnp.stack`.

Along a **stack** axis of every adapted piece (layer stacks joined, `jnp.stack` of layers) the
factors concatenate along it too: the result is one tracked value with `A = concat(A_i)`,
`B = concat(B_i)` along that axis (plain pieces get zero factors, ranks are zero-padded to the
largest, and differing scales are folded into `A_i`), so every rule for a stacked kernel (scan,
per-layer indexing, batched dots) applies unchanged and each use is recorded for every piece.

Along an **in** or **out** axis the pieces keep their own factors (a `Parts` value) and the base
is the concatenation of the base pieces. A `dot_general` then computes the base product once on
the concatenated `W` and adds the pieces' low-rank terms: for the concatenated axis free (an out
axis), the concatenation along the matching output axis of each piece's `s_i·(x·A_i)·B_i` (zeros
for plain pieces); for it contracted (an in axis), `Σ_i s_i·(x_i·A_i)·B_i` with `x` split along
its contracted axis like the pieces; for it batched (a stack axis of pieces whose layouts differ),
the same split of `x`, concatenated along the batch axis. `transpose`, casts, `copy`, `squeeze`,
`reshape` (leaving the concatenated axis whole), `slice` / `dynamic_slice` / `split` (cutting
pieces back out along that axis, or slicing every piece along another) keep the pieces; `jit`,
remat, `cond`, `while` and `scan` (as a constant or carry) pass them through. Any other use
(e.g. a reshape that splits the concatenated axis) materialises the concatenation for that use,
recording why for each adapted piece.

Layout inference needs nothing here: each piece's view goes through the uses after the
concatenation on its own (`core.Infer.on_parts`), so each gets its layout from how the
concatenation is used.
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from ..layout import Role
from .contract import dot_axes, dot_first, dot_low_rank
from .core import (
  Apply,
  Infer,
  applies,
  applies_to_parts,
  bind,
  dense,
  dispatch,
  infers,
  materialize,
  materialize_parts,
  primitive_of,
)
from .indexing import _split_p, joint_factors, on_factors
from .values import Parts, Tracked, View

STACK = Role.STACK

_stack_p = primitive_of(lambda a, b: jnp.stack([a, b]), jnp.zeros(1), jnp.zeros(1))


@infers(P.concatenate_p)
def _concatenate_infer(eqn, views, ctx: Infer):
  return [Parts.of_views(views)]


@applies(P.concatenate_p)
@applies_to_parts(P.concatenate_p)
def _concatenate(eqn, invals, ctx: Apply):
  return [_join(_dense(invals), eqn.params["dimension"], ctx)]


@infers(_stack_p)
def _stack_infer(eqn, views, ctx: Infer):
  axis = eqn.params["axis"]
  return [Parts.of_views([v.replace(axes=(*v.axes[:axis], frozenset(), *v.axes[axis:]))
                          if isinstance(v, View) else v for v in views])]


@applies(_stack_p)
@applies_to_parts(_stack_p)
def _stack(eqn, invals, ctx: Apply):
  """`jnp.stack`: each piece gains a size-1 stack axis at `axis` (a new stack axis, last in its
  stack group, as `W[None]` does), then they are concatenated along it."""
  axis = eqn.params["axis"]
  pieces = []
  for x in _dense(materialize_parts(invals, ctx, "stack of concatenated kernels", "stack")):
    if isinstance(x, Tracked):
      n_s = x.count(STACK)
      x = x.replace(w=jnp.expand_dims(x.w, axis), a=jnp.expand_dims(x.a, n_s),
                    b=jnp.expand_dims(x.b, n_s), axes=(*x.axes[:axis], (STACK, n_s), *x.axes[axis:]))
    else:
      x = jnp.expand_dims(x, axis)
    pieces.append(x)
  return [_join(pieces, axis, ctx)]


def _dense(invals: list) -> list:
  """Quantized bases dequantized: a concatenation holds its pieces' base values."""
  return [x.replace(w=dense(x.w)) if isinstance(x, Tracked) else x for x in invals]


def _base(x):
  return x.w if isinstance(x, (Tracked, Parts)) else x


def _join(invals: list, axis: int, ctx: Apply):
  """The concatenation of `invals` along `axis`: one stacked tracked value, or `Parts`."""
  pieces: list = []
  for x in invals:
    if isinstance(x, Parts) and x.axis == axis:
      pieces.extend(x.pieces)
    else:
      pieces.append(materialize(x, ctx, "concatenate of concatenations along different axes",
                                "concatenate") if isinstance(x, Parts) else x)
  w = lax.concatenate([_base(p) for p in pieces], axis)
  tracked = [p for p in pieces if isinstance(p, Tracked)]
  if not tracked:
    return w
  if all(t.axes[axis][0] is STACK and t.axes == tracked[0].axes for t in tracked):
    return _stacked(pieces, tracked, axis, w)
  return Parts(tuple(pieces), axis, w)


def _stacked(pieces: list, tracked: list[Tracked], axis: int, w) -> Tracked:
  """Pieces joined along a stack axis (every adapted piece has the same view layout): one
  tracked value whose factors are the pieces' joined along that stack axis."""
  first = tracked[0]
  k = first.axes[axis][1]  # the stack axis is axis k of both A and B
  factors, scale, site = joint_factors(pieces, first.axes)
  return first.replace(w=w, a=jnp.concatenate([a for a, _ in factors], k),
                       b=jnp.concatenate([b for _, b in factors], k), scale=scale, site=site)


# --- uses of a concatenation -------------------------------------------------------------------

def _offsets(parts: Parts) -> list[tuple[int, int]]:
  bounds = list(itertools.accumulate(parts.sizes(), initial=0))
  return list(zip(bounds[:-1], bounds[1:]))


def _cut(piece, lo: int, hi: int, axis: int):
  """`piece[lo:hi]` along `axis` (a tracked piece slices the factor carrying that axis)."""
  if not isinstance(piece, Tracked):
    return lax.slice_in_dim(piece, lo, hi, axis=axis)
  t = on_factors(piece, axis, lambda x, ax: lax.slice_in_dim(x, lo, hi, axis=ax))
  return t.replace(w=lax.slice_in_dim(piece.w, lo, hi, axis=axis))


def _take(parts: Parts, start: int, stop: int):
  """The concatenation's `[start:stop]` along its axis: a piece (cut back out), `Parts`, or the
  base array where no adapted piece is left."""
  pieces = [_cut(p, max(start, lo) - lo, min(stop, hi) - lo, parts.axis) if (lo, hi) != (
      max(start, lo), min(stop, hi)) else p
            for p, (lo, hi) in zip(parts.pieces, _offsets(parts)) if lo < stop and hi > start]
  w = lax.slice_in_dim(parts.w, start, stop, axis=parts.axis)
  if len(pieces) == 1:
    return pieces[0]
  return Parts(tuple(pieces), parts.axis, w) if any(isinstance(p, Tracked) for p in pieces) else w


def _each(eqn, parts: Parts, ctx: Apply, axis: int, params=None) -> Parts:
  """A unary equation applied to each piece (with `params(piece)` if given) and to the base."""
  pieces = tuple(dispatch(eqn if params is None else eqn.replace(params=params(p)), [p], ctx)[0]
                 for p in parts.pieces)
  return Parts(pieces, axis, bind(eqn, [parts.w])[0])


def _whole(eqn, invals, ctx: Apply, why: str) -> list:
  name = eqn.primitive.name
  return dispatch(eqn, materialize_parts(invals, ctx, why, name), ctx)


@applies_to_parts(P.convert_element_type_p, P.copy_p)
def _cast(eqn, invals, ctx: Apply):
  (parts,) = invals
  return [_each(eqn, parts, ctx, parts.axis)]


@applies_to_parts(P.sharding_constraint_p)
def _constrain(eqn, invals, ctx: Apply):
  # The constraint places the base; the pieces' factors stay where they are.
  (parts,) = invals
  return [parts.replace(w=bind(eqn, [parts.w])[0])]


@applies_to_parts(P.transpose_p)
def _transpose(eqn, invals, ctx: Apply):
  (parts,) = invals
  return [_each(eqn, parts, ctx, list(eqn.params["permutation"]).index(parts.axis))]


@applies_to_parts(P.squeeze_p)
def _squeeze(eqn, invals, ctx: Apply):
  (parts,) = invals
  dims = eqn.params["dimensions"]
  if parts.axis in dims:
    return _whole(eqn, invals, ctx, "squeeze of the concatenated axis")
  return [_each(eqn, parts, ctx, parts.axis - sum(d < parts.axis for d in dims))]


@applies_to_parts(P.reshape_p)
def _reshape(eqn, invals, ctx: Apply):
  """A reshape that keeps the concatenated axis whole (its size and the product of the sizes
  before it unchanged) reshapes each piece likewise."""
  (parts,) = invals
  old, new = parts.w.shape, tuple(eqn.params["new_sizes"])
  before = math.prod(old[:parts.axis])
  j = next((j for j in range(len(new)) if new[j] == old[parts.axis] and math.prod(new[:j]) == before),
           None)
  if j is None or eqn.params.get("dimensions") is not None:
    return _whole(eqn, invals, ctx, "reshape across the concatenated axis")
  def params(p):
    sizes = list(new)
    sizes[j] = _base(p).shape[parts.axis]
    return {**eqn.params, "new_sizes": tuple(sizes)}
  return [_each(eqn, parts, ctx, j, params)]


@applies_to_parts(P.slice_p)
def _slice(eqn, invals, ctx: Apply):
  (parts,) = invals
  c, p = parts.axis, eqn.params
  strides = p["strides"] or (1,) * parts.w.ndim
  if strides[c] != 1:
    return _whole(eqn, invals, ctx, "strided slice along the concatenated axis")
  taken = _take(parts, p["start_indices"][c], p["limit_indices"][c])
  rest = lambda size: {**p, "start_indices": _at(p["start_indices"], c, 0),
                       "limit_indices": _at(p["limit_indices"], c, size)}
  size = lambda piece: _base(piece).shape[c]
  if not isinstance(taken, Parts):
    return dispatch(eqn.replace(params=rest(size(taken))), [taken], ctx)
  return [_each(eqn.replace(params=rest(taken.w.shape[c])), taken, ctx, c,
                lambda piece: rest(size(piece)))]


def _at(values, j: int, value) -> tuple:
  return tuple(value if i == j else v for i, v in enumerate(values))


@applies_to_parts(P.dynamic_slice_p)
def _dynamic_slice(eqn, invals, ctx: Apply):
  parts, *starts = invals
  c, sizes = parts.axis, eqn.params["slice_sizes"]
  if sizes[c] != parts.w.shape[c] or any(isinstance(s, (Tracked, Parts)) for s in starts):
    return _whole(eqn, invals, ctx, "dynamic_slice along the concatenated axis")
  pieces = tuple(dispatch(eqn.replace(params={**eqn.params, "slice_sizes": _at(
      sizes, c, _base(p).shape[c])}), [p, *starts], ctx)[0] for p in parts.pieces)
  return [Parts(pieces, c, bind(eqn, [parts.w, *starts])[0])]


@applies_to_parts(_split_p)
def _split(eqn, invals, ctx: Apply):
  (parts,) = invals
  axis, sizes = eqn.params["axis"], eqn.params["sizes"]
  bounds = list(itertools.accumulate(sizes, initial=0))
  if axis == parts.axis:  # cut the pieces back out
    return [_take(parts, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
  per_piece = [dispatch(eqn, [p], ctx) for p in parts.pieces]
  ws = bind(eqn, [parts.w])
  return [Parts(tuple(outs), parts.axis, w) for outs, w in zip(zip(*per_piece), ws)]


@applies_to_parts(P.dot_general_p)
def _dot_general(eqn, invals, ctx: Apply):
  """The base product on the concatenated `W` plus each piece's low-rank term (see the module
  docstring for how the terms combine)."""
  lhs, rhs = invals
  kernel_is_rhs = isinstance(rhs, Parts)
  x, parts = (lhs, rhs) if kernel_is_rhs else (rhs, lhs)
  if isinstance(x, (Tracked, Parts)):
    return _whole(eqn, invals, ctx, "dot_general of two kernels")
  xc, kc, xb, kb = dot_axes(eqn, kernel_is_rhs)
  firsts = [dot_first(t, kc, kb) for t in parts.tracked()]
  why = next((f for f in firsts if isinstance(f, str)), None)
  if why is not None:
    return _whole(eqn, invals, ctx, why)
  c = parts.axis
  base = bind(eqn, [x, parts.w] if kernel_is_rhs else [parts.w, x])[0]
  x_axis = xc[kc.index(c)] if c in kc else xb[kb.index(c)] if c in kb else None
  terms, it = [], iter([f for f in firsts if isinstance(f, Role)])
  for piece, (lo, hi) in zip(parts.pieces, _offsets(parts)):
    xi = x if x_axis is None else lax.slice_in_dim(x, lo, hi, axis=x_axis)
    terms.append(dot_low_rank(eqn, xi, piece, kernel_is_rhs, next(it), ctx).astype(base.dtype)
                 if isinstance(piece, Tracked) else hi - lo)
  if c in kc:  # contracted: each piece meets its own slice of x; the terms add up
    return [base + sum(t for t in terms if not isinstance(t, int))]
  if c in kb:
    out = list(kb).index(c)
  else:  # free: after the batch axes and, for a kernel on the right, x's free axes
    free = [j for j in range(parts.w.ndim) if j not in kc and j not in kb]
    x_free = x.ndim - len(xc) - len(xb)
    out = len(kb) + (x_free if kernel_is_rhs else 0) + free.index(c)
  zeros = lambda n: jnp.zeros(_at(base.shape, out, n), base.dtype)
  return [base + jnp.concatenate([zeros(t) if isinstance(t, int) else t for t in terms], out)]
