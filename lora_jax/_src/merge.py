"""The merged path: fold `ΔW = scale · A·B` into the kernels for zero inference overhead."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.core import Tracer

from .adapters import site_arrays, with_saved
from .layout import add_delta
from .layout import delta as delta_formula
from .quantize import QuantizedArray, dequantize
from .sites import Plan
from .tree import map_leaves, with_value


def delta(plan: Plan, tree: Any) -> dict[str, jax.Array]:
  """`{path: ΔW}` with `ΔW = scale · A·B` arranged in each kernel's own axis order.

  Args:
    plan: the plan `tree` was made with.
    tree: a LoRA tree (`lj.attach`, `lj.load_adapter`, ...).

  Returns:
    Per site, `ΔW` of the kernel's shape in `factor_dtype` (float32, float64 for float64 kernels).
  """
  arrays = site_arrays(plan, tree)
  return {s.path: delta_formula(arrays[s.path][1], arrays[s.path][2], s.scale, s.layout.view())
          for s in plan.sites}


def merge(plan: Plan, tree: Any, *, check_finite: bool = False, dtype: Any = None) -> Any:
  """Plain variables with `W' = W + scale · A·B`, each `modules_to_save` leaf replaced by its
  trained copy (as PEFT's `merge_and_unload`), and the LoRA leaves removed.

  On a quantized tree (`lj.quantize`) `W` is the dequantized kernel and every other quantized
  leaf is dequantized too, so the result holds no `QuantizedArray`.

  The sum is accumulated in float32 and cast once to W's dtype (integer kernels are rounded to
  nearest and saturated); a concrete W's sharding is kept. `jit`-compatible:
  `jax.jit(lj.merge, static_argnums=0, donate_argnums=1)` updates the kernels in place. To get the
  base back use `lj.strip(tree)` on the LoRA tree: never subtract ΔW (that drifts in bf16).

  Args:
    plan: the plan `tree` was made with.
    tree: a LoRA tree.
    check_finite: refuse to merge when a merged kernel has a NaN or infinity (PEFT's
      `safe_merge`); needs concrete arrays (not under `jit`).
    dtype: the merged (and dequantized) kernels' dtype; default each kernel's own (a quantized
      kernel's original dtype).

  Returns:
    The variables in `tree`'s structure, without LoRA leaves.

  Raises:
    ValueError: `tree` does not match `plan`, or (with `check_finite`) naming the first path
      whose merged kernel is not finite.
  """
  arrays = site_arrays(plan, tree)
  merged = {}
  for s in plan.sites:
    w, a, b = arrays[s.path]
    if isinstance(w, QuantizedArray):
      w = w.dequantize(dtype)
    new = add_delta(w, a, b, s.scale, s.layout.view())
    new = new if dtype is None else new.astype(dtype)
    if check_finite and not bool(jnp.all(jnp.isfinite(new))):
      raise ValueError(f"lj.merge: {s.path}: the merged kernel has non-finite values "
                       "(NaN or inf); nothing was merged")
    if isinstance(w, jax.Array) and not isinstance(w, Tracer):
      new = jax.device_put(new, w.sharding)
    merged[s.path] = new
  return dequantize(map_leaves(lambda p, x: with_value(x, merged[p]) if p in merged else x,
                               with_saved(plan, tree)), dtype)
