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

Files go through the `safetensors` package's numpy API, which validates the header (size, JSON,
offsets covering the data exactly) before any tensor is read; a PyTorch `adapter_model.bin`
(a pickle) is never loaded. Without `apply_fn`, `import_peft` refuses a 2-D kernel whose
orientation it would have to guess (a square one, or one shaped `(out, in)`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import tempfile
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so BF16 safetensors read as such)
import numpy as np
import safetensors
import safetensors.numpy

from .adapters import LORA_A, LORA_B, put_factors, saved_arrays, site_arrays
from .config import LoraConfig, module_of
from .layout import Layout
from .plan import plan as make_plan
from .sites import Plan, Site
from .tree import flatten, map_leaves, unbox, with_value

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAME = "adapter_model.bin"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_(?:([AB])\.weight|embedding_([AB]))")
_BASE_LAYER = ".base_layer.weight"  # a full embedding, as `save_embedding_layers=True` writes it
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
  leaf: str = "kernel"  # the kernels' leaf name: PEFT's `weight` (other leaves keep their names)
  # layouts the names presuppose (a fused kernel's fused axis as a stack axis), as LoraConfig's
  layout_pattern: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # whether a 2-D leaf is torch's weight transposed ((in, out)); default: leaves named `kernel`
  transposed: Callable[[str], bool] | None = None
  # PEFT `target_parameters` (fused MoE expert tensors): `experts(path)` is `(parameter, part,
  # parts)` for a kernel that is part `part` of `parts` concatenated along the parameter's out
  # axis (tunix `gate_proj` is part 0 of 2 of transformers' `experts.gate_up_proj`), else None;
  # `from_experts(parameter)` the kernels' paths by part, or None; `expert_params` the expert
  # module's parameter names in torch's registration order (PEFT nests one wrapper per
  # parameter in that order: all but the last targeted one sit under `.base_layer`s).
  experts: Callable[[str], tuple[str, int, int] | None] | None = None
  from_experts: Callable[[str], list[str] | None] | None = None
  expert_params: tuple[str, ...] = ()

  def is_transposed(self, path: str) -> bool:
    """Whether the 2-D leaf at `path` is stored `(in, out)`, torch's `(out, in)` transposed."""
    return self.transposed(path) if self.transposed else path.rpartition("/")[2] == "kernel"


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

  return KeyMap(to_peft, from_peft, leaf)


def linen(prefix: str = "params", leaf: str = "kernel", scanned: Sequence[str] = ()) -> KeyMap:
  """Flax linen variables: `params/block_0/attn/query/kernel` <-> `block_0.attn.query`.

  Args:
    prefix: the collection the kernels live in (`"params"`).
    leaf: the kernel's leaf name (`"kernel"`).
    scanned: '/'-joined module paths (below `prefix`) of `nn.scan`-stacked modules; layer `l` of
      `params/layers/fc1/kernel` with `scanned=("layers",)` is `layers.l.fc1` (a `ModuleList`).

  Returns:
    The `KeyMap`.
  """
  return _flax(prefix, leaf, scanned)


def nnx(leaf: str = "kernel", scanned: Sequence[str] = ()) -> KeyMap:
  """Flax NNX state: `blocks/0/linear/kernel` <-> `blocks.0.linear`.

  Args:
    leaf: the kernel's leaf name (`"kernel"`).
    scanned: module paths of stacked modules, as for `linen`.

  Returns:
    The `KeyMap`.
  """
  return _flax("", leaf, scanned)


def from_dict(mapping: Mapping[str, str]) -> KeyMap:
  """Explicit names.

  Args:
    mapping: `{path: module}`; a stacked kernel's module holds `{}` where the layer index goes
      (`{"params/layers/fc1/kernel": "model.layers.{}.mlp.fc1"}`).

  Returns:
    The `KeyMap`.
  """
  patterns = {p: re.compile(re.escape(m).replace(r"\{\}", r"(\d+)")) for p, m in mapping.items()}
  leaves = {p.rpartition("/")[2] for p in mapping}

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

  return KeyMap(to_peft, from_peft, leaves.pop() if len(leaves) == 1 else "kernel")


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


def _is_embedding(site: Site) -> bool:
  return any(u.primitive == "gather" for u in site.use)


def _is_tied(site: Site) -> bool:
  """A 2-D table used by lookups and as a dense output head (`attend`, `x @ E.T`): one kernel whose
  update reaches both uses, PEFT's `Embedding` + output head under `ensure_weight_tying=True`."""
  return (_is_embedding(site) and len(site.shape) == 2
          and all(u.primitive in ("gather", "dot_general") for u in site.use)
          and any(u.primitive == "dot_general" for u in site.use))


def _check_exportable(site: Site, stated: bool) -> None:
  # without uses, several in axes read as a conv window, unless the config states the layout
  conv_like = not site.use and not stated and len(site.layout.in_axes) > 1 and len(site.shape) > 2
  if "conv_general_dilated" in site.use or conv_like:
    raise NotImplementedError(f"{site.path}: only kernels used as dense layers (PEFT `Linear`) or "
                              f"embedding lookups (`Embedding`) can be exported to PEFT; this one "
                              f"is used as {site.use or ('a conv',)}")
  if _is_embedding(site) and not _is_tied(site) and (
      len(site.shape) != 2 or any(u.primitive != "gather" for u in site.use)):
    raise NotImplementedError(
        f"{site.path}: an embedding of shape {site.shape} used as {[str(u) for u in site.use]}: "
        "PEFT's `Embedding` LoRA changes the lookup only, so a 2-D table used by lookups (and "
        "optionally as a tied output head, x @ E.T) exports; this use has no PEFT equivalent")


def _saved_names(key_map: KeyMap, path: str, leaf: Any) -> tuple[str, np.ndarray]:
  """PEFT's name and value for a `modules_to_save` leaf: the module named as the key map names
  its kernel, the kernel leaf as `weight` (a 2-D `kernel` transposed to torch's `(out, in)`), other
  leaves (`bias`) by their own names."""
  module_path, _, name = path.rpartition("/")
  own = key_map.to_peft(path, ())  # a leaf the map names is its module's `weight`
  name = key_map.leaf if own is not None else name
  module = own or key_map.to_peft(f"{module_path}/{key_map.leaf}", ())
  if module is None:
    raise ValueError(f"{path}: a modules_to_save leaf, but the key map names no PEFT module for "
                     f"{module_path}/{key_map.leaf}")
  value = np.asarray(leaf)
  if name == key_map.leaf:
    name, value = "weight", (value.T if key_map.is_transposed(path) and value.ndim == 2 else value)
  return f"{module}.{name}", value


