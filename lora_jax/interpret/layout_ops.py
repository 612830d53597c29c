"""Rules for layout-only ops: the kernel stays factored, only its view changes."""

from __future__ import annotations

import math

from jax.extend.core import primitives as P

from .core import bind, materialize_all, rule
from .tracked import Tracked


@rule(P.convert_element_type_p, P.copy_p, P.sharding_constraint_p)
def _same_view(eqn, invals, ctx):
  (t,) = invals
  return [t.replace(w=bind(eqn, [t.w])[0])]


@rule(P.transpose_p)
def _transpose(eqn, invals, ctx):
  (t,) = invals
  perm = eqn.params["permutation"]
  return [t.replace(w=bind(eqn, [t.w])[0], axes=tuple(t.axes[p] for p in perm))]


@rule(P.reshape_p)
def _reshape(eqn, invals, ctx):
  """A reshape that only splits/merges axes within one group: reshape A and/or B likewise."""
  (t,) = invals
  new_shape = tuple(eqn.params["new_sizes"])
  runs = _runs(t)
  if eqn.params.get("dimensions") is not None or runs is None:
    return materialize_all(eqn, invals, ctx)
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
      return materialize_all(eqn, invals, ctx)
    pieces.append((role, new_shape[start:stop]))
    start = stop
  new = dict(pieces)
  n_s = t.count("s")
  s_shape = new.get("s", t.a.shape[:n_s])
  i_shape = new.get("i", t.a.shape[n_s:-1])
  o_shape = new.get("o", t.b.shape[n_s + 1:])
  a = t.a.reshape(*s_shape, *i_shape, t.a.shape[-1])
  b = t.b.reshape(*s_shape, t.b.shape[n_s], *o_shape)
  axes = tuple((role, k) for role, dims in pieces for k in range(len(dims)))
  return [Tracked(bind(eqn, [t.w])[0], a, b, axes, t.site, t.scale)]


def _runs(t: Tracked) -> list[tuple[str, list[int]]] | None:
  """The view as runs of one group each, in view order; None unless every group is one
  contiguous run in its canonical order (the only case a row-major reshape keeps factored)."""
  runs: list[tuple[str, list[int]]] = []
  for j, (role, k) in enumerate(t.axes):
    if runs and runs[-1][0] == role:
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
