"""Tracing a user function to a jaxpr with every array leaf of its variables as an input, and
running the driver over it in either mode."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ..layout import Role
from ..quantize import QuantizedArray
from ..sites import Site
from ..tree import flatten, map_leaves, unbox, with_value
from .core import Apply, Infer, dense, eval_jaxpr, materialize
from .values import QuantizedBase, Tracked, View


def is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, QuantizedArray))


@dataclasses.dataclass
class Traced:
  """`fn` traced on `(variables, *args, **kwargs)`.

  `jaxpr`'s inputs are `values` (the array leaves of the variables, by `paths`) followed by
  `arg_values` (the array leaves of args/kwargs); other leaves are baked in as static.
  """
  jaxpr: Any  # ClosedJaxpr
  paths: list[str]
  values: list[Any]
  arg_values: list[Any]
  out_tree: Any
  compute: list[Any]  # per value, the dtype a quantized kernel was traced (is dequantized) in

  def index(self, path: str) -> int:
    return self.paths.index(path)

  def infer(self, kernels: Sequence[str], order: list[int] | None = None
            ) -> dict[int, list[tuple[str, dict[int, Role]]]]:
    """Run the infer halves with `kernels[i]` as site `i`: per site, `(primitive, roles)` of each
    use that gives it a complete, consistent layout, in program order. `order`, if given, is
    extended with the site of every such use in program order across sites."""
    views: list[Any] = [None] * (len(self.values) + len(self.arg_values))
    ndims = []
    for i, path in enumerate(kernels):
      j = self.index(path)
      ndims.append(np.ndim(self.values[j]))
      views[j] = View.of_kernel(i, ndims[-1])
    ctx = Infer(ndims)
    eval_jaxpr(self.jaxpr.jaxpr, ctx.consts(self.jaxpr), views, ctx)
    if order is not None:
      order.extend(ctx.order)
    return ctx.found

  def run(self, sites: Sequence[Site], factors: dict[str, tuple[Any, Any]], ctx: Apply,
          values: Sequence[Any] | None = None, arg_values: Sequence[Any] | None = None,
          scales: Mapping[str, Any] | None = None) -> Any:
    """Run the apply halves with each site's kernel tracked with its `(A, B)` and scale
    (`scales[path]`, a scalar array, where given: data, so a new value does not recompile; else
    the site's static `scale`); returns the function's output pytree (a kernel returned as-is
    comes back as `W + ΔW`)."""
    invals = [QuantizedBase(x, dtype) if isinstance(x, QuantizedArray) else x
              for x, dtype in zip(self.values if values is None else values, self.compute)]
    for i, s in enumerate(sites):
      j = self.index(s.path)
      scale = s.scale if scales is None or s.path not in scales else scales[s.path]
      invals[j] = Tracked.from_kernel(invals[j], *factors[s.path], s.layout, i, scale)
    args = list(self.arg_values if arg_values is None else arg_values)
    outs = eval_jaxpr(self.jaxpr.jaxpr, self.jaxpr.consts, invals + args, ctx)
    outs = [dense(materialize(o, ctx, "returned")) for o in outs]
    return jax.tree_util.tree_unflatten(self.out_tree, outs)


def trace(fn: Callable, variables: Any, args: Sequence[Any], kwargs: dict[str, Any],
          compute_dtype: Any = None) -> Traced:
  """Trace `fn(variables, *args, **kwargs)` abstractly (no FLOPs) with every array leaf of
  `variables` and of `args`/`kwargs` as a jaxpr input. A quantized kernel stands in as an array
  of its shape in `compute_dtype` (default: that of the first floating-point array argument, else
  its original dtype)."""
  leaves = {p: unbox(x) for p, x in flatten(variables).items()}
  paths = [p for p, x in leaves.items() if is_array(x)]
  arg_leaves, arg_tree = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)))
  dyn = [i for i, x in enumerate(arg_leaves) if is_array(x)]

  def call(var_values, arg_values):
    by_path = dict(zip(paths, var_values))
    v = map_leaves(lambda p, x: with_value(x, by_path[p]) if p in by_path else x, variables)
    filled = list(arg_leaves)
    for i, x in zip(dyn, arg_values):
      filled[i] = x
    a, kw = jax.tree_util.tree_unflatten(arg_tree, filled)
    return fn(v, *a, **kw)

  values = [leaves[p] for p in paths]
  arg_values = [arg_leaves[i] for i in dyn]
  if compute_dtype is None:
    compute_dtype = next((jax.numpy.result_type(x) for x in arg_values
                          if jax.numpy.issubdtype(jax.numpy.result_type(x), jax.numpy.floating)), None)
  compute = [jax.numpy.dtype(compute_dtype or x.dtype) if isinstance(x, QuantizedArray) else None
             for x in values]
  spec = lambda x, dtype: jax.ShapeDtypeStruct(np.shape(x), dtype or jax.numpy.result_type(x))
  closed, out_shape = jax.make_jaxpr(call, return_shape=True)(
      [spec(x, d) for x, d in zip(values, compute)], [spec(x, None) for x in arg_values])
  return Traced(closed, paths, values, arg_values, jax.tree_util.tree_structure(out_shape), compute)
