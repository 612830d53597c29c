"""Layout inference: which axes of each kernel are stack / input / output axes, read off how the
traced function uses it (no FLOPs: this walks the jaxpr symbolically).

Each kernel is followed through transposes, reshapes and casts as a *view*: for every current
axis, the set of the kernel's own axes it covers. A use then assigns roles: `dot_general`
contracting axes are inputs, batch axes stack, free axes outputs; `conv_general_dilated` input
feature and spatial axes are inputs; an embedding `gather`'s indexed axis is the input; a `scan`
over a kernel makes the scanned axis a stack axis.
"""

from __future__ import annotations

import dataclasses
import math

from jax.extend import core as jex
from jax.extend.core import primitives as P

Roles = dict[int, str]  # kernel axis -> "stack" | "in" | "out"


@dataclasses.dataclass(frozen=True)
class _View:
  kernel: int
  axes: tuple[frozenset, ...]  # per current axis: the kernel axes it covers
  roles: tuple[tuple[int, str], ...] = ()  # roles fixed on the way (scan's stack axis)


def _reshape_view(old_shape, view, new_shape):
  """Row-major reshape: a new axis covers each old axis whose stride range overlaps its own."""
  def spans(shape):
    return [(math.prod(shape[i + 1:]), math.prod(shape[i:])) for i in range(len(shape))]
  old = spans(old_shape)
  return tuple(frozenset().union(*(view[i] for i, (lo, hi) in enumerate(old)
                                   if max(lo, nlo) < min(hi, nhi)))
               for nlo, nhi in spans(new_shape))


def _assign(view: _View, groups: dict[str, list[int]]) -> Roles | None:
  """Roles of the kernel's axes when the view's axes play `groups`; None if inconsistent."""
  roles: Roles = dict(view.roles)
  for role, axes in groups.items():
    for j in axes:
      for k in view.axes[j]:
        if roles.setdefault(k, role) != role:
          return None
  return roles


def infer(jaxpr, kernels: dict[int, int], ndims: dict[int, int]) -> dict[int, list[tuple[str, Roles]]]:
  """For each kernel (invar position -> kernel id), the `(primitive, roles)` of every use that
  gives it a complete, consistent layout, in program order."""
  found: dict[int, list[tuple[str, Roles]]] = {k: [] for k in kernels.values()}
  env = {jaxpr.invars[pos]: _View(kid, tuple(frozenset([j]) for j in range(ndims[kid])))
         for pos, kid in kernels.items()}
  _walk(jaxpr, env, found, ndims)
  return found


def _walk(jaxpr, env, found, ndims):
  def get(v):
    return None if isinstance(v, jex.Literal) else env.get(v)

  def note(prim, view, groups):
    roles = _assign(view, groups)
    if roles is not None and len(roles) == ndims[view.kernel] and "in" in roles.values() \
        and "out" in roles.values():
      found[view.kernel].append((prim, roles))

  for eqn in jaxpr.eqns:
    views = [get(v) for v in eqn.invars]
    if not any(views):
      continue
    prim, out = eqn.primitive, eqn.outvars
    v0 = views[0]
    if prim in (P.convert_element_type_p, P.copy_p, P.sharding_constraint_p) and v0:
      env[out[0]] = v0
    elif prim is P.transpose_p and v0:
      env[out[0]] = dataclasses.replace(v0, axes=tuple(v0.axes[p] for p in eqn.params["permutation"]))
    elif prim is P.reshape_p and v0 and eqn.params.get("dimensions") is None:
      axes = _reshape_view(eqn.invars[0].aval.shape, v0.axes, eqn.params["new_sizes"])
      env[out[0]] = dataclasses.replace(v0, axes=axes)
    elif prim is P.dot_general_p:
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      for view, c, b in ((views[0], lc, lb), (views[1], rc, rb)):
        if view:
          free = [j for j in range(len(view.axes)) if j not in c and j not in b]
          note("dot_general", view, {"in": list(c), "stack": list(b), "out": free})
    elif prim is P.conv_general_dilated_p and views[1]:
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec
      note("conv_general_dilated", views[1], {"out": [rhs_spec[0]], "in": list(rhs_spec[1:])})
    elif prim is P.gather_p and v0:
      collapsed = eqn.params["dimension_numbers"].collapsed_slice_dims
      note("gather", v0, {"in": list(collapsed),
                          "out": [j for j in range(len(v0.axes)) if j not in collapsed]})
    elif prim is P.jit_p:
      inner = eqn.params["jaxpr"].jaxpr
      _walk(inner, {iv: v for iv, v in zip(inner.invars, views) if v}, found, ndims)
    elif prim is P.remat_p:
      inner = eqn.params["jaxpr"]
      _walk(inner, {iv: v for iv, v in zip(inner.invars, views) if v}, found, ndims)
    elif prim is P.scan_p:
      inner = eqn.params["jaxpr"].jaxpr
      n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
      sub = {}
      for i, (iv, v) in enumerate(zip(inner.invars, views)):
        if not v or n_consts <= i < n_consts + n_carry:
          continue
        if i >= n_consts + n_carry:  # scanned input: its leading axis is a stack axis
          roles = _assign(v, {"stack": [0]})
          if roles is None:
            continue
          v = dataclasses.replace(v, axes=v.axes[1:], roles=tuple(roles.items()))
        sub[iv] = v
      _walk(inner, sub, found, ndims)