def _save_weights(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  """Write `tensors` to the safetensors file `path` atomically (a temporary file beside it, then
  `os.replace`), with PEFT's `{"format": "pt"}` metadata.

  Every array is made C-contiguous first: `safetensors.numpy.save_file` copies `nbytes` from the
  array's data pointer, so a transposed view would be written in memory order, silently wrong.

  Args:
    path: the file to write.
    tensors: `{name: array}`.
  """
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                             suffix=".safetensors")
  os.close(fd)
  try:
    safetensors.numpy.save_file(arrays, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def export_peft(directory: str | os.PathLike, plan: Plan, tree: Any, *,
                key_map: KeyMap | Mapping[str, str] | None = None,
                base_model_name_or_path: str | None = None, fan_in_fan_out: bool = False,
                save_embedding_layers: bool | str = "auto", task_type: str | None = None,
                tied_head: str = "lm_head") -> None:
  """Write the adapter in `tree` as a PEFT LoRA adapter: `directory/adapter_model.safetensors`
  and `directory/adapter_config.json` (loadable with `peft.PeftModel.from_pretrained`).

  Each site's layer `l` (every index of its stack axes) becomes the PEFT module
  `key_map.to_peft(path, l)` with `lora_A.weight = A[l].reshape(fan_in, r).T: (r, fan_in)` and
  `lora_B.weight = B[l].reshape(r, fan_out).T: (fan_out, r)`. An embedding table `(V, D)` used by
  lookups is a PEFT `Embedding`: `lora_embedding_A = A.T: (r, V)`, `lora_embedding_B = B.T:
  (D, r)` (same transposes, PEFT's other key names). Per-site rank and alpha go into
  `rank_pattern`/`alpha_pattern` so every PEFT module gets this site's `scale`. Each
  `modules_to_save` leaf's trained copy is written as PEFT's `get_peft_model_state_dict` does:
  `base_model.model.<module>.weight` (a 2-D `kernel` transposed to `(out, in)`) / `.bias`.

  Args:
    directory: created if missing; the two files are replaced atomically.
    plan: the plan of `tree`.
    tree: the LoRA tree.
    key_map: names the PEFT module of each site; default `peft_key_map.linen()`.
    base_model_name_or_path: written into `adapter_config.json`.
    fan_in_fan_out: True when the torch modules are `transformers` `Conv1D`s (GPT-2), whose
      weight is `(in, out)`; the factors are the same, only the config flag differs (PEFT warns
      and corrects a wrong one).
    save_embedding_layers: as PEFT's: True also writes each adapted embedding's base table as
      `<module>.base_layer.weight`; `"auto"` (PEFT's default) means True when an embedding is
      adapted.
    task_type: PEFT's `task_type` (`"SEQ_CLS"`, `"CAUSAL_LM"`, ...), written into the config.
    tied_head: PEFT's module name of the output head tied to an adapted embedding table. A table
      `(V, D)` used by lookups and as the head (`attend`, `h @ E.T`) has one adapter, which
      reaches both uses; it is written as PEFT writes `ensure_weight_tying=True`: the embedding's
      `lora_embedding_A/B` and `<tied_head>.lora_A.weight = B: (r, D)`, `.lora_B.weight = A:
      (V, r)` (the embedding's factors transposed), with the head left out of `target_modules`.

  Expert kernels `(E, in, out)` that the key map places in fused PEFT parameters
  (`key_map.experts`, e.g. `peft_key_map.tunix("qwen3_moe")`) are written as PEFT's
  `target_parameters` (see `_export_experts`: one rank-`Σ r_k` adapter per fused parameter).

  With `plan.config.layers_to_transform`, only those layers of each stacked site are written,
  with PEFT's `layers_to_transform` and `layers_pattern` (the name segment before the layer
  index); the other layers' factors must be zero.

  Returns:
    None.

  Raises:
    ValueError: naming the path, for a site the key map cannot name (or two sites with one
      name), a layer left out by `layers_to_transform` with nonzero factors, or a module that
      PEFT's `layers_to_transform` would leave out (one outside the layer stack), before writing
      anything.
    NotImplementedError: a site used other than as a dense layer, an embedding lookup or a tied
      output head.
  """
  key_map = _as_key_map(key_map if key_map is not None else linen())
  if save_embedding_layers not in (True, False, "auto"):
    raise ValueError(f"export_peft: save_embedding_layers must be True, False or 'auto', got "
                     f"{save_embedding_layers!r}")
  arrays = site_arrays(plan, tree)
  tensors, ranks, alphas, owner, heads = {}, {}, {}, {}, set()
  embeddings = [s for s in plan.sites if _is_embedding(s)]
  save_embeddings = bool(embeddings) if save_embedding_layers == "auto" else save_embedding_layers
  experts = _expert_sites(plan, key_map)
  for site in plan.sites:
    if site.path in experts:
      continue
    _check_exportable(site, plan.config.layout_for(site.path) is not None)
    w, a, b = (np.asarray(x) for x in arrays[site.path])
    names = ("lora_embedding_A", "lora_embedding_B") if site in embeddings else ("lora_A.weight",
                                                                                "lora_B.weight")
    kept = plan.config.layers_to_transform
    for index in _layers(site):
      if kept and index and index[0] not in kept:
        if np.any(a[index]) or np.any(b[index]):
          raise ValueError(f"{site.path}: layer {index} is outside LoraConfig.layers_to_transform "
                           f"{list(kept)} but its factors are not zero; PEFT would drop them")
        continue
      module = key_map.to_peft(site.path, index)
      if module is None:
        raise ValueError(f"{site.path}: the key map gives no PEFT module name for this kernel"
                         + (f" (layer {index})" if index else ""))
      modules = [module, tied_head] if _is_tied(site) else [module]
      for m in modules:
        if m in owner:
          raise ValueError(f"{site.path} and {owner[m]}: both map to PEFT module {m!r}")
        owner[m] = site.path
        ranks[m], alphas[m] = site.rank, _number(site.alpha)
        if save_embeddings and site in embeddings:
          tensors[f"{PREFIX}{m}{_BASE_LAYER}"] = w
      tensors[f"{PREFIX}{module}.{names[0]}"] = a[index].reshape(site.fan_in, site.rank).T
      tensors[f"{PREFIX}{module}.{names[1]}"] = b[index].reshape(site.rank, site.fan_out).T
      if _is_tied(site):  # PEFT's tied head: lora_A = lora_embedding_B.T, lora_B = lora_embedding_A.T
        tensors[f"{PREFIX}{tied_head}.lora_A.weight"] = b.reshape(site.rank, site.fan_out)
        tensors[f"{PREFIX}{tied_head}.lora_B.weight"] = a.reshape(site.fan_in, site.rank)
        heads.add(tied_head)
  target_parameters = _export_experts(experts, plan, arrays, key_map, tensors, ranks, alphas)
  saved_modules = set()
  for path, leaf in saved_arrays(plan, tree).items():
    name, value = _saved_names(key_map, path, leaf)
    tensors[PREFIX + name] = value
    saved_modules.add(name.rpartition(".")[0])
  r, rank_pattern = _patterns(ranks)
  alpha, alpha_pattern = _patterns(alphas)
  init = {"kaiming_uniform": True, "gaussian": "gaussian"}[plan.config.init]
  config = {"peft_type": "LORA", "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": r, "lora_alpha": alpha, "target_modules": sorted(set(owner) - heads),
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "use_rslora": plan.config.scaling == "rslora", "lora_dropout": plan.config.dropout,
            "bias": "none", "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": init,
            "use_dora": False, "modules_to_save": sorted(saved_modules) or None,
            "ensure_weight_tying": bool(heads), **_layers_config(plan, owner),
            "target_parameters": target_parameters or None,
            "inference_mode": True}
  os.makedirs(directory, exist_ok=True)
  _save_weights(os.path.join(directory, WEIGHTS_NAME), tensors)
  tmp = os.path.join(directory, f".tmp-{CONFIG_NAME}")
  with open(tmp, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, CONFIG_NAME))


