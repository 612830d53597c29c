"""Pure pytree code over the LoRA tree: paths, attach, strip, split, combine, trainable_mask.

A *path* joins dict keys with '/' and writes list/tuple indices as numbers. Boxes are transparent:
an NNX `Variable` (e.g. `nnx.Param`) or a linen metadata box (`nn.Partitioned`) adds no component,
so the NNX kernel of `model.l1` is `l1/kernel` and a partitioned linen kernel is
`params/Dense_0/kernel`. LoRA leaves are siblings of their kernel, named `<name>_lora_a` and
`<name>_lora_b`, and are wrapped in the same kind of box as the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta

from .init import INITIALIZERS

PyTree = Any
LORA_A, LORA_B = "_lora_a", "_lora_b"


def is_lora_key(key: Any) -> bool:
  """True for the name of a LoRA leaf (`*_lora_a` / `*_lora_b`)."""
  return isinstance(key, str) and key.endswith((LORA_A, LORA_B))


def _is_box(x: Any) -> bool:
  return isinstance(x, (nnx.Variable, meta.AxisMetadata))


def unbox(x: Any) -> Any:
  """The value inside a box (NNX Variable / linen AxisMetadata), or `x` itself."""
  if isinstance(x, nnx.Variable):
    return x.get_value()
  if isinstance(x, meta.AxisMetadata):
    return x.unbox(apply_constraint=False) if isinstance(x, meta.Partitioned) else x.unbox()
  return x


def with_value(box: Any, value: Any) -> Any:
  """`box` with its value replaced and its metadata kept (`value` itself if `box` is no box)."""
  if isinstance(box, nnx.Variable):
    return box.replace(value)
  if isinstance(box, meta.AxisMetadata):
    return box.replace_boxed(value)
  return value


def box_like(box: Any, value: Any, axis_names: tuple | None = None) -> Any:
  """Wrap a new leaf `value` in the same kind of box as `box` (no box if `box` is a plain leaf).

  `axis_names` (one per axis of `value`) become a `nn.Partitioned` box's names, so a LoRA leaf of
  a partitioned kernel carries sharding names matching its own shape. NNX boxes are made fresh
  (the kernel's sharding metadata describes the kernel's shape, not the adapter's).
  """
  if isinstance(box, nnx.Variable):
    return type(box)(value)
  if isinstance(box, meta.Partitioned):
    names = axis_names if axis_names is not None else (None,) * jnp.ndim(value)
    return box.replace(value=value, names=names)
  if isinstance(box, meta.AxisMetadata):
    return box.replace_boxed(value)
  return value


def _fresh(x: Any) -> Any:
  """A new NNX `Variable` holding the same value (other leaves as they are). NNX Variables are
  mutable and `nnx.split` hands out the model's own; a tree we return must not share them, or an
  `nnx.update(model, ...)` would silently rewrite our tree (and the caller's state) as well."""
  return x.replace(x.get_value()) if isinstance(x, nnx.Variable) else x


def _children(node: Any) -> list[tuple[Any, Any]] | None:
  if isinstance(node, Mapping):
    return list(node.items())
  if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
    return list(enumerate(node))
  return None


def _rebuild(node: Any, items: list[tuple[Any, Any]]) -> Any:
  if isinstance(node, Mapping):
    d = dict(items)
    return d if type(node) is dict else type(node)(d)
  return type(node)(v for _, v in items)


def join(prefix: str, key: Any) -> str:
  return f"{prefix}/{key}" if prefix else str(key)


def flatten(tree: PyTree) -> dict[str, Any]:
  """`{path: leaf}` for every leaf, boxes kept (see `unbox`), in tree order."""
  out: dict[str, Any] = {}

  def walk(node, prefix):
    kids = None if _is_box(node) else _children(node)
    if kids is None:
      out[prefix] = node
    else:
      for k, v in kids:
        walk(v, join(prefix, k))

  walk(tree, "")
  return out


def map_leaves(fn: Callable[[str, Any], Any], tree: PyTree,
               siblings: Callable[[str, Any, Any], dict] | None = None,
               keep: Callable[[str, Any, Any], bool] = lambda path, key, value: True) -> PyTree:
  """Rebuild `tree` (same container types) with leaves `fn(path, leaf)`; NNX `Variable` leaves
  of the result are new objects (never the input's, which a later `nnx.update` could mutate).

  `keep(path, key, value)` drops container entries; `siblings(path, key, leaf)` returns extra
  `{key: leaf}` entries inserted right after an entry. Leaves are passed boxed.
  """

  def walk(node, prefix):
    kids = None if _is_box(node) else _children(node)
    if kids is None:
      return _fresh(fn(prefix, node))
    items = []
    for k, v in kids:
      path = join(prefix, k)
      if not keep(path, k, v):
        continue
      items.append((k, walk(v, path)))
      if siblings is not None:
        items.extend((sk, _fresh(sv)) for sk, sv in siblings(path, k, v).items())
    return _rebuild(node, items)

  return walk(tree, "")


def _leaf_name(path: str) -> str:
  return path.rsplit("/", 1)[-1]


def lora_paths(tree: PyTree) -> list[str]:
  """Paths of the LoRA leaves in `tree`."""
  return [p for p in flatten(tree) if is_lora_key(_leaf_name(p))]


def has_lora(tree: PyTree) -> bool:
  return bool(lora_paths(tree))


def strip(tree: PyTree) -> PyTree:
  """The base variables: `tree` with every LoRA leaf removed. Base arrays are the same objects
  (bit-exact; never an 'unmerge' by subtraction)."""
  return map_leaves(lambda p, x: x, tree, keep=lambda p, k, v: not is_lora_key(k))


def _prune(node: Any) -> Any:
  """Drop containers left empty (used to keep only the adapter part of a tree)."""
  kids = None if _is_box(node) else _children(node)
  if kids is None:
    return node
  items = [(k, _prune(v)) for k, v in kids]
  items = [(k, v) for k, v in items if not (_children(v) is not None and not _is_box(v) and len(v) == 0)]
  return _rebuild(node, items)


def split(tree: PyTree) -> tuple[PyTree, PyTree]:
  """`(adapters, base)`: the LoRA leaves (in their nested containers, nothing else) and the base.

  Differentiate a loss with respect to `adapters` alone and no base gradient is ever built.
  """
  is_container = lambda v: not _is_box(v) and _children(v) is not None
  adapters = map_leaves(lambda p, x: x, tree, keep=lambda p, k, v: is_lora_key(k) or is_container(v))
  return _prune(adapters), strip(tree)


def combine(base: PyTree, adapters: PyTree) -> PyTree:
  """Inverse of `split`: put the LoRA leaves of `adapters` back next to their kernels in `base`."""
  flat = flatten(adapters)
  if not flat or not all(is_lora_key(_leaf_name(p)) for p in flat):
    bad = [p for p in flat if not is_lora_key(_leaf_name(p))]
    raise ValueError(f"combine: `adapters` must hold only LoRA leaves (*{LORA_A}/*{LORA_B}); "
                     f"found {bad[:3] or 'none at all'}")
  used: set[str] = set()

  def siblings(path, key, leaf):
    out = {}
    for suffix in (LORA_A, LORA_B):
      p = path + suffix
      if p in flat:
        out[str(key) + suffix] = flat[p]
        used.add(p)
    return out

  out = map_leaves(lambda p, x: x, base, siblings=siblings)
  missing = sorted(set(flat) - used)
  if missing:
    raise ValueError(f"combine: no kernel in `base` for adapter leaf {missing[0]!r} "
                     f"(expected a sibling leaf {missing[0].rsplit('_lora_', 1)[0]!r})")
  return out


def trainable_mask(tree: PyTree) -> PyTree:
  """Bool pytree shaped like `tree`: True exactly on LoRA leaves (for `optax.masked` & co.)."""
  return map_leaves(lambda p, x: with_value(x, is_lora_key(_leaf_name(p))), tree)


def attach(plan: Any, variables: PyTree, key: jax.Array) -> PyTree:
  """Add `<name>_lora_a: (*stack, *in, r)` (random, per `plan.config.init`) and
  `<name>_lora_b: (*stack, r, *out)` (zeros) next to every kernel in `plan`.

  The factors are float32 (float64 for float64 kernels) whatever the kernel's dtype, and boxed
  like their kernel. Since `B = 0`, the model's output is unchanged. Returns a new tree.
  """
  leaves = flatten(variables)
  init = INITIALIZERS[plan.config.init]
  sites = {}
  for i, s in enumerate(plan.sites):
    if s.path not in leaves:
      raise ValueError(f"lj.attach: {s.path}: in the plan but not in the variables")
    w = unbox(leaves[s.path])
    if tuple(w.shape) != s.shape:
      raise ValueError(f"lj.attach: {s.path}: kernel shape {tuple(w.shape)} != plan's {s.shape}")
    dtype = jnp.promote_types(w.dtype, jnp.float32)
    a = init(jax.random.fold_in(key, i), s.a_shape, s.fan_in, dtype)
    b = jnp.zeros(s.b_shape, dtype)
    sites[s.path] = (s.layout, a, b)

  return put_factors(variables, sites, "lj.attach")


def put_factors(variables: PyTree, factors: Mapping[str, tuple[Any, Any, Any]], who: str) -> PyTree:
  """`variables` with `<name>_lora_a` / `<name>_lora_b` inserted after each kernel in `factors`
  (`{path: (layout, A, B)}`), boxed like the kernel; a `nn.Partitioned` kernel's axis names carry
  over to the matching factor axes (`Layout.factor_axes`). `who` prefixes error messages."""
  existing = lora_paths(variables)
  if existing:
    raise ValueError(f"{who}: variables already carry LoRA leaves (e.g. {existing[0]!r})")

  def siblings(path, key, leaf):
    if path not in factors:
      return {}
    if not isinstance(key, str):
      raise ValueError(f"{who}: {path}: the kernel sits in a list/tuple; its LoRA leaves need "
                       "a dict (or NNX State) parent to sit beside it")
    layout, a, b = factors[path]
    names = getattr(leaf, "names", None)
    a_names, b_names = layout.factor_axes(names) if names is not None else (None, None)
    return {f"{key}{LORA_A}": box_like(leaf, a, a_names), f"{key}{LORA_B}": box_like(leaf, b, b_names)}

  return map_leaves(lambda p, x: x, variables, siblings=siblings)
