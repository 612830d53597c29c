"""`Plan`: a `LoraConfig` resolved against one model — every adapted kernel (a `Site`) with its
shape, dtype, layout, rank, alpha, scale and how the function uses it.

Built by tracing the function abstractly (`jax.make_jaxpr` / `jax.eval_shape`: no FLOPs). Static
and hashable (usable as a `jit` static argument), JSON round-trip, printable as a table.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .config import LoraConfig
from .interpret import Context, is_array, trace
from .interpret import layout as layout_lib
from .tree import LORA_A, LORA_B, flatten, lora_paths, unbox


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which axes of a stored kernel are stack, input and output axes (each in increasing order).

  `A` has shape `(*stack, *in, r)` and `B` has shape `(*stack, r, *out)`, with the sizes of the
  kernel's axes listed here; `ΔW = scale · A·B` is arranged back into the kernel's axis order.
  """
  stack_axes: tuple[int, ...]
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]

  @classmethod
  def from_roles(cls, roles: dict[int, str]) -> "Layout":
    pick = lambda role: tuple(sorted(j for j, r in roles.items() if r == role))
    return cls(pick("stack"), pick("in"), pick("out"))

  def factor_axes(self, per_axis: Sequence[Any]) -> tuple[tuple, tuple]:
    """Per-axis values of the kernel (sharding names, partition specs) carried over to its
    factors: `(A's, B's)` = `((*stack, *in, None), (*stack, None, *out))`, None on the rank axis."""
    pick = lambda axes: tuple(per_axis[j] for j in axes)
    return ((*pick(self.stack_axes), *pick(self.in_axes), None),
            (*pick(self.stack_axes), None, *pick(self.out_axes)))

  def describe(self, shape: Sequence[int]) -> str:
    fmt = lambda axes: "(" + ",".join(str(shape[j]) for j in axes) + ")"
    parts = ([f"stack={fmt(self.stack_axes)}"] if self.stack_axes else [])
    return " ".join(parts + [f"in={fmt(self.in_axes)}", f"out={fmt(self.out_axes)}"])


