"""Generic walking of any pytree by `jax.tree_util` key paths (no LoRA knowledge here).

A leaf's identity is its key path; its *name* renders the path with '/' between components
(dict keys and attribute names as themselves, sequence indices as numbers), and is used only for
regex matching, messages and file keys. Two leaves of one tree whose names coincide (a dict key
that contains '/') are refused with an error naming both key paths.

Boxes are transparent: an NNX `Variable` (e.g. `nnx.Param`) or a linen metadata box
(`nn.Partitioned`) is treated as a leaf holding its value and adds no path component, so the NNX
kernel of `model.l1` is `l1/kernel`. Any container works: dicts, `FrozenDict`, NNX `State`, lists,
tuples, `NamedTuple`s, registered dataclasses, equinox Modules, any registered pytree node.
A node may give a child a `SuffixKey`, which appends to its own name instead of adding a component.
A node whose class sets `__lora_jax_leaf__ = True` (a quantized kernel: codes and scales under
one name) is one leaf here, while `jax.tree_util` still sees its arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta

PyTree = Any
KeyPath = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class SuffixKey:
  """A pytree key that renders by appending `suffix` to its parent's name (`W` -> `W_lora_a`)."""
  suffix: str

  def __str__(self) -> str:
    return self.suffix


def is_box(x: Any) -> bool:
  """True for NNX `Variable`s and linen metadata boxes (`nn.Partitioned`, ...)."""
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

  `axis_names` (one per axis of `value`) become a `nn.Partitioned` box's names, so a new leaf
  beside a partitioned kernel carries sharding names matching its own shape. NNX boxes are made
  fresh (the kernel's sharding metadata describes the kernel's shape, not the new leaf's).
  """
  if isinstance(box, nnx.Variable):
    return type(box)(value)
  if isinstance(box, meta.Partitioned):
    names = axis_names if axis_names is not None else (None,) * jnp.ndim(value)
    return box.replace(value=value, names=names)
  if isinstance(box, meta.AxisMetadata):
    return box.replace_boxed(value)
  return value


def fresh(x: Any) -> Any:
  """A new NNX `Variable` holding the same value (other leaves as they are). NNX Variables are
  mutable and `nnx.split` hands out the model's own; a tree we return must not share them, or an
  `nnx.update(model, ...)` would silently rewrite our tree (and the caller's state) as well."""
  return x.replace(x.get_value()) if isinstance(x, nnx.Variable) else x


def key_name(key: Any) -> str:
  """One path component as text: a dict key, an attribute name, or a sequence index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def render(path: KeyPath) -> str:
  """The '/'-joined name of a key path (`SuffixKey`s append to the previous component)."""
  out = ""
  for k in path:
    if isinstance(k, SuffixKey):
      out += k.suffix
    else:
      out = f"{out}/{key_name(k)}" if out else key_name(k)
  return out


def children(node: Any) -> list[tuple[Any, Any]] | None:
  """`[(key, child)]` of a pytree node one level down, or None for a leaf (a box is a leaf)."""
  if is_box(node) or node is None or getattr(type(node), "__lora_jax_leaf__", False):
    return None if node is not None else []  # a box or a quantized kernel is one leaf
  if isinstance(node, Mapping):
    return [(jax.tree_util.DictKey(k), v) for k, v in node.items()]
  flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
  if len(flat) == 1 and flat[0][0] == () and flat[0][1] is node:
    return None
  return [(path[0], child) for path, child in flat]


def rebuild(node: Any, items: list[tuple[Any, Any]]) -> Any:
  """`node` with its children replaced by `items` (from `children`, possibly edited: a Mapping
  may gain or lose entries; any other node must keep its arity)."""
  if node is None:
    return None
  if isinstance(node, Mapping):
    d = {k.key: v for k, v in items}
    return d if type(node) is dict else cast(Any, type(node))(d)  # FrozenDict, nnx.State, ...
  treedef = jax.tree_util.tree_structure(node, is_leaf=lambda x: x is not node)
  return jax.tree_util.tree_unflatten(treedef, [v for _, v in items])


def flatten_with_keys(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None
                      ) -> list[tuple[KeyPath, str, Any]]:
  """`[(key path, name, leaf)]` in tree order, boxes kept (see `unbox`).

  Raises:
    ValueError: two leaves whose names coincide, naming both key paths.
  """
  out: list[tuple[KeyPath, str, Any]] = []
  seen: dict[str, KeyPath] = {}

  def walk(node, path):
    kids = None if is_leaf is not None and is_leaf(node) else children(node)
    if kids is None:
      name = render(path)
      if name in seen:
        raise ValueError(f"two leaves render to the same path {name!r}: "
                         f"{jax.tree_util.keystr(seen[name])} and {jax.tree_util.keystr(path)} "
                         "(a key containing '/'?); rename one so paths stay unique")
      seen[name] = path
      out.append((path, name, node))
    else:
      for k, v in kids:
        walk(v, (*path, k))

  walk(tree, ())
  return out


def flatten(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
  """`{name: leaf}` for every leaf, boxes kept, in tree order (see `flatten_with_keys`)."""
  return {name: leaf for _, name, leaf in flatten_with_keys(tree, is_leaf)}


def map_leaves(fn: Callable[[str, Any], Any], tree: PyTree,
               siblings: Callable[[str, Any, Any], dict] | None = None,
               keep: Callable[[str, Any, Any], bool] = lambda path, key, value: True,
               is_leaf: Callable[[Any], bool] | None = None) -> PyTree:
  """Rebuild `tree` (same container types) with leaves `fn(name, leaf)`; NNX `Variable` leaves
  of the result are new objects (never the input's, which a later `nnx.update` could mutate).

  Within Mappings, `keep(name, key, value)` drops entries and `siblings(name, key, leaf)` returns
  extra `{key: leaf}` entries inserted right after an entry. Leaves are passed boxed; `is_leaf`
  marks extra nodes to hand to `fn` whole.
  """

  def walk(node, path):
    kids = None if is_leaf is not None and is_leaf(node) else children(node)
    if kids is None:
      return fresh(fn(render(path), node))
    items = []
    mapping = isinstance(node, Mapping)
    for k, v in kids:
      sub = (*path, k)
      name = render(sub)
      if mapping and not keep(name, k.key, v):
        continue
      items.append((k, walk(v, sub)))
      if mapping and siblings is not None:
        items.extend((jax.tree_util.DictKey(sk), fresh(sv))
                     for sk, sv in siblings(name, k.key, v).items())
    return rebuild(node, items)

  return walk(tree, ())
