"""What a plan is: `Site` (one adapted kernel: name, shape, dtype, layout, rank, alpha, scale,
uses), `Use` (how the function uses it) and `Plan` (the sites with their config). Static, hashable
(valid `jit` static arguments), JSON round-trip, printable as the dry-run table. Building one by
tracing a function is `plan.py`'s job; these types sit below the interpreter and the adapters,
which both speak them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp

from .config import LoraConfig
from .layout import Layout, factor_dtype


@dataclasses.dataclass(frozen=True)
class Use:
  """How the function uses a kernel at one place: `kind` is `"low_rank"` (ΔW stays factored),
  `"materialised"` (`W + ΔW` formed for this use only, because `why`) or `"unused"` (the function
  never reads it); `primitive` names the op."""
  kind: str
  primitive: str
  why: str = ""

  def __str__(self) -> str:
    if self.kind != "materialised":
      return self.primitive if self.kind == "low_rank" else self.kind
    return f"materialised ({self.why})" if self.why else f"materialised ({self.primitive})"

  def to_dict(self) -> dict[str, str]:
    return dataclasses.asdict(self)



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
  """The resolved config: `sites` in tree order, the `config` they came from, the number of
  parameters in the base variables (for the summary line), and `saved`: the paths of the leaves
  trained in full (`LoraConfig.modules_to_save`), in tree order."""
  sites: tuple[Site, ...]
  config: LoraConfig
  base_params: int
  saved: tuple[str, ...] = ()

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
    if self.saved:
      summary += f"\ntrained in full (modules_to_save): {', '.join(self.saved)}"
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows), summary])

  def to_dict(self) -> dict[str, Any]:
    d = {"config": self.config.to_dict(), "base_params": self.base_params,
         "sites": [s.to_dict() for s in self.sites]}
    if self.saved:  # only when used, so plans without it serialise as before
      d["saved"] = list(self.saved)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Plan:
    sites = tuple(Site.from_dict(s) for s in d["sites"])
    return cls(sites, LoraConfig.from_dict(d["config"]), int(d["base_params"]),
               tuple(d.get("saved", ())))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_json(cls, s: str) -> Plan:
    return cls.from_dict(json.loads(s))