def _layers_config(plan: Plan, owner: Mapping[str, str]) -> dict[str, Any]:
  """PEFT's `layers_to_transform` and `layers_pattern` for `plan.config.layers_to_transform`: the
  pattern is the module-name segment before each module's layer index (`layers` in
  `model.layers.3.mlp.up_proj`), which PEFT reads back with `.*\\.{pattern}\\.(\\d+)\\.`.

  Raises:
    ValueError: naming the path, for a module with no layer index in `layers_to_transform`, which
      PEFT would leave out (an embedding, an output head).
  """
  kept = plan.config.layers_to_transform
  if not kept:
    return {"layers_to_transform": None, "layers_pattern": None}
  patterns = set()
  for module, path in owner.items():
    found = re.fullmatch(r".*?(?:^|\.)([^.]+)\.(\d+)\..*", module)
    if found is None or int(found[2]) not in kept:
      raise ValueError(f"{path}: exported as PEFT module {module!r}, which PEFT's "
                       f"layers_to_transform {list(kept)} would leave out (no layer index in it, or "
                       f"another one); adapt it in a separate adapter, or drop layers_to_transform")
    patterns.add(found[1])
  return {"layers_to_transform": list(kept),
          "layers_pattern": patterns.pop() if len(patterns) == 1 else sorted(patterns)}


def _bin_refusal(directory: str | os.PathLike, weights: str, pickle_path: str) -> FileNotFoundError:
  """The error for a PEFT directory holding only the PyTorch pickle `adapter_model.bin`."""
  command = (f"cd {shlex.quote(os.fspath(directory))} && python -c \"import torch, "
             f"safetensors.torch as st; st.save_file(torch.load('{PICKLE_NAME}', "
             f"weights_only=True), '{WEIGHTS_NAME}')\"")
  return FileNotFoundError(
      f"lj.import_peft: {weights} does not exist, but {pickle_path} does: a PyTorch pickle, which "
      f"lj.import_peft never loads (unpickling can run arbitrary code). If you trust the file, "
      f"convert it once with torch and safetensors:\n  {command}")


def _config_error(path: str, field: str, why: str) -> ValueError:
  return ValueError(f"lj.import_peft: {path}: {field}: {why}")


def _config_int(path: str, field: str, value: Any) -> int:
  """A positive int from the adapter config (no bool, no float, no string)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise _config_error(path, field, f"expected a positive integer, got {value!r}")
  return value


def _config_real(path: str, field: str, value: Any) -> float:
  """A finite real > 0 from the adapter config (an int or float; no bool, no string)."""
  number = None
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    try:
      number = float(value)
    except OverflowError:  # an int too large for a float
      pass
  if number is None or not (math.isfinite(number) and number > 0):
    raise _config_error(path, field, f"expected a finite number > 0, got {value!r}")
  return number


def _config_pattern(config: Mapping[str, Any], path: str, field: str,
                    check: Callable[..., Any]) -> dict[str, Any]:
  """PEFT's `{key: value}` pattern dict (`rank_pattern`, `alpha_pattern`), values checked."""
  value = config.get(field)
  if value is None:
    return {}
  if not isinstance(value, dict):
    raise _config_error(path, field, f"expected a {{module pattern: value}} object, got {value!r}")
  for k, _v in value.items():
    try:
      re.compile(k)
    except re.error as e:
      raise _config_error(path, f"{field}[{k!r}]", f"invalid regex: {e}") from None
  return {k: check(path, f"{field}[{k!r}]", v) for k, v in value.items()}


def _read_config(path: str) -> dict[str, Any]:
  """Read and check `adapter_config.json`: a plain LoRA (not DoRA) adapter with numeric `r`,
  `lora_alpha` and patterns, a bool `use_rslora` and a `lora_dropout` in `[0, 1)`.

  Args:
    path: the full path of `adapter_config.json`.

  Returns:
    `{"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout",
    "init"}`, with PEFT's defaults for missing fields (`r = lora_alpha = 8`).

  Raises:
    ValueError: naming `path` and the field, for anything else (no coercion: `"4"`, `true` or
      `4.0` are not ranks, `"16"` and `true` are not alphas).
  """
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"lj.import_peft: {path}: not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise ValueError(f"lj.import_peft: {path}: expected a JSON object, got {type(config).__name__}")
  if config.get("peft_type") != "LORA":
    raise _config_error(path, "peft_type", f"only plain LoRA adapters (\"LORA\") are supported, "
                        f"got {config.get('peft_type')!r}")
  if config.get("use_dora") is not None and config.get("use_dora") is not False:
    raise _config_error(path, "use_dora", f"DoRA adapters are not supported, got "
                        f"{config.get('use_dora')!r}")
  rslora = config.get("use_rslora", False)
  if not isinstance(rslora, bool):
    raise _config_error(path, "use_rslora", f"expected true or false, got {rslora!r}")
  dropout = config.get("lora_dropout", 0.0)
  dropout = 0.0 if dropout is None else dropout
  if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
      or not 0.0 <= dropout < 1.0):
    raise _config_error(path, "lora_dropout", f"expected a number in [0, 1), got {dropout!r}")
  init = config.get("init_lora_weights", True)
  if not isinstance(init, (bool, str)):
    raise _config_error(path, "init_lora_weights",
                        f"expected true, false or a string, got {init!r}")
  return {"r": _config_int(path, "r", config.get("r", 8)),
          "lora_alpha": _config_real(path, "lora_alpha", config.get("lora_alpha", 8)),
          "rank_pattern": _config_pattern(config, path, "rank_pattern", _config_int),
          "alpha_pattern": _config_pattern(config, path, "alpha_pattern", _config_real),
          "use_rslora": rslora, "lora_dropout": float(dropout),
          "init": "gaussian" if init == "gaussian" else "kaiming_uniform",
          "modules_to_save": _config_names(path, "modules_to_save", config.get("modules_to_save")),
          "layers_to_transform": _config_layers(path, config.get("layers_to_transform")),
          "ensure_weight_tying": config.get("ensure_weight_tying") is True,
          "target_parameters": _config_names(path, "target_parameters", config.get("target_parameters"))}


