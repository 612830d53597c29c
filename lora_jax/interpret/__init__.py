"""The jaxpr interpreter behind the unmerged apply path (see `unmerged`)."""

from . import contract, control, layout_ops  # noqa: F401  (register their rules)
from .core import RULES, Context, eval_jaxpr, materialize
from .trace import Traced, is_array, trace
from .tracked import Tracked

__all__ = ["RULES", "Context", "Traced", "Tracked", "eval_jaxpr", "is_array", "materialize", "trace"]
