"""The two apply paths: `merged` (fold ΔW in, then call the function) and `unmerged`
(`x·W + scale·(drop(x)·A)·B` via the jaxpr interpreter, never forming `W + ΔW`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .adapters import LORA_A, LORA_B, site_arrays, with_saved
from .interpret import Apply, is_array, ragged, trace
from .merge import merge
from .sites import Plan
from .tree import flatten, unbox


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
             compute_dtype: Any = None, *, adapter_ids: Any = None, batch_axis: int = 0,
             scale: Mapping[str, Any] | None = None) -> Callable:
  """`fn` taking the LoRA tree, computing every adapted kernel's use without forming `W + ΔW`.

  `fn(variables, *args, **kwargs)` is traced to a jaxpr with the base kernels as inputs, then
  interpreted: each `dot_general` / `ragged_dot` / `conv_general_dilated` / embedding `gather` on
  a kernel emits the base op plus the low-rank term `scale · (drop(x)·A)·B` (shapes: x `(..., *in)`,
  A `(*stack, *in, r)`, B `(*stack, r, *out)`); indexing, slicing, concatenation and size-1 reshapes
  of a kernel are applied to its factors alike; `jit`, remat, `scan`, `cond`, `while`,
  `custom_jvp`/`custom_vjp` and `shard_map` are recursed into; any other use of a kernel gets
  `W + ΔW` for that use only (reported in the plan's `use` column).

  **Mixed-adapter batches** (`adapter_ids` given): the tree holds a bank of N adapters, every
  factor with a leading adapter axis (`A: (N, *stack, *in, r)`, `B: (N, *stack, r, *out)`, e.g.
  `lj.combine(params, lj.bank_tree(bank))`), and example `b` of the batch gets, at every adapted
  use, `s_i·(x_b·A_i)·B_i` with `i = adapter_ids[b]` (`i = -1`: the base alone, exactly). The
  result equals running each example alone (its batch axis kept, of size 1) with its own adapter:
  the function is `jax.vmap`-ed over the batch with each example's factors gathered from the bank
  (`A_i`: `(batch, *stack, *in, r)`), so the base ops stay one batched op on `W` and the low-rank
  terms are batched matmuls, per example (never `W + ΔW_i`, never a pass of the batch per
  adapter). An MoE's `lax.ragged_dot` with per-example group sizes is batched by lora_jax's own
  rule (`interpret/ragged.py`: rows sorted by group, one ragged dot); other ops JAX cannot
  `vmap` raise JAX's error.

  Args:
    fn: `fn(variables, *args, **kwargs)`, any JAX function.
    plan: from `lj.plan` on the same function (for a bank, `bank.plan`).
    dropout_key: enables `plan.config.dropout` on the LoRA input path (off without a key). The
      wrapper is cheap to build inside a jitted step. With `adapter_ids`, each example draws its
      masks from its own key (`jax.random.split(dropout_key, batch)[b]`).
    compute_dtype: the dtype a quantized kernel (`lj.quantize`) is dequantized to, at each use
      (per layer inside `scan`, per expert when an expert is picked out of a stack): default the
      dtype of the first floating-point array argument (the activations), else the kernel's own.
    adapter_ids: int array `(batch,)`: each example's adapter in the bank, `-1` for the base
      only. Values outside `[-1, N)` are clamped by JAX's indexing rules (not checked: they may
      be traced).
    batch_axis: with `adapter_ids`, the batch axis of the activations: every array leaf of
      `args`/`kwargs` with size `batch` on this axis is split into examples (other leaves are
      shared by all), and every output leaf must have the batch axis there.
    scale: `{site path: scale}` overriding the plan's static scales with data (a new value does
      not recompile): scalars, or `(N,)` arrays with `adapter_ids` (a bank's `bank.scale`).
      Default: the plan's `scale` of each site (for every adapter of a bank).

  Returns:
    A function of `(tree, *args, **kwargs)` with `fn`'s outputs. Array leaves of `args`/`kwargs`
    are traced; other leaves (Python bools, strings) are static.

  Raises:
    ValueError (when called): a tree that does not match the plan (naming the leaf), bank
      factors with different N, `scale` naming an unknown site or of the wrong shape,
      `adapter_ids` that is not a 1-D int array, no argument with the batch axis, or an output
      leaf without it.
  """

  @functools.wraps(fn)
  def apply(tree: Any, *args: Any, **kwargs: Any) -> Any:
    if adapter_ids is not None:
      return _mixed(fn, plan, tree, args, kwargs, adapter_ids, batch_axis, scale, dropout_key,
                    compute_dtype)
    factors = {path: (a, b) for path, (_, a, b) in site_arrays(plan, tree).items()}
    traced = trace(fn, with_saved(plan, tree), args, kwargs, compute_dtype)
    return traced.run(plan.sites, factors, Apply(plan.config.dropout, dropout_key),
                      scales=_scales(plan, scale, ()))

  return apply


def _scales(plan: Plan, scale: Mapping[str, Any] | None, shape: tuple[int, ...]) -> dict[str, Any] | None:
  """`scale` checked against the plan's sites (every value of shape `shape`), as arrays."""
  if scale is None:
    return None
  unknown = [p for p in scale if p not in plan.paths]
  if unknown:
    raise ValueError(f"unmerged: scale names {unknown[0]!r}, not a site of the plan "
                     f"({list(plan.paths)})")
  out = {}
  for path, value in scale.items():
    value = jnp.asarray(value)
    if value.shape != shape:
      raise ValueError(f"unmerged: scale[{path!r}] has shape {value.shape}, expected {shape}")
    out[path] = value
  return out


def _bank_arrays(plan: Plan, tree: Any) -> tuple[dict[str, tuple[Any, Any]], int]:
  """`({path: (A, B)}, N)` of a bank tree: factors with a leading adapter axis of one size N."""
  leaves = {p: unbox(x) for p, x in flatten(tree).items()}
  stray = [p for p in leaves if p.endswith((LORA_A, LORA_B))
           and p.removesuffix(LORA_A).removesuffix(LORA_B) not in plan.paths]
  if stray:
    raise ValueError(f"{stray[0]}: LoRA leaf not in the plan (the plan adapts {list(plan.paths)})")
  out, n = {}, None
  for s in plan.sites:
    pair = []
    for p, want in ((s.path + LORA_A, s.a_shape), (s.path + LORA_B, s.b_shape)):
      if p not in leaves:
        raise ValueError(f"{p}: missing from the tree; pass lj.combine(params, lj.bank_tree(bank))")
      got = tuple(np.shape(leaves[p]))
      n = got[0] if n is None and got else n
      if got != (n, *want):
        raise ValueError(f"{p}: shape {got} is not (N, *{tuple(want)}) with N={n}, the bank's "
                         "adapter axis in front of the plan's factor shape")
      pair.append(leaves[p])
    out[s.path] = (pair[0], pair[1])
  assert n is not None
  return out, n


def _mixed(fn: Callable, plan: Plan, tree: Any, args: tuple, kwargs: dict, adapter_ids: Any,
           batch_axis: int, scale: Mapping[str, Any] | None, dropout_key: jax.Array | None,
           compute_dtype: Any) -> Any:
  """`unmerged` with per-example adapters: `fn` vmapped over the examples, each with its own
  factors and scales gathered from the bank (the strategy `benchmarks/mixed_strategy.py` chose)."""
  bank, n = _bank_arrays(plan, tree)
  scales = _scales(plan, scale, (n,)) or {}
  scales = {s.path: scales.get(s.path, jnp.full((n,), s.scale, bank[s.path][0].dtype))
            for s in plan.sites}
  ids = jnp.asarray(adapter_ids)
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"unmerged: adapter_ids must be a 1-D int array (one adapter per example), "
                     f"got {ids.dtype}{list(ids.shape)}")
  batch = ids.shape[0]
  variables = with_saved(plan, tree)
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  mapped = [i for i, x in enumerate(leaves)
            if is_array(x) and np.ndim(x) > batch_axis and np.shape(x)[batch_axis] == batch]
  if not mapped:
    raise ValueError(f"unmerged: no array argument has {batch} examples on axis {batch_axis} "
                     f"(adapter_ids has {batch}); set batch_axis")
  keys = None if dropout_key is None else jax.random.split(dropout_key, batch)

  def one(i, key, examples):
    filled = list(leaves)
    for k, x in zip(mapped, examples):  # each example keeps its batch axis, of size 1
      filled[k] = jnp.expand_dims(x, batch_axis)
    a, kw = jax.tree_util.tree_unflatten(treedef, filled)
    use = i >= 0
    j = jnp.maximum(i, 0)
    factors = {p: (fa[j], fb[j]) for p, (fa, fb) in bank.items()}
    # A zero scale for the base-only rows: the low-rank term is exactly 0 there.
    own = {p: jnp.where(use, s[j], jnp.zeros((), s.dtype)) for p, s in scales.items()}
    traced = trace(fn, variables, a, kw, compute_dtype)
    out = traced.run(plan.sites, factors, Apply(plan.config.dropout, key), scales=own)
    return jax.tree_util.tree_map_with_path(lambda path, y: _drop_batch(path, y, batch_axis), out)

  with ragged.batchable():  # an MoE's ragged_dot gets per-example group sizes under this vmap
    return jax.vmap(one, in_axes=(0, None if keys is None else 0, batch_axis),
                    out_axes=batch_axis)(ids, keys, [leaves[k] for k in mapped])


def _drop_batch(path: Any, y: Any, axis: int) -> Any:
  """An example's output leaf without its size-1 batch axis (vmap puts the batch back there)."""
  if np.ndim(y) <= axis or np.shape(y)[axis] != 1:
    raise ValueError(f"unmerged: output {jax.tree_util.keystr(path) or 'leaf'} has shape "
                     f"{np.shape(y)} per example, no batch axis {axis} of size 1 to put the "
                     "batch back on (adapter_ids needs outputs with the batch axis)")
  return jnp.squeeze(y, axis)