def _config_names(path: str, field: str, value: Any) -> list[str]:
  """A list of module names (or null) from the adapter config."""
  if value is None:
    return []
  if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
    raise _config_error(path, field, f"expected a list of module names or null, got {value!r}")
  return value


def _config_layers(path: str, value: Any) -> set[int] | None:
  """`layers_to_transform` (an int, a list of ints, or null) as a set of layer indices."""
  if value is None or value == []:
    return None
  values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
  if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                             and v >= 0 for v in values):
    raise _config_error(path, "layers_to_transform",
                        f"expected a layer index or a list of them, got {value!r}")
  return set(values)


def _weights_path(directory: str | os.PathLike) -> tuple[str, str]:
  """`(config path, weights path)` of a PEFT directory, both checked to exist.

  Raises:
    FileNotFoundError: a file is missing (with the one-line conversion when only
      `adapter_model.bin` is there; that pickle is never opened).
  """
  config, weights = (os.path.join(directory, n) for n in (CONFIG_NAME, WEIGHTS_NAME))
  if not os.path.isfile(config):
    raise FileNotFoundError(f"lj.import_peft: {config} does not exist (a PEFT adapter directory "
                            f"has {CONFIG_NAME} and {WEIGHTS_NAME})")
  if not os.path.isfile(weights):
    pickle_path = os.path.join(directory, PICKLE_NAME)
    if os.path.isfile(pickle_path):
      raise _bin_refusal(directory, weights, pickle_path)
    raise FileNotFoundError(f"lj.import_peft: {weights} does not exist (a PEFT adapter directory "
                            f"has {CONFIG_NAME} and {WEIGHTS_NAME})")
  return config, weights


def _header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """`{name: (dtype, shape)}` from a safetensors file's header; no tensor is read.

  The `safetensors` package validates the header on opening (its length and size limit, the JSON,
  dtypes, offsets that cover the data exactly, no overlaps).

  Raises:
    ValueError: naming `path`, for a file the package refuses.
  """
  try:
    with safetensors.safe_open(path, framework="np") as f:
      return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
  except safetensors.SafetensorError as e:
    raise ValueError(f"lj.import_peft: {path}: not a valid safetensors file ({e})") from None


def _load(path: str, header: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
  """The tensors named in `header`, checked to still have its shapes (the file may have changed
  since `_header` read it)."""
  try:
    with safetensors.safe_open(path, framework="np") as f:
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except safetensors.SafetensorError as e:
    raise ValueError(f"lj.import_peft: {path}: not a valid safetensors file ({e})") from None
  got = {k: tuple(x.shape) for k, x in tensors.items()}
  if got != {k: shape for k, (_, shape) in header.items()}:
    raise ValueError(f"lj.import_peft: {path}: the file changed while it was being read")
  return tensors


def _modules(header: Mapping[str, tuple[str, tuple[int, ...]]], path: str,
             saved_names: Sequence[str]
             ) -> tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...]]], dict[str, str]]:
  """`({module: (lora_A shape (r, in), lora_B shape (out, r))}, {key: kind})` from the header,
  checking names, dtypes and shapes. `lora_embedding_A/B` count as `lora_A/B` (same shapes and
  transposes). The second dict holds the keys that are not factors: `"saved"` for a parameter of
  a module in `saved_names` (PEFT's `modules_to_save`), `"embedding"` for an adapted module's
  `base_layer.weight` (`save_embedding_layers=True`)."""
  parts: dict[str, dict[str, tuple[int, ...]]] = collections.defaultdict(dict)
  others = {}
  for key, (dtype, shape) in header.items():
    found = _KEY.fullmatch(key)
    if dtype not in FLOAT_DTYPES:
      raise ValueError(f"lj.import_peft: {path}: tensor {key!r} has dtype {dtype}; LoRA factors "
                       f"are floating point ({', '.join(FLOAT_DTYPES)})")
    if found is None:
      module = key[len(PREFIX):].rpartition(".")[0] if key.startswith(PREFIX) else ""
      if key.endswith(_BASE_LAYER):
        others[key] = "embedding"
      elif module and any(module == m or module.endswith("." + m) for m in saved_names):
        others[key] = "saved"
      else:
        saved = f"; modules_to_save is {list(saved_names)}" if saved_names else ""
        raise ValueError(f"lj.import_peft: {path}: tensor {key!r} is not a LoRA factor "
                         f"('{PREFIX}<module>.lora_A.weight' / '.lora_B.weight') nor a parameter "
                         f"of a module in the config's modules_to_save{saved}")
      continue
    parts[found[1]][found[2] or found[3]] = shape
  out = {}
  for module, ab in parts.items():
    if set(ab) != {"A", "B"}:
      raise ValueError(f"lj.import_peft: {PREFIX}{module}: has lora_{''.join(ab)} but not both")
    a, b = ab["A"], ab["B"]
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
      raise ValueError(f"lj.import_peft: {PREFIX}{module}: lora_A {a} and lora_B {b} "
                       "are not (r, in) and (out, r)")
    out[module] = (a, b)
  for key, kind in others.items():
    if kind == "embedding" and key[len(PREFIX):-len(_BASE_LAYER)] not in out:
      raise ValueError(f"lj.import_peft: {path}: tensor {key!r}: a base layer of a module with "
                       "no LoRA factors")
  return out, others


