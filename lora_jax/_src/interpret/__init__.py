"""The jaxpr interpreter behind `lj.plan` (layout inference, uses) and `lj.unmerged`."""

from . import concat, contract, control, indexing, layout_ops  # noqa: F401  (register their rules)
from .core import RULES, Apply, Infer, Use, eval_jaxpr, materialize
from .trace import Traced, is_array, trace
from .values import Tracked, View

__all__ = ["RULES", "Apply", "Infer", "Traced", "Tracked", "Use", "View", "eval_jaxpr", "is_array",
           "materialize", "trace"]
