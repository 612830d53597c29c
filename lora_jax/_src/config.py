"""`LoraConfig`: the user's rules for which kernels get adapters, and with what rank and alpha.

Vocabulary mirrors PEFT (`r` -> `rank`, `lora_alpha` -> `alpha`, `rank_pattern`, `alpha_pattern`,
`use_rslora` -> `scaling="rslora"`). Patterns are regular expressions *fullmatched* against the
'/'-joined leaf path of a variable, e.g. ``"params/Block_0/query/kernel"``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

SCALINGS = ("standard", "rslora")
INITS = ("kaiming_uniform", "gaussian")


def _as_patterns(value: str | Sequence[str], field: str) -> tuple[str, ...]:
  patterns = (value,) if isinstance(value, str) else tuple(value)
  for p in patterns:
    if not isinstance(p, str):
      raise TypeError(f"LoraConfig.{field}: expected regex strings, got {p!r}")
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"LoraConfig.{field}: invalid regex {p!r}: {e}") from None
  return patterns


def _as_pattern_pairs(value: Mapping[str, Any] | Sequence[tuple[str, Any]], field: str,
                      cast: type) -> tuple[tuple[str, Any], ...]:
  pairs = tuple(value.items()) if isinstance(value, Mapping) else tuple(tuple(p) for p in value)
  out = []
  for pattern, v in pairs:
    _as_patterns(pattern, field)
    out.append((pattern, cast(v)))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels to adapt and how. Frozen, hashable, JSON round-trip (`to_json`/`from_json`).

  Attributes:
    targets: regex or sequence of regexes, fullmatched against '/'-joined leaf paths.
    rank: default LoRA rank `r`.
    alpha: default `alpha`; the update is `ΔW = scale · A·B` with `scale = alpha / r`
      (`scaling="standard"`, Hu et al. 2021) or `alpha / sqrt(r)` (`scaling="rslora"`, Kalajdzievski 2023).
    exclude: regexes; a path matching any of them is never adapted (exclusion wins).
    dropout: dropout rate on the LoRA input path only (`drop(x)·A·B`); the base path is untouched.
    init: `"kaiming_uniform"`: `A ~ U(±1/sqrt(fan_in))` (PEFT's default); `"gaussian"`:
      `A ~ N(0, (1/r)^2)`. `B = 0` always, so the model is unchanged at step 0.
    rank_pattern, alpha_pattern: `{regex: value}` per-path overrides; the first match wins.
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

  def __post_init__(self):
    targets = _as_patterns(self.targets, "targets")
    if not targets:
      raise ValueError("LoraConfig.targets: give at least one regex, e.g. r'.*/(query|value)/kernel'")
    set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen dataclass: normalise once here
    set_("targets", targets)
    set_("exclude", _as_patterns(self.exclude, "exclude"))
    set_("rank_pattern", _as_pattern_pairs(self.rank_pattern, "rank_pattern", int))
    set_("alpha_pattern", _as_pattern_pairs(self.alpha_pattern, "alpha_pattern", float))
    for name, r in (("rank", self.rank), *((f"rank_pattern[{p!r}]", v) for p, v in self.rank_pattern)):
      if isinstance(r, bool) or int(r) != r or r < 1:
        raise ValueError(f"LoraConfig.{name} must be a positive integer, got {r!r}")
    set_("rank", int(self.rank))
    set_("alpha", float(self.alpha))
    for name, a in (("alpha", self.alpha), *((f"alpha_pattern[{p!r}]", v) for p, v in self.alpha_pattern)):
      if not (a > 0 and math.isfinite(a)):
        raise ValueError(f"LoraConfig.{name} must be a finite number > 0, got {a!r}")
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
    set_("dropout", float(self.dropout))
    if self.scaling not in SCALINGS:
      raise ValueError(f"LoraConfig.scaling must be one of {SCALINGS}, got {self.scaling!r}")
    if self.init not in INITS:
      raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")

  def selects(self, path: str) -> bool:
    """True if `path` fullmatches a target and no exclude pattern."""
    return (any(re.fullmatch(p, path) for p in self.targets)
            and not any(re.fullmatch(p, path) for p in self.exclude))

  def rank_for(self, path: str) -> int:
    """Rank for `path`: the first fullmatching `rank_pattern` entry, else `rank`."""
    return next((v for p, v in self.rank_pattern if re.fullmatch(p, path)), self.rank)

  def alpha_for(self, path: str) -> float:
    """Alpha for `path`: the first fullmatching `alpha_pattern` entry, else `alpha`."""
    return next((v for p, v in self.alpha_pattern if re.fullmatch(p, path)), self.alpha)

  def scale_for(self, path: str) -> float:
    """`alpha/r` (standard) or `alpha/sqrt(r)` (rsLoRA) for `path`."""
    r, a = self.rank_for(path), self.alpha_for(path)
    return a / math.sqrt(r) if self.scaling == "rslora" else a / r

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["rank_pattern"] = dict(self.rank_pattern)
    d["alpha_pattern"] = dict(self.alpha_pattern)
    d["targets"], d["exclude"] = list(self.targets), list(self.exclude)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_json(cls, s: str) -> "LoraConfig":
    return cls.from_dict(json.loads(s))
