"""The layout vocabulary: which axes of a kernel are *stack*, *in* and *out* axes, the factor
shapes that follow from it, and the ΔW formula. Everything above (plan, interpreter, attach, merge,
checkpoints, PEFT) speaks this one language.

For a kernel `W` with stack axes `S` (layers, experts, fused projections), input axes `I`
(contracted with activations) and output axes `O`:

    A: (*S, *I, r)      B: (*S, r, *O)      ΔW = scale · A·B   (summed over r, per stack index)

arranged back into `W`'s own axis order.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp


class Role(enum.Enum):
  """The part an axis of a kernel plays: `STACK` (an independent copy per index: layers, experts),
  `IN` (contracted with the activations) or `OUT` (produced)."""
  STACK = "stack"
  IN = "in"
  OUT = "out"


Axis = tuple[Role, int]
"""One axis of a (view of a) kernel: its role and its position within that role's group."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which axes of a stored kernel are stack, input and output axes (each in increasing order).

  `A` has shape `(*stack, *in, r)` and `B` has shape `(*stack, r, *out)`, with the sizes of the
  kernel's axes listed here; `ΔW = scale · A·B` is arranged back into the kernel's axis order.
  """
  stack_axes: tuple[int, ...]
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]

  def __post_init__(self):
    for name in ("stack_axes", "in_axes", "out_axes"):
      object.__setattr__(self, name, tuple(int(j) for j in getattr(self, name)))

  @classmethod
  def from_roles(cls, roles: Mapping[int, Role]) -> Layout:
    """The layout whose axis `j` plays `roles[j]`."""
    pick = lambda role: tuple(sorted(j for j, r in roles.items() if r is role))
    return cls(pick(Role.STACK), pick(Role.IN), pick(Role.OUT))

  @property
  def ndim(self) -> int:
    return len(self.stack_axes) + len(self.in_axes) + len(self.out_axes)

  def axes(self, role: Role) -> tuple[int, ...]:
    return {Role.STACK: self.stack_axes, Role.IN: self.in_axes, Role.OUT: self.out_axes}[role]

  def view(self) -> tuple[Axis, ...]:
    """Per kernel axis, `(role, position within its group)`: the stored kernel as a view."""
    axes: list[Axis | None] = [None] * self.ndim
    for role in Role:
      for k, j in enumerate(self.axes(role)):
        axes[j] = (role, k)
    return tuple(a for a in axes if a is not None)

  def check(self, shape: Sequence[int], where: str) -> None:
    """Raise `ValueError` (prefixed with `where`) unless the layout names each axis of a kernel
    of `shape` exactly once and has at least one in and one out axis."""
    named = sorted(self.stack_axes + self.in_axes + self.out_axes)
    if named != list(range(len(shape))) or not self.in_axes or not self.out_axes:
      raise ValueError(f"{where}: layout {self.to_text()} does not fit a kernel of shape "
                       f"{tuple(shape)}: each of its {len(shape)} axes must be named exactly once, "
                       "with at least one in and one out axis")

  def sizes(self, shape: Sequence[int], role: Role) -> tuple[int, ...]:
    return tuple(shape[j] for j in self.axes(role))

  def a_shape(self, shape: Sequence[int], rank: int) -> tuple[int, ...]:
    """`(*stack, *in, r)`."""
    return (*self.sizes(shape, Role.STACK), *self.sizes(shape, Role.IN), rank)

  def b_shape(self, shape: Sequence[int], rank: int) -> tuple[int, ...]:
    """`(*stack, r, *out)`."""
    return (*self.sizes(shape, Role.STACK), rank, *self.sizes(shape, Role.OUT))

  def fan_in(self, shape: Sequence[int]) -> int:
    return math.prod(self.sizes(shape, Role.IN))

  def fan_out(self, shape: Sequence[int]) -> int:
    return math.prod(self.sizes(shape, Role.OUT))

  def factor_axes(self, per_axis: Sequence[Any]) -> tuple[tuple, tuple]:
    """Per-axis values of the kernel (sharding names, partition specs) carried over to its
    factors: `(A's, B's)` = `((*stack, *in, None), (*stack, None, *out))`, None on the rank axis."""
    pick = lambda axes: tuple(per_axis[j] for j in axes)
    return ((*pick(self.stack_axes), *pick(self.in_axes), None),
            (*pick(self.stack_axes), None, *pick(self.out_axes)))

  def describe(self, shape: Sequence[int]) -> str:
    """Sizes per role, e.g. `stack=(4) in=(64) out=(4,16)` (the plan table's layout column)."""
    fmt = lambda axes: "(" + ",".join(str(shape[j]) for j in axes) + ")"
    parts = [f"stack={fmt(self.stack_axes)}"] if self.stack_axes else []
    return " ".join(parts + [f"in={fmt(self.in_axes)}", f"out={fmt(self.out_axes)}"])

  def to_text(self) -> str:
    """Axis numbers per role, e.g. `stack=(0) in=(2) out=(1,3)` (inverse of `parse`)."""
    fmt = lambda axes: "(" + ",".join(map(str, axes)) + ")"
    return f"stack={fmt(self.stack_axes)} in={fmt(self.in_axes)} out={fmt(self.out_axes)}"

  @classmethod
  def parse(cls, text: str) -> Layout:
    """`"stack=(0) in=(2) out=(1,3)"` -> `Layout((0,), (2,), (1, 3))`; `stack=` may be left out."""
    found: dict[str, tuple[int, ...]] = {}
    for m in re.finditer(r"(\w+)\s*=\s*\(([^)]*)\)", text):
      if m[1] not in ("stack", "in", "out") or m[1] in found:
        raise ValueError(f"layout {text!r}: unexpected or repeated {m[1]!r} (use stack=(..) "
                         "in=(..) out=(..) with axis numbers)")
      found[m[1]] = tuple(int(v) for v in m[2].replace(" ", "").split(",") if v)
    rest = re.sub(r"(\w+)\s*=\s*\(([^)]*)\)", "", text).strip()
    if rest or "in" not in found or "out" not in found:
      raise ValueError(f"layout {text!r}: expected 'stack=(..) in=(..) out=(..)' with axis numbers")
    return cls(found.get("stack", ()), found["in"], found["out"])

  def to_dict(self) -> dict[str, list[int]]:
    return {"stack_axes": list(self.stack_axes), "in_axes": list(self.in_axes),
            "out_axes": list(self.out_axes)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Sequence[int]]) -> Layout:
    return cls(tuple(d["stack_axes"]), tuple(d["in_axes"]), tuple(d["out_axes"]))


