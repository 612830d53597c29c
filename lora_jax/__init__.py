"""lora_jax: LoRA for any JAX function, as pure functions over parameter pytrees."""

from .apply import merged, unmerged
from .config import LoraConfig
from .merge import delta, merge
from .optim import freeze_base
from .plan import Layout, Plan, Site, plan
from .tree import attach, combine, split, strip, trainable_mask

__version__ = "0.1.0"

__all__ = ["Layout", "LoraConfig", "Plan", "Site", "attach", "combine", "delta", "freeze_base",
           "merge", "merged", "plan", "split", "strip", "trainable_mask", "unmerged"]
