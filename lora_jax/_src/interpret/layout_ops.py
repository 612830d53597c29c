"""Layout-only ops: the kernel stays factored, only its view changes (casts, copies, sharding
constraints, transposes, reshapes that split or merge axes within one role group)."""

from __future__ import annotations

import math

from jax.extend.core import primitives as P

from ..layout import Role
from .core import Apply, Infer, applies, bind, infers, materialize_all
from .values import Tracked

_SAME = (P.convert_element_type_p, P.copy_p, P.sharding_constraint_p)


@infers(*_SAME)
def _same_view_infer(eqn, views, ctx: Infer):
  return [views[0]]


@applies(*_SAME)
def _same_view(eqn, invals, ctx: Apply):
  (t,) = invals
  return [t.replace(w=bind(eqn, [t.w])[0])]


@infers(P.transpose_p)
def _transpose_infer(eqn, views, ctx: Infer):
  (v,) = views
  return [v.replace(axes=tuple(v.axes[p] for p in eqn.params["permutation"]))]


@applies(P.transpose_p)
def _transpose(eqn, invals, ctx: Apply):
  (t,) = invals
  perm = eqn.params["permutation"]
  return [t.replace(w=bind(eqn, [t.w])[0], axes=tuple(t.axes[p] for p in perm))]


@infers(P.reshape_p)
def _reshape_infer(eqn, views, ctx: Infer):
  """Row-major reshape: a new axis covers each old axis whose stride range overlaps its own."""
  (v,) = views
  if eqn.params.get("dimensions") is not None:
    return [None]

  def spans(shape):
    return [(math.prod(shape[i + 1:]), math.prod(shape[i:])) for i in range(len(shape))]

  old = spans(eqn.invars[0].aval.shape)
  axes = tuple(frozenset().union(*(v.axes[i] for i, (lo, hi) in enumerate(old)
                                   if max(lo, nlo) < min(hi, nhi)))
               for nlo, nhi in spans(eqn.params["new_sizes"]))
  return [v.replace(axes=axes)]


@applies(P.reshape_p)
def _reshape(eqn, invals, ctx: Apply):
  """A reshape that only splits/merges axes within one group: reshape A and/or B likewise."""
  (t,) = invals
  new_shape = tuple(eqn.params["new_sizes"])
  runs = _runs(t)
  if eqn.params.get("dimensions") is not None or runs is None:
    return materialize_all(eqn, invals, ctx, "reshape across role groups")
  # Cut the new shape into consecutive pieces whose sizes match each run of the view.
  pieces, start = [], 0
  for n, (role, axes) in enumerate(runs):
    target = math.prod(t.w.shape[j] for j in axes)
    stop, size = start, 1
    if n == len(runs) - 1:
      stop = len(new_shape)
      size = math.prod(new_shape[start:])
    else:
      while size < target and stop < len(new_shape):
        size *= new_shape[stop]
        stop += 1
    if size != target:
      return materialize_all(eqn, invals, ctx, "reshape across role groups")
    pieces.append((role, new_shape[start:stop]))
    start = stop
  new = dict(pieces)
  n_s = t.count(Role.STACK)
  s_shape = new.get(Role.STACK, t.a.shape[:n_s])
  i_shape = new.get(Role.IN, t.a.shape[n_s:-1])
  o_shape = new.get(Role.OUT, t.b.shape[n_s + 1:])
  a = t.a.reshape(*s_shape, *i_shape, t.a.shape[-1])
  b = t.b.reshape(*s_shape, t.b.shape[n_s], *o_shape)
  axes = tuple((role, k) for role, dims in pieces for k in range(len(dims)))
  return [t.replace(w=bind(eqn, [t.w])[0], a=a, b=b, axes=axes)]


def _runs(t: Tracked) -> list[tuple[Role, list[int]]] | None:
  """The view as runs of one group each, in view order; None unless every group is one
  contiguous run in its canonical order (the only case a row-major reshape keeps factored)."""
  runs: list[tuple[Role, list[int]]] = []
  for j, (role, _k) in enumerate(t.axes):
    if runs and runs[-1][0] is role:
      runs[-1][1].append(j)
    else:
      runs.append((role, [j]))
  roles = [r for r, _ in runs]
  if len(set(roles)) != len(roles):
    return None
  for _, axes in runs:
    if [t.axes[j][1] for j in axes] != list(range(len(axes))):
      return None
  return runs


