"""`LoraConfig`: the user's rules for which kernels get adapters, and with what rank and alpha.

Vocabulary mirrors PEFT (`r` -> `rank`, `lora_alpha` -> `alpha`, `rank_pattern`, `alpha_pattern`,
`use_rslora` -> `scaling="rslora"`). Patterns are regular expressions *fullmatched* against the
'/'-joined leaf path of a variable, e.g. ``"params/Block_0/query/kernel"``.

Values are checked strictly, never coerced: a rank is an `int` (not a `bool`, not a float, not
even `4.0`), an alpha or dropout a real number (`int` or `float`, not a `bool` or a string), and
every error is a `TypeError` (wrong type) or `ValueError` (wrong value) naming the field, e.g.
``LoraConfig.alpha_pattern['.*']``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

from .layout import Layout

SCALINGS = ("standard", "rslora")
ALL_LINEAR = "all-linear"
INITS = ("kaiming_uniform", "gaussian")


def _type_name(value: Any) -> str:
  return type(value).__name__


def _positive_int(value: Any, field: str) -> int:
  """`value` as an `int` >= 1.

  Args:
    value: the candidate rank.
    field: the field's name for messages (`rank`, `rank_pattern['.*']`).

  Returns:
    `int(value)` (a numpy integer becomes a Python `int`).

  Raises:
    TypeError: `value` is a bool, a float (even an integral one) or not a number.
    ValueError: `value` < 1.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"LoraConfig.{field} must be a positive integer (an int), got {value!r} "
                    f"of type {_type_name(value)}")
  if value < 1:
    raise ValueError(f"LoraConfig.{field} must be a positive integer, got {value!r}")
  return int(value)


def _real(value: Any, field: str, what: str) -> float:
  """`value` as a finite `float`, refusing bools, strings and non-numbers (no coercion).

  Args:
    value: the candidate number.
    field: the field's name for messages.
    what: the requirement, for messages (`"a finite number > 0"`).

  Returns:
    `float(value)`.

  Raises:
    TypeError: `value` is a bool or not a real number (a str, None, a list, ...).
    ValueError: `value` is NaN, infinite, or an int too large for a float.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"LoraConfig.{field} must be {what} (an int or float), got {value!r} of type "
                    f"{_type_name(value)}")
  try:
    number = float(value)
  except OverflowError:  # an int too large for a float
    number = math.inf
  if not math.isfinite(number):
    raise ValueError(f"LoraConfig.{field} must be {what}, got {value!r}")
  return number


def _positive_real(value: Any, field: str) -> float:
  """`value` as a finite `float` > 0 (see `_real`); `ValueError` for <= 0."""
  what = "a finite number > 0"
  out = _real(value, field, what)
  if not out > 0:
    raise ValueError(f"LoraConfig.{field} must be {what}, got {value!r}")
  return out


def _regex(value: Any, field: str) -> str:
  """`value` if it is a `str` that compiles as a regex; else `TypeError`/`ValueError` naming
  `field`."""
  if not isinstance(value, str):
    raise TypeError(f"LoraConfig.{field}: expected a regex string, got {value!r} of type "
                    f"{_type_name(value)}")
  try:
    re.compile(value)
  except re.error as e:
    raise ValueError(f"LoraConfig.{field}: invalid regex {value!r}: {e}") from None
  return value


def _as_patterns(value: Any, field: str) -> tuple[str, ...]:
  """A regex or a list/tuple of regexes as a tuple of regexes.

  Args:
    value: a `str`, or a list/tuple of `str`.
    field: `targets` or `exclude`, for messages.

  Returns:
    The regexes, in order.

  Raises:
    TypeError: `value` is neither a str nor a list/tuple (None, a set, a dict, a number...), or
      holds a non-string (named by its index).
    ValueError: a regex does not compile.
  """
  if isinstance(value, str):
    return (_regex(value, field),)
  if not isinstance(value, (list, tuple)):
    raise TypeError(f"LoraConfig.{field}: expected a regex string or a list/tuple of them, got "
                    f"{value!r} of type {_type_name(value)}")
  return tuple(_regex(p, f"{field}[{i}]") for i, p in enumerate(value))


def _module_names(value: Any, field: str, shorthand: bool) -> tuple[str, ...] | str:
  """PEFT-style module names (`["q_proj", "self_attn.v_proj"]`) as a tuple of '/'-joined names.

  Args:
    value: a list/tuple of non-empty strings; with `shorthand`, also the string `"all-linear"`
      (any case, as PEFT).
    field: `target_modules` or `modules_to_save`, for messages.
    shorthand: whether `"all-linear"` is allowed.

  Returns:
    The names with PEFT's '.' separators written as '/' (the separator of lora_jax paths), or
    `"all-linear"`.

  Raises:
    TypeError: any other string (a regex belongs in `targets=`), or not a list/tuple of strings.
    ValueError: an empty name, or one with an empty '.'/'/' segment.
  """
  if isinstance(value, str):
    if shorthand and value.lower() == ALL_LINEAR:
      return ALL_LINEAR
    allowed = f"{ALL_LINEAR!r} or " if shorthand else ""
    raise TypeError(f"LoraConfig.{field}: expected {allowed}a list of module names (e.g. "
                    f"['q_proj', 'v_proj']), got the string {value!r}; a regex over full paths "
                    f"goes in `targets=`")
  if not isinstance(value, (list, tuple)):
    raise TypeError(f"LoraConfig.{field}: expected a list/tuple of module names, got {value!r} "
                    f"of type {_type_name(value)}")
  out = []
  for i, name in enumerate(value):
    if not isinstance(name, str):
      raise TypeError(f"LoraConfig.{field}[{i}]: expected a module name string, got {name!r} of "
                      f"type {_type_name(name)}")
    if not all(name.replace(".", "/").split("/")):
      raise ValueError(f"LoraConfig.{field}[{i}]: {name!r} is not a module name (empty segment)")
    out.append(name.replace(".", "/"))
  return tuple(out)


def module_of(path: str) -> str:
  """The module path of a leaf path: `params/layers/q_proj/kernel` -> `params/layers/q_proj`."""
  return path.rpartition("/")[0]


def names_module(name: str, module: str) -> bool:
  """PEFT's rule for a module name in a list: `module` is `name` or ends with `/name`."""
  return module == name or module.endswith("/" + name)


