"""`lj.plan`: resolve a `LoraConfig` against one model — every adapted kernel (a `Site`) with its
shape, dtype, layout, rank, alpha, scale and how the function uses it.

Built by tracing the function abstractly (`jax.make_jaxpr` / `jax.eval_shape`: no FLOPs). Static
and hashable (usable as a `jit` static argument), JSON round-trip, printable as a table.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .adapters import lora_paths
from .config import ALL_LINEAR, LoraConfig, module_of, names_module
from .interpret import Apply, Traced, is_array, trace
from .layout import Layout, Role
from .sites import Plan, Site, Use
from .tree import flatten, unbox


def _closest(pattern: str, paths: Sequence[str], n: int = 5) -> list[str]:
  return difflib.get_close_matches(pattern, paths, n=n, cutoff=0.0)


def _named_kernels(config: LoraConfig, arrays: dict[str, Any], traced: Traced | None) -> set[str]:
  """The kernels of the modules a `target_modules` list names: their leaves with >= 2 axes that
  the function uses as weights (a contraction, lookup or conv gives them in and out axes; a
  scanned stack's `(L, F)` bias has 2 axes but no such use), or without `apply_fn` that are not
  named `bias`. Every name must name a module that has one."""
  if not isinstance(config.target_modules, tuple):
    return set()
  modules = sorted({module_of(p) for p in arrays})
  out = set()
  for i, name in enumerate(config.target_modules):
    hits = [p for p in arrays if names_module(name, module_of(p))]
    if not hits:
      raise ValueError(f"LoraConfig.target_modules[{i}]: {name!r} names no module (a module path "
                       f"equal to it or ending in '/{name}'). Closest modules: "
                       f"{_closest(name, modules)}")
    kernels = [p for p in hits if arrays[p].ndim >= 2 and (traced or not p.endswith("/bias"))]
    if traced is not None and kernels:
      found = traced.infer(kernels)
      kernels = [p for i, p in enumerate(kernels) if found[i]]
    if not kernels:
      found = ", ".join(f"{p} {tuple(arrays[p].shape)}" for p in hits[:3])
      raise ValueError(f"LoraConfig.target_modules[{i}]: {name!r} names modules with no kernel "
                       f"(a leaf with at least an in and an out axis), only {found}")
    out.update(kernels)
  return out


def _all_linear(config: LoraConfig, arrays: dict[str, Any], traced: Traced | None) -> set[str]:
  """PEFT's `"all-linear"`: kernels whose every use is a `dot_general`, less the output head (the
  kernel of the function's last weight use, which PEFT finds as `lm_head` or a classifier)."""
  if traced is None:
    raise ValueError("LoraConfig.target_modules='all-linear' needs `apply_fn=` (and `args=`) in "
                     "lj.plan: which kernels are used as dense layers is read off the function")
  candidates = [p for p, x in arrays.items() if x.ndim >= 2]
  order: list[int] = []
  found = traced.infer(candidates, order)
  linear = {i for i, uses in found.items() if uses and all(u[0] == "dot_general" for u in uses)}
  if order and order[-1] in linear:
    linear.discard(order[-1])
  return {candidates[i] for i in linear}


def _select(config: LoraConfig, arrays: dict[str, Any], traced: Traced | None) -> list[str]:
  paths = list(arrays)
  for pattern in config.targets:
    if not any(re.fullmatch(pattern, p) for p in paths):
      raise ValueError(f"LoraConfig.targets: {pattern!r} matches no variable path "
                       f"(fullmatch). Closest paths: {_closest(pattern, paths)}")
  for i, name in enumerate(config.modules_to_save):
    if not any(names_module(name, m) for p in paths for m in _ancestors(p)):
      raise ValueError(f"LoraConfig.modules_to_save[{i}]: {name!r} names no module. Closest "
                       f"modules: {_closest(name, sorted({module_of(p) for p in paths}))}")
  named = _named_kernels(config, arrays, traced)
  if config.target_modules == ALL_LINEAR:
    named |= _all_linear(config, arrays, traced)
  excluded = lambda p: config.saves(p) or any(re.fullmatch(e, p) for e in config.exclude)
  selected = [p for p in paths
              if not excluded(p) and (p in named or any(re.fullmatch(t, p) for t in config.targets))]
  if not selected:
    raise ValueError(f"LoraConfig: every path matched by targets {list(config.targets)} / "
                     f"target_modules {config.target_modules!r} is excluded by "
                     f"{list(config.exclude)} or modules_to_save {list(config.modules_to_save)}")
  for field, pairs in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
    for pattern, _ in pairs:
      if not any(re.fullmatch(pattern, p) for p in selected):
        raise ValueError(f"LoraConfig.{field}: {pattern!r} matches no selected kernel. "
                         f"Selected: {_closest(pattern, selected)}")
  return selected


def _ancestors(path: str) -> list[str]:
  parts = path.split("/")
  return ["/".join(parts[:k]) for k in range(1, len(parts))]


def _default_layout(path: str, shape: tuple[int, ...]) -> Layout:
  parent = path.rsplit("/", 2)[-2] if path.count("/") else ""
  if len(shape) == 2:
    return Layout((), (0,), (1,))
  if len(shape) >= 3 and "conv" in parent.lower():  # linen/NNX Conv kernel: (*window, in, out)
    return Layout((), tuple(range(len(shape) - 1)), (len(shape) - 1,))
  raise ValueError(f"{path}: kernel of shape {shape} has no unambiguous layout (multi-axis); pass "
                   f"`apply_fn=` (and `args=`) to lj.plan so the layout is read off how it is used")


def _inferred_layout(path: str, shape: tuple[int, ...], found: list[tuple[str, dict[int, Role]]]
                     ) -> Layout:
  """The layout a kernel's uses give it: an embedding lookup's if any (its `attend` then reads
  the kernel out-side first), else the first use's in program order; a 2-D kernel no use
  decides is `(in, out)`."""
  found = sorted(found, key=lambda u: u[0] != "gather")
  if found:
    return Layout.from_roles(found[0][1])
  if len(shape) == 2:
    return Layout((), (0,), (1,))
  raise ValueError(f"{path}: no use of this {shape} kernel (a dot_general, conv or gather, "
                   "possibly after transposes/reshapes, inside any jit/scan/cond/while/remat) "
                   "determines which of its axes are stack, in and out axes")


def plan(config: LoraConfig, variables: Any, apply_fn: Callable | None = None,
         args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Plan:
  """Resolve `config` against `variables` (any pytree: a linen variables dict, an NNX `State`,
  nested dicts/lists, `NamedTuple`s, registered dataclasses, equinox Modules).

  With `apply_fn` (called as `apply_fn(variables, *args, **kwargs)`), the function is traced
  abstractly (no FLOPs) and the interpreter's driver runs twice over it: its *infer* rules read
  each kernel's layout off its uses — `(D, H, hd)` attention query kernels get `in=(D)
  out=(H,hd)`, scanned stacks `(L, D, F)` get `stack=(L)`, a `(out, in)` weight used as `x @ W.T`
  gets `in=(in) out=(out)` — and its *apply* rules then run under `jax.eval_shape` to record,
  per site, whether `lj.unmerged` keeps `ΔW` factored or materialises it (and why). Without
  `apply_fn`, 2-D kernels are `(in, out)` and conv kernels `(*window, in, out)`. A
  `config.layout_pattern` entry overrides both for the paths it matches.

  Args:
    config: the rules (`lj.LoraConfig`).
    variables: the base variables (no LoRA leaves yet).
    apply_fn: the function to adapt; its layout evidence beats the defaults.
    args, kwargs: example inputs for `apply_fn` (arrays or `jax.ShapeDtypeStruct`-like arrays).

  Returns:
    A static, hashable `Plan` (a valid `jit` static argument; JSON round-trip; `print` it).

  Raises:
    ValueError: naming the path, for rules that match nothing, ranks above
      `min(fan_in, fan_out)`, kernels whose layout cannot be determined, variables that already
      carry LoRA leaves, or two leaves whose names coincide.
  """
  existing = lora_paths(variables)
  if existing:
    raise ValueError(f"lj.plan: variables already carry LoRA leaves (e.g. {existing[0]!r}); "
                     "plan on the base (`lj.strip(tree)`)")
  leaves = {p: unbox(x) for p, x in flatten(variables).items()}
  arrays = {p: x for p, x in leaves.items() if is_array(x)}
  kwargs = dict(kwargs or {})
  traced = None if apply_fn is None else trace(apply_fn, variables, args, kwargs)
  selected = _select(config, arrays, traced)
  for path in selected:
    if arrays[path].ndim < 2:
      raise ValueError(f"{path}: selected by LoraConfig.targets but it is a {arrays[path].ndim}-D "
                       f"array of shape {tuple(arrays[path].shape)}, not a kernel (LoRA adapts "
                       "weights with at least an in and an out axis); narrow the regex or add it "
                       "to `exclude`")
  if traced is not None:
    found = traced.infer(selected)
  sites, inferred = [], {}
  for i, path in enumerate(selected):
    shape = tuple(arrays[path].shape)
    override = config.layout_for(path)
    if override is not None:
      override.check(shape, f"{path}: LoraConfig.layout_pattern")
      if traced is not None and found[i]:
        inferred[path] = _inferred_layout(path, shape, found[i])
      layout = override
    elif traced is None:
      layout = _default_layout(path, shape)
    else:
      layout = _inferred_layout(path, shape, found[i])
    site = Site(path, shape, jnp.dtype(arrays[path].dtype).name, layout, config.rank_for(path),
                config.alpha_for(path), config.scale_for(path))
    if site.rank > min(site.fan_in, site.fan_out):
      raise ValueError(f"{path}: rank {site.rank} exceeds min(fan_in={site.fan_in}, "
                       f"fan_out={site.fan_out}) of its {shape} kernel ({layout.describe(shape)})")
    sites.append(site)

  base_params = sum(math.prod(x.shape) for x in arrays.values())
  saved = tuple(p for p in leaves if config.saves(p) and is_array(leaves[p]))
  result = Plan(tuple(sites), config, base_params, saved)
  if traced is not None:
    result = _record_uses(result, traced)
    for s in result.sites:
      bad = [u for u in s.use if u.kind == "materialised"]
      if s.path in inferred and inferred[s.path] != s.layout and bad:
        raise ValueError(
            f"{s.path}: LoraConfig.layout_pattern gives layout {s.layout.to_text()} "
            f"({s.layout.describe(s.shape)}), but the function uses this kernel as "
            f"{inferred[s.path].to_text()} ({inferred[s.path].describe(s.shape)}); under the "
            f"override, {bad[0]} would form W + ΔW. Fix the pattern or drop it")
  return result


def _record_uses(plan_: Plan, traced: Traced) -> Plan:
  """Run the apply rules abstractly and write down what they do with each site."""
  seen: dict[int, list[Use]] = {i: [] for i in range(len(plan_.sites))}

  def record(site: int, use: Use) -> None:
    if use not in seen[site]:
      seen[site].append(use)

  def run(values, arg_values):
    zeros = {s.path: (jnp.zeros(s.a_shape, s.factor_dtype), jnp.zeros(s.b_shape, s.factor_dtype))
             for s in plan_.sites}
    return traced.run(plan_.sites, zeros, Apply(record=record), values, arg_values)

  jax.eval_shape(run, traced.values, traced.arg_values)
  unused = (Use("unused", "-"),)
  sites = tuple(dataclasses.replace(s, use=tuple(seen[i]) or unused)
                for i, s in enumerate(plan_.sites))
  return dataclasses.replace(plan_, sites=sites)
