"""lora_jax: LoRA for any JAX function, as pure functions over parameter pytrees."""

from ._src import checkpoint
from ._src import key_maps as _key_maps  # noqa: F401  (registers lj.peft_key_map.tunix, ...)
from ._src.adapters import LoraWeight, attach, combine, split, strip, trainable_mask
from ._src.apply import merged, unmerged
from ._src.banks import AdapterBank, select_adapter, stack_adapters, weighted_adapter
from ._src.checkpoint import CheckpointError, load_adapter, save_adapter
from ._src.config import LoraConfig
from ._src.layout import Layout, Role
from ._src.merge import delta, merge
from ._src.optim import apply_updates, freeze_base
from ._src.peft import export_peft, import_peft, peft_key_map
from ._src.plan import plan
from ._src.quantize import QuantizedArray, dequantize, quantize
from ._src.sites import Plan, Site, Use
from ._src.training import TrainingCheckpointer
from ._src.version import __version__

__all__ = ["CheckpointError", "apply_updates", "Layout", "LoraConfig", "LoraWeight", "Plan",
           "QuantizedArray", "Role", "Site", "TrainingCheckpointer", "Use", "__version__", "attach",
           "checkpoint", "combine", "delta", "dequantize", "export_peft", "freeze_base", "import_peft",
           "load_adapter", "merge", "merged", "peft_key_map", "plan", "quantize", "save_adapter", "split",
           "strip", "trainable_mask", "unmerged"]
__all__ += ["AdapterBank", "select_adapter", "stack_adapters", "weighted_adapter"]
