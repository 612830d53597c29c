"""What a kernel is while the driver walks a jaxpr: a `View` when inferring its layout, a
`Tracked` value when applying the adapters.

A `View` knows, for each axis of the current value, which axes of the stored kernel it covers
(a transpose permutes them, a reshape merges or splits them), plus roles fixed on the way (a
`scan` over the kernel makes the scanned axis a stack axis). A `Tracked` value stands for
`W_view + scale · ΔW_view`: the base kernel after the layout-only ops seen so far, with
`ΔW = A·B` kept factored (`A: (*S, *I, r)`, `B: (*S, r, *O)`); `axes[j]` says which role axis `j`
of the view plays and its position within that role's group.

A quantized kernel (`lj.quantize`) enters as a `QuantizedBase`: its codes and scales plus the
layout-only ops applied to it so far, dequantized only where it is used (`core.bind`); indexing
its leading stack axis (a layer, an expert; a `scan` step) indexes the codes and scales instead.

A `Parts` value is a concatenation of kernels along an in or out axis, each piece keeping its own
factors (interpret/concat.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from ..layout import Axis, Layout, Role, add_delta, delta
from ..quantize import QuantizedArray


@jax.tree_util.register_pytree_node_class
class QuantizedBase:
  """A view of a quantized kernel standing for its dequantized values in `compute` dtype: the
  `source` (storage-level indexing already applied) followed by `ops` (layout-only equations,
  each with its number of extra operands, taken in order from `extras`), still to be run on the
  dequantized array. A pytree over the source's arrays and `extras`, so it crosses `scan`, remat
  and `cond` boundaries as codes and scales."""

  def __init__(self, source: QuantizedArray, compute: Any, ops: tuple = (), extras: tuple = ()):
    self.source, self.compute, self.ops, self.extras = source, compute, ops, extras

  def tree_flatten(self):
    return (self.source, self.extras), (self.compute, self.ops)

  @classmethod
  def tree_unflatten(cls, aux, kids):
    return cls(kids[0], aux[0], aux[1], tuple(kids[1]))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.ops[-1][0].outvars[0].aval.shape) if self.ops else self.source.shape

  @property
  def dtype(self) -> Any:
    return self.ops[-1][0].outvars[0].aval.dtype if self.ops else self.compute

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def then(self, eqn: Any, extra: list) -> QuantizedBase:
    return QuantizedBase(self.source, self.compute, (*self.ops, (eqn, len(extra))),
                         (*self.extras, *extra))


@dataclasses.dataclass(frozen=True)
class View:
  """A kernel (site `site`, `ndim` axes) as seen through layout-only ops, for layout inference."""
  site: int
  axes: tuple[frozenset[int], ...]
  fixed: tuple[tuple[int, Role], ...] = ()

  @classmethod
  def of_kernel(cls, site: int, ndim: int) -> View:
    return cls(site, tuple(frozenset([j]) for j in range(ndim)))

  def replace(self, **kw: Any) -> View:
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class Tracked:
  """A kernel (a view of site `site`) with its factors, for the apply half of the rules."""
  w: jax.Array
  a: jax.Array
  b: jax.Array
  axes: tuple[Axis, ...]
  site: int | tuple[int, ...]  # a tuple: kernels concatenated along a stack axis (concat.py)
  scale: Any  # a Python float, or a scalar array

  @classmethod
  def from_kernel(cls, w, a, b, layout: Layout, site: int, scale: Any) -> Tracked:
    """Wrap a stored kernel whose `layout` names its stack / in / out axes."""
    return cls(w, a, b, layout.view(), site, scale)

  def count(self, role: Role) -> int:
    return sum(r is role for r, _ in self.axes)

  def view_axes(self, role: Role) -> list[int]:
    """View axes of `role`, ordered by their position within the group."""
    return [j for _, j in sorted((k, j) for j, (r, k) in enumerate(self.axes) if r is role)]

  def replace(self, **kw: Any) -> Tracked:
    return dataclasses.replace(self, **kw)

  def delta(self) -> jax.Array:
    """`ΔW_view = scale · A·B` in the view's axis order, accumulated in (at least) float32."""
    return delta(self.a, self.b, self.scale, self.axes, None)

  def materialize(self) -> jax.Array:
    """`W_view + ΔW_view` in W's dtype (see `layout.add_delta`); `w` must be an array (the driver's
    `materialize` dequantizes a `QuantizedBase` first)."""
    return add_delta(self.w, self.a, self.b, self.scale, self.axes)


@dataclasses.dataclass(frozen=True)
class Parts:
  """Kernels (and plain arrays) concatenated along view axis `axis`, each keeping its own
  factors: `pieces` are `Tracked` values or arrays (apply mode), or `View`s / None (infer mode,
  where a `Parts` is just the views that travel together); `w` is the concatenation of the base
  pieces (apply mode)."""
  pieces: tuple[Any, ...]
  axis: int
  w: Any = None

  @classmethod
  def of_views(cls, views) -> Any:
    """Infer mode: the views among `views` as one value (None, a `View`, or their `Parts`)."""
    found = [v for v in views if isinstance(v, View)]
    return None if not found else found[0] if len(found) == 1 else cls(tuple(found), -1)

  def tracked(self) -> list[Tracked]:
    return [p for p in self.pieces if isinstance(p, Tracked)]

  def sizes(self) -> list[int]:
    return [p.w.shape[self.axis] if isinstance(p, Tracked) else p.shape[self.axis] for p in self.pieces]

  def replace(self, **kw: Any) -> Parts:
    return dataclasses.replace(self, **kw)

  def materialize(self) -> jax.Array:
    """The concatenation of each piece's `W + ΔW` (plain pieces as they are)."""
    full = [p.materialize() if isinstance(p, Tracked) else p for p in self.pieces]
    return jax.numpy.concatenate(full, axis=self.axis)
