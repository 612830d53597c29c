"""Rules for the ops LoRA exists for: the base op on W plus a low-rank term that never forms ΔW.

- `dot_general`: `x·W + scale·(drop(x)·A)·B` when the kernel's contracted axes are exactly its
  in-axes, or `(drop(x)·Bᵀ)·Aᵀ` when they are exactly its out-axes (a tied embedding's `attend`).
- `conv_general_dilated`: the base conv, plus a conv with A (r output channels) then a 1×1 with B.
- `gather` (embedding lookup): the base lookup, plus the same lookup of A's rows, then `·B`.
"""

from __future__ import annotations

import string

import jax.numpy as jnp
from jax.extend.core import primitives as P

from ..layout import Role
from . import ragged
from .core import Apply, Infer, applies, bind, infers, materialize, materialize_all
from .values import Tracked, View

IN, OUT, STACK = Role.IN, Role.OUT, Role.STACK


def _with_b(t: Tracked, h, axis: int):
  """Contract axis `axis` (size r) of `h` with `B: (r, O)` and put O back at that position."""
  y = jnp.tensordot(h * t.scale, t.b.astype(h.dtype), axes=[[axis], [0]])
  return jnp.moveaxis(y, -1, axis)


def _a_in_view(t: Tracked):
  """A arranged like the kernel's view, with the single out-axis replaced by the rank axis."""
  n_i = t.count(IN)
  return jnp.transpose(t.a, [k if role is IN else n_i for role, k in t.axes])


@infers(P.dot_general_p)
def _dot_general_infer(eqn, views, ctx: Infer):
  """Contracting axes are in-axes, batch axes stack axes, the rest out-axes."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  for view, c, b in ((views[0], lc, lb), (views[1], rc, rb)):
    if isinstance(view, View):
      free = [j for j in range(len(view.axes)) if j not in c and j not in b]
      ctx.note("dot_general", view, {IN: list(c), STACK: list(b), OUT: free})
  return [None]


@applies(P.dot_general_p)
def _dot_general(eqn, invals, ctx: Apply):
  lhs, rhs = invals
  if isinstance(lhs, Tracked) and isinstance(rhs, Tracked):  # W1·W2: keep one factored
    lhs = materialize(lhs, ctx, "dot_general of two kernels", "dot_general")
  kernel_is_rhs = isinstance(rhs, Tracked)
  x, t = (lhs, rhs) if kernel_is_rhs else (rhs, lhs)
  xc, kc, xb, kb = dot_axes(eqn, kernel_is_rhs)
  first = dot_first(t, kc, kb)
  if isinstance(first, str):
    return materialize_all(eqn, [lhs, rhs], ctx, first)
  base = bind(eqn, [x, t.w] if kernel_is_rhs else [t.w, x])[0]
  return [base + dot_low_rank(eqn, x, t, kernel_is_rhs, first, ctx).astype(base.dtype)]


def dot_axes(eqn, kernel_is_rhs: bool) -> tuple:
  """`(x's contracted, kernel's contracted, x's batch, kernel's batch)` axes of a dot_general."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  return (lc, rc, lb, rb) if kernel_is_rhs else (rc, lc, rb, lb)


def dot_first(t: Tracked, kc, kb) -> Role | str:
  """The factor the activations meet first (IN: `(x·A)·B`, OUT: `(x·Bᵀ)·Aᵀ`) when the kernel's
  contracted axes `kc` and batch axes `kb` allow a low-rank term, else why not."""
  first = IN if set(kc) == set(t.view_axes(IN)) else OUT if set(kc) == set(t.view_axes(OUT)) else None
  if first is None:
    return "dot_general contracting in and out axes together"
  if any(t.axes[j][0] is not STACK for j in kb):
    return "dot_general batching a non-stack axis"
  return first


def dot_low_rank(eqn, x, t: Tracked, kernel_is_rhs: bool, first: Role, ctx: Apply):
  """`scale·(drop(x)·A)·B` (or `·Bᵀ)·Aᵀ`) laid out like the dot_general's output; records the
  low-rank use."""
  ctx.low_rank(t, "dot_general")
  xc, kc, xb, kb = dot_axes(eqn, kernel_is_rhs)
  opts = dict(precision=eqn.params.get("precision"),
              preferred_element_type=eqn.params.get("preferred_element_type"))
  x = ctx.drop(x)
  y = None
  if kernel_is_rhs and not xb and not t.count(STACK):
    y = _low_rank_2d(x, t, xc, kc, first, opts)
  if y is None:
    y = _low_rank_einsum(x, t, xc, kc, xb, kb, kernel_is_rhs, first, opts)
  return y


