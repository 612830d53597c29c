"""Tracing a user function to a jaxpr with every array leaf of its variables as an input."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ..tree import flatten, map_leaves, unbox, with_value
from .core import Context, eval_jaxpr, materialize
from .tracked import Tracked


def is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


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

  def index(self, path: str) -> int:
    return self.paths.index(path)

  def run(self, sites: Sequence[Any], factors: dict[str, tuple[Any, Any]], ctx: Context) -> Any:
    """Evaluate the traced function with each site's kernel tracked with its `(A, B)`; returns
    the function's output pytree (a kernel returned as-is comes back as `W + ΔW`)."""
    invals = list(self.values)
    for i, s in enumerate(sites):
      j = self.index(s.path)
      invals[j] = Tracked.from_kernel(invals[j], *factors[s.path], s.layout, i, s.scale)
    outs = eval_jaxpr(self.jaxpr.jaxpr, self.jaxpr.consts, invals + list(self.arg_values), ctx)
    outs = [materialize(o, ctx, "returned") for o in outs]
    return jax.tree_util.tree_unflatten(self.out_tree, outs)


def trace(fn: Callable, variables: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Traced:
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
  spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x))
  closed, out_shape = jax.make_jaxpr(call, return_shape=True)(
      [spec(x) for x in values], [spec(x) for x in arg_values])
  return Traced(closed, paths, values, arg_values, jax.tree_util.tree_structure(out_shape))
