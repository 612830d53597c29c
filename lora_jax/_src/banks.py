"""Many adapters on one base: adapter banks (`stack_adapters`, `select_adapter`) and adapter
algebra (`weighted_adapter`, PEFT's `add_weighted_adapter` over pytrees).

An *adapter* here is the pair `(tree, plan)` that `lj.load_adapter` and `lj.import_peft` return
(or `(lj.split(tree)[0], plan)`): the factors `A: (*stack, *in, r)`, `B: (*stack, r, *out)` of
every site, and the plan that gives each site its rank, alpha and `scale`.

A bank holds N adapters for the same sites (same paths, shapes, layouts; ranks and alphas may
differ) as data: per site `A: (N, *stack, *in, r_max)`, `B: (N, *stack, r_max, *out)` zero-padded
to the site's largest rank, and the per-adapter `scale: (N,)` and `rank: (N,)` as arrays. Only
what every adapter of a bank shares is static (the bank's plan at rank `r_max`, the names, the
tree structure), so banks of equal shapes are interchangeable jit arguments.

Zero padding is exact: the padded columns of `A` meet the padded rows of `B` and add `0·0` to
every entry of `A·B`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from .adapters import LORA_A, LORA_B, is_lora_name, split
from .config import LoraConfig
from .layout import Role, factor_dtype
from .sites import Plan
from .tree import PyTree, flatten, unbox

Adapter = tuple[PyTree, Plan]
"""`(tree, plan)`: a LoRA tree (or only its LoRA leaves, `lj.split(tree)[0]`) and its plan."""

COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties",
                     "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
_FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_WITHOUT_DARE = {"dare_linear": "linear", "dare_ties": "ties", "dare_linear_svd": "svd",
                 "dare_ties_svd": "ties_svd"}
_DENSITY_TYPES = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                  "magnitude_prune", "magnitude_prune_svd")


@jax.tree_util.register_pytree_with_keys_class
class AdapterBank:
  """N adapters for the same sites, stacked on a leading axis and zero-padded to `r_max`.

  Children (arrays, per site path):
    lora_a: `{path: (N, *stack, *in, r_max)}`.
    lora_b: `{path: (N, *stack, r_max, *out)}`.
    scale: `{path: (N,)}`, adapter `i`'s `alpha/r` (or `alpha/sqrt(r)`) at that site, in the
      factors' dtype.
    rank: `{path: (N,) int32}`, adapter `i`'s rank at that site (columns beyond it are zero).

  Static (the pytree's aux data): `names` (one string per adapter), `plan` (the sites at rank
  `r_max` with `scale = 1`: the plan of `select_adapter`'s default output) and the structure of
  one adapter's tree. Neither ranks nor scales are static, so every bank with the same sites,
  `r_max`, N and names is one jit signature.
  """

  def __init__(self, lora_a: dict[str, Any], lora_b: dict[str, Any], scale: dict[str, Any],
               rank: dict[str, Any], names: tuple[str, ...], plan: Plan,
               treedef: Any, leaf_names: tuple[str, ...]):
    self.lora_a, self.lora_b, self.scale, self.rank = lora_a, lora_b, scale, rank
    self.names, self.plan, self.treedef, self.leaf_names = names, plan, treedef, leaf_names

  def tree_flatten_with_keys(self):
    attr = jax.tree_util.GetAttrKey
    kids = tuple((attr(k), getattr(self, k)) for k in ("lora_a", "lora_b", "scale", "rank"))
    return kids, (self.names, self.plan, self.treedef, self.leaf_names)

  @classmethod
  def tree_unflatten(cls, aux, kids):
    return cls(*kids, *aux)

  def __len__(self) -> int:
    return len(self.names)

  def index(self, which: int | str) -> int:
    """The position of adapter `which` (a name, or an int in `[-N, N)`).

    Raises:
      KeyError: an unknown name.
      IndexError: an int out of range.
    """
    if isinstance(which, str):
      if which not in self.names:
        raise KeyError(f"select_adapter: no adapter named {which!r}; the bank has {list(self.names)}")
      return self.names.index(which)
    if not -len(self) <= which < len(self):
      raise IndexError(f"select_adapter: adapter {which} out of range for a bank of {len(self)}")
    return which % len(self)

  def __repr__(self) -> str:
    sites = ", ".join(f"{p}: A{tuple(np.shape(a))}" for p, a in self.lora_a.items())
    return f"AdapterBank(names={list(self.names)}, {sites})"


def _unit_plan(plan: Plan, ranks: Mapping[str, int]) -> Plan:
  """`plan`'s sites at rank `ranks[path]` with `alpha = rank`, standard scaling: `scale = 1`,
  and a config that says so (one exact target per site), so the plan checkpoints and exports."""
  exact = {s.path: re.escape(s.path) for s in plan.sites}
  first = ranks[plan.sites[0].path]
  config = LoraConfig(
      targets=tuple(exact.values()), rank=first, alpha=first, scaling="standard",
      rank_pattern={exact[p]: r for p, r in ranks.items() if r != first},
      alpha_pattern={exact[p]: r for p, r in ranks.items() if r != first},
      dropout=plan.config.dropout, init=plan.config.init,
      layout_pattern=dict(plan.config.layout_pattern))
  sites = tuple(dataclasses.replace(s, rank=ranks[s.path], alpha=float(ranks[s.path]), scale=1.0)
                for s in plan.sites)
  return Plan(sites, config, plan.base_params)


def _same_sites(first: Plan, other: Plan, who: str, what: str) -> None:
  """Raise unless `other` adapts the same kernels (paths, shapes, layouts) as `first`."""
  if first.paths != other.paths:
    raise ValueError(f"{who}: {what} adapts {list(other.paths)}, but the first adapts "
                     f"{list(first.paths)}; all adapters must be for the same sites")
  for s, t in zip(first.sites, other.sites):
    if (s.shape, s.layout) != (t.shape, t.layout):
      raise ValueError(f"{who}: {s.path}: {what} has kernel shape {t.shape} with layout "
                       f"{t.layout.to_text()}, the first {s.shape} with {s.layout.to_text()}")


def _factors(tree: PyTree, plan: Plan, who: str) -> dict[str, tuple[Any, Any]]:
  """`{path: (A, B)}` of `tree` (unboxed), checked against `plan`'s factor shapes."""
  leaves = {p: unbox(x) for p, x in flatten(tree).items() if is_lora_name(p)}
  expected = {s.path + f for s in plan.sites for f in (LORA_A, LORA_B)}
  stray = [p for p in leaves if p not in expected]
  if stray:
    raise ValueError(f"{who}: {stray[0]}: LoRA leaf not in its plan (the plan adapts "
                     f"{list(plan.paths)})")
  out = {}
  for s in plan.sites:
    for p, want in ((s.path + LORA_A, s.a_shape), (s.path + LORA_B, s.b_shape)):
      if p not in leaves:
        raise ValueError(f"{who}: {p}: missing from the adapter tree")
      if tuple(np.shape(leaves[p])) != tuple(want):
        raise ValueError(f"{who}: {p}: shape {tuple(np.shape(leaves[p]))} does not match its "
                         f"plan's {tuple(want)}")
    out[s.path] = (leaves[s.path + LORA_A], leaves[s.path + LORA_B])
  return out


def _template(tree: PyTree) -> tuple[Any, tuple[str, ...]]:
  """The jax treedef of `tree`'s LoRA-only part and each of its leaves' names, in leaf order."""
  only = split(tree)[0]
  leaves, treedef = jax.tree_util.tree_flatten(only)
  # jax orders dict keys by sorting, our names follow insertion order: number jax's leaves and
  # read the numbers back by name.
  numbered = jax.tree_util.tree_unflatten(treedef, list(range(len(leaves))))
  order = {int(unbox(x)): p for p, x in flatten(numbered).items()}
  return treedef, tuple(order[j] for j in range(len(leaves)))


def _pad_rank(x: Any, axis: int, rank: int) -> Any:
  """`x` zero-padded (or cut) along `axis` to size `rank`."""
  have = x.shape[axis]
  if have >= rank:
    return jax.lax.slice_in_dim(x, 0, rank, axis=axis)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, rank - have)
  return jnp.pad(x, pad)