def _layout_text(value: Any, field: str) -> str:
  """A layout override in its canonical text (`Layout.to_text`).

  Raises:
    TypeError: not a str.
    ValueError: not of the form `stack=(..) in=(..) out=(..)`, naming the field.
  """
  if not isinstance(value, str):
    raise TypeError(f"LoraConfig.{field}: expected a layout like 'stack=(0) in=(2) out=(1,3)', "
                    f"got {value!r} of type {_type_name(value)}")
  try:
    return Layout.parse(value).to_text()
  except ValueError as e:
    raise ValueError(f"LoraConfig.{field}: {e}") from None


def _as_pattern_pairs(value: Any, field: str, check: Callable[[Any, str], Any]
                      ) -> tuple[tuple[str, Any], ...]:
  """`{regex: value}` (or a sequence of `(regex, value)` pairs) as a tuple of checked pairs.

  Args:
    value: a Mapping, or a list/tuple of 2-item lists/tuples (the frozen form).
    field: `rank_pattern` or `alpha_pattern`, for messages.
    check: `check(v, name)` validates and normalises one value; `name` is
      `field[<regex>]`.

  Returns:
    `((regex, checked value), ...)` in the given order.

  Raises:
    TypeError: `value` is not a mapping or a sequence of pairs, a key is not a str, or (from
      `check`) a value has the wrong type.
    ValueError: a key does not compile, or (from `check`) a value is out of range.
  """
  if isinstance(value, Mapping):
    pairs = list(value.items())
  elif isinstance(value, (list, tuple)):
    pairs = []
    for i, p in enumerate(value):
      if not isinstance(p, (list, tuple)) or len(p) != 2:
        raise TypeError(f"LoraConfig.{field}[{i}]: expected a (regex, value) pair, got {p!r}")
      pairs.append(tuple(p))
  else:
    raise TypeError(f"LoraConfig.{field}: expected a {{regex: value}} dict, got {value!r} of "
                    f"type {_type_name(value)}")
  out = []
  for pattern, v in pairs:
    name = f"{field}[{pattern!r}]"
    out.append((_regex(pattern, name), check(v, name)))
  return tuple(out)