def _check_orientation(site: Site, a: tuple[int, ...], b: tuple[int, ...], module: str,
                       traced: bool) -> None:
  """Refuse a 2-D kernel whose orientation would be a guess.

  Without `apply_fn`, a 2-D kernel is taken to be stored `(in, out)`. That is only known to be
  right when the kernel is not square and its shape is PEFT's `(in, out)`; a square kernel
  (e.g. HF Flax GPT-2's `attn.c_proj`, stored `(out, in)` and used as `x @ W.T`) fits either way,
  and a kernel shaped `(out, in)` is evidently not stored as assumed. With `apply_fn` the layout is
  read off the kernel's uses, unless the function never uses it.

  Raises:
    ValueError: naming the path, asking for `apply_fn=`/`args=`.
  """
  if len(site.shape) != 2 or site.layout.stack_axes:
    return
  unused = bool(site.use) and all(u.kind == "unused" for u in site.use)
  if traced and not unused:
    return
  how = ("`apply_fn` never uses it, so its layout is the (in, out) default" if traced
         else "without `apply_fn` a 2-D kernel is assumed stored (in, out)")
  fix = ("pass `apply_fn=` (and `args=`) that use it, so its orientation is read off how it is "
         "used (x @ W or x @ W.T)")
  if site.shape[0] == site.shape[1]:
    raise ValueError(f"lj.import_peft: {site.path}: square kernel {site.shape}: whether it is "
                     f"stored (in, out) (used as x @ W) or (out, in) (x @ W.T, as torch and e.g. "
                     f"HF Flax GPT-2's c_proj) cannot be read off its shape, and {how}; {fix}")
  fan_in, fan_out = a[1], b[0]
  if site.shape == (fan_out, fan_in) and site.shape != (fan_in, fan_out):
    raise ValueError(f"lj.import_peft: {site.path}: kernel of shape {site.shape} matches PEFT "
                     f"module {module!r} (in={fan_in}, out={fan_out}) only as (out, in), but "
                     f"{how}; it is not transposed silently: {fix}")


