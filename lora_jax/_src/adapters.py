"""The LoRA tree: the user's variables with each adapted kernel's factors next to it.

Two representations, one naming. In a Mapping (dict, `FrozenDict`, NNX `State`) the factors are
sibling leaves `<name>_lora_a: (*stack, *in, r)` and `<name>_lora_b: (*stack, r, *out)`, boxed
like the kernel. A container that cannot take new keys (list, tuple, `NamedTuple`, registered
dataclass, equinox Module) holds a `LoraWeight(w, lora_a, lora_b)` node in the kernel's place.
Either way the leaves are *named* `<kernel>`, `<kernel>_lora_a`, `<kernel>_lora_b`, so plans,
checkpoints and PEFT key maps do not care which one a tree uses.

A leaf trained in full (`LoraConfig.modules_to_save`, PEFT's wrapper that keeps the original
module and trains a copy) gets a copy `<leaf>_lora_full` the same way (a sibling leaf, or a
`LoraWeight(w, lora_full=...)` node); the function sees the copy in the leaf's place, and being
named as a LoRA leaf it is split, masked, optimised and saved with the factors.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.core import Tracer

from .init import INITIALIZERS
from .layout import Layout, factor_dtype
from .sites import Plan
from .tree import (
  PyTree,
  SuffixKey,
  box_like,
  children,
  flatten,
  fresh,
  key_name,
  map_leaves,
  rebuild,
  unbox,
  with_value,
)

LORA_A, LORA_B, LORA_FULL = "_lora_a", "_lora_b", "_lora_full"


@jax.tree_util.register_pytree_with_keys_class
class LoraWeight:
  """An adapted leaf in a container that cannot take sibling keys: the base `w` with its
  factors `lora_a: (*stack, *in, r)` and `lora_b: (*stack, r, *out)`, or (a leaf trained in
  full, `modules_to_save`) its trained copy `lora_full` of `w`'s shape.

  A pytree node whose children are named `<kernel>`, `<kernel>_lora_a`, `<kernel>_lora_b` (or
  `<kernel>`, `<kernel>_lora_full`), so `jax.tree_util`, optax, `eqx.partition` /
  `eqx.filter_grad` (with `lj.trainable_mask(tree)` as the filter) and every lora_jax function see
  it as the kernel plus its adapter leaves. It is not an array: call the model through
  `lj.unmerged` / `lj.merged`, or on `lj.merge(plan, tree)`.
  """

  def __init__(self, w: Any, lora_a: Any = None, lora_b: Any = None, lora_full: Any = None):
    self.w, self.lora_a, self.lora_b, self.lora_full = w, lora_a, lora_b, lora_full
    self.full = lora_full is not None and lora_a is None

  def tree_flatten_with_keys(self):
    if self.full:
      return ((SuffixKey(""), self.w), (SuffixKey(LORA_FULL), self.lora_full)), True
    return (((SuffixKey(""), self.w), (SuffixKey(LORA_A), self.lora_a),
             (SuffixKey(LORA_B), self.lora_b)), False)

  @classmethod
  def tree_unflatten(cls, full, kids):
    return cls(kids[0], lora_full=kids[1]) if full else cls(*kids)

  def __repr__(self) -> str:
    shape = lambda x: getattr(unbox(x), "shape", x)
    if self.full:
      return f"LoraWeight(w={shape(self.w)}, lora_full={shape(self.lora_full)})"
    return f"LoraWeight(w={shape(self.w)}, lora_a={shape(self.lora_a)}, lora_b={shape(self.lora_b)})"


def is_lora_name(name: str) -> bool:
  """True for the name (or key) of a LoRA leaf (`*_lora_a` / `*_lora_b` / `*_lora_full`)."""
  return isinstance(name, str) and name.endswith((LORA_A, LORA_B, LORA_FULL))


def lora_paths(tree: PyTree) -> list[str]:
  """Names of the LoRA leaves in `tree`, in tree order."""
  return [p for p in flatten(tree) if is_lora_name(p)]


def has_lora(tree: PyTree) -> bool:
  return bool(lora_paths(tree))


def _is_lora_weight(x: Any) -> bool:
  return isinstance(x, LoraWeight)


def strip(tree: PyTree) -> PyTree:
  """The base variables: `tree` with every LoRA leaf removed (`LoraWeight` nodes become their
  `w`). Base arrays are the same objects (bit-exact; never an 'unmerge' by subtraction).

  Args:
    tree: a LoRA tree (or any pytree; one without LoRA leaves comes back rebuilt as it is).

  Returns:
    The variables without adapters, in `tree`'s container types.
  """
  return map_leaves(lambda p, x: fresh(x.w) if isinstance(x, LoraWeight) else x, tree,
                    keep=lambda p, k, v: not is_lora_name(k), is_leaf=_is_lora_weight)


def _only_lora(node: Any, name: str) -> tuple[Any, bool]:
  """`(node with only its LoRA leaves, whether it has any)`: Mapping entries without LoRA leaves
  are dropped, other containers keep their arity with None in place of such children."""
  if isinstance(node, LoraWeight):
    if node.full:
      return LoraWeight(None, lora_full=fresh(node.lora_full)), True
    return LoraWeight(None, fresh(node.lora_a), fresh(node.lora_b)), True
  kids = children(node)
  if kids is None:
    return (fresh(node), True) if is_lora_name(name) else (None, False)
  items, found = [], False
  for k, v in kids:
    sub, has = _only_lora(v, f"{name}/{key_name(k)}" if name else key_name(k))
    found |= has
    if has or not isinstance(node, Mapping):
      items.append((k, sub))
  return rebuild(node, items), found


def split(tree: PyTree) -> tuple[PyTree, PyTree]:
  """`(adapters, base)`: the LoRA leaves (in their containers, nothing else) and the base.

  In Mappings the adapters keep only entries that lead to LoRA leaves; other containers keep
  their shape with None in place of base leaves (as `eqx.partition` does). Differentiate a loss
  with respect to `adapters` alone and no base gradient is ever built.

  Args:
    tree: a LoRA tree.

  Returns:
    `(adapters, base)`, with `lj.combine(base, adapters)` the original tree.
  """
  adapters, _ = _only_lora(tree, "")
  return adapters, strip(tree)


_FIELDS = {LORA_A: "lora_a", LORA_B: "lora_b", LORA_FULL: "lora_full"}


def _insert(base: PyTree, factors: Mapping[str, Mapping[str, Any]], who: str) -> PyTree:
  """`base` with the leaves `{suffix: leaf}` (`_lora_a`/`_lora_b`, or `_lora_full`) put beside
  each kernel named in `factors`: sibling keys in a Mapping, a `LoraWeight` node elsewhere.
  Raises for names that are not kernels of `base`."""
  used: set[str] = set()

  def walk(node, name):
    if name in factors and children(node) is None:  # a kernel in a list / NamedTuple / Module
      used.add(name)
      return LoraWeight(fresh(node), **{_FIELDS[k]: v for k, v in factors[name].items()})
    kids = children(node)
    if kids is None:
      return fresh(node)
    items = []
    for k, v in kids:
      sub = f"{name}/{key_name(k)}" if name else key_name(k)
      if isinstance(node, Mapping) and sub in factors and children(v) is None:
        used.add(sub)
        if not isinstance(k.key, str):
          raise ValueError(f"{who}: {sub}: a kernel under a non-string dict key cannot get "
                           "sibling LoRA leaves; use string keys")
        items += [(k, fresh(v)), *((jax.tree_util.DictKey(k.key + suffix), fresh(x))
                                   for suffix, x in factors[sub].items())]
      else:
        items.append((k, walk(v, sub)))
    return rebuild(node, items)

  out = walk(base, "")
  missing = [p for p in factors if p not in used]
  if missing:
    raise ValueError(f"{who}: {missing[0]}: no kernel leaf of that name in the base "
                     f"(expected a leaf named {missing[0]!r} next to which its adapters go)")
  return out


def combine(base: PyTree, adapters: PyTree) -> PyTree:
  """Inverse of `split`: put the LoRA leaves of `adapters` back next to their kernels in `base`.

  Args:
    base: variables without LoRA leaves (`lj.split(tree)[1]`, `lj.strip(tree)`).
    adapters: only LoRA leaves, by name (`lj.split(tree)[0]`, possibly updated).

  Returns:
    The LoRA tree: sibling leaves in Mappings, `LoraWeight` nodes elsewhere.

  Raises:
    ValueError: `base` still has LoRA leaves (it would keep stale adapters), `adapters` holds a
      non-LoRA leaf, or a LoRA leaf has no kernel in `base`.
  """
  existing = lora_paths(base)
  if existing:
    raise ValueError(f"combine: `base` already carries LoRA leaves (e.g. {existing[0]!r}); pass "
                     "the base from lj.split(tree) or lj.strip(tree)")
  flat = {p: x for p, x in flatten(adapters).items() if x is not None}
  bad = [p for p in flat if not is_lora_name(p)]
  if not flat or bad:
    raise ValueError(f"combine: `adapters` must hold only LoRA leaves (*{LORA_A}/*{LORA_B}/"
                     f"*{LORA_FULL}); found {bad[:3] or 'none at all'}")
  extras: dict[str, dict[str, Any]] = {}
  for p, x in flat.items():
    suffix = next(f for f in _FIELDS if p.endswith(f))
    extras.setdefault(p[:-len(suffix)], {})[suffix] = x
  for k, got in extras.items():
    if set(got) not in ({LORA_A, LORA_B}, {LORA_FULL}):
      want = k + (LORA_B if LORA_A in got else LORA_A)
      raise ValueError(f"combine: adapters have {sorted(k + f for f in got)} but not {want!r}"
                       if LORA_FULL not in got else
                       f"combine: {k}: a leaf trained in full ({LORA_FULL}) has no LoRA factors")
  return _insert(base, {k: extras[k] for k in sorted(extras)}, "combine")


def trainable_mask(tree: PyTree) -> PyTree:
  """Bool pytree shaped like `tree`: True exactly on LoRA leaves.

  Args:
    tree: a LoRA tree.

  Returns:
    `tree` with each leaf replaced by a bool (boxes kept), for `optax.masked`, `optax.multi_transform`
    or as the filter spec of `eqx.partition` / `eqx.filter_grad`.
  """
  return map_leaves(lambda p, x: x if x is None else with_value(x, is_lora_name(p)), tree)


def put_factors(variables: PyTree, factors: Mapping[str, tuple[Layout, Any, Any]], who: str,
                saved: Mapping[str, Any] | None = None) -> PyTree:
  """`variables` with factors `{name: (layout, A, B)}` put beside each named kernel, boxed like
  the kernel; a `nn.Partitioned` kernel's axis names carry over to the matching factor axes
  (`Layout.factor_axes`). `saved` `{name: array}` puts each array beside its leaf as
  `<name>_lora_full` (boxed like it). `who` prefixes error messages.

  Raises:
    ValueError: `variables` already carries LoRA leaves, or a name is not a kernel of it.
  """
  existing = lora_paths(variables)
  if existing:
    raise ValueError(f"{who}: variables already carry LoRA leaves (e.g. {existing[0]!r})")
  leaves = flatten(variables)
  boxed: dict[str, dict[str, Any]] = {}
  for path in [*factors, *(saved or {})]:
    if path not in leaves:
      raise ValueError(f"{who}: {path}: in the plan but not in the variables")
  for path, (layout, a, b) in factors.items():
    leaf = leaves[path]
    names = getattr(leaf, "names", None)
    a_names, b_names = layout.factor_axes(names) if names is not None else (None, None)
    boxed[path] = {LORA_A: box_like(leaf, a, a_names), LORA_B: box_like(leaf, b, b_names)}
  for path, full in (saved or {}).items():
    leaf = leaves[path]
    boxed[path] = {LORA_FULL: box_like(leaf, full, getattr(leaf, "names", None))}
  return _insert(variables, boxed, who)


def attach(plan: Plan, variables: PyTree, key: jax.Array) -> PyTree:
  """Add the factors of every site of `plan` next to its kernel.

  `A: (*stack, *in, r)` is drawn per `plan.config.init` (fan-in = `prod(in)`), `B: (*stack, r,
  *out)` is zero, so `ΔW = scale·A·B = 0` and the model's output is unchanged. Each leaf in
  `plan.saved` (`modules_to_save`) gets a copy `<leaf>_lora_full` (same dtype and sharding). Factors are
  `factor_dtype(W.dtype)` (float32, or float64 for float64 kernels), boxed like their kernel, and
  placed like a sharded kernel (`A` sharded like its stack and in axes, `B` like its stack and out
  axes, the rank axis replicated), created directly in that sharding.

  Args:
    plan: from `lj.plan`.
    variables: the base variables the plan was made on (any pytree).
    key: a PRNG key; site `i` uses `fold_in(key, i)`.

  Returns:
    The LoRA tree (a new tree; base arrays are the same objects).

  Raises:
    ValueError: a site's kernel is missing or has another shape, or `variables` has LoRA leaves.
  """
  leaves = flatten(variables)
  factors = {}
  for i, s in enumerate(plan.sites):
    if s.path not in leaves:
      raise ValueError(f"lj.attach: {s.path}: in the plan but not in the variables")
    w = unbox(leaves[s.path])
    if tuple(jnp.shape(w)) != s.shape:
      raise ValueError(f"lj.attach: {s.path}: kernel shape {tuple(jnp.shape(w))} != plan's {s.shape}")
    dtype = jnp.dtype(factor_dtype(w.dtype))
    a_sharding, b_sharding = factor_shardings(s.layout, w)
    a = _creator(plan.config.init, s.a_shape, s.fan_in, dtype, a_sharding)(jax.random.fold_in(key, i))
    b = _creator("zeros", s.b_shape, 0, dtype, b_sharding)(key)
    kept = plan.config.layers_to_transform
    if kept and s.layout.stack_axes:  # A = B = 0 on the other layers: a fixed point of training
      layers = s.shape[s.layout.stack_axes[0]]
      if kept[-1] >= layers:
        raise ValueError(f"lj.attach: {s.path}: LoraConfig.layers_to_transform {list(kept)} goes "
                         f"past its stack of {layers} layers")
      a = a * jnp.isin(jnp.arange(layers), jnp.asarray(kept)).astype(dtype).reshape(
          (layers,) + (1,) * (a.ndim - 1))
    factors[s.path] = (s.layout, a, b)
  missing = [p for p in plan.saved if p not in leaves]
  if missing:
    raise ValueError(f"lj.attach: {missing[0]}: in the plan's modules_to_save but not in the variables")
  saved = {p: jnp.copy(unbox(leaves[p])) for p in plan.saved}
  return put_factors(variables, factors, "lj.attach", saved)


@functools.lru_cache(maxsize=256)
def _creator(init: str, shape: tuple[int, ...], fan_in: int, dtype: Any, sharding: Any) -> Any:
  """A jitted factor initialiser whose output is created directly in `sharding` (compiled once
  per distinct shape, init, dtype and sharding, so a model's repeated layers share it)."""
  if init == "zeros":
    return jax.jit(lambda key: jnp.zeros(shape, dtype), out_shardings=sharding)
  return jax.jit(lambda key: INITIALIZERS[init](key, shape, fan_in, dtype), out_shardings=sharding)


def factor_shardings(layout: Layout, kernel: Any) -> tuple[Any, Any]:
  """`(A's, B's)` sharding for a kernel: a `NamedSharding` kernel's spec carried over to the
  factor axes (`Layout.factor_axes`, rank axis replicated); None (the default device) otherwise."""
  from jax.sharding import NamedSharding, PartitionSpec
  sharding = getattr(kernel, "sharding", None)
  if isinstance(sharding, NamedSharding) and not isinstance(kernel, Tracer):
    spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
    a_axes, b_axes = layout.factor_axes(spec)
    return (NamedSharding(sharding.mesh, PartitionSpec(*a_axes)),
            NamedSharding(sharding.mesh, PartitionSpec(*b_axes)))
  return None, None


def site_arrays(plan: Plan, tree: PyTree) -> dict[str, tuple[Any, Any, Any]]:
  """`{path: (W, A, B)}` (unboxed) for every site, checking that `tree` matches the plan.

  Raises:
    ValueError: naming the first LoRA leaf not in the plan, or missing / wrongly shaped leaf.
  """
  leaves = flatten(tree)
  expected = {s.path + suffix for s in plan.sites for suffix in (LORA_A, LORA_B)}
  expected |= {p + LORA_FULL for p in plan.saved}
  stray = [p for p in leaves if is_lora_name(p) and p not in expected]
  if stray:
    raise ValueError(f"{stray[0]}: LoRA leaf not in the plan (the plan adapts {list(plan.paths)})")
  out = {}
  for s in plan.sites:
    for p, want in ((s.path, s.shape), (s.path + LORA_A, s.a_shape), (s.path + LORA_B, s.b_shape)):
      if p not in leaves:
        raise ValueError(f"{p}: missing from the tree; did you `lj.attach(plan, variables, key)`?")
      got = tuple(jnp.shape(unbox(leaves[p])))
      if got != tuple(want):
        raise ValueError(f"{p}: shape {got} does not match the plan's {tuple(want)}")
    out[s.path] = tuple(unbox(leaves[p]) for p in (s.path, s.path + LORA_A, s.path + LORA_B))
  return out


def saved_arrays(plan: Plan, tree: PyTree) -> dict[str, Any]:
  """`{path: trained copy}` (unboxed) for every leaf in `plan.saved`, checked against the base.

  Raises:
    ValueError: naming the path, for a missing copy or one whose shape differs from its leaf's.
  """
  leaves = flatten(tree)
  out = {}
  for p in plan.saved:
    if p + LORA_FULL not in leaves:
      raise ValueError(f"{p}{LORA_FULL}: missing from the tree (a modules_to_save leaf of the "
                       "plan); did you `lj.attach(plan, variables, key)`?")
    full, base = unbox(leaves[p + LORA_FULL]), unbox(leaves[p])
    if jnp.shape(full) != jnp.shape(base):
      raise ValueError(f"{p}{LORA_FULL}: shape {jnp.shape(full)} differs from {p}'s {jnp.shape(base)}")
    out[p] = full
  return out


def with_saved(plan: Plan, tree: PyTree) -> PyTree:
  """`strip(tree)` with each `modules_to_save` leaf replaced by its trained copy: the variables
  the function sees (the LoRA factors are applied separately)."""
  full = saved_arrays(plan, tree)
  base = strip(tree)
  if not full:
    return base
  return map_leaves(lambda p, x: with_value(x, full[p]) if p in full else x, base)
