"""`Tracked`: a base kernel followed through the jaxpr together with its low-rank factors.

A tracked value stands for `W_view + scale · ΔW_view`, where `W_view` is the base kernel after the
layout-only ops seen so far (transposes, reshapes within a side, dtype casts) and `ΔW` is kept
factored as `A: (*S, *I, r)` and `B: (*S, r, *O)`. `axes[j]` says which group (`"s"`, `"i"`,
`"o"`) axis `j` of the view belongs to and its index within that group, so
`ΔW_view = transpose(A·B, canonical → view)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

Axis = tuple[str, int]  # ("s" | "i" | "o", index within the group)


@dataclasses.dataclass(frozen=True)
class Tracked:
  w: jax.Array
  a: jax.Array
  b: jax.Array
  axes: tuple[Axis, ...]
  site: int
  scale: float

  @classmethod
  def from_kernel(cls, w, a, b, layout, site: int, scale: float) -> "Tracked":
    """Wrap a stored kernel whose `layout` names its stack / in / out axes."""
    axes: list[Axis | None] = [None] * jnp.ndim(w)
    for role, group in (("s", layout.stack_axes), ("i", layout.in_axes), ("o", layout.out_axes)):
      for k, j in enumerate(group):
        axes[j] = (role, k)
    return cls(w, a, b, tuple(axes), site, scale)

  def count(self, role: str) -> int:
    return sum(r == role for r, _ in self.axes)

  def view_axes(self, role: str) -> list[int]:
    """View axes of `role`, ordered by their index within the group."""
    return [j for _, j in sorted((k, j) for j, (r, k) in enumerate(self.axes) if r == role)]

  def replace(self, **kw: Any) -> "Tracked":
    return dataclasses.replace(self, **kw)

  def delta(self) -> jax.Array:
    """`ΔW_view = scale · A·B` in the view's axis order, accumulated in (at least) float32."""
    n_s, n_i = self.count("s"), self.count("i")
    dtype = jnp.promote_types(self.w.dtype, jnp.float32)
    s_shape, i_shape, o_shape = (self.a.shape[:n_s], self.a.shape[n_s:-1], self.b.shape[n_s + 1:])
    a = (self.a.astype(dtype) * self.scale).reshape(*s_shape, math.prod(i_shape), -1)  # scale A, not ΔW
    b = self.b.astype(dtype).reshape(*s_shape, -1, math.prod(o_shape))
    # Σ_k a[..., i, k] · b[..., k, o] as a broadcast product summed over k: XLA fuses it (and a
    # following `W +`) into one pass over W, vectorised along `o`. A `dot` with contraction size r
    # is several times slower on CPU and leaves ΔW in a buffer of its own (benchmarks/RESULTS.md).
    d = jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)
    d = d.reshape(*s_shape, *i_shape, *o_shape)
    offset = {"s": 0, "i": n_s, "o": n_s + n_i}
    return jnp.transpose(d, [offset[r] + k for r, k in self.axes])

  def materialize(self) -> jax.Array:
    """`W_view + ΔW_view`, computed in float32 and cast once to W's dtype."""
    d = self.delta()
    return (self.w.astype(d.dtype) + d).astype(self.w.dtype)