def _low_rank_2d(x, t: Tracked, xc, kc, first: Role, opts):
  """`((x2·F1)·s)·F2` on x flattened to `(rows, fan)`, when x's contracted axes are its trailing
  axes in the factor's order and the output axes come out in the other factor's order.

  Two plain matmuls: XLA (CPU especially) compiles their gradients far better than a
  contraction over several leading axes, which transposes whole activations.
  """
  n = len(xc)
  order = [kc[xc.index(i)] for i in range(x.ndim - n, x.ndim)] if sorted(xc) == list(
      range(x.ndim - n, x.ndim)) else None
  if order is None or order != t.view_axes(first):
    return None
  second = OUT if first is IN else IN
  free = [j for j in range(t.w.ndim) if j not in kc]
  if free != t.view_axes(second):
    return None
  rank = t.a.shape[-1]
  a = t.a.astype(t.w.dtype).reshape(-1, rank)  # (fan_in, r)
  b = t.b.astype(t.w.dtype).reshape(rank, -1)  # (r, fan_out)
  f1, f2 = (a, b) if first is IN else (b.T, a.T)
  rows = x.reshape(-1, f1.shape[0])
  h = jnp.matmul(rows, f1, **opts)
  y = jnp.matmul(h * jnp.asarray(t.scale, h.dtype), f2.astype(h.dtype), **opts)
  return y.reshape(*x.shape[:x.ndim - n], *(t.w.shape[j] for j in free))


def _low_rank_einsum(x, t: Tracked, xc, kc, xb, kb, kernel_is_rhs: bool, first: Role, opts):
  """The general case (batch dims, stack axes, any axis order) as two einsums."""
  letters = iter(string.ascii_letters)
  x_l = [next(letters) for _ in range(x.ndim)]
  k_l = [None] * t.w.ndim
  for i, j in zip(xc, kc):
    k_l[j] = x_l[i]
  for i, j in zip(xb, kb):
    k_l[j] = x_l[i]
  k_l = [name if name is not None else next(letters) for name in k_l]
  r = next(letters)
  group = lambda role: [k_l[j] for j in t.view_axes(role)]
  a_l = group(STACK) + group(IN) + [r]
  b_l = group(STACK) + [r] + group(OUT)
  x_keep = [name for i, name in enumerate(x_l) if i not in xc]  # x's batch and free axes
  s_free = [k_l[j] for j in t.view_axes(STACK) if j not in kb]
  h_l = x_keep + s_free + [r]
  x_free = [x_l[i] for i in range(x.ndim) if i not in xc and i not in xb]
  k_free = [k_l[j] for j in range(t.w.ndim) if j not in kc and j not in kb]
  out_l = [x_l[i] for i in xb] + (x_free + k_free if kernel_is_rhs else k_free + x_free)

  factors = {IN: (t.a, a_l), OUT: (t.b, b_l)}
  (f1, f1_l), (f2, f2_l) = factors[first], factors[OUT if first is IN else IN]
  h = jnp.einsum(f"{''.join(x_l)},{''.join(f1_l)}->{''.join(h_l)}", x, f1.astype(t.w.dtype), **opts)
  h = h * jnp.asarray(t.scale, h.dtype)
  return jnp.einsum(f"{''.join(h_l)},{''.join(f2_l)}->{''.join(out_l)}", h, f2.astype(h.dtype), **opts)


@infers(P.conv_general_dilated_p)
def _conv_infer(eqn, views, ctx: Infer):
  """The kernel's output-feature axis is its out-axis; input features and window axes are in."""
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec
  if isinstance(views[1], View):
    ctx.note("conv_general_dilated", views[1], {OUT: [rhs_spec[0]], IN: list(rhs_spec[1:])})
  return [None]


