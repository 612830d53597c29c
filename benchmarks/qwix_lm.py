"""The reference LM with qwix's LoRA (`qwix.LoraProvider` + `qwix.apply_lora_to_model`).

qwix intercepts `dot_general`/`einsum` while the linen model runs and adds `x·A·B · alpha/r` next
to every weight whose module path matches the rule. It creates `kernel_lora_a` / `kernel_lora_b`
beside the kernel, like lora_jax, but with the kernel's contracted axes flattened into A and the
kept axes flattened into B: for a query kernel `(D, H, hd)` A is `(D, r)` and B is `(r, H·hd)`
(lora_jax keeps `(r, H, hd)`). The values are the same numbers, so `tree_from_lora_jax` converts
a lora_jax tree by reshaping and the two models compute the same function.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import optax
from flax import traverse_util

try:
  import qwix
except ImportError:  # the benchmark prints "n/a (not installed)"
  qwix = None

MODULE_PATH = r"block_\d+/(attn/(query|key|value|out)|fc1|fc2)"
LORA_SUFFIXES = ("_lora_a", "_lora_b")


def missing() -> str | None:
  """Why this alternative cannot run here, or None."""
  return None if qwix is not None else "n/a (not installed)"


def lora_model(model: Any, rank: int, alpha: float) -> Any:
  """`model` (a linen module) with qwix LoRA of rank `rank`, scale `alpha / rank` on the query /
  key / value / out / fc1 / fc2 kernels of every block."""
  provider = qwix.LoraProvider(module_path=MODULE_PATH, rank=rank, alpha=alpha)
  return qwix.apply_lora_to_model(model, provider)


def tree_from_lora_jax(tree: Any) -> Any:
  """A lora_jax LoRA tree in qwix's layout: A `(*in, r)` -> `(prod(in), r)`, B `(r, *out)` ->
  `(r, prod(out))` (what qwix's `_create_lora_layer_shapes` gives a kernel with no batch axes)."""
  def convert(path, x):
    name = path[-1]
    if name.endswith("_lora_a"):
      return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if name.endswith("_lora_b"):
      return x.reshape(x.shape[0], math.prod(x.shape[1:]))
    return x
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({k: convert(k, v) for k, v in flat.items()})


def split(tree: Any) -> tuple[Any, Any]:
  """`(adapters, base)` by leaf name (qwix's LoRA leaves end in `_lora_a` / `_lora_b`)."""
  flat = traverse_util.flatten_dict(tree)
  is_lora = lambda k: str(k[-1]).endswith(LORA_SUFFIXES)
  return (traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_lora(k)}),
          traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_lora(k)}))


def combine(base: Any, adapters: Any) -> Any:
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base),
                                       **traverse_util.flatten_dict(adapters)})


def forward(qmodel: Any) -> Callable[[Any, jax.Array], jax.Array]:
  """`(tree, tokens (B, S)) -> logits (B, S, vocab)`, through qwix's interception."""
  return lambda tree, tokens: qmodel.apply(tree, tokens)


def train_step(qmodel: Any, tx: optax.GradientTransformation,
               loss_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable:
  """`(adapters, opt_state, base, tokens) -> (adapters, opt_state, loss)`: gradients and `tx`
  for the qwix adapters only (the base is a constant input)."""
  def step(adapters, opt_state, base, tokens):
    loss, grads = jax.value_and_grad(
        lambda a: loss_fn(qmodel.apply(combine(base, a), tokens), tokens))(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss
  return step
