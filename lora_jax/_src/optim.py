"""optax helpers: train only the LoRA leaves."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .adapters import combine, has_lora, split


class FreezeBaseState(NamedTuple):
  inner: Any  # the wrapped optimizer's state, over the adapters only


def freeze_base(tx: optax.GradientTransformation, tree: Any) -> optax.GradientTransformation:
  """Wrap `tx` so it updates only the LoRA leaves of a full LoRA tree; base leaves get a zero
  update and the optimizer holds state (moments, …) only for the adapters.

  The zero update is `-0.0`, the IEEE identity of addition (`w + -0.0 == w` bit for bit, also
  for `w = -0.0`), so after `optax.apply_updates` every base leaf is bit-identical. Building base
  gradients at all is wasted work: where you can, differentiate only `adapters` from
  `lj.split(tree)` and apply `tx` to them directly.
  """
  if not has_lora(tree):
    raise ValueError("freeze_base: `tree` has no LoRA leaves (*_lora_a/*_lora_b); "
                     "attach adapters first with lj.attach(plan, variables, key)")

  def init(params):
    return FreezeBaseState(tx.init(split(params)[0]))

  def update(updates, state, params=None):
    adapter_updates, base_updates = split(updates)
    adapter_params = None if params is None else split(params)[0]
    adapter_updates, inner = tx.update(adapter_updates, state.inner, adapter_params)
    frozen = jax.tree_util.tree_map(lambda u: jnp.full_like(u, -0.0), base_updates)
    return combine(frozen, adapter_updates), FreezeBaseState(inner)

  return optax.GradientTransformation(init, update)
