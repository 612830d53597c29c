"""The two apply paths: `merged` (fold ΔW in, then call the function) and `unmerged`
(`x·W + scale·(drop(x)·A)·B` via the jaxpr interpreter, never forming `W + ΔW`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from .adapters import site_arrays, with_saved
from .interpret import Apply, trace
from .merge import merge
from .sites import Plan


def merged(fn: Callable, plan: Plan) -> Callable:
  """`fn` taking the LoRA tree: `merged(fn, plan)(tree, *a, **k) == fn(merge(plan, tree), *a, **k)`.

  Args:
    fn: `fn(variables, *args, **kwargs)`.
    plan: the plan of the trees it will be called with.

  Returns:
    A function of `(tree, *args, **kwargs)`.
  """

  @functools.wraps(fn)
  def apply(tree: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(merge(plan, tree), *args, **kwargs)

  return apply


def unmerged(fn: Callable, plan: Plan, dropout_key: jax.Array | None = None,
             compute_dtype: Any = None) -> Callable:
  """`fn` taking the LoRA tree, computing every adapted kernel's use without forming `W + ΔW`.

  `fn(variables, *args, **kwargs)` is traced to a jaxpr with the base kernels as inputs, then
  interpreted: each `dot_general` / `ragged_dot` / `conv_general_dilated` / embedding `gather` on
  a kernel emits the base op plus the low-rank term `scale · (drop(x)·A)·B` (shapes: x `(..., *in)`,
  A `(*stack, *in, r)`, B `(*stack, r, *out)`); indexing, slicing, concatenation and size-1 reshapes
  of a kernel are applied to its factors alike; `jit`, remat, `scan`, `cond`, `while`,
  `custom_jvp`/`custom_vjp` and `shard_map` are recursed into; any other use of a kernel gets
  `W + ΔW` for that use only (reported in the plan's `use` column).

  Args:
    fn: `fn(variables, *args, **kwargs)`, any JAX function.
    plan: from `lj.plan` on the same function.
    dropout_key: enables `plan.config.dropout` on the LoRA input path (off without a key). The
      wrapper is cheap to build inside a jitted step.
    compute_dtype: the dtype a quantized kernel (`lj.quantize`) is dequantized to, at each use
      (per layer inside `scan`, per expert when an expert is picked out of a stack): default the
      dtype of the first floating-point array argument (the activations), else the kernel's own.

  Returns:
    A function of `(tree, *args, **kwargs)` with `fn`'s outputs. Array leaves of `args`/`kwargs`
    are traced; other leaves (Python bools, strings) are static.
  """

  @functools.wraps(fn)
  def apply(tree: Any, *args: Any, **kwargs: Any) -> Any:
    factors = {path: (a, b) for path, (_, a, b) in site_arrays(plan, tree).items()}
    traced = trace(fn, with_saved(plan, tree), args, kwargs, compute_dtype)
    return traced.run(plan.sites, factors, Apply(plan.config.dropout, dropout_key))

  return apply