def factor_dtype(kernel_dtype: Any) -> jnp.dtype:
  """The dtype of a kernel's factors: float32, or the kernel's if wider (float64). Adapters of a
  bfloat16 or int8 kernel are trained in float32."""
  return jnp.promote_types(kernel_dtype, jnp.float32)


def delta(a: jax.Array, b: jax.Array, scale: Any, axes: Sequence[Axis], dtype: Any = None
          ) -> jax.Array:
  """`ΔW = scale · A·B` arranged in the axis order `axes` (per axis: role, position in group).

  Args:
    a: `(*S, *I, r)`.
    b: `(*S, r, *O)`.
    scale: a Python float or a scalar array.
    axes: for each axis of the result, `(role, k)`: it is the `k`-th axis of that role's group.
    dtype: the accumulation dtype; default `factor_dtype(a.dtype)` (at least float32).

  Returns:
    `ΔW` of shape `(sizes of axes)` in `dtype`.
  """
  dtype = factor_dtype(a.dtype) if dtype is None else dtype
  n_s = sum(r is Role.STACK for r, _ in axes)
  n_i = sum(r is Role.IN for r, _ in axes)
  s_shape, i_shape, o_shape = a.shape[:n_s], a.shape[n_s:-1], b.shape[n_s + 1:]
  a = (a.astype(dtype) * jnp.asarray(scale, dtype)).reshape(*s_shape, math.prod(i_shape), -1)
  b = b.astype(dtype).reshape(*s_shape, -1, math.prod(o_shape))
  # Σ_k a[..., i, k] · b[..., k, o] as a broadcast product summed over k (scale folded into A):
  # XLA fuses it (and a following `W +`) into one pass over W, vectorised along `o`. A `dot` with
  # contraction size r is several times slower on CPU and leaves ΔW in a buffer of its own
  # (benchmarks/RESULTS.md).
  d = jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)
  d = d.reshape(*s_shape, *i_shape, *o_shape)
  offset = {Role.STACK: 0, Role.IN: n_s, Role.OUT: n_s + n_i}
  return jnp.transpose(d, [offset[r] + k for r, k in axes])


def add_delta(w: jax.Array, a: jax.Array, b: jax.Array, scale: Any, axes: Sequence[Axis]) -> jax.Array:
  """`W + ΔW` in W's dtype: summed in float32 (float64 for float64 operands), cast once.

  An integer kernel is rounded to nearest and saturated to its dtype's range (a cast would
  truncate toward zero: `-5 + 0.4 -> -4`, where nearest is `-5`).
  """
  dtype = jnp.promote_types(factor_dtype(w.dtype), factor_dtype(a.dtype))
  total = w.astype(dtype) + delta(a, b, scale, axes, dtype)
  if jnp.issubdtype(w.dtype, jnp.integer):
    info = jnp.iinfo(w.dtype)
    total = jnp.clip(jnp.round(total), info.min, info.max)
  return total.astype(w.dtype)
