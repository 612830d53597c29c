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

from .adapters import lora_paths
from .config import LoraConfig
from .interpret import Apply, Traced, Use, is_array, trace
from .layout import Layout, Role, factor_dtype
from .tree import flatten, unbox


@dataclasses.dataclass(frozen=True)
class Site:
  """One adapted kernel: its name (the '/'-rendered key path), shape, dtype, layout, rank, alpha,
  `scale` (`alpha/r` or `alpha/sqrt(r)`) and `use`: how the function uses it, one `Use` per
  distinct use (`str(use)` is `"dot_general"` or `"materialised (<why>)"`)."""
  path: str
  shape: tuple[int, ...]
  dtype: str
  layout: Layout
  rank: int
  alpha: float
  scale: float
  use: tuple[Use, ...] = ()

  @property
  def a_shape(self) -> tuple[int, ...]:
    """`(*stack, *in, r)`."""
    return self.layout.a_shape(self.shape, self.rank)

  @property
  def b_shape(self) -> tuple[int, ...]:
    """`(*stack, r, *out)`."""
    return self.layout.b_shape(self.shape, self.rank)

  @property
  def fan_in(self) -> int:
    return self.layout.fan_in(self.shape)

  @property
  def fan_out(self) -> int:
    return self.layout.fan_out(self.shape)

  @property
  def factor_dtype(self) -> str:
    return jnp.dtype(factor_dtype(self.dtype)).name

  @property
  def num_params(self) -> int:
    return math.prod(self.a_shape) + math.prod(self.b_shape)

  @property
  def low_rank(self) -> bool:
    """True when every use keeps ΔW factored (nothing materialised)."""
    return bool(self.use) and all(u.kind == "low_rank" for u in self.use)

  def to_dict(self) -> dict[str, Any]:
    return {"path": self.path, "shape": list(self.shape), "dtype": self.dtype,
            "layout": self.layout.to_dict(), "rank": self.rank, "alpha": self.alpha,
            "scale": self.scale, "use": [u.to_dict() for u in self.use]}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Site:
    uses = tuple(Use(**u) if isinstance(u, dict) else _legacy_use(u) for u in d["use"])
    return cls(d["path"], tuple(d["shape"]), d["dtype"], Layout.from_dict(d["layout"]),
               d["rank"], d["alpha"], d["scale"], uses)


def _legacy_use(text: str) -> Use:
  """A use as version 0.1 wrote it (`"dot_general"`, `"materialised (why)"`)."""
  if text.startswith("materialised ("):
    why = text[len("materialised ("):-1]
    return Use("materialised", why, why)
  return Use("low_rank", text)


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
             ", ".join(map(str, s.use)) or "-") for s in self.sites]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    pct = 100.0 * self.num_params / max(self.base_params, 1)
    summary = (f"{len(self.sites)} sites, {self.num_params:,} LoRA params = {pct:.3g}% of "
               f"{self.base_params:,} base params; scaling={self.config.scaling}, "
               f"dropout={self.config.dropout:g}, init={self.config.init}")
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows), summary])

  def to_dict(self) -> dict[str, Any]:
    return {"config": self.config.to_dict(), "base_params": self.base_params,
            "sites": [s.to_dict() for s in self.sites]}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Plan:
    sites = tuple(Site.from_dict(s) for s in d["sites"])
    return cls(sites, LoraConfig.from_dict(d["config"]), int(d["base_params"]))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_json(cls, s: str) -> Plan:
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
  selected = _select(config, arrays)
  kwargs = dict(kwargs or {})

  traced = None
  if apply_fn is not None:
    traced = trace(apply_fn, variables, args, kwargs)
    found = traced.infer(selected)

  for path in selected:
    if arrays[path].ndim < 2:
      raise ValueError(f"{path}: selected by LoraConfig.targets but it is a {arrays[path].ndim}-D "
                       f"array of shape {tuple(arrays[path].shape)}, not a kernel (LoRA adapts "
                       "weights with at least an in and an out axis); narrow the regex or add it "
                       "to `exclude`")
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
  result = Plan(tuple(sites), config, base_params)
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
