"""The two apply paths: `merged` (fold ΔW in, then call the function) and `unmerged`
(`x·W + scale·(drop(x)·A)·B` via the jaxpr interpreter, never forming `W + ΔW`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from .interpret import Context, Tracked, eval_jaxpr, materialize, trace
from .merge import merge
from .plan import Plan, site_arrays
from .tree import strip


def merged(fn: Callable, plan: Plan) -> Callable:
  """`fn` taking the LoRA tree: `merged(fn, plan)(tree, *a, **k) == fn(merge(plan, tree), *a, **k)`."""

  @functools.wraps(fn)
  def apply(tree, *args, **kwargs):
    return fn(merge(plan, tree), *args, **kwargs)

  return apply


def unmerged(fn: Callable, plan: Plan, dropout_key: jax.Array | None = None) -> Callable:
  """`fn` taking the LoRA tree, computing every adapted kernel's use without forming `W + ΔW`.

  `fn(variables, *args, **kwargs)` is traced to a jaxpr with the base kernels as inputs, then
  interpreted: each `dot_general` / `conv_general_dilated` / embedding `gather` on a kernel emits
  the base op plus the low-rank term `scale · (drop(x)·A)·B` (shapes: x `(..., *in)`,
  A `(*stack, *in, r)`, B `(*stack, r, *out)`); `jit`, remat and `scan` are recursed into; any
  other use of a kernel gets `W + ΔW` for that use only (reported in the plan's `use` column).

  Dropout (`plan.config.dropout`) applies to the LoRA input path only, and only when
  `dropout_key` is given; the wrapper is cheap to build inside a jitted step. Array leaves of
  `args`/`kwargs` are traced; other leaves (Python bools, strings) are static.
  """

  @functools.wraps(fn)
  def apply(tree, *args, **kwargs):
    factors = site_arrays(plan, tree)
    traced = trace(fn, strip(tree), args, kwargs)
    invals = list(traced.values)
    for i, s in enumerate(plan.sites):
      w, a, b = factors[s.path]
      invals[traced.index(s.path)] = Tracked.from_kernel(w, a, b, s.layout, i, s.scale)
    ctx = Context(plan.config.dropout, dropout_key)
    closed = traced.jaxpr
    outs = eval_jaxpr(closed.jaxpr, closed.consts, invals + traced.arg_values, ctx)
    outs = [materialize(o, ctx, "returned") for o in outs]
    return jax.tree_util.tree_unflatten(traced.out_tree, outs)

  return apply