def _choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
  """`value` if it is one of the strings `choices`; else `TypeError`/`ValueError` naming `field`."""
  if not isinstance(value, str):
    raise TypeError(f"LoraConfig.{field} must be one of {choices}, got {value!r} of type "
                    f"{_type_name(value)}")
  if value not in choices:
    raise ValueError(f"LoraConfig.{field} must be one of {choices}, got {value!r}")
  return value


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels to adapt and how. Frozen, hashable, JSON round-trip (`to_json`/`from_json`).

  Attributes:
    targets: regex or list/tuple of regexes, fullmatched against '/'-joined leaf paths.
    target_modules: PEFT's vocabulary: a list of module names, each matching a module path (a
      leaf path minus its leaf name) equal to it or ending in `/<name>` (`"q_proj"`,
      `"self_attn.q_proj"`; '.' and '/' are the same separator), whose kernels (leaves directly
      in the module with at least 2 axes that the function uses as weights; without `apply_fn`,
      any such leaf not named `bias`) are adapted; or `"all-linear"`: every kernel whose
      uses are all dense (`dot_general`), except the output head (the kernel of the function's
      last weight use), as PEFT's `all-linear` leaves out `lm_head` / a classifier. Adds to
      `targets`; `"all-linear"` needs `apply_fn` in `lj.plan`.
    modules_to_save: module names (as in `target_modules`) whose leaves are trained in full, as
      PEFT's `modules_to_save` (a classifier head): `lj.attach` puts a trainable copy
      `<leaf>_lora_full` beside each, which the function sees in place of the leaf; `split`,
      `trainable_mask`, `freeze_base`, checkpoints and PEFT export treat it as an adapter leaf.
      A saved module is never LoRA-adapted.
    rank: default LoRA rank `r`, an `int` >= 1.
    alpha: default `alpha`, a finite real > 0; the update is `ΔW = scale · A·B` with
      `scale = alpha / r` (`scaling="standard"`, Hu et al. 2021) or `alpha / sqrt(r)`
      (`scaling="rslora"`, Kalajdzievski 2023).
    exclude: regexes; a path matching any of them is never adapted (exclusion wins).
    dropout: dropout rate in `[0, 1)` on the LoRA input path only (`drop(x)·A·B`); the base path
      is untouched.
    init: `"kaiming_uniform"`: `A ~ U(±1/sqrt(fan_in))` (PEFT's default); `"gaussian"`:
      `A ~ N(0, (1/r)^2)`. `B = 0` always, so the model is unchanged at step 0.
    rank_pattern, alpha_pattern: `{regex: value}` per-path overrides; the first match wins. Values
      obey the same rules as `rank` and `alpha`.
    layout_pattern: `{regex: "stack=(0) in=(2) out=(1,3)"}` per-path layouts (axis numbers of
      the stored kernel; `stack=` may be left out), the first match wins. The escape hatch where
      the function's use cannot decide, and how a fused kernel gets one adapter per projection:
      gemma's `kv_einsum (2, K, D, H)` with `stack=(0) in=(2) out=(1,3)` has separate `k` and `v`
      adapters, as PEFT's `k_proj` / `v_proj`.
    layers_to_transform: PEFT's `layers_to_transform` for stacked kernels: indices along the first
      stack axis (the layers of a scanned stack) that are adapted. `lj.attach` gives the other
      layers `A = B = 0`, where training keeps them (both gradients, `xᵀ·g·Bᵀ` and `(x·A)ᵀ·g`,
      vanish), and `lj.export_peft` writes only these layers with PEFT's `layers_to_transform` /
      `layers_pattern`. Empty: every layer. Kernels without a stack axis are chosen by `targets`.

  Raises:
    TypeError: a field of the wrong type (a float or bool rank, a str or bool alpha, a
      non-string regex, ...), naming the field (`LoraConfig.rank_pattern['.*']`).
    ValueError: a value out of range (rank < 1, alpha <= 0 or not finite, dropout outside
      `[0, 1)`, unknown scaling/init, a regex that does not compile, no targets), naming the field.
  """

  targets: tuple[str, ...] | str = ()
  rank: int = 8
  alpha: float = 16.0
  exclude: tuple[str, ...] | str = ()
  dropout: float = 0.0
  scaling: str = "standard"
  init: str = "kaiming_uniform"
  rank_pattern: Any = ()
  alpha_pattern: Any = ()
  layout_pattern: Any = ()
  target_modules: tuple[str, ...] | str = ()
  modules_to_save: tuple[str, ...] = ()
  layers_to_transform: tuple[int, ...] = ()

  def __post_init__(self):
    targets = _as_patterns(self.targets, "targets")
    target_modules = _module_names(self.target_modules, "target_modules", shorthand=True)
    if not targets and not target_modules:
      raise ValueError("LoraConfig.targets: give at least one regex, e.g. r'.*/(query|value)/kernel', "
                       "or PEFT-style `target_modules=['query', 'value']`")
    set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen dataclass: normalise once here
    set_("targets", targets)
    set_("target_modules", target_modules)
    set_("modules_to_save", _module_names(self.modules_to_save, "modules_to_save", shorthand=False))
    set_("exclude", _as_patterns(self.exclude, "exclude"))
    set_("rank", _positive_int(self.rank, "rank"))
    set_("alpha", _positive_real(self.alpha, "alpha"))
    set_("rank_pattern", _as_pattern_pairs(self.rank_pattern, "rank_pattern", _positive_int))
    set_("alpha_pattern", _as_pattern_pairs(self.alpha_pattern, "alpha_pattern", _positive_real))
    set_("layout_pattern", _as_pattern_pairs(self.layout_pattern, "layout_pattern", _layout_text))
    dropout = _real(self.dropout, "dropout", "a number in [0, 1)")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
    set_("dropout", dropout)
    layers = self.layers_to_transform
    if not isinstance(layers, (list, tuple)) or any(
        isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in layers):
      raise TypeError(f"LoraConfig.layers_to_transform: expected a list of layer indices >= 0, got "
                      f"{layers!r}")
    set_("layers_to_transform", tuple(sorted({int(i) for i in layers})))
    _choice(self.scaling, "scaling", SCALINGS)
    _choice(self.init, "init", INITS)

  def selects(self, path: str) -> bool:
    """True if `path` fullmatches a target regex, or its module is named in a `target_modules`
    list, and it matches no exclude pattern and is not in a module to save. (`"all-linear"`
    and the at-least-2-axes rule of `target_modules` need the model: `lj.plan` applies them.)"""
    module = module_of(path)
    named = (isinstance(self.target_modules, tuple)
             and any(names_module(n, module) for n in self.target_modules))
    return ((named or any(re.fullmatch(p, path) for p in self.targets))
            and not any(re.fullmatch(p, path) for p in self.exclude) and not self.saves(path))

  def saves(self, path: str) -> bool:
    """True if `path` lies in a module named by `modules_to_save` (at any depth below it, as
    PEFT wraps the whole module)."""
    parts = path.split("/")
    return any(names_module(n, "/".join(parts[:k])) for n in self.modules_to_save
               for k in range(1, len(parts)))

  def rank_for(self, path: str) -> int:
    """Rank for `path`: the first fullmatching `rank_pattern` entry, else `rank`."""
    return next((v for p, v in self.rank_pattern if re.fullmatch(p, path)), self.rank)

  def alpha_for(self, path: str) -> float:
    """Alpha for `path`: the first fullmatching `alpha_pattern` entry, else `alpha`."""
    return next((v for p, v in self.alpha_pattern if re.fullmatch(p, path)), self.alpha)

  def layout_for(self, path: str) -> Layout | None:
    """The `layout_pattern` layout for `path` (first fullmatch), or None to infer it."""
    text = next((v for p, v in self.layout_pattern if re.fullmatch(p, path)), None)
    return None if text is None else Layout.parse(text)

  def scale_for(self, path: str) -> float:
    """`alpha/r` (standard) or `alpha/sqrt(r)` (rsLoRA) for `path`."""
    r, a = self.rank_for(path), self.alpha_for(path)
    return a / math.sqrt(r) if self.scaling == "rslora" else a / r

  def to_dict(self) -> dict[str, Any]:
    """The fields as JSON-able Python values (lists and dicts; `from_dict` reverses it); empty
    `target_modules` / `modules_to_save` are left out."""
    d = dataclasses.asdict(self)
    d["rank_pattern"] = dict(self.rank_pattern)
    d["alpha_pattern"] = dict(self.alpha_pattern)
    d["layout_pattern"] = dict(self.layout_pattern)
    d["targets"], d["exclude"] = list(self.targets), list(self.exclude)
    # the PEFT-vocabulary fields only when used, so records of configs without them stay as
    # they were written before these fields existed
    d["layers_to_transform"] = list(self.layers_to_transform)
    for field in ("target_modules", "modules_to_save", "layers_to_transform"):
      value = d.pop(field)
      if value:
        d[field] = value if isinstance(value, str) else list(value)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
    """A config from `to_dict`'s output (or any subset of the fields).

    Args:
      d: `{field: value}`; values are checked as by the constructor.

    Returns:
      The config.

    Raises:
      TypeError: `d` is not a mapping, or a value has the wrong type (naming the field).
      ValueError: `d` has a key that is not a field (naming the key), or a value is out of range.
    """
    if not isinstance(d, Mapping):
      raise TypeError(f"LoraConfig.from_dict: expected a {{field: value}} dict, got "
                      f"{_type_name(d)}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in fields]
    if unknown:
      raise ValueError(f"LoraConfig.from_dict: unknown field {unknown[0]!r} (fields: "
                       f"{', '.join(fields)})")
    return cls(**d)

  def to_json(self) -> str:
    """`to_dict()` as a JSON string (sorted keys)."""
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_json(cls, s: str) -> LoraConfig:
    """A config from `to_json`'s output.

    Args:
      s: a JSON object of fields.

    Returns:
      The config.

    Raises:
      ValueError: `s` is not JSON (`json.JSONDecodeError`), names an unknown field, or holds a
        value out of range.
      TypeError: `s` is not a JSON object, or a value has the wrong type.
    """
    return cls.from_dict(json.loads(s))
