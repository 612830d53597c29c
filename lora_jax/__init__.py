"""lora_jax: LoRA for any JAX function, as pure functions over parameter pytrees."""

from .apply import merged, unmerged
from .checkpoint import CheckpointError, TrainingCheckpointer, load_adapter, save_adapter
from .config import LoraConfig
from .merge import delta, merge
from .optim import freeze_base
from .peft import export_peft, import_peft, peft_key_map
from .plan import Layout, Plan, Site, plan
from .tree import attach, combine, split, strip, trainable_mask

__version__ = "0.1.0"

__all__ = ["CheckpointError", "Layout", "LoraConfig", "Plan", "Site", "TrainingCheckpointer", "attach",
           "combine", "delta", "export_peft", "freeze_base", "import_peft", "load_adapter", "merge",
           "merged", "peft_key_map", "plan", "save_adapter", "split", "strip", "trainable_mask",
           "unmerged"]
