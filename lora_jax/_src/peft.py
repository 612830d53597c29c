"""Exchange adapters with PyTorch PEFT: `adapter_model.safetensors` + `adapter_config.json`.

PEFT stores, per adapted `torch.nn.Linear` named `<module>`,
`base_model.model.<module>.lora_A.weight: (r, in)` and `...lora_B.weight: (out, r)`, with
`ΔW_torch = scale · B_peft · A_peft` of shape `(out, in)`. A Flax kernel is `(in, out)` and lora_jax's
factors are `A: (*stack, *in, r)`, `B: (*stack, r, *out)`, so per layer of a stack
`A_peft = A.reshape(fan_in, r).T` and `B_peft = B.reshape(r, fan_out).T` (a multi-axis kernel's
in and out axes are flattened in C order, as a `(D, H, hd)` kernel is a `Linear(D, H·hd)`), and a
stacked kernel `(L, ...)` becomes `L` PEFT modules. Scales round-trip through PEFT's `r`,
`lora_alpha`, `rank_pattern`, `alpha_pattern` and `use_rslora` (`alpha/r` or `alpha/sqrt(r)`).

A `KeyMap` names the PEFT module of each site (and back); `peft_key_map.linen()`,
`peft_key_map.nnx()` and `peft_key_map.from_dict({...})` cover the usual cases.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from . import _safetensors
from .config import LoraConfig
from .adapters import LORA_A, LORA_B, put_factors, site_arrays
from .plan import Plan, Site, plan as make_plan
from .tree import flatten, unbox

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
Index = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """Maps a site to PEFT module names and back.

  `to_peft(path, index)`: the PEFT module name (without `base_model.model.`) of layer `index` of
  the kernel at the '/'-joined `path` (`index == ()` for an unstacked kernel), or None.
  `from_peft(module)`: `(path, index)` for a PEFT module name, or None.
  """
  to_peft: Callable[[str, Index], str | None]
  from_peft: Callable[[str], tuple[str, Index] | None]


def _flax(prefix: str, leaf: str, scanned: Sequence[str]) -> KeyMap:
  head = prefix + "/" if prefix else ""
  scans = [tuple(s.strip("/").split("/")) for s in scanned]

  def to_peft(path: str, index: Index) -> str | None:
    if not (path.startswith(head) and path.endswith("/" + leaf)):
      return None
    parts = path[len(head):-len(leaf) - 1].split("/")
    if index:
      scan = next((s for s in scans if tuple(parts[:len(s)]) == s), None)
      if scan is None:
        raise ValueError(f"{path}: stacked kernel (layer index {index}); tell the key map after "
                         f"which module the layer index goes, e.g. scanned=({parts[0]!r},)")
      parts = [*scan, *map(str, index), *parts[len(scan):]]
    return ".".join(parts)

  def from_peft(module: str) -> tuple[str, Index] | None:
    parts = module.split(".")
    index: Index = ()
    for s in scans:
      n = len(s)
      if tuple(parts[:n]) == s and len(parts) > n and parts[n].isdigit():
        digits = list(itertools.takewhile(str.isdigit, parts[n:]))
        index, parts = tuple(map(int, digits)), [*s, *parts[n + len(digits):]]
        break
    return head + "/".join(parts) + "/" + leaf, index

  return KeyMap(to_peft, from_peft)


def linen(prefix: str = "params", leaf: str = "kernel", scanned: Sequence[str] = ()) -> KeyMap:
  """Flax linen variables: `params/block_0/attn/query/kernel` <-> `block_0.attn.query`.

  `scanned`: '/'-joined module paths (below `prefix`) of `nn.scan`-stacked modules; layer `l` of
  `params/layers/fc1/kernel` with `scanned=("layers",)` is `layers.l.fc1` (a `ModuleList`).
  """
  return _flax(prefix, leaf, scanned)


def nnx(leaf: str = "kernel", scanned: Sequence[str] = ()) -> KeyMap:
  """Flax NNX state: `blocks/0/linear/kernel` <-> `blocks.0.linear` (see `linen` for `scanned`)."""
  return _flax("", leaf, scanned)


def from_dict(mapping: Mapping[str, str]) -> KeyMap:
  """Explicit `{path: module}`; a stacked kernel's module holds `{}` where the layer index goes
  (`{"params/layers/fc1/kernel": "model.layers.{}.mlp.fc1"}`)."""
  patterns = {p: re.compile(re.escape(m).replace(r"\{\}", r"(\d+)")) for p, m in mapping.items()}

  def to_peft(path: str, index: Index) -> str | None:
    m = mapping.get(path)
    if m is not None and m.count("{}") != len(index):
      raise ValueError(f"{path}: module template {m!r} needs one '{{}}' per stack axis "
                       f"({len(index)})")
    return None if m is None else m.format(*index)

  def from_peft(module: str) -> tuple[str, Index] | None:
    for path, pat in patterns.items():
      found = pat.fullmatch(module)
      if found:
        return path, tuple(int(g) for g in found.groups())
    return None

  return KeyMap(to_peft, from_peft)


peft_key_map = types.SimpleNamespace(linen=linen, nnx=nnx, from_dict=from_dict, KeyMap=KeyMap)


def _as_key_map(key_map: KeyMap | Mapping[str, str]) -> KeyMap:
  if isinstance(key_map, KeyMap):
    return key_map
  if isinstance(key_map, Mapping):
    return from_dict(key_map)
  raise TypeError(f"key_map: expected a lj.peft_key_map.KeyMap or a {{path: module}} dict, got "
                  f"{type(key_map).__name__}")


def _peft_lookup(pattern: Mapping[str, Any], default: Any, module: str) -> Any:
  """PEFT's `rank_pattern`/`alpha_pattern` rule: the first key `k` (in order) with
  `re.match(rf"(.*\\.)?({k})$", module)`, else `default`."""
  for k, v in pattern.items():
    if re.match(rf"(.*\.)?({k})$", module):
      return v
  return default


def _patterns(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  """`(default, pattern)` such that `_peft_lookup(pattern, default, m) == values[m]` for every
  module: the commonest value is the default; other modules get an entry, and so does any module
  that an entry would otherwise catch as a dotted suffix. Longest names first (most specific)."""
  default = collections.Counter(values.values()).most_common(1)[0][0]
  keys = {m for m, v in values.items() if v != default}
  keys |= {m for m in values for k in keys if m.endswith("." + k)}
  pattern = {m: values[m] for m in sorted(keys, key=lambda m: (-len(m), m))}
  if any(_peft_lookup(pattern, default, m) != v for m, v in values.items()):  # regex metachars
    pattern = {f"^{re.escape(m)}$": values[m] for m in values if values[m] != default}
  return default, pattern


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def _layers(site: Site) -> list[Index]:
  stack = tuple(site.shape[j] for j in site.layout.stack_axes)
  return list(itertools.product(*map(range, stack)))


def _check_exportable(site: Site) -> None:
  conv_like = not site.use and len(site.layout.in_axes) > 1 and len(site.shape) > 2
  if "conv_general_dilated" in site.use or "gather" in site.use or conv_like:
    raise NotImplementedError(f"{site.path}: only kernels used as dense layers (PEFT `Linear`) can "
                              f"be exported to PEFT; this one is used as {site.use or ('a conv',)}")


def export_peft(directory: str | os.PathLike, plan: Plan, tree: Any, *,
                key_map: KeyMap | Mapping[str, str] | None = None,
                base_model_name_or_path: str | None = None) -> None:
  """Write the adapter in `tree` as a PEFT LoRA adapter: `directory/adapter_model.safetensors`
  and `directory/adapter_config.json` (loadable with `peft.PeftModel.from_pretrained`).

  Each site's layer `l` (every index of its stack axes) becomes the PEFT module
  `key_map.to_peft(path, l)` with `lora_A.weight = A[l].reshape(fan_in, r).T: (r, fan_in)` and
  `lora_B.weight = B[l].reshape(r, fan_out).T: (fan_out, r)`. Per-site rank and alpha go into
  `rank_pattern`/`alpha_pattern` so every PEFT module gets this site's `scale`.
  `key_map` defaults to `peft_key_map.linen()`. Raises `ValueError` naming the path for a site
  the key map cannot name (or two sites with one name), before writing anything.
  """
  key_map = _as_key_map(key_map if key_map is not None else linen())
  arrays = site_arrays(plan, tree)
  tensors, ranks, alphas, owner = {}, {}, {}, {}
  for site in plan.sites:
    _check_exportable(site)
    _, a, b = (np.asarray(x) for x in arrays[site.path])
    for index in _layers(site):
      module = key_map.to_peft(site.path, index)
      if module is None:
        raise ValueError(f"{site.path}: the key map gives no PEFT module name for this kernel"
                         + (f" (layer {index})" if index else ""))
      if module in owner:
        raise ValueError(f"{site.path} and {owner[module]}: both map to PEFT module {module!r}")
      owner[module] = site.path
      tensors[f"{PREFIX}{module}.lora_A.weight"] = a[index].reshape(site.fan_in, site.rank).T
      tensors[f"{PREFIX}{module}.lora_B.weight"] = b[index].reshape(site.rank, site.fan_out).T
      ranks[module], alphas[module] = site.rank, _number(site.alpha)
  r, rank_pattern = _patterns(ranks)
  alpha, alpha_pattern = _patterns(alphas)
  init = {"kaiming_uniform": True, "gaussian": "gaussian"}[plan.config.init]
  config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
            "r": r, "lora_alpha": alpha, "target_modules": sorted(owner),
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "use_rslora": plan.config.scaling == "rslora", "lora_dropout": plan.config.dropout,
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": init, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "inference_mode": True}
  os.makedirs(directory, exist_ok=True)
  _safetensors.save(os.path.join(directory, WEIGHTS_NAME), tensors, {"format": "pt"})
  tmp = os.path.join(directory, f".tmp-{CONFIG_NAME}")
  with open(tmp, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, CONFIG_NAME))


def _read(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  paths = [os.path.join(directory, n) for n in (CONFIG_NAME, WEIGHTS_NAME)]
  for p in paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"lj.import_peft: {p} does not exist (a PEFT adapter directory has "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME})")
  with open(paths[0]) as f:
    config = json.load(f)
  if config.get("peft_type") != "LORA" or config.get("use_dora"):
    raise ValueError(f"lj.import_peft: {paths[0]}: only plain LoRA adapters are supported, got "
                     f"peft_type={config.get('peft_type')!r}, use_dora={config.get('use_dora')!r}")
  tensors, _ = _safetensors.load(paths[1])
  return config, tensors


def _modules(tensors: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`{module: (lora_A (r, in), lora_B (out, r))}`, checking names and shapes."""
  parts: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  for key, x in tensors.items():
    found = _KEY.fullmatch(key)
    if found is None:
      raise ValueError(f"lj.import_peft: tensor {key!r} is not a LoRA factor "
                       f"('{PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
    parts[found[1]][found[2]] = x
  out = {}
  for module, ab in parts.items():
    if set(ab) != {"A", "B"}:
      raise ValueError(f"lj.import_peft: {PREFIX}{module}: has lora_{''.join(ab)} but not both")
    a, b = ab["A"], ab["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
      raise ValueError(f"lj.import_peft: {PREFIX}{module}: lora_A {a.shape} and lora_B {b.shape} "
                       "are not (r, in) and (out, r)")
    out[module] = (a, b)
  return out


def import_peft(directory: str | os.PathLike, base: Any, *,
                key_map: KeyMap | Mapping[str, str] | None = None,
                apply_fn: Callable | None = None, args: Sequence[Any] = (),
                kwargs: dict[str, Any] | None = None) -> tuple[Any, Plan]:
  """Read a PEFT LoRA adapter and attach it to `base`: returns `(tree, plan)`.

  Every PEFT module `m` is mapped by `key_map.from_peft(m)` (default `peft_key_map.linen()`)
  to a kernel path and layer index of `base`; the plan is `lj.plan` over those kernels with
  PEFT's rank (from `lora_A`'s shape), `lora_alpha`/`alpha_pattern`, `use_rslora` and
  `lora_dropout`, so `scale` is PEFT's. Multi-axis kernels (`(D, H, hd)`) and stacks need
  `apply_fn` and `args` (as for `lj.plan`) to know their layout; `A = lora_A.T` and
  `B = lora_B.T` are then un-flattened to `(*stack, *in, r)` and `(*stack, r, *out)`.

  Raises (and leaves `base` untouched) for a PEFT key no kernel of `base` takes, a kernel whose
  shape does not fit its factors (naming both shapes), a stack with layers missing, and missing or
  malformed files.
  """
  key_map = _as_key_map(key_map if key_map is not None else linen())
  config, tensors = _read(directory)
  modules = _modules(tensors)
  leaves = {p: unbox(x) for p, x in flatten(base).items()}
  by_path: dict[str, dict[Index, str]] = collections.defaultdict(dict)
  for module in modules:
    found = key_map.from_peft(module)
    if found is None or found[0] not in leaves:
      where = "" if found is None else f" to {found[0]!r}, which is not in `base`"
      raise ValueError(f"lj.import_peft: {PREFIX}{module}.lora_A.weight: the key map maps this "
                       f"PEFT module{where or ' to no lora_jax path'}")
    by_path[found[0]][found[1]] = module

  def per_path(value: Callable[[str], Any], what: str) -> dict[str, Any]:
    out = {}
    for path, layers in by_path.items():
      got = {value(m) for m in layers.values()}
      if len(got) != 1:
        raise ValueError(f"lj.import_peft: {path}: its PEFT modules {sorted(layers.values())} have "
                         f"different {what} {sorted(got)}; one kernel has one {what}")
      out[path] = got.pop()
    return out

  ranks = per_path(lambda m: int(modules[m][0].shape[0]), "ranks")
  alphas = per_path(lambda m: float(_peft_lookup(config.get("alpha_pattern") or {},
                                                 config.get("lora_alpha", 8), m)), "alphas")
  r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
  exact = {p: re.escape(p) for p in by_path}
  lora_config = LoraConfig(
      targets=tuple(exact.values()), rank=r, alpha=alpha,
      rank_pattern={exact[p]: v for p, v in ranks.items() if v != r},
      alpha_pattern={exact[p]: v for p, v in alphas.items() if v != alpha},
      dropout=float(config.get("lora_dropout") or 0.0),
      scaling="rslora" if config.get("use_rslora") else "standard",
      init="gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming_uniform")
  plan = make_plan(lora_config, base, apply_fn, args, kwargs)

  loaded = {}
  for site in plan.sites:
    layers = by_path[site.path]
    missing = [i for i in _layers(site) if i not in layers]
    extra = sorted(set(layers) - set(_layers(site)))
    if missing or extra:
      bad = missing or extra
      name = key_map.to_peft(site.path, bad[0]) if missing else layers[bad[0]]
      raise ValueError(f"lj.import_peft: {site.path} of shape {site.shape} "
                       f"({site.layout.describe(site.shape)}): PEFT module {name!r} is "
                       f"{'missing' if missing else 'outside the stack'}")
    a_layers, b_layers = [], []
    for index in _layers(site):
      module = layers[index]
      a, b = modules[module]
      want_a, want_b = (site.rank, site.fan_in), (site.fan_out, site.rank)
      if a.shape != want_a or b.shape != want_b:
        raise ValueError(f"lj.import_peft: {PREFIX}{module}: lora_A {a.shape} / lora_B {b.shape} "
                         f"do not fit {site.path} of shape {site.shape} "
                         f"({site.layout.describe(site.shape)}), which needs {want_a} / {want_b}")
      a_layers.append(a.T.reshape(site.a_shape[len(index):]))
      b_layers.append(b.T.reshape(site.b_shape[len(index):]))
    loaded[site.path + LORA_A] = np.stack(a_layers).reshape(site.a_shape)
    loaded[site.path + LORA_B] = np.stack(b_layers).reshape(site.b_shape)

  kernels = flatten(base)
  dtype = lambda path: jnp.promote_types(unbox(kernels[path]).dtype, jnp.float32)  # as lj.attach
  factors = {s.path: (s.layout, jnp.asarray(loaded[s.path + LORA_A], dtype(s.path)),
                      jnp.asarray(loaded[s.path + LORA_B], dtype(s.path))) for s in plan.sites}
  return put_factors(base, factors, "lj.import_peft"), plan
