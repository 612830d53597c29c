"""The driver: one loop over a jaxpr, one rule table, two modes.

Each primitive family module registers, per primitive, an `infer` half (what this use says about
a kernel's layout, given `View`s) and an `apply` half (the base op on `W` plus the low-rank term,
given `Tracked` values). `eval_jaxpr` runs either half over a jaxpr whose kernel inputs are
tracked: plan-building runs it with an `Infer` context (to read layouts off the uses) and then
with an `Apply` context under `jax.eval_shape` (to record each use), and `lj.unmerged` runs the
`Apply` half for real, so what the plan reports is what `unmerged` does by construction.

Equations without a tracked input are re-bound unchanged. A tracked input to a primitive with no
`apply` half gets `W + ΔW` for that use only, recorded in the plan; with no `infer` half the use
says nothing about the layout. A concatenation of kernels (`Parts`, interpret/concat.py) goes to
a rule's `parts` half; inferring, each piece's view goes through the `infer` half on its own;
applying a primitive with no `parts` half, the concatenation is materialised for that use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax.extend import core as jex
from jax.extend.core import primitives as P

from ..layout import Role
from ..sites import Use
from . import ragged
from .values import Parts, QuantizedBase, Tracked, View

InferHalf = Callable[[Any, list, "Infer"], list]
ApplyHalf = Callable[[Any, list, "Apply"], list]


@dataclasses.dataclass
class Rule:
  infer: InferHalf | None = None
  apply: ApplyHalf | None = None
  parts: ApplyHalf | None = None  # apply half for inputs that are concatenated kernels (`Parts`)


RULES: dict[Any, Rule] = {}


Half = TypeVar("Half", bound=Callable[..., list])


def _registrar(half: str, primitives: tuple) -> Callable[[Half], Half]:
  def register(fn: Half) -> Half:
    for p in primitives:
      setattr(RULES.setdefault(p, Rule()), half, fn)
    return fn
  return register


def infers(*primitives: Any) -> Callable[[Half], Half]:
  """Register `fn` as the infer half of the rule for `primitives`."""
  return _registrar("infer", primitives)


def applies(*primitives: Any) -> Callable[[Half], Half]:
  """Register `fn` as the apply half of the rule for `primitives`."""
  return _registrar("apply", primitives)


def applies_to_parts(*primitives: Any) -> Callable[[Half], Half]:
  """Register `fn` as the apply half for `primitives` when an input is a `Parts` value."""
  return _registrar("parts", primitives)


class Infer:
  """Infer-mode context: kernels are `View`s, other values are not computed (None); each use
  that gives a kernel a complete, consistent layout is collected in `found[site]`."""

  def __init__(self, ndims: Sequence[int]):
    self.ndims = list(ndims)
    self.found: dict[int, list[tuple[str, dict[int, Role]]]] = {i: [] for i in range(len(ndims))}
    self.order: list[int] = []  # the site of each found use, across sites (for `all-linear`)

  tracked_type = View

  def plain(self, eqn, invals) -> list:
    del invals
    return [None] * len(eqn.outvars)

  def fallback(self, eqn, invals) -> list:
    """No infer half: walk any sub-jaxpr that takes the equation's operands (shard_map and other
    higher-order primitives), so uses inside still inform the layout."""
    outs = [None] * len(eqn.outvars)
    for value in eqn.params.values():
      jaxpr = getattr(value, "jaxpr", value)
      if isinstance(jaxpr, jex.Jaxpr) and len(jaxpr.invars) == len(invals):
        consts = self.consts(value) if hasattr(value, "consts") else []
        found = eval_jaxpr(jaxpr, consts, invals, self)
        outs = found if len(found) == len(outs) else outs
    return outs

  def half(self, rule: Rule) -> Any:
    return rule.infer

  def on_parts(self, eqn, invals) -> list:
    """Each piece's view through the equation on its own (other concatenations left out); an
    output is the view, or the `Parts` of the views, that the runs give it."""
    found: list[list] = [[] for _ in eqn.outvars]
    for i, x in enumerate(invals):
      if not isinstance(x, Parts):
        continue
      for piece in x.pieces:
        if piece is None:
          continue
        vals = [piece if j == i else None if isinstance(y, Parts) else y for j, y in enumerate(invals)]
        for o, out in enumerate(dispatch(eqn, vals, self)):
          for v in out.pieces if isinstance(out, Parts) else [out]:
            if isinstance(v, View) and v not in found[o]:
              found[o].append(v)
    return [None if not vs else vs[0] if len(vs) == 1 else Parts(tuple(vs), -1) for vs in found]

  def consts(self, closed) -> list:
    return [None] * len(closed.consts)

  def note(self, primitive: str, view: View, groups: dict[Role, Sequence[int]]) -> None:
    """Record that this use gives view axes `groups[role]` their roles, if that assigns every
    kernel axis one role consistently and includes in and out axes."""
    roles = assign(view, groups)
    if (roles is not None and len(roles) == self.ndims[view.site]
        and Role.IN in roles.values() and Role.OUT in roles.values()):
      self.found[view.site].append((primitive, roles))
      self.order.append(view.site)


def assign(view: View, groups: dict[Role, Sequence[int]]) -> dict[int, Role] | None:
  """Roles of the kernel's axes when the view's axes play `groups`; None if inconsistent."""
  roles: dict[int, Role] = dict(view.fixed)
  for role, axes in groups.items():
    for j in axes:
      for k in view.axes[j]:
        if roles.setdefault(k, role) is not role:
          return None
  return roles


class Apply:
  """Apply-mode context: kernels are `Tracked`; carries the dropout key stream and an optional
  recorder of each site's uses (plan-building)."""

  tracked_type = Tracked

  def __init__(self, dropout: float = 0.0, key: jax.Array | None = None,
               record: Callable[[int, Use], None] | None = None):
    self.dropout = dropout if key is not None else 0.0
    self.key = key
    self._count = 0
    self._record = record

  def plain(self, eqn, invals) -> list:
    return bind(eqn, invals)

  def fallback(self, eqn, invals) -> list:
    return materialize_all(eqn, invals, self)

  def half(self, rule: Rule) -> Any:
    return rule.apply

  def on_parts(self, eqn, invals) -> list:
    rule = RULES.get(eqn.primitive)
    if rule is not None and rule.parts is not None:
      return rule.parts(eqn, invals, self)
    return dispatch(eqn, materialize_parts(invals, self, f"no rule for {eqn.primitive.name} on "
                                           "concatenated kernels", eqn.primitive.name), self)

  def consts(self, closed) -> list:
    return list(closed.consts)

  def record(self, site: int | tuple[int, ...], use: Use) -> None:
    if self._record is not None:
      for s in site if isinstance(site, tuple) else (site,):
        self._record(s, use)

  def low_rank(self, t: Tracked, primitive: str) -> None:
    self.record(t.site, Use("low_rank", primitive))

  def next_key(self) -> jax.Array | None:
    if self.key is None:
      return None
    self._count += 1
    return jax.random.fold_in(self.key, self._count)

  def child(self, key: jax.Array | None) -> Apply:
    """A context for a sub-computation (scan body, remat region) with its own key stream."""
    return Apply(self.dropout, key, self._record)

  def drop(self, x: Any) -> Any:
    """Inverted dropout on the LoRA input path (identity when dropout is off)."""
    key = self.next_key()
    if not self.dropout or key is None:
      return x
    keep = 1.0 - self.dropout
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))


