"""`lax.ragged_dot` that can be `vmap`-ed with per-example group sizes (mixed-adapter batches).

A mixed-adapter batch runs the model vmapped over its examples (`lj.unmerged(..., adapter_ids=)`),
so an MoE's grouped matmul sees a batch of examples, each with its own rows sorted by expert and
its own group sizes; JAX has no batching rule for that. The rule here flattens the examples' rows
into one ragged matmul: each row's group is read off its example's group sizes, the rows are
stably sorted by group (by `(example, group)` when the right-hand side is per example too, as the
gathered LoRA factors are), multiplied by one `lax.ragged_dot` and put back in place. Rows past an
example's last group get zeros, as `lax.ragged_dot` gives them. FLOPs are those of the examples'
ragged dots together; no weight is copied per example.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_BATCHABLE = contextvars.ContextVar("lora_jax_batchable_ragged_dot", default=False)


@contextlib.contextmanager
def batchable() -> Iterator[None]:
  """Within this context the interpreter emits `ragged_dot` through `ragged_dot` below."""
  token = _BATCHABLE.set(True)
  try:
    yield
  finally:
    _BATCHABLE.reset(token)


def active() -> bool:
  return _BATCHABLE.get()


@functools.cache
def _custom(precision: Any, preferred_element_type: Any) -> Any:
  """The custom-vmap'd ragged dot for one set of static options."""
  opts = dict(precision=precision, preferred_element_type=preferred_element_type)

  @jax.custom_batching.custom_vmap
  def grouped(lhs, rhs, group_sizes):
    return lax.ragged_dot(lhs, rhs, group_sizes, **opts)

  @grouped.def_vmap
  def _rule(batch, in_batched, lhs, rhs, group_sizes):
    lhs_b, rhs_b, sizes_b = in_batched
    lhs = lhs if lhs_b else jnp.broadcast_to(lhs, (batch, *lhs.shape))  # (B, m, k)
    sizes = group_sizes if sizes_b else jnp.broadcast_to(group_sizes, (batch, *group_sizes.shape))
    _, m, k = lhs.shape
    groups = sizes.shape[-1]
    ends = jnp.cumsum(sizes, axis=-1)  # (B, g)
    # Row i of example b is in group e = #{ends[b] <= i}; e == g: past the last group.
    e = jax.vmap(lambda end: jnp.searchsorted(end, jnp.arange(m), side="right"))(ends)
    if rhs_b:  # (B, g, k, n): a group per (example, expert)
      total = batch * groups
      key = jnp.where(e < groups, jnp.arange(batch)[:, None] * groups + e, total)
      weights = rhs.reshape(total, *rhs.shape[2:])
    else:
      total, key, weights = groups, e, rhs
    key = key.reshape(-1)
    order = jnp.argsort(key, stable=True)
    counts = jnp.bincount(key, length=total + 1)[:total].astype(group_sizes.dtype)
    out = lax.ragged_dot(lhs.reshape(batch * m, k)[order], weights, counts, **opts)
    out = jnp.zeros_like(out).at[order].set(out, unique_indices=True)
    return out.reshape(batch, m, -1), True

  return grouped


def ragged_dot(lhs: Any, rhs: Any, group_sizes: Any, *, precision: Any = None,
               preferred_element_type: Any = None) -> Any:
  """`lax.ragged_dot(lhs (m, k), rhs (g, k, n), group_sizes (g,))`; inside `batchable()`, one
  that can be vmapped over all three."""
  if not active():
    return lax.ragged_dot(lhs, rhs, group_sizes, precision=precision,
                          preferred_element_type=preferred_element_type)
  return _custom(precision, preferred_element_type)(lhs, rhs, group_sizes)


PRIMITIVE = jax.make_jaxpr(lambda x, w, g: lax.ragged_dot(x, w, g))(
    jnp.zeros((2, 2)), jnp.zeros((1, 2, 2)), jnp.ones(1, jnp.int32)).jaxpr.eqns[-1].primitive
"""`ragged_dot_general`, which `jax.extend` does not list: found by tracing."""


def canonical(params: dict[str, Any]) -> bool:
  """Whether a `ragged_dot_general` equation is `lax.ragged_dot`'s own form: lhs `(m, k)` ragged
  along m, rhs `(g, k, n)` grouped along its first axis, no group offset."""
  dn = params["ragged_dot_dimension_numbers"]
  return (dn.dot_dimension_numbers == (((1,), (1,)), ((), ())) and tuple(dn.lhs_ragged_dimensions) == (0,)
          and tuple(dn.rhs_group_dimensions) == (0,) and params["group_offset"] is None)


def emit(params: dict[str, Any], lhs: Any, rhs: Any, group_sizes: Any) -> Any:
  """A canonical `ragged_dot_general` equation's output, through `ragged_dot`."""
  return ragged_dot(lhs, rhs, group_sizes, precision=params["precision"],
                    preferred_element_type=params["preferred_element_type"])