def import_peft(directory: str | os.PathLike, base: Any, *,
                key_map: KeyMap | Mapping[str, str] | None = None,
                apply_fn: Callable | None = None, args: Sequence[Any] = (),
                kwargs: dict[str, Any] | None = None,
                layout_pattern: Mapping[str, str] | None = None,
                tied_head: str = "lm_head") -> tuple[Any, Plan]:
  """Read a PEFT LoRA adapter and attach it to `base`: returns `(tree, plan)`.

  Every PEFT module `m` is mapped by `key_map.from_peft(m)` (default `peft_key_map.linen()`)
  to a kernel path and layer index of `base`; the plan is `lj.plan` over those kernels with
  PEFT's rank (from `lora_A`'s shape, checked against `r`/`rank_pattern`),
  `lora_alpha`/`alpha_pattern`, `use_rslora` and `lora_dropout`, so `scale` is PEFT's.
  `A = lora_A.T` and `B = lora_B.T` are un-flattened to `(*stack, *in, r)` and
  `(*stack, r, *out)` (an `Embedding`'s `lora_embedding_A/B` likewise). Parameters of the config's
  `modules_to_save` (`<module>.weight` -> the key map's kernel, transposed back to `(in, out)` for a
  2-D `kernel`; `<module>.bias` -> its sibling `bias`) become `<leaf>_lora_full` copies, and a
  `save_embedding_layers` table (`<module>.base_layer.weight`) replaces the base table, as PEFT
  loads it. PEFT `target_parameters` wrappers (MoE experts) that the key map places
  (`key_map.from_experts`) give each fused kernel PEFT's per-expert `A` and its rows of `B`
  (see `_expert_factors`). Stack layers left out by `layers_to_transform` get zero factors (and
  the plan's config keeps `layers_to_transform`, so `lj.attach`-style training keeps them zero).

  Pass `apply_fn` and `args` (as for `lj.plan`) so each kernel's layout is read off its uses.
  They are needed for multi-axis kernels and stacks, and for any 2-D kernel whose orientation
  the shape does not tell: without them a 2-D kernel is assumed stored `(in, out)`, which is
  accepted only for a non-square kernel of PEFT's `(in, out)` shape. A square kernel (which may
  be stored `(out, in)` and used as `x @ W.T`) or one shaped `(out, in)` is refused, never
  guessed or transposed.

  Args:
    directory: holds `adapter_config.json` and `adapter_model.safetensors`.
    base: the base variables (no LoRA leaves).
    key_map: PEFT module names <-> kernel paths (a `KeyMap` or `{path: module}`).
    apply_fn, args, kwargs: the function and example inputs, as for `lj.plan`.
    layout_pattern: `{regex: "stack=(..) in=(..) out=(..)"}` layouts by path, as
      `LoraConfig.layout_pattern`: they take the place of `apply_fn` for the kernels they match
      (a fused `kv_einsum (2, K, D, H)` as `stack=(0) in=(2) out=(1,3)` takes PEFT's `k_proj` and
      `v_proj` as its two stack entries), and state a 2-D kernel's orientation outright. The
      key map's own `layout_pattern` (a ready map's fused kernels) applies after these.
    tied_head: PEFT's name of an output head tied to the embedding. When the adapter has factors
      for it and the key map names no kernel of `base` for it (the head is the table), they must
      be the embedding's transposed (PEFT's `ensure_weight_tying=True`) and the table's one
      adapter carries both; a head adapted on its own is refused.

  Returns:
    `(tree, plan)`: `base` with the factors attached, and the plan.

  Raises:
    FileNotFoundError: a file is missing; if only the PyTorch pickle `adapter_model.bin` is
      there, the message gives the one-line conversion (the pickle is never loaded).
    ValueError: naming `adapter_config.json` (full path) and the field for a bad config (not
      LoRA, DoRA, a non-integer `r`, a non-numeric or bool `lora_alpha`, ...); naming the file for
      a safetensors file the `safetensors` package refuses; naming the key for a PEFT key no
      kernel of `base` takes, factors whose shape does not fit their kernel (both shapes), a
      stack with layers missing; naming the path for a kernel whose orientation is a guess.
    `base` is left untouched, and no tensor is read before the header and config check out.
  """
  key_map = _as_key_map(key_map if key_map is not None else linen())
  config_path, weights_path = _weights_path(directory)
  config = _read_config(config_path)
  header = _header(weights_path)
  modules, others = _modules(header, weights_path, config["modules_to_save"])
  leaves = {p: unbox(x) for p, x in flatten(base).items()}
  experts = _import_experts(modules, config, key_map, leaves, weights_path)
  tied = _tied_head(modules, others, header, config["ensure_weight_tying"], key_map, leaves, tied_head,
                    weights_path)
  saved = _saved_paths(others, key_map, leaves, weights_path)
  by_path: dict[str, dict[Index, str]] = collections.defaultdict(dict)
  for module in modules:
    found = key_map.from_peft(module)
    if found is None or found[0] not in leaves:
      where = "" if found is None else f" to {found[0]!r}, which is not in `base`"
      raise ValueError(f"lj.import_peft: {PREFIX}{module}.lora_A.weight: the key map maps this "
                       f"PEFT module{where or ' to no lora_jax path'}")
    by_path[found[0]][found[1]] = module
    want = _peft_lookup(config["rank_pattern"], config["r"], module)
    if modules[module][0][0] != want:
      raise _config_error(config_path, "r / rank_pattern",
                          f"gives PEFT module {module!r} r={want}, but {PREFIX}{module}.lora_A."
                          f"weight has rank {modules[module][0][0]} (shape {modules[module][0]})")

  def per_path(value: Callable[[str], Any], what: str) -> dict[str, Any]:
    out = {}
    for path, layers in by_path.items():
      got = {value(m) for m in layers.values()}
      if len(got) != 1:
        raise ValueError(f"lj.import_peft: {path}: its PEFT modules {sorted(layers.values())} have "
                         f"different {what} {sorted(got)}; one kernel has one {what}")
      out[path] = got.pop()
    return out

  ranks = per_path(lambda m: int(modules[m][0][0]), "ranks")
  alphas = per_path(lambda m: _peft_lookup(config["alpha_pattern"], config["lora_alpha"], m),
                    "alphas")
  r, alpha = config["r"], config["lora_alpha"]
  for path, (_, _, rank, alpha_) in experts.items():
    ranks[path], alphas[path] = rank, alpha_
  exact = {p: re.escape(p) for p in [*by_path, *experts]}
  lora_config = LoraConfig(
      targets=tuple(exact.values()), rank=r, alpha=alpha,
      rank_pattern={exact[p]: v for p, v in ranks.items() if v != r},
      alpha_pattern={exact[p]: v for p, v in alphas.items() if v != alpha},
      dropout=config["lora_dropout"], scaling="rslora" if config["use_rslora"] else "standard",
      init=config["init"],
      layout_pattern=[*(layout_pattern or {}).items(), *key_map.layout_pattern.items()],
      modules_to_save=tuple(sorted({module_of(p) for p in saved.values()})),
      layers_to_transform=tuple(config["layers_to_transform"] or ()))
  plan = make_plan(lora_config, base, apply_fn, args, kwargs)
  unsaved = sorted(set(plan.saved) - set(saved.values()))
  if unsaved:
    raise ValueError(f"lj.import_peft: {weights_path}: {unsaved[0]} is in a module of "
                     f"modules_to_save, but the file has no tensor for it")
  kept = config["layers_to_transform"]  # PEFT's layer index is the first stack index

  for site in plan.sites:
    if site.path in experts:
      _check_expert_layout(site, experts[site.path][0])
      continue
    layers = by_path[site.path]
    missing = [i for i in _layers(site) if i not in layers and (kept is None or i[0] in kept)]
    extra = sorted(set(layers) - set(_layers(site)))
    if missing or extra:
      bad = missing or extra
      name = key_map.to_peft(site.path, bad[0]) if missing else layers[bad[0]]
      raise ValueError(f"lj.import_peft: {site.path} of shape {site.shape} "
                       f"({site.layout.describe(site.shape)}): PEFT module {name!r} is "
                       f"{'missing' if missing else 'outside the stack'}")
    for index in _layers(site):
      if index not in layers:
        continue
      module = layers[index]
      a, b = modules[module]
      if lora_config.layout_for(site.path) is None:  # an override states the orientation
        _check_orientation(site, a, b, module, traced=apply_fn is not None)
      want_a, want_b = (site.rank, site.fan_in), (site.fan_out, site.rank)
      if a != want_a or b != want_b:
        raise ValueError(f"lj.import_peft: {PREFIX}{module}: lora_A {a} / lora_B {b} "
                         f"do not fit {site.path} of shape {site.shape} "
                         f"({site.layout.describe(site.shape)}), which needs {want_a} / {want_b}")

  tensors = _load(weights_path, header)
  if tied is not None:
    _check_tied(tensors, *tied)
  loaded = _expert_factors(experts, plan, tensors)
  for site in plan.sites:
    if site.path in experts:
      continue
    layers = by_path[site.path]
    a_layers, b_layers = [], []
    for index in _layers(site):
      if index not in layers:  # left out by layers_to_transform: ΔW = 0 there, exactly
        a_layers.append(np.zeros(site.a_shape[len(index):], np.float32))
        b_layers.append(np.zeros(site.b_shape[len(index):], np.float32))
        continue
      key = f"{PREFIX}{layers[index]}"
      embedding = f"{key}.lora_A.weight" not in tensors  # `_modules` checked one name is there
      a = tensors[f"{key}.lora_embedding_A" if embedding else f"{key}.lora_A.weight"]
      b = tensors[f"{key}.lora_embedding_B" if embedding else f"{key}.lora_B.weight"]
      a_layers.append(a.T.reshape(site.a_shape[len(index):]))
      b_layers.append(b.T.reshape(site.b_shape[len(index):]))
    loaded[site.path + LORA_A] = np.stack(a_layers).reshape(site.a_shape)
    loaded[site.path + LORA_B] = np.stack(b_layers).reshape(site.b_shape)

  kernels = flatten(base)
  dtype = lambda path: jnp.promote_types(unbox(kernels[path]).dtype, jnp.float32)  # as lj.attach
  factors = {s.path: (s.layout, jnp.asarray(loaded[s.path + LORA_A], dtype(s.path)),
                      jnp.asarray(loaded[s.path + LORA_B], dtype(s.path))) for s in plan.sites}
  full = {}
  for key, path in saved.items():
    value = tensors[key]
    if key_map.is_transposed(path) and value.ndim == 2:
      value = value.T  # torch's (out, in) weight back to the (in, out) kernel
    if value.shape != np.shape(unbox(kernels[path])):
      raise ValueError(f"lj.import_peft: {key}: shape {tensors[key].shape} does not fit {path} of "
                       f"shape {np.shape(unbox(kernels[path]))}")
    full[path] = jnp.asarray(value, unbox(kernels[path]).dtype)
  # `save_embedding_layers=True` stores the base table too; PEFT loads it into the base layer
  tables = {}
  for key, kind in others.items():
    if kind == "embedding":
      found = key_map.from_peft(key[len(PREFIX):-len(_BASE_LAYER)])
      assert found is not None  # _modules checked it is an adapted module
      if tensors[key].shape != np.shape(leaves[found[0]]):
        raise ValueError(f"lj.import_peft: {key}: shape {tensors[key].shape} is not that of "
                         f"{found[0]} {np.shape(leaves[found[0]])} (a resized vocabulary?)")
      tables[found[0]] = jnp.asarray(tensors[key], leaves[found[0]].dtype)
  if tables:
    base = map_leaves(lambda p, x: with_value(x, tables[p]) if p in tables else x, base)
  return put_factors(base, factors, "lj.import_peft", full), plan


