"""The interpreter loop: evaluate a jaxpr whose base-kernel inputs are `Tracked`.

Equations without a tracked input are re-bound unchanged. Equations with one go to the rule
registered for their primitive (`RULES`); a primitive with no rule gets `W + ΔW` materialised for
that use only, and the use is recorded (the plan reports it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from .tracked import Tracked

Rule = Callable[[Any, list, "Context"], list]
RULES: dict[Any, Rule] = {}


def rule(*primitives) -> Callable[[Rule], Rule]:
  def register(fn: Rule) -> Rule:
    for p in primitives:
      RULES[p] = fn
    return fn
  return register


class Context:
  """Per-call state: the dropout key stream and an optional recorder of how each site is used."""

  def __init__(self, dropout: float = 0.0, key: jax.Array | None = None,
               record: Callable[[int, str], None] | None = None):
    self.dropout = dropout if key is not None else 0.0
    self.key = key
    self._count = 0
    self._record = record

  def record(self, site: int, use: str) -> None:
    if self._record is not None:
      self._record(site, use)

  def next_key(self) -> jax.Array | None:
    if self.key is None:
      return None
    self._count += 1
    return jax.random.fold_in(self.key, self._count)

  def child(self, key: jax.Array | None) -> "Context":
    """A context for a sub-computation (scan body, remat region) with its own key stream."""
    return Context(self.dropout, key, self._record)

  def drop(self, x: jax.Array) -> jax.Array:
    """Inverted dropout on the LoRA input path (identity when dropout is off)."""
    if not self.dropout:
      return x
    keep = 1.0 - self.dropout
    mask = jax.random.bernoulli(self.next_key(), keep, x.shape)
    return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))


def bind(eqn, invals: Sequence[Any]) -> list:
  """Re-emit `eqn` on (untracked) `invals`; always returns a list of outputs."""
  params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(params, tuple):  # older JAX: (subfuns, params)
    subfuns, params = params
    invals = [*subfuns, *invals]
  out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def materialize(x: Any, ctx: Context, why: str) -> Any:
  """`W + ΔW` for a tracked value (recording why), anything else unchanged."""
  if isinstance(x, Tracked):
    ctx.record(x.site, f"materialised ({why})")
    return x.materialize()
  return x


def materialize_all(eqn, invals: list, ctx: Context) -> list:
  """Fallback rule: materialise every tracked input for this use only."""
  return bind(eqn, [materialize(x, ctx, eqn.primitive.name) for x in invals])


def eval_jaxpr(jaxpr, consts: Sequence[Any], args: Sequence[Any], ctx: Context) -> list:
  """Evaluate `jaxpr` where some inputs may be `Tracked`; outputs may be `Tracked` too."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(isinstance(x, Tracked) for x in invals):
      outs = RULES.get(eqn.primitive, materialize_all)(eqn, invals, ctx)
    else:
      outs = bind(eqn, invals)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jex.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


# --- packing Tracked values into flat arrays, to cross jax.checkpoint / lax.scan boundaries ---

def pack(values: Sequence[Any]) -> tuple[list, list]:
  """Flatten values to arrays (a tracked value becomes `w, a, b`); returns arrays and specs."""
  flat, specs = [], []
  for x in values:
    if isinstance(x, Tracked):
      specs.append(x)
      flat.extend((x.w, x.a, x.b))
    else:
      specs.append(None)
      flat.append(x)
  return flat, specs


def unpack(specs: Sequence[Tracked | None], arrays: Sequence[Any]) -> list:
  """Inverse of `pack`: rebuild tracked values from `specs` (their static parts) and arrays."""
  it, out = iter(arrays), []
  for spec in specs:
    out.append(next(it) if spec is None else spec.replace(w=next(it), a=next(it), b=next(it)))
  return out