def stack_adapters(adapters: Sequence[Adapter], names: Sequence[str] | None = None, *,
                   pad_to: int | None = None) -> AdapterBank:
  """Stack N adapters for the same sites into one `AdapterBank`.

  Per site, with `r_max = max(r_1, ..., r_N, pad_to)`:
  `lora_a[path] = stack_i pad(A_i): (N, *stack, *in, r_max)`,
  `lora_b[path] = stack_i pad(B_i): (N, *stack, r_max, *out)` (zeros beyond `r_i`), and
  `scale[path] = (s_1, ..., s_N)`, `rank[path] = (r_1, ..., r_N)` as arrays. Adapter `i`'s update
  stays `ΔW_i = s_i · A_i·B_i` exactly: padding adds `0·0` terms.

  Args:
    adapters: `[(tree, plan), ...]` as `lj.load_adapter` / `lj.import_peft` return them (or
      `(lj.split(tree)[0], plan)`); same site paths, kernel shapes and layouts in every plan.
    names: one distinct string per adapter; default `"0", "1", ...`.
    pad_to: pad every site to at least this rank (at most its `min(fan_in, fan_out)`, the
      largest rank `lj.plan` allows), so adapters of rank up to `pad_to` can later take a slot of
      the bank without changing its shapes.

  Returns:
    The bank. Its `plan` is the first adapter's plan at rank `r_max` with `scale = 1`.

  Raises:
    ValueError: no adapters, names that are not distinct strings (or not one per adapter), plans
      for different sites (naming the path), a tree whose LoRA leaves do not match its plan
      (naming the leaf), or `pad_to` < 1.
  """
  who = "stack_adapters"
  if not adapters:
    raise ValueError(f"{who}: no adapters given")
  names = tuple(str(i) for i in range(len(adapters))) if names is None else tuple(names)
  if (len(names) != len(adapters) or len(set(names)) != len(names)
      or not all(isinstance(n, str) for n in names)):
    raise ValueError(f"{who}: names must be {len(adapters)} distinct strings (one per adapter), "
                     f"got {list(names)}")
  if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1):
    raise ValueError(f"{who}: pad_to must be a positive int, got {pad_to!r}")
  plans = [plan for _, plan in adapters]
  for k, plan in enumerate(plans):
    if not isinstance(plan, Plan):
      raise TypeError(f"{who}: adapter {k} ({names[k]!r}) must be a (tree, plan) pair, got a "
                      f"{type(plan).__name__} where the plan goes")
    _same_sites(plans[0], plan, who, f"adapter {k} ({names[k]!r})")
  factors = [_factors(tree, plan, f"{who}: adapter {k} ({names[k]!r})")
             for k, (tree, plan) in enumerate(adapters)]
  treedef, leaf_names = _template(adapters[0][0])
  r_max = {s.path: max([p.site(s.path).rank for p in plans] + [min(pad_to or 1, s.fan_in, s.fan_out)])
           for s in plans[0].sites}
  bank_plan = _unit_plan(plans[0], r_max)
  lora_a, lora_b = _stack(factors, bank_plan)
  scale = {s.path: jnp.asarray([p.site(s.path).scale for p in plans], lora_a[s.path].dtype)
           for s in plans[0].sites}
  # Ranks as host numpy arrays: they stay concrete when a bank is built inside a traced function.
  rank = {s.path: np.asarray([p.site(s.path).rank for p in plans], np.int32) for s in plans[0].sites}
  return AdapterBank(lora_a, lora_b, scale, rank, names, bank_plan, treedef, leaf_names)