def _saved_paths(others: Mapping[str, str], key_map: KeyMap, leaves: Mapping[str, Any],
                 where: str) -> dict[str, str]:
  """`{PEFT key: leaf path}` for the `modules_to_save` tensors: the module's kernel is the path
  the key map gives for the module, PEFT's `weight` is that kernel, other names are its siblings.

  Raises:
    ValueError: naming the key, for a module the key map cannot place or a leaf `base` lacks.
  """
  out = {}
  for key, kind in others.items():
    if kind != "saved":
      continue
    module, _, name = key[len(PREFIX):].rpartition(".")
    found = key_map.from_peft(module)
    if found is None or found[1]:
      raise ValueError(f"lj.import_peft: {where}: tensor {key!r} (modules_to_save): the key map "
                       f"maps {module!r} to {found}, not to one unstacked kernel")
    path = found[0] if name == "weight" else f"{module_of(found[0])}/{name}"
    if path not in leaves:
      raise ValueError(f"lj.import_peft: {where}: tensor {key!r} (modules_to_save) maps to "
                       f"{path!r}, which is not in `base`")
    out[key] = path
  return out


def _tied_head(modules: dict[str, Any], others: dict[str, str], header: Mapping[str, Any],
               ensure_weight_tying: bool,
               key_map: KeyMap, leaves: Mapping[str, Any], head: str, where: str
               ) -> tuple[str, str] | None:
  """Take PEFT's tied output head out of `modules` / `others` (in place): `(head, embedding
  module)` when `head` has LoRA factors but the key map names no kernel of `base` for it (the
  head is the embedding table, as in tunix/gemma `attend` or a tied GPT-2/Llama lm_head); None
  when there is no such head or `base` has its own head kernel.

  Under `ensure_weight_tying=True` PEFT gives the head the embedding's factors (`lora_A =
  lora_embedding_B.T`, `lora_B = lora_embedding_A.T`), so the table's one lora_jax adapter is
  both; `_check_tied` checks the values once the tensors are read.

  Raises:
    ValueError: naming the key, for a head adapted on its own (`ensure_weight_tying` false): its
      update reaches the head only, while the tied table's reaches the lookup too.
  """
  if head not in modules:
    return None
  found = key_map.from_peft(head)
  if found is not None and found[0] in leaves:
    return None
  key = f"{PREFIX}{head}.lora_A.weight"
  embeddings = [m for m in modules if f"{PREFIX}{m}.lora_embedding_A" in header]
  if ensure_weight_tying and len(embeddings) != 1:
    raise ValueError(f"lj.import_peft: {where}: tensor {key!r}: a tied head (ensure_weight_tying) "
                     f"needs exactly one adapted embedding to be tied to, found {embeddings}")
  if not ensure_weight_tying:
    raise ValueError(
        f"lj.import_peft: {where}: tensor {key!r}: PEFT adapted the output head {head!r} on its own "
        f"(ensure_weight_tying is not true), and the key map names no kernel of `base` for it: the "
        f"head is the tied embedding table, whose one lora_jax adapter changes the lookup as well, "
        f"which PEFT's does not. Train the adapter in PEFT with ensure_weight_tying=True, or give "
        f"`base` an untied head kernel and name it {head!r} in the key map")
  del modules[head]
  others.pop(f"{PREFIX}{head}{_BASE_LAYER}", None)
  return head, embeddings[0]


def _check_tied(tensors: Mapping[str, np.ndarray], head: str, embedding: str) -> None:
  """Check that PEFT's tied head holds its embedding's factors, transposed.

  Raises:
    ValueError: naming both keys, when they differ.
  """
  emb = f"{PREFIX}{embedding}.lora_embedding_"
  pairs = [(f"{PREFIX}{head}.lora_A.weight", emb + "B"), (f"{PREFIX}{head}.lora_B.weight", emb + "A")]
  for head_key, emb_key in pairs:
    if not np.array_equal(tensors[head_key], tensors[emb_key].T):
      raise ValueError(f"lj.import_peft: {head_key} is not {emb_key} transposed, as weight tying "
                       f"(ensure_weight_tying) makes it; the tied table has one adapter")


def _expert_sites(plan: Plan, key_map: KeyMap) -> dict[str, tuple[str, int, int]]:
  """`{path: (PEFT parameter, part, parts)}` for the sites the key map puts in fused expert
  tensors (PEFT's `target_parameters`)."""
  if key_map.experts is None:
    return {}
  found = {s.path: key_map.experts(s.path) for s in plan.sites}
  return {p: e for p, e in found.items() if e is not None}


def _expert_module(param: str, key_map: KeyMap, targeted: Sequence[str]) -> str:
  """PEFT's module name of a `ParamWrapper` over `param`: PEFT wraps the targeted parameters of
  one module in torch's registration order, each around the last, so a parameter sits under one
  `.base_layer` per targeted parameter registered after it."""
  module, _, name = param.rpartition(".")
  on_module = [n for n in key_map.expert_params if f"{module}.{n}" in targeted]
  return module + ".base_layer" * (len(on_module) - 1 - on_module.index(name))


