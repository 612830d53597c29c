"""The merged path: fold `ΔW = scale · A·B` into the kernels for zero inference overhead."""

from __future__ import annotations

from typing import Any

import jax

from .interpret import Tracked
from .plan import Plan, site_arrays
from .tree import map_leaves, strip, with_value


def _tracked(plan: Plan, tree: Any) -> dict[str, Tracked]:
  """Every site's kernel with its factors, in the kernel's own axis order."""
  arrays = site_arrays(plan, tree)
  return {s.path: Tracked.from_kernel(*arrays[s.path], s.layout, i, s.scale)
          for i, s in enumerate(plan.sites)}


def delta(plan: Plan, tree: Any) -> dict[str, jax.Array]:
  """`{path: ΔW}` with `ΔW = scale · A·B` arranged in each kernel's own axis order (float32, or
  float64 for float64 kernels)."""
  return {path: t.delta() for path, t in _tracked(plan, tree).items()}


def merge(plan: Plan, tree: Any) -> Any:
  """Plain variables with `W' = W + scale · A·B` and the LoRA leaves removed.

  The sum is accumulated in float32 and cast once to W's dtype; a concrete W's sharding is kept.
  `jit`-compatible: `jax.jit(lj.merge, static_argnums=0, donate_argnums=1)` updates the kernels
  in place (JAX then warns that the A/B buffers could not be reused: they have no output). To get
  the base back use `lj.strip(tree)` on the LoRA tree: never subtract ΔW (that drifts in bf16).
  """
  merged = {}
  for path, t in _tracked(plan, tree).items():
    new = t.materialize()
    if isinstance(t.w, jax.Array) and not isinstance(t.w, jax.core.Tracer):
      new = jax.device_put(new, t.w.sharding)
    merged[path] = new
  return map_leaves(lambda p, x: with_value(x, merged[p]) if p in merged else x, strip(tree))