@applies(P.conv_general_dilated_p)
def _conv(eqn, invals, ctx: Apply):
  x, t = invals
  p = eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  if isinstance(x, Tracked) or not isinstance(t, Tracked):
    return materialize_all(eqn, invals, ctx, "conv_general_dilated over a kernel as input")
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    return materialize_all(eqn, invals, ctx, "grouped conv_general_dilated")
  if t.count(STACK) or t.view_axes(OUT) != [rhs_spec[0]]:
    return materialize_all(eqn, invals, ctx, "conv_general_dilated with an unusual kernel layout")
  ctx.low_rank(t, "conv_general_dilated")
  base = bind(eqn, [x, t.w])[0]
  h = bind(eqn, [ctx.drop(x), _a_in_view(t).astype(t.w.dtype)])[0]  # r output channels
  return [base + _with_b(t, h, out_spec[1]).astype(base.dtype)]


@infers(P.gather_p)
def _gather_infer(eqn, views, ctx: Infer):
  """An embedding lookup: the indexed (collapsed) axes are in-axes, the sliced ones out-axes."""
  v0 = views[0]
  if isinstance(v0, View):
    collapsed = eqn.params["dimension_numbers"].collapsed_slice_dims
    ctx.note("gather", v0, {IN: list(collapsed),
                            OUT: [j for j in range(len(v0.axes)) if j not in collapsed]})
  return [None]


@applies(P.gather_p)
def _gather(eqn, invals, ctx: Apply):
  t, idx = invals
  if isinstance(idx, Tracked) or not isinstance(t, Tracked):
    return materialize_all(eqn, invals, ctx, "gather with a kernel as indices")
  p = eqn.params
  dn = p["dimension_numbers"]
  in_axes, out_axes = t.view_axes(IN), t.view_axes(OUT)
  if (t.count(STACK) or len(out_axes) != 1
      or sorted(dn.collapsed_slice_dims) != in_axes or not set(dn.start_index_map) <= set(in_axes)
      or dn.operand_batching_dims or p["slice_sizes"][out_axes[0]] != t.w.shape[out_axes[0]]):
    return materialize_all(eqn, invals, ctx, "gather that is not a row lookup")
  ctx.low_rank(t, "gather")
  base = bind(eqn, [t.w, idx])[0]
  rank = t.a.shape[-1]
  sizes = tuple(rank if j == out_axes[0] else s for j, s in enumerate(p["slice_sizes"]))
  rows = eqn.primitive.bind(_a_in_view(t).astype(t.w.dtype), idx, **{**p, "slice_sizes": sizes})
  return [base + _with_b(t, rows, dn.offset_dims[0]).astype(base.dtype)]


@infers(ragged.PRIMITIVE)
def _ragged_dot_infer(eqn, views, ctx: Infer):
  """A grouped matmul (`lax.ragged_dot`, the MoE kernel): the kernel's group axis is a stack
  axis (one adapter per expert), its contracted axes in-axes, the rest out-axes."""
  dn = eqn.params["ragged_dot_dimension_numbers"]
  (_, rc), (_, rb) = dn.dot_dimension_numbers
  w = views[1]
  if isinstance(w, View):
    groups = list(dn.rhs_group_dimensions)
    free = [j for j in range(len(w.axes)) if j not in rc and j not in rb and j not in groups]
    ctx.note("ragged_dot", w, {STACK: [*rb, *groups], IN: list(rc), OUT: free})
  return [None]


@applies(ragged.PRIMITIVE)
def _ragged_dot(eqn, invals, ctx: Apply):
  """`x·W_g + s·((x·A_g)·B_g)`, both low-rank products ragged dots with the same group sizes.

  Handles `lax.ragged_dot`'s own form: x `(m, k)` ragged along m, W `(g, k, n)` viewed as
  `stack, in, out`; any other form materialises (correct, reported).
  """
  x, t, group_sizes = invals
  if (not isinstance(t, Tracked) or isinstance(x, Tracked) or isinstance(group_sizes, Tracked)
      or not ragged.canonical(eqn.params) or t.axes != ((STACK, 0), (IN, 0), (OUT, 0))):
    return materialize_all(eqn, invals, ctx, "ragged_dot in an unsupported form")
  ctx.low_rank(t, "ragged_dot")
  base = bind(eqn, [x, t.w, group_sizes])[0]
  h = ragged.emit(eqn.params, ctx.drop(x), t.a.astype(t.w.dtype), group_sizes)  # (m, r)
  h = h * jnp.asarray(t.scale, h.dtype)
  y = ragged.emit(eqn.params, h, t.b.astype(h.dtype), group_sizes)  # (m, n)
  return [base + y.astype(base.dtype)]
