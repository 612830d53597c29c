"""Initialisers for the LoRA factors. `B = 0` always, so `ΔW = 0` and the model is unchanged at
step 0; only `A` is random."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype=jnp.float32) -> jax.Array:
  """`A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`: PyTorch's `kaiming_uniform_(a=sqrt(5))`, PEFT's default."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def gaussian(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype=jnp.float32) -> jax.Array:
  """`A ~ N(0, (1/r)^2)` with `r = shape[-1]` (PEFT's `init_lora_weights="gaussian"`)."""
  del fan_in
  return jax.random.normal(key, shape, dtype) / shape[-1]


INITIALIZERS = {"kaiming_uniform": kaiming_uniform, "gaussian": gaussian}
