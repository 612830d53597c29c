"""optax helpers: train only the LoRA leaves (`freeze_base`), and apply their updates without
touching a base bit, inside or outside `jit` (`apply_updates`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .adapters import combine, has_lora, is_lora_name, split
from .tree import flatten, map_leaves, unbox, with_value


class FreezeBaseState(NamedTuple):
  inner: Any  # the wrapped optimizer's state, over the adapters only


def freeze_base(tx: optax.GradientTransformation, tree: Any) -> optax.GradientTransformation:
  """Wrap `tx` so it updates only the LoRA leaves of a full LoRA tree; base leaves get a zero
  update and the optimizer holds state (moments, …) only for the adapters.

  The zero update is `-0.0`, the IEEE identity of addition (`w + -0.0 == w` bit for bit, also
  for `w = -0.0`). In one jitted step that computes the updates and applies them with
  `optax.apply_updates`, XLA folds the constant `w + -0.0` away and every base leaf stays
  bit-identical. Outside `jit` (or in a jit that receives `updates` as an argument) the addition
  really runs, through XLA's CPU flush-to-zero: subnormal base weights (e.g. `1e-40` in float32)
  become zeros and signalling NaNs are quieted. There, use `lj.apply_updates(tree, updates)`,
  which returns the base leaves untouched (the same objects) and adds the updates to the LoRA
  leaves only; it is correct under `jit` too. Building base gradients at all is wasted work:
  where you can, differentiate only `adapters` from `lj.split(tree)` and apply `tx` to them
  directly.

  Args:
    tx: the optimizer for the adapters.
    tree: a full LoRA tree (base and LoRA leaves), to check that there is something to train.

  Returns:
    A `GradientTransformation` over full LoRA trees whose state covers the adapters only.

  Raises:
    ValueError: `tree` has no LoRA leaves.
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


def apply_updates(tree: Any, updates: Any) -> Any:
  """`optax.apply_updates` for a full LoRA tree that never touches a base leaf.

  LoRA leaves (names ending in `_lora_a` / `_lora_b`) become `leaf + update` in the leaf's dtype,
  as `optax.apply_updates` computes them; every other leaf is returned as is (the same array
  object, boxed as before), whatever its update. With `lj.freeze_base` the base updates are all
  `-0.0`, which `optax.apply_updates` leaves bit-exact only when XLA can fold them away (one
  jitted step computing and applying them): run eagerly, XLA's CPU flush-to-zero zeroes subnormal
  base weights and quiets signalling NaNs. This function is bit-exact for the base either way.

  Args:
    tree: a full LoRA tree (as given to `lj.freeze_base`'s `update`).
    updates: the updates, with `tree`'s structure (from `lj.freeze_base(tx, tree).update`).

  Returns:
    `tree` with the LoRA leaves updated.

  Raises:
    ValueError: naming the first path where `updates` and `tree` do not have the same leaves.
  """
  names, update_leaves = list(flatten(tree)), flatten(updates)
  missing = [n for n in names if n not in update_leaves]
  extra = [n for n in update_leaves if n not in set(names)]
  if missing or extra:
    what = (f"{missing[0]!r} has no update" if missing
            else f"{extra[0]!r} is an update for no leaf of `tree`")
    raise ValueError(f"lj.apply_updates: `updates` does not match `tree`: {what}")

  def apply(name: str, leaf: Any) -> Any:
    if not is_lora_name(name):
      return leaf
    return with_value(leaf, optax.apply_updates(unbox(leaf), unbox(update_leaves[name])))

  return map_leaves(apply, tree)