@dataclasses.dataclass(frozen=True)
class Site:
  """One adapted kernel. `use` lists how the function uses it: `"dot_general"`,
  `"conv_general_dilated"`, `"gather"` (low-rank), or `"materialised (<why>)"`."""
  path: str
  shape: tuple[int, ...]
  dtype: str
  layout: Layout
  rank: int
  alpha: float
  scale: float
  use: tuple[str, ...] = ()

  def _sizes(self, axes):
    return tuple(self.shape[j] for j in axes)

  @property
  def a_shape(self) -> tuple[int, ...]:
    """`(*stack, *in, r)`."""
    return (*self._sizes(self.layout.stack_axes), *self._sizes(self.layout.in_axes), self.rank)

  @property
  def b_shape(self) -> tuple[int, ...]:
    """`(*stack, r, *out)`."""
    return (*self._sizes(self.layout.stack_axes), self.rank, *self._sizes(self.layout.out_axes))

  @property
  def fan_in(self) -> int:
    return math.prod(self._sizes(self.layout.in_axes))

  @property
  def fan_out(self) -> int:
    return math.prod(self._sizes(self.layout.out_axes))

  @property
  def num_params(self) -> int:
    return math.prod(self.a_shape) + math.prod(self.b_shape)

  @property
  def low_rank(self) -> bool:
    """True when every use keeps ΔW factored (nothing materialised)."""
    return bool(self.use) and not any(u.startswith("materialised") for u in self.use)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The resolved config: `sites` in tree order, the `config` they came from, and the number of
  parameters in the base variables (for the summary line)."""
  sites: tuple[Site, ...]
  config: LoraConfig
  base_params: int

  @property
  def paths(self) -> tuple[str, ...]:
    return tuple(s.path for s in self.sites)

  def site(self, path: str) -> Site:
    for s in self.sites:
      if s.path == path:
        return s
    raise KeyError(f"no site at {path!r}; the plan adapts {list(self.paths)}")

  @property
  def num_params(self) -> int:
    """Trainable LoRA parameters in total."""
    return sum(s.num_params for s in self.sites)

  def __str__(self) -> str:
    head = ("path", "shape", "layout", "rank", "alpha", "scale", "A", "B", "params", "use")
    fmt_shape = lambda s: "(" + ",".join(map(str, s)) + ")"
    rows = [(s.path, fmt_shape(s.shape), s.layout.describe(s.shape), str(s.rank), f"{s.alpha:g}",
             f"{s.scale:g}", fmt_shape(s.a_shape), fmt_shape(s.b_shape), f"{s.num_params:,}",
             ", ".join(s.use) or "-") for s in self.sites]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    pct = 100.0 * self.num_params / max(self.base_params, 1)
    summary = (f"{len(self.sites)} sites, {self.num_params:,} LoRA params = {pct:.3g}% of "
               f"{self.base_params:,} base params; scaling={self.config.scaling}, "
               f"dropout={self.config.dropout:g}, init={self.config.init}")
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows), summary])

  def to_dict(self) -> dict[str, Any]:
    return {"config": self.config.to_dict(), "base_params": self.base_params,
            "sites": [dict(dataclasses.asdict(s), shape=list(s.shape), use=list(s.use),
                           layout={k: list(v) for k, v in dataclasses.asdict(s.layout).items()})
                      for s in self.sites]}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Plan":
    sites = tuple(Site(**dict(s, shape=tuple(s["shape"]), use=tuple(s["use"]),
                              layout=Layout(**{k: tuple(v) for k, v in s["layout"].items()})))
                  for s in d["sites"])
    return cls(sites, LoraConfig.from_dict(d["config"]), int(d["base_params"]))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_json(cls, s: str) -> "Plan":
    return cls.from_dict(json.loads(s))


def _closest(pattern: str, paths: Sequence[str], n: int = 5) -> list[str]:
  return difflib.get_close_matches(pattern, paths, n=n, cutoff=0.0)


def _select(config: LoraConfig, arrays: dict[str, Any]) -> list[str]:
  paths = list(arrays)
  for pattern in config.targets:
    if not any(re.fullmatch(pattern, p) for p in paths):
      raise ValueError(f"LoraConfig.targets: {pattern!r} matches no variable path "
                       f"(fullmatch). Closest paths: {_closest(pattern, paths)}")
  selected = [p for p in paths if config.selects(p)]
  if not selected:
    raise ValueError(f"LoraConfig: every path matched by targets {list(config.targets)} is "
                     f"excluded by {list(config.exclude)}")
  for field, pairs in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
    for pattern, _ in pairs:
      if not any(re.fullmatch(pattern, p) for p in selected):
        raise ValueError(f"LoraConfig.{field}: {pattern!r} matches no selected kernel. "
                         f"Selected: {_closest(pattern, selected)}")
  return selected


def _default_layout(path: str, shape: tuple[int, ...]) -> Layout:
  parent = path.rsplit("/", 2)[-2] if path.count("/") else ""
  if len(shape) == 2:
    return Layout((), (0,), (1,))
  if len(shape) >= 3 and "conv" in parent.lower():  # linen/NNX Conv kernel: (*window, in, out)
    return Layout((), tuple(range(len(shape) - 1)), (len(shape) - 1,))
  raise ValueError(f"{path}: kernel of shape {shape} has no unambiguous layout (multi-axis); pass "
                   f"`apply_fn=` (and `args=`) to lj.plan so the layout is read off how it is used")


def plan(config: LoraConfig, variables: Any, apply_fn: Callable | None = None,
         args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Plan:
  """Resolve `config` against `variables` (a linen variables dict, an NNX `State`, any nested
  dict of arrays).

  With `apply_fn` (called as `apply_fn(variables, *args, **kwargs)`), the function is traced
  abstractly (no FLOPs) to read each kernel's layout off its use — `(D, H, hd)` attention query
  kernels get `in=(D) out=(H,hd)`, scanned stacks `(L, D, F)` get `stack=(L)` — and to record, per
  site, whether the unmerged path keeps `ΔW` factored or has to materialise it. Without it, 2-D
  kernels are `(in, out)` and conv kernels `(*window, in, out)`; other kernels raise.

  Raises `ValueError` naming the path for rules that match nothing, ranks above
  `min(fan_in, fan_out)`, and variables that already carry LoRA leaves.
  """
  existing = lora_paths(variables)
  if existing:
    raise ValueError(f"lj.plan: variables already carry LoRA leaves (e.g. {existing[0]!r}); "
                     "plan on the base (`lj.strip(tree)`)")
  leaves = {p: unbox(x) for p, x in flatten(variables).items()}
  arrays = {p: x for p, x in leaves.items() if is_array(x)}
  selected = _select(config, arrays)
  kwargs = dict(kwargs or {})

  traced = None
  if apply_fn is not None:
    traced = trace(apply_fn, variables, args, kwargs)
    positions = {traced.index(p): i for i, p in enumerate(selected)}
    uses = layout_lib.infer(traced.jaxpr.jaxpr, positions,
                            {i: arrays[p].ndim for i, p in enumerate(selected)})

  sites = []
  for i, path in enumerate(selected):
    shape = tuple(arrays[path].shape)
    if traced is None:
      layout = _default_layout(path, shape)
    else:
      found = sorted(uses[i], key=lambda u: u[0] != "gather")  # a lookup defines an embedding
      if found:
        layout = Layout.from_roles(found[0][1])
      elif len(shape) == 2:
        layout = Layout((), (0,), (1,))
      else:
        raise ValueError(f"{path}: the function never uses this {shape} kernel in a dot_general, "
                         "conv or gather, so its layout cannot be inferred")
    site = Site(path, shape, jnp.dtype(arrays[path].dtype).name, layout, config.rank_for(path),
                config.alpha_for(path), config.scale_for(path))
    if site.rank > min(site.fan_in, site.fan_out):
      raise ValueError(f"{path}: rank {site.rank} exceeds min(fan_in={site.fan_in}, "
                       f"fan_out={site.fan_out}) of its {shape} kernel ({layout.describe(shape)})")
    sites.append(site)

  base_params = sum(math.prod(x.shape) for x in arrays.values())
  result = Plan(tuple(sites), config, base_params)
  if traced is not None:
    result = _record_uses(result, traced)
  return result


def _record_uses(plan_: Plan, traced) -> Plan:
  """Run the unmerged interpreter abstractly and write down what it does with each site."""
  seen: dict[int, list[str]] = {i: [] for i in range(len(plan_.sites))}

  def record(site: int, use: str) -> None:
    if use not in seen[site]:
      seen[site].append(use)

  def run(values, arg_values):
    zeros = {s.path: (jnp.zeros(s.a_shape, jnp.float32), jnp.zeros(s.b_shape, jnp.float32))
             for s in plan_.sites}
    traced_here = dataclasses.replace(traced, values=values, arg_values=arg_values)
    return traced_here.run(plan_.sites, zeros, Context(record=record))

  jax.eval_shape(run, traced.values, traced.arg_values)
  sites = tuple(dataclasses.replace(s, use=tuple(seen[i]) or ("unused",))
                for i, s in enumerate(plan_.sites))
  return dataclasses.replace(plan_, sites=sites)


def site_arrays(plan_: Plan, tree: Any) -> dict[str, tuple[Any, Any, Any]]:
  """`{path: (W, A, B)}` (unboxed) for every site, checking that `tree` matches the plan."""
  leaves = flatten(tree)
  expected = {s.path + suffix for s in plan_.sites for suffix in (LORA_A, LORA_B)}
  stray = [p for p in lora_paths(tree) if p not in expected]
  if stray:
    raise ValueError(f"{stray[0]}: LoRA leaf not in the plan (the plan adapts {list(plan_.paths)})")
  out = {}
  for s in plan_.sites:
    for p, want in ((s.path, s.shape), (s.path + LORA_A, s.a_shape), (s.path + LORA_B, s.b_shape)):
      if p not in leaves:
        raise ValueError(f"{p}: missing from the tree; did you `lj.attach(plan, variables, key)`?")
      got = tuple(jnp.shape(unbox(leaves[p])))
      if got != tuple(want):
        raise ValueError(f"{p}: shape {got} does not match the plan's {tuple(want)}")
    out[s.path] = tuple(unbox(leaves[p]) for p in (s.path, s.path + LORA_A, s.path + LORA_B))
  return out
