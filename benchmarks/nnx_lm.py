"""The reference LM written in Flax NNX with NNX's own LoRA layers (`nnx.LoRALinear`).

Same architecture, shapes and math as `common.LM` (pre-LN blocks, `dot_product_attention`,
tanh-GELU MLP, learned positions, untied head), with one difference forced by NNX: `LoRALinear` is
a 2-D `Linear`, so the attention projections hold `(D, H·hd)` / `(H·hd, D)` kernels instead of
linen's `(D, H, hd)` / `(H, hd, D)` (the same numbers, reshaped). NNX's LoRA computes
`x·W + b + x·A·B` with **no alpha/r scaling**; used as-is in the benchmark (one multiply fewer per
site). `from_lora_jax` folds lora_jax's scale into B so both compute the same function.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

KINDS = ("query", "key", "value", "out", "fc1", "fc2")


class Attention(nnx.Module):
  def __init__(self, d: int, heads: int, rank: int, dtype: Any, rngs: nnx.Rngs):
    self.heads = heads
    lin = lambda i, o: nnx.LoRALinear(i, o, lora_rank=rank, dtype=dtype, param_dtype=dtype,
                                      lora_dtype=dtype, lora_param_dtype=dtype, rngs=rngs)
    self.query, self.key, self.value, self.out = lin(d, d), lin(d, d), lin(d, d), lin(d, d)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    b, s, d = x.shape
    heads = lambda t: t.reshape(b, s, self.heads, d // self.heads)
    h = nnx.dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                  mask=mask)
    return self.out(h.reshape(b, s, d))


class Block(nnx.Module):
  def __init__(self, d: int, heads: int, rank: int, dtype: Any, rngs: nnx.Rngs):
    ln = lambda: nnx.LayerNorm(d, epsilon=1e-6, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.ln1, self.ln2 = ln(), ln()
    self.attn = Attention(d, heads, rank, dtype, rngs)
    lin = lambda i, o: nnx.LoRALinear(i, o, lora_rank=rank, dtype=dtype, param_dtype=dtype,
                                      lora_dtype=dtype, lora_param_dtype=dtype, rngs=rngs)
    self.fc1, self.fc2 = lin(d, 4 * d), lin(4 * d, d)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x), mask)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class LM(nnx.Module):
  """`tokens (B, S) int -> logits (B, S, vocab)`; blocks are attributes `block_0 ...`."""

  def __init__(self, vocab: int, d: int, heads: int, layers: int, max_len: int, rank: int,
               dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
    self.layers = layers
    self.embed = nnx.Embed(vocab, d, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.pos_embed = nnx.Param(jnp.zeros((max_len, d), dtype))
    for i in range(layers):
      setattr(self, f"block_{i}", Block(d, heads, rank, dtype, rngs))
    self.ln_f = nnx.LayerNorm(d, epsilon=1e-6, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.lm_head = nnx.Linear(d, vocab, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos_embed[...][: tokens.shape[1]]
    mask = nnx.make_causal_mask(tokens)
    for i in range(self.layers):
      x = getattr(self, f"block_{i}")(x, mask)
    return self.lm_head(self.ln_f(x))


def _flat2(x: jax.Array, n_in: int) -> jax.Array:
  """A kernel or factor as a 2-D matrix, its first `n_in` axes flattened into rows."""
  return x.reshape(math.prod(x.shape[:n_in]), math.prod(x.shape[n_in:]))


def from_lora_jax(args: Any, plan: Any, tree: Any, dtype: Any = jnp.float32):
  """`(graphdef, lora_state, rest_state)` of an `LM` holding the same weights as the lora_jax LoRA
  tree `tree` (linen layout, see `common.LM`), with each site's B multiplied by its scale
  (NNX has none). `lora_state` holds exactly the `nnx.LoRAParam`s."""
  abstract = nnx.eval_shape(lambda: LM(args.vocab, args.d_model, args.heads, args.layers, args.seq,
                                       args.rank, dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  p = tree["params"]
  pure = {"embed": {"embedding": p["embed"]["embedding"]}, "pos_embed": p["pos_embed"],
          "ln_f": dict(p["ln_f"]), "lm_head": {"kernel": p["lm_head"]["kernel"]}}
  scales = {s.path: s.scale for s in plan.sites}
  for i in range(args.layers):
    src, dst = p[f"block_{i}"], {"ln1": dict(p[f"block_{i}"]["ln1"]),
                                 "ln2": dict(p[f"block_{i}"]["ln2"]), "attn": {}}
    for kind in KINDS:
      in_attn = kind in ("query", "key", "value", "out")
      layer = src["attn"][kind] if in_attn else src[kind]
      n_in = 2 if kind == "out" else 1  # out kernel (H, hd, D): two input axes
      scale = scales[f"params/block_{i}/{'attn/' if in_attn else ''}{kind}/kernel"]
      b = layer["kernel_lora_b"]
      (dst["attn"] if in_attn else dst)[kind] = {
          "kernel": _flat2(layer["kernel"], n_in), "bias": layer["bias"].reshape(-1),
          "lora": {"lora_a": _flat2(layer["kernel_lora_a"], n_in),
                   "lora_b": _flat2(b * jnp.asarray(scale, b.dtype), 1)}}
    pure[f"block_{i}"] = dst
  nnx.replace_by_pure_dict(state, pure)  # in place; raises on a key the model lacks
  _, lora, rest = nnx.split(nnx.merge(graphdef, state), nnx.LoRAParam, ...)
  return graphdef, lora, rest


def forward(graphdef: Any) -> Callable[[Any, Any, jax.Array], jax.Array]:
  """`(lora_state, rest_state, tokens) -> logits` (pure: `nnx.merge` inside the caller's jit)."""
  return lambda lora, rest, tokens: nnx.merge(graphdef, lora, rest)(tokens)


def train_step(graphdef: Any, tx: optax.GradientTransformation,
               loss_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable:
  """`(lora_state, opt_state, rest_state, tokens) -> (lora_state, opt_state, loss)`: gradients
  and `tx` for the `nnx.LoRAParam`s only (NNX's functional split/merge API, jitted by the
  caller; the same program `nnx.jit` + `nnx.Optimizer(wrt=nnx.LoRAParam)` traces, without its
  per-call Python graph traversal)."""
  fwd = forward(graphdef)

  def step(lora, opt_state, rest, tokens):
    loss, grads = jax.value_and_grad(lambda l: loss_fn(fwd(l, rest, tokens), tokens))(lora)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss
  return step
