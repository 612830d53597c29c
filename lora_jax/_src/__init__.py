"""lora_jax's implementation; the public API is re-exported by `lora_jax`."""