@functools.partial(jax.jit, static_argnums=1)
def _stack(factors: list[dict[str, tuple[Any, Any]]], plan: Plan
           ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Per site, the adapters' `A`s and `B`s padded to `plan`'s rank and stacked (one program)."""
  lora_a, lora_b = {}, {}
  for s in plan.sites:
    dtype = factor_dtype(jnp.result_type(*[x for f in factors for x in f[s.path]]))
    lora_a[s.path] = jnp.stack([_pad_rank(f[s.path][0].astype(dtype), -1, s.rank) for f in factors])
    n_stack = len(s.layout.stack_axes)
    lora_b[s.path] = jnp.stack([_pad_rank(f[s.path][1].astype(dtype), n_stack, s.rank)
                                for f in factors])
  return lora_a, lora_b


def _tree(bank: AdapterBank, factors: Mapping[str, tuple[Any, Any]]) -> PyTree:
  """An adapter tree shaped like the bank's adapters, holding `factors` `{path: (A, B)}`."""
  by_name = {p + suffix: f for p, (a, b) in factors.items() for suffix, f in ((LORA_A, a), (LORA_B, b))}
  return jax.tree_util.tree_unflatten(bank.treedef, [by_name[n] for n in bank.leaf_names])


def select_adapter(bank: AdapterBank, i: int | str | jax.Array, plan: Plan | None = None
                   ) -> Adapter:
  """Adapter `i` of `bank` as a `(tree, plan)` pair that applies exactly as the original.

  A plan's `scale` is static while a bank's scales are data, so the adapter's own scale is folded
  into `B`: with `s_p` the plan's scale at a site, the returned factors are `A_i` and
  `B_i · (s_i / s_p)` (the ratio computed in the factors' dtype), zero-padded or cut to the plan's
  rank. Then `s_p · A·B' = s_i · A_i·B_i`: exact up to one rounding of `B`, and bit-exact when
  `s_p = s_i` (the ratio is exactly 1), e.g. with the adapter's own plan.

  - `plan=None` (default): the bank's plan, at rank `r_max` with `scale = 1` (so `B' = s_i·B_i`).
    One plan for every `i`: `i` may be a traced int and a jitted function of `(bank, i)` compiles
    once for all adapters and all banks of the same shapes. For serving and merging; to keep
    training an adapter, select it with its own plan (gradients depend on how `s` is split).
  - `plan` given (e.g. the adapter's own, from `lj.load_adapter`): the factors at that plan's
    ranks. Given `i`'s own plan, the result equals the stacked adapter bit for bit.

  Args:
    bank: from `stack_adapters`.
    i: a name, a Python int in `[-N, N)`, or an int array (under `jit`; out-of-range indices are
      clamped by JAX's indexing rules, not checked).
    plan: the plan to express the adapter in: same sites, shapes and layouts as the bank's.

  Returns:
    `(tree, plan)`: the adapter's LoRA leaves (`A: (*stack, *in, r)`, `B: (*stack, r, *out)`) in
    the structure of the stacked adapters' trees (`lj.combine(base, tree)` attaches them), and
    the plan they apply with.

  Raises:
    KeyError / IndexError: an unknown name or an int out of range.
    ValueError: `plan` is for other sites, or (ranks known, i.e. not under `jit`) its rank at a
      site is below adapter `i`'s: cutting nonzero columns would change `ΔW`.
  """
  target = bank.plan if plan is None else plan
  if plan is not None:
    _same_sites(bank.plan, plan, "select_adapter", "the plan")
  if isinstance(i, (int, str)) and not isinstance(i, bool):
    i = bank.index(i)
  for s in target.sites:
    rank = bank.rank[s.path][i]
    if not isinstance(rank, Tracer) and int(rank) > s.rank:
      raise ValueError(f"select_adapter: {s.path}: adapter {i} has rank {int(rank)}, the plan "
                       f"only {s.rank}; pass a plan of rank >= {int(rank)} (or the default)")
  return _tree(bank, _select(bank.lora_a, bank.lora_b, bank.scale, jnp.asarray(i), target)), target


@functools.partial(jax.jit, static_argnums=4)
def _select(lora_a: dict[str, Any], lora_b: dict[str, Any], scale: dict[str, Any], i: jax.Array,
            plan: Plan) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Adapter `i`'s factors at `plan`'s ranks, `s_i / s_p` folded into `B` (one program)."""
  factors = {}
  for s in plan.sites:
    a, b = lora_a[s.path][i], lora_b[s.path][i]
    ratio = scale[s.path][i] / jnp.asarray(s.scale, b.dtype)
    n_stack = len(s.layout.stack_axes)
    factors[s.path] = (_pad_rank(a, -1, s.rank), _pad_rank(b * ratio, n_stack, s.rank))
  return factors


def bank_tree(bank: AdapterBank) -> PyTree:
  """The bank's factors as one adapter tree whose leaves have a leading adapter axis, for
  `lj.unmerged(fn, bank.plan, adapter_ids=ids, scale=bank.scale)(lj.combine(params, tree), x)`.

  Args:
    bank: from `stack_adapters`.

  Returns:
    The LoRA leaves in the structure of the stacked adapters' trees: per site
    `A: (N, *stack, *in, r_max)`, `B: (N, *stack, r_max, *out)` (the bank's arrays themselves, so
    gradients with respect to this tree train all N adapters at once).
  """
  return _tree(bank, {p: (bank.lora_a[p], bank.lora_b[p]) for p in bank.lora_a})


def bank_from_tree(bank: AdapterBank, tree: PyTree) -> AdapterBank:
  """`bank` with its factors replaced by those of `tree`: the inverse of `bank_tree`.

  After training the N adapters at once (gradients with respect to `lj.bank_tree(bank)` in a
  mixed batch), this turns the trained tree back into a bank for `select_adapter`,
  `weighted_adapter` or saving; names, plan, scales and ranks are `bank`'s.

  Args:
    bank: from `stack_adapters`.
    tree: a tree holding (at least) the bank's LoRA leaves, per site `A: (N, *stack, *in, r_max)`
      and `B: (N, *stack, r_max, *out)` (e.g. `lj.combine(params, trained)` or `trained`).

  Returns:
    An `AdapterBank` with `tree`'s factors.

  Raises:
    ValueError: a LoRA leaf of the bank missing from `tree`, a stray LoRA leaf, or a factor
      whose shape is not the bank's (the error names the leaf's path).
  """
  leaves = {p: unbox(x) for p, x in flatten(tree).items() if is_lora_name(p)}
  names = set(bank.leaf_names)
  stray = sorted(set(leaves) - names)
  if stray:
    raise ValueError(f"bank_from_tree: {stray[0]}: LoRA leaf not in the bank (its sites are "
                     f"{sorted(bank.lora_a)})")
  new = {LORA_A: {}, LORA_B: {}}
  for path in bank.lora_a:
    for suffix, old in ((LORA_A, bank.lora_a[path]), (LORA_B, bank.lora_b[path])):
      name = path + suffix
      if name not in leaves:
        raise ValueError(f"bank_from_tree: {name}: missing from the tree")
      if tuple(np.shape(leaves[name])) != tuple(np.shape(old)):
        raise ValueError(f"bank_from_tree: {name}: shape {tuple(np.shape(leaves[name]))}, the bank's "
                         f"is {tuple(np.shape(old))} (N, *stack, ...)")
      new[suffix][path] = leaves[name]
  return AdapterBank(new[LORA_A], new[LORA_B], bank.scale, bank.rank, bank.names, bank.plan,
                     bank.treedef, bank.leaf_names)


def pad_adapter(adapter: Adapter, rank: int) -> tuple[PyTree, Plan, dict[str, jax.Array]]:
  """One adapter in a swappable form: factors zero-padded to `rank` and its scales as data.

  Every adapter of the same sites with rank ≤ `rank` gives the same plan and tree shapes, so
  `lj.unmerged(fn, plan, scale=scale)(lj.combine(params, tree), x)` under `jit` (a forward or a
  train step) does not recompile when another adapter, of any rank ≤ `rank` and any alpha, is
  swapped in. Unlike `select_adapter`, the scale stays outside the factors: training the padded
  adapter follows the same gradients as under its own plan (in its first `r` columns).

  Args:
    adapter: `(tree, plan)` as `lj.load_adapter` / `lj.import_peft` return it.
    rank: the rank to pad to (≥ the adapter's rank at every site; capped per site at
      `min(fan_in, fan_out)`).

  Returns:
    `(tree, plan, scale)`: the LoRA leaves (`A: (*stack, *in, rank)`, `B: (*stack, rank, *out)`),
    the plan at `rank` (its static scales are 1 and unused), and `{path: scalar array}` (the
    adapter's `alpha/r`) for `unmerged`'s `scale=`.

  Raises:
    ValueError: a site of the adapter has rank above `rank`, or what `stack_adapters` raises.
  """
  tree, plan = adapter
  ranks = {s.path: min(rank, s.fan_in, s.fan_out) for s in plan.sites}
  over = [s.path for s in plan.sites if s.rank > ranks[s.path]]
  if over:
    raise ValueError(f"pad_adapter: {over[0]}: rank {plan.site(over[0]).rank} is above {rank}")
  factors = _factors(tree, plan, "pad_adapter")
  treedef, leaf_names = _template(tree)
  leaves, scale = {}, {}
  for s in plan.sites:
    a, b = factors[s.path]
    dtype = factor_dtype(jnp.result_type(a, b))
    leaves[s.path + LORA_A] = _pad_rank(jnp.asarray(a, dtype), -1, ranks[s.path])
    leaves[s.path + LORA_B] = _pad_rank(jnp.asarray(b, dtype), len(s.layout.stack_axes), ranks[s.path])
    scale[s.path] = jnp.asarray(s.scale, dtype)
  padded = jax.tree_util.tree_unflatten(treedef, [leaves[n] for n in leaf_names])
  return padded, _unit_plan(plan, ranks), scale


# ---- adapter algebra -------------------------------------------------------------------------
# Task tensors are handled as `(N, S, M)`: N adapters, S stack slices (one PEFT module each), M
# entries per slice (a factor or ΔW flattened), so top-k, quantiles and SVDs run per slice, as
# PEFT runs them per module.


def _magnitude_prune(t: jax.Array, density: float) -> jax.Array:
  """Keep the `int(density·M)` largest-magnitude entries of each `t[n, s, :]`, zero the rest
  (exactly that many: equal magnitudes are taken in index order)."""
  if density >= 1:
    return t
  k = int(density * t.shape[-1])
  # An entry's place in the descending order, by a double argsort: compiles faster than top_k
  # followed by a scatter of its indices.
  order = jnp.argsort(-jnp.abs(t), axis=-1, stable=True)
  place = jnp.argsort(order, axis=-1)
  return jnp.where(place < k, t, jnp.zeros_like(t))


def _random_prune(t: jax.Array, density: float, uniform: jax.Array | None) -> jax.Array:
  """DARE: keep each entry with probability `density` (where `uniform`, U[0, 1) draws shaped
  like `t`, is below it) and rescale the kept ones by `1/density`."""
  if density >= 1 or uniform is None:
    return t
  return jnp.where(uniform < density, t, jnp.zeros_like(t)) / jnp.asarray(density, t.dtype)


def _combine(t: jax.Array, weights: jax.Array, kind: str, density: float | None,
             majority_sign_method: str, uniform: jax.Array | None) -> jax.Array:
  """Merge task tensors `t: (N, S, M)` with `weights: (N,)` into `(S, M)` (PEFT's merge_utils:
  `kind` is the combination type without its `_svd` suffix)."""
  if kind in ("ties", "magnitude_prune"):
    t = _magnitude_prune(t, 1.0 if density is None else density)
  elif kind.startswith("dare"):
    t = _random_prune(t, 1.0 if density is None else density, uniform)
  weighted = t * weights.astype(t.dtype)[:, None, None]
  if not kind.endswith("ties"):
    return jnp.sum(weighted, axis=0)
  # TIES sign election on the pruned, unweighted tensors: the sign of the sum (or of the count
  # of signs), ties going to +; then the mean over the entries that agree with it.
  sign = jnp.sign(t)
  votes = jnp.sum(t if majority_sign_method == "total" else sign, axis=0)
  agree = sign == jnp.where(votes >= 0, 1, -1).astype(t.dtype)
  kept = jnp.sum(agree, axis=0).astype(t.dtype)
  return jnp.sum(jnp.where(agree, weighted, 0), axis=0) / jnp.maximum(kept, 1)


def _svd_factors(d: jax.Array, rank: int, clamp: float | None) -> tuple[jax.Array, jax.Array]:
  """Rank-`rank` factors of `d: (S, fan_in, fan_out)`: `(A: (S, fan_in, r), B: (S, r, fan_out))`
  with `A·B` the truncated SVD, singular values on `B`, optionally clamped to the `clamp`
  quantile of all entries of both (PEFT, after kohya-ss' svd_merge_lora)."""
  # PEFT decomposes ΔW in torch's (out, in) orientation: do the same, so B = (U·Σ)ᵀ, A = Vhᵀ.
  u, sv, vh = jnp.linalg.svd(jnp.swapaxes(d, -1, -2), full_matrices=False)
  us = u[..., :rank] * sv[..., None, :rank]
  vh = vh[..., :rank, :]
  if clamp is not None:
    flat = jnp.concatenate([us.reshape(us.shape[0], -1), vh.reshape(vh.shape[0], -1)], axis=-1)
    hi = jnp.quantile(flat, clamp, axis=-1)[:, None, None]
    us, vh = jnp.clip(us, -hi, hi), jnp.clip(vh, -hi, hi)
  return jnp.swapaxes(vh, -1, -2), jnp.swapaxes(us, -1, -2)


def _ranks(bank: AdapterBank) -> dict[str, list[int]]:
  """Each site's true ranks per adapter, read from the bank (must be concrete)."""
  if any(isinstance(r, Tracer) for r in bank.rank.values()):
    raise ValueError("weighted_adapter: the bank's ranks are traced (called under jit?); the "
                     "result's ranks are static, so call it with a concrete bank or with "
                     "(tree, plan) pairs")
  return {p: [int(v) for v in np.asarray(r)] for p, r in bank.rank.items()}


def weighted_adapter(adapters: Sequence[Adapter] | AdapterBank, weights: Sequence[float] | Any,
                     combination_type: str = "svd", *, density: float | None = None,
                     majority_sign_method: str = "total", svd_rank: int | None = None,
                     svd_clamp: float | None = None, key: jax.Array | None = None) -> Adapter:
  """One adapter combining N adapters with `weights`, with the meanings of PEFT's
  `LoraModel.add_weighted_adapter` (per site; per stack slice = per PEFT module).

  With `w_i` the weights and `s_i` adapter `i`'s scale at a site:

  - `cat` (exact): `A = [w_1 s_1 A_1 | ... | w_N s_N A_N]`, `B = [B_1; ...; B_N]` along the
    rank axis, so `A·B = Σ w_i s_i A_i·B_i`; rank `Σ r_i` (any ranks).
  - on the factors (all adapters of equal rank at each site, the result has that rank; a rough
    approximation: `A·B` has cross terms): with `c_i = w_i s_i`, `A = op_i(sign(c_i)·sqrt|c_i|,
    A_i)` and `B = op_i(sqrt|c_i|, B_i)`, where `op` is `linear` (`Σ c A_i`), `magnitude_prune`
    (each `A_i` cut to its top `density` fraction by magnitude, then summed), `ties` (cut, then
    per entry the sign elected by the cut, unweighted tensors — their sum (`"total"`) or sign
    count (`"frequency"`) — and the mean of the weighted entries that agree with it),
    `dare_linear` / `dare_ties` (as `linear` / `ties` with a random cut: each entry kept with
    probability `density` and divided by `density`; needs `key`).
  - on `ΔW` (`*_svd` types; `svd` is task arithmetic): `ΔW = op_i(w_i, s_i A_i·B_i)` with `op` as
    above, then the rank-`svd_rank` (default `max r_i`) truncated SVD: `B = (U_r Σ_r)ᵀ`,
    `A = V_r`, optionally both clamped to `±quantile(entries of both, svd_clamp)`. Exact for
    `svd` when `svd_rank >= rank(Σ w_i ΔW_i)`; otherwise the best rank-`svd_rank` approximation.

  Negative weights are allowed. With one adapter every type is `linear` (as in PEFT).
  `density=1` prunes nothing (so `dare_linear` is `linear`, `dare_ties` is `ties`, and so on,
  without a key). The result has `alpha = r` per site with standard scaling (`scale = 1`), like
  PEFT's new adapter config (PEFT keeps the first adapter's `use_rslora`, which makes its new
  scale `sqrt(r)`, not 1).

  Args:
    adapters: `[(tree, plan), ...]` for the same sites (as for `stack_adapters`), or a bank
      (with concrete ranks).
    weights: one number per adapter (a sequence or an `(N,)` array).
    combination_type: one of `COMBINATION_TYPES`; default `"svd"`, as PEFT.
    density: fraction of entries kept, in `[0, 1]`; required by the `ties`, `dare_*` and
      `magnitude_prune*` types.
    majority_sign_method: `"total"` or `"frequency"` (TIES types).
    svd_rank: the `*_svd` types' target rank, at most `min(fan_in, fan_out)` of every site.
    svd_clamp: the `*_svd` types' clamp quantile in `[0, 1]`, or None for no clamp.
    key: PRNG key for the `dare_*` types (one draw of uniforms for all sites and factors).

  Returns:
    `(tree, plan)`: the combined adapter's LoRA leaves in the structure of the first adapter's
    tree (`lj.combine(base, tree)` attaches it) and its plan (scale 1, ranks as above). A `cat`
    rank above `min(fan_in, fan_out)` applies and merges exactly, but `lj.load_adapter` refuses
    such a rank; compress it with `svd` before saving.

  Raises:
    ValueError: an unknown `combination_type` or `majority_sign_method`, a missing `density` or
      one outside `[0, 1]`, a missing `key` for DARE, a weight count other than N, unequal ranks for a
      factor-level type or an `svd_rank` too large (naming the path), `svd_clamp` outside
      `[0, 1]`, or adapters for different sites.
  """
  who = "weighted_adapter"
  bank = adapters if isinstance(adapters, AdapterBank) else stack_adapters(adapters)
  n = len(bank)
  if combination_type not in COMBINATION_TYPES:
    raise ValueError(f"{who}: combination_type must be one of {COMBINATION_TYPES}, got "
                     f"{combination_type!r}")
  if majority_sign_method not in ("total", "frequency"):
    raise ValueError(f"{who}: majority_sign_method must be 'total' or 'frequency', got "
                     f"{majority_sign_method!r}")
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != (n,):
    raise ValueError(f"{who}: weights must hold one number per adapter ({n}), got shape "
                     f"{weights.shape}")
  kind = "linear" if n == 1 else combination_type
  if kind in _DENSITY_TYPES:
    if density is None or isinstance(density, bool) or not 0 <= density <= 1:
      raise ValueError(f"{who}: combination_type={kind!r} needs density in [0, 1], got {density!r}")
    density = float(density)
  if density == 1:  # nothing is dropped: the type without DARE (and no key needed)
    kind = _WITHOUT_DARE.get(kind, kind)
  if kind not in _DENSITY_TYPES:
    density = None
  if kind.startswith("dare") and key is None:
    raise ValueError(f"{who}: combination_type={kind!r} drops entries at random: pass key=")
  if svd_clamp is not None and not 0 <= svd_clamp <= 1:
    raise ValueError(f"{who}: svd_clamp must be a quantile in [0, 1], got {svd_clamp!r}")
  if isinstance(adapters, AdapterBank):
    ranks = _ranks(bank)
  else:
    ranks = {s.path: [p.site(s.path).rank for _, p in adapters] for s in bank.plan.sites}
  new_ranks = {}
  for s in bank.plan.sites:
    if kind == "cat":
      new_ranks[s.path] = sum(ranks[s.path])
    elif kind in _FACTOR_TYPES:
      if len(set(ranks[s.path])) != 1:
        raise ValueError(f"{who}: {s.path}: combination_type={kind!r} needs adapters of one rank "
                         f"per site, got ranks {ranks[s.path]}; use 'cat' or an '*_svd' type")
      new_ranks[s.path] = ranks[s.path][0]
    else:
      new_ranks[s.path] = svd_rank or max(ranks[s.path])
      if new_ranks[s.path] > min(s.fan_in, s.fan_out):
        raise ValueError(f"{who}: {s.path}: svd_rank {new_ranks[s.path]} exceeds min(fan_in="
                         f"{s.fan_in}, fan_out={s.fan_out}) of its {s.shape} kernel")
  static = _Combination(kind, tuple((p, tuple(r)) for p, r in ranks.items()), density,
                        majority_sign_method, svd_clamp)
  new_plan = _unit_plan(bank.plan, new_ranks)
  factors = _weighted(bank.lora_a, bank.lora_b, bank.scale, weights, key, new_plan, static)
  return _tree(bank, factors), new_plan


@dataclasses.dataclass(frozen=True)
class _Combination:
  """The static part of a `weighted_adapter` call: type, input ranks per site and options."""
  kind: str
  ranks: tuple[tuple[str, tuple[int, ...]], ...]
  density: float | None
  majority_sign_method: str
  svd_clamp: float | None


@functools.partial(jax.jit, static_argnums=(5, 6))
def _weighted(lora_a: dict[str, Any], lora_b: dict[str, Any], scale: dict[str, Any],
              weights: jax.Array, key: jax.Array | None, plan: Plan, how: _Combination
              ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """The combined factors `{path: (A, B)}` at `plan`'s ranks (one program for all sites)."""
  kind, ranks = how.kind, dict(how.ranks)
  n = len(weights)
  # DARE's masks come from one draw for everything: one PRNG hash in the program, not one per
  # tensor (each is a long unrolled function that XLA compiles slowly).
  sizes = [n * math.prod(s.layout.sizes(s.shape, Role.STACK)) * (
      s.rank * (s.fan_in + s.fan_out) if kind in _FACTOR_TYPES else s.fan_in * s.fan_out)
      for s in plan.sites]
  uniform = None
  if kind.startswith("dare") and key is not None:
    uniform = jax.random.uniform(key, (sum(sizes),))
  offset = 0

  def draws(shape: tuple[int, ...]) -> jax.Array | None:
    nonlocal offset
    offset += math.prod(shape)
    return None if uniform is None else uniform[offset - math.prod(shape):offset].reshape(shape)

  factors = {}
  for s in plan.sites:
    n_slices, rank = math.prod(s.layout.sizes(s.shape, Role.STACK)), s.rank
    a = lora_a[s.path].reshape(n, n_slices, s.fan_in, -1)
    b = lora_b[s.path].reshape(n, n_slices, -1, s.fan_out)
    site_scale = scale[s.path].astype(jnp.float32)
    if kind == "cat":
      new_a = jnp.concatenate([a[i, ..., :r] * (weights[i] * site_scale[i]).astype(a.dtype)
                               for i, r in enumerate(ranks[s.path])], axis=-1)
      new_b = jnp.concatenate([b[i, :, :r] for i, r in enumerate(ranks[s.path])], axis=-2)
    elif kind in _FACTOR_TYPES:
      # PEFT splits each weight w·s over both factors: sign(w·s)·sqrt|w·s| on A, sqrt|w·s| on B.
      c = weights * site_scale
      root = jnp.sqrt(jnp.abs(c))
      flat_a = a[..., :rank].reshape(n, n_slices, -1)
      flat_b = b[:, :, :rank].reshape(n, n_slices, -1)
      new_a = _combine(flat_a, jnp.where(c >= 0, root, -root), kind, how.density,
                       how.majority_sign_method, draws(flat_a.shape))
      new_b = _combine(flat_b, root, kind, how.density, how.majority_sign_method,
                       draws(flat_b.shape))
    else:
      deltas = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
      deltas = deltas * site_scale.astype(a.dtype)[:, None, None, None]
      flat = deltas.reshape(n, n_slices, -1)
      merged = _combine(flat, weights, kind.removesuffix("_svd"), how.density,
                        how.majority_sign_method, draws(flat.shape))
      new_a, new_b = _svd_factors(merged.reshape(n_slices, s.fan_in, s.fan_out), rank, how.svd_clamp)
    factors[s.path] = (new_a.reshape(s.a_shape), new_b.reshape(s.b_shape))
  return factors