Context = Infer | Apply


def eval_jaxpr(jaxpr, consts: Sequence[Any], args: Sequence[Any], ctx: Context) -> list:
  """Evaluate `jaxpr` in `ctx`'s mode; inputs and outputs may be tracked (`View`/`Tracked`)."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    outs = dispatch(eqn, [read(v) for v in eqn.invars], ctx)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jex.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def dispatch(eqn, invals: list, ctx: Context) -> list:
  """One equation in `ctx`'s mode: its rule's half for tracked inputs, else re-bound as is."""
  if any(isinstance(x, Parts) for x in invals):
    return ctx.on_parts(eqn, invals)
  if any(isinstance(x, ctx.tracked_type) for x in invals):
    rule = RULES.get(eqn.primitive)
    half = ctx.half(rule) if rule is not None else None
    return half(eqn, invals, ctx) if half is not None else ctx.fallback(eqn, invals)
  return ctx.plain(eqn, invals)


def primitive_of(fn: Callable, *args: Any) -> Any:
  """The last primitive `fn` binds: the key for a primitive `jax.extend` does not list
  (`split`, `ragged_dot_general`), found through public tracing rather than a private import."""
  return jax.make_jaxpr(fn)(*args).jaxpr.eqns[-1].primitive


# Ops a quantized kernel may go through before its use without being dequantized.
_LAYOUT_ONLY = {P.transpose_p, P.reshape_p, P.squeeze_p, P.broadcast_in_dim_p, P.slice_p,
                P.dynamic_slice_p, P.gather_p, P.convert_element_type_p}


def dense(x: Any) -> Any:
  """A `QuantizedBase` dequantized (in its compute dtype) with its pending ops run; anything else
  unchanged. Only what the view covers is read when it was indexed on its leading stack axis."""
  if not isinstance(x, QuantizedBase):
    return x
  out, extras = x.source.dequantize(x.compute), list(x.extras)
  for eqn, n in x.ops:
    out = bind(eqn, [out, *extras[:n]])[0]
    extras = extras[n:]
  return out


def _index_storage(eqn, q: QuantizedBase, rest: Sequence[Any]) -> QuantizedBase | None:
  """`eqn` on a quantized kernel done on its codes and scales, when it only indexes the first
  stack axis, stored leading (`W[l]`: a size-1 slice or dynamic slice there, then a squeeze)."""
  src = q.source
  if q.ops or not src.layout.stack_axes or src.layout.stack_axes[0] != 0:
    return None
  out_shape = tuple(eqn.outvars[0].aval.shape)
  if eqn.primitive is P.squeeze_p and tuple(eqn.params["dimensions"]) == (0,):
    return QuantizedBase(src.take(0), q.compute)
  if eqn.primitive not in (P.slice_p, P.dynamic_slice_p) or out_shape[1:] != src.shape[1:]:
    return None
  if eqn.primitive is P.slice_p:
    if (eqn.params["strides"] or (1,))[0] != 1:
      return None
    start = eqn.params["start_indices"][0]
  else:  # lax clamps a dynamic start into range
    start = jnp.clip(rest[0], 0, src.shape[0] - out_shape[0])
  return QuantizedBase(src.slice_leading(start, out_shape[0]), q.compute)


def bind(eqn, invals: Sequence[Any]) -> list:
  """Re-emit `eqn` on (untracked) `invals`; always returns a list of outputs.

  A quantized kernel (`QuantizedBase`) going through a layout-only op stays quantized (indexed
  in storage, or the op is kept for later); any other use dequantizes it there."""
  if invals and isinstance(invals[0], QuantizedBase) and eqn.primitive in _LAYOUT_ONLY:
    return [_index_storage(eqn, invals[0], invals[1:]) or invals[0].then(eqn, list(invals[1:]))]
  if any(isinstance(x, QuantizedBase) for x in invals):
    # Dequantize inside a remat region with the use: the backward pass dequantizes again from the
    # codes instead of keeping every dequantized kernel alive as a residual until it runs.
    return jax.checkpoint(lambda *v: _bind(eqn, [dense(x) for x in v]))(*invals)
  return _bind(eqn, invals)


def _bind(eqn, invals: Sequence[Any]) -> list:
  if eqn.primitive is ragged.PRIMITIVE and ragged.active() and ragged.canonical(eqn.params):
    return [ragged.emit(eqn.params, *invals)]  # a mixed-adapter batch vmaps it
  params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(params, tuple):  # (subfuns, params) for primitives that carry functions
    subfuns, params = params
    invals = [*subfuns, *invals]
  out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def materialize(x: Any, ctx: Apply, why: str, primitive: str = "") -> Any:
  """`W + ΔW` for a tracked value or a concatenation of them (recording why), anything else
  unchanged."""
  if isinstance(x, (Tracked, Parts)):
    for t in x.tracked() if isinstance(x, Parts) else [x]:
      ctx.record(t.site, Use("materialised", primitive or why, why))
    return (x.replace(w=dense(x.w)) if isinstance(x, Tracked) else x).materialize()
  return x


def materialize_parts(invals: list, ctx: Apply, why: str, primitive: str) -> list:
  """`invals` with each concatenation of kernels materialised (tracked kernels left as they are)."""
  return [materialize(x, ctx, why, primitive) if isinstance(x, Parts) else x for x in invals]


def materialize_all(eqn, invals: list, ctx: Apply, why: str = "") -> list:
  """Fallback: materialise every tracked input for this use only."""
  name = eqn.primitive.name
  return bind(eqn, [materialize(x, ctx, why or f"no rule for {name}", name) for x in invals])


# --- packing Tracked values into flat arrays, to cross jax.checkpoint / lax.scan boundaries ---

def pack(values: Sequence[Any]) -> tuple[list, list]:
  """Flatten values to arrays (a tracked value becomes `w, a, b`, a concatenation its `w` then
  its pieces'); returns arrays and specs."""
  flat, specs = [], []
  for x in values:
    if isinstance(x, Tracked):
      specs.append(x)
      flat.extend((x.w, x.a, x.b))
    elif isinstance(x, Parts):
      pieces, piece_specs = pack(x.pieces)
      specs.append(x.replace(pieces=tuple(piece_specs)))
      flat.extend([x.w, *pieces])
    else:
      specs.append(None)
      flat.append(x)
  return flat, specs


def unpack(specs: Sequence[Tracked | Parts | None], arrays: Sequence[Any]) -> list:
  """Inverse of `pack`: rebuild tracked values from `specs` (their static parts) and arrays."""
  it = iter(arrays)
  return [_unpack_one(spec, it) for spec in specs]


def _unpack_one(spec: Tracked | Parts | None, it) -> Any:
  if isinstance(spec, Tracked):
    return spec.replace(w=next(it), a=next(it), b=next(it))
  if isinstance(spec, Parts):
    return spec.replace(w=next(it), pieces=tuple(_unpack_one(p, it) for p in spec.pieces))
  return next(it)