def _export_experts(experts: Mapping[str, tuple[str, int, int]], plan: Plan,
                    arrays: Mapping[str, Any], key_map: KeyMap, tensors: dict[str, np.ndarray],
                    ranks: dict[str, int], alphas: dict[str, Any]) -> list[str]:
  """Write the expert sites as PEFT `target_parameters` (into `tensors`, `ranks`, `alphas`).

  PEFT's `ParamWrapper` over an `(E, out, in)` parameter has `lora_A.weight: (E·r, in)`, read as
  `(E, r, in)`, and `lora_B.weight: (out, r·E)`, read as `(out, r, E)`, with
  `ΔW[e] = scale·B[:, :, e]·A[e]`. Kernels `(E, in, out_k)` (layout `stack=(0) in=(1) out=(2)`)
  fused along `out` (tunix `gate_proj` + `up_proj` = `gate_up_proj`) become one adapter of rank
  `r = Σ r_k`: `A[e] = [A_0[e]ᵀ; A_1[e]ᵀ; ...]` and `B[e]` block-diagonal with blocks
  `(s_k/s)·B_k[e]ᵀ`, `s = s_0` (alpha written so PEFT's scale is `s`), so every part's
  `ΔW_k[e] = s_k·A_k[e]·B_k[e]` is exactly its rows of PEFT's.

  Returns:
    The PEFT parameter names written, for `target_parameters`.

  Raises:
    ValueError: naming the path, for a part whose siblings are not all adapted, or a kernel that
      is not `(E, in, out)` with the experts as its one stack axis.
  """
  groups: dict[str, dict[int, str]] = collections.defaultdict(dict)
  counts = {}
  for path, (param, part, parts) in experts.items():
    groups[param][part], counts[param] = path, parts
  by_path = {site.path: site for site in plan.sites}
  for param, parts in groups.items():
    n = counts[param]
    if set(parts) != set(range(n)):
      want = key_map.from_experts(param) if key_map.from_experts else None
      missing = [want[k] if want else f"part {k}" for k in range(n) if k not in parts]
      raise ValueError(f"{next(iter(parts.values()))}: part of PEFT's fused parameter {param!r}, "
                       f"which is one adapter; adapt its other kernels too: {missing}")
  targeted = sorted(groups)
  for param, parts in groups.items():
    sites = [arrays[parts[k]] for k in range(len(parts))]
    infos = [by_path[parts[k]] for k in range(len(parts))]
    for site in infos:
      _check_expert_layout(site, param)
    scale = infos[0].scale
    rank = sum(site.rank for site in infos)
    experts_n, fan_in = infos[0].shape[0], infos[0].shape[1]
    a = np.concatenate([np.asarray(x[1], np.float32) for x in sites], axis=-1)  # (E, in, r)
    b = np.zeros((experts_n, rank, sum(site.shape[2] for site in infos)), np.float32)
    r0 = o0 = 0
    for site, (_, _, b_k) in zip(infos, sites):
      b[:, r0:r0 + site.rank, o0:o0 + site.shape[2]] = np.asarray(b_k, np.float32) * (site.scale / scale)
      r0, o0 = r0 + site.rank, o0 + site.shape[2]
    module = _expert_module(param, key_map, targeted)
    tensors[f"{PREFIX}{module}.lora_A.weight"] = a.transpose(0, 2, 1).reshape(experts_n * rank, fan_in)
    tensors[f"{PREFIX}{module}.lora_B.weight"] = b.transpose(2, 1, 0).reshape(-1, rank * experts_n)
    ranks[param] = rank
    alphas[param] = _number(scale * (math.sqrt(rank) if plan.config.scaling == "rslora" else rank))
  return targeted


def _check_expert_layout(site: Site, param: str) -> None:
  """Raise ValueError naming the path unless `site` is `(E, in, out)`, experts stacked."""
  if site.layout != Layout((0,), (1,), (2,)):
    raise ValueError(f"{site.path}: an expert kernel for PEFT's {param!r} must be (E, in, out) "
                     f"with the experts as its stack axis (stack=(0) in=(1) out=(2)), but it is "
                     f"{site.layout.describe(site.shape)}")


def _import_experts(modules: dict[str, Any], config: Mapping[str, Any], key_map: KeyMap,
                    leaves: Mapping[str, Any], where: str
                    ) -> dict[str, tuple[str, tuple[int, int], int, float]]:
  """Take PEFT's `target_parameters` wrappers that the key map places out of `modules` (in place).

  A module `<m>(.base_layer)*` wraps the parameter of `<m>` that PEFT's nesting puts at that
  depth (see `_expert_module`); the key map gives the kernels fused in it.

  Returns:
    `{path: (PEFT module, (offset, size) of its part along the out axis, rank, alpha)}`.

  Raises:
    ValueError: naming the key, for a kernel `base` lacks, or factors that do not fit the kernels
      (`lora_A: (E·r, in)`, `lora_B: (Σ out_k, r·E)`), or a rank that `r`/`rank_pattern` does not
      give.
  """
  targets = config["target_parameters"]
  if key_map.from_experts is None or not targets:
    return {}
  out = {}
  for module in list(modules):
    plain, depth = module.replace(".base_layer", ""), module.count(".base_layer")
    on_module = [n for n in key_map.expert_params
                 if any(f"{plain}.{n}" == t or f"{plain}.{n}".endswith("." + t) for t in targets)]
    if depth >= len(on_module):
      continue
    param = f"{plain}.{on_module[len(on_module) - 1 - depth]}"
    paths = key_map.from_experts(param)
    if paths is None:
      continue
    key = f"{PREFIX}{module}.lora_A.weight"
    absent = [p for p in paths if p not in leaves]
    if absent:
      raise ValueError(f"lj.import_peft: {where}: tensor {key!r} (PEFT parameter {param!r}): the "
                       f"key map maps it to {absent[0]!r}, which is not in `base`")
    a, b = modules.pop(module)
    shapes = [tuple(np.shape(leaves[p])) for p in paths]
    experts_n, fan_in = shapes[0][0], shapes[0][1]
    rank = a[0] // experts_n
    if (any(len(x) != 3 for x in shapes) or a != (rank * experts_n, fan_in)
        or b != (sum(x[2] for x in shapes), rank * experts_n)):
      raise ValueError(f"lj.import_peft: {key}: lora_A {a} / lora_B {b} do not fit the expert "
                       f"kernels {dict(zip(paths, shapes))} (PEFT's (E·r, in) / (out, r·E))")
    want = _peft_lookup(config["rank_pattern"], config["r"], param)
    if want != rank:
      raise _config_error(where, "r / rank_pattern", f"gives PEFT parameter {param!r} r={want}, but "
                          f"{key} has rank {rank} per expert (shape {a}, {experts_n} experts)")
    alpha = _peft_lookup(config["alpha_pattern"], config["lora_alpha"], param)
    offset = 0
    for path, shape in zip(paths, shapes):
      out[path] = (module, (offset, shape[2]), rank, alpha)
      offset += shape[2]
  return out


def _expert_factors(experts: Mapping[str, tuple[str, tuple[int, int], int, float]], plan: Plan,
                    tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`{path + LORA_A: A (E, in, r), path + LORA_B: B (E, r, out_k)}` for the expert kernels:
  PEFT's `lora_A (E·r, in)` read as `(E, r, in)`, `lora_B (out, r·E)` as `(out, r, E)`, each part
  taking its rows of `out` (fused parts share `A`)."""
  sites = {s.path: s for s in plan.sites}
  out = {}
  for path, (module, (offset, size), rank, _) in experts.items():
    experts_n = sites[path].shape[0]
    a = tensors[f"{PREFIX}{module}.lora_A.weight"]
    b = tensors[f"{PREFIX}{module}.lora_B.weight"]
    out[path + LORA_A] = a.reshape(experts_n, rank, -1).transpose(0, 2, 1)
    out[path + LORA_B] = b.reshape(-1, rank, experts_n).transpose(2, 1, 0)[:, :, offset:offset + size]
  return out
