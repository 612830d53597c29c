"""Remat benchmark: the LoRA step on a Llama-3-shaped NNX model with `nnx.remat` per block.

The model (Flax NNX, written here): token embedding, decoder blocks of RMSNorm -> grouped-query
attention (`q/k/v/o_proj`, RoPE) -> RMSNorm -> SwiGLU MLP (`gate/up/down_proj`), final RMSNorm,
untied `lm_head`. With `remat=True` each block's body runs under
`nnx.remat(Block.block)(self, x)`, the way tunix's `RematConfig.BLOCK` wraps its decoder layers.
Both variants hold the same state (same initialisation); only the graph differs.

LoRA (r=8) on the seven projection kernels of every block. Train steps (AdamW; state donated):

  full_ft         full fine-tuning, no remat
  full_ft_remat   full fine-tuning, blocks under nnx.remat  (the base model's own remat overhead)
  lora            LoRA via `lj.split`/`lj.combine` + `lj.unmerged`, no remat
  lora_remat      the same on the remat graph

The target (issue 11): the LoRA step with remat costs the non-remat LoRA step plus only the
recomputation the base model itself pays. FLOP accounting from the compiled steps'
`cost_analysis()`: `Δ_base = full_ft_remat - full_ft` is the blocks' forward recomputed; a LoRA step
under remat must recompute the same forward plus each site's low-rank forward
`2·T·r·(fan_in + fan_out)` FLOPs (T tokens), so `Δ_lora = lora_remat - lora` should equal
`Δ_base + that term`. Reported as `Δ_lora / (Δ_base + LoRA forward)`; 1.00 = the target holds
exactly. The benchmark asserts that both LoRA plans are identical and all low-rank and that the
remat and plain LoRA steps compute the same loss and adapter gradients.

  python benchmarks/remat.py            # 4 layers, d=256, 8 heads / 2 kv heads, F=768 (< 2 minutes)
  python benchmarks/remat.py --quick    # tiny smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lora_jax as lj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Variant, copy_tree, full_step, lora_step, nonzero_b,  # noqa: E402
                    parse_step_args, ratio_results, ratio_table, start, time_steps, write_results, xent)

TARGETS = r"layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
QUICK = dict(layers=1, d_model=32, heads=4, kv_heads=2, ffn=64, vocab=64, batch=2, seq=16, rank=4)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def rope(x: jax.Array, base: float = 5e5) -> jax.Array:
  """Rotary embedding on `x (B, S, H, hd)` (half-split form, Llama 3's base)."""
  s, hd = x.shape[1], x.shape[-1]
  freq = base ** (-jnp.arange(0, hd // 2, dtype=jnp.float32) * 2 / hd)
  angle = jnp.arange(s, dtype=jnp.float32)[:, None] * freq[None]
  cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
  x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
  def __init__(self, d: int, heads: int, kv_heads: int, rngs: nnx.Rngs):
    self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
    lin = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
    self.q_proj, self.o_proj = lin(d, heads * self.hd), lin(heads * self.hd, d)
    self.k_proj, self.v_proj = lin(d, kv_heads * self.hd), lin(d, kv_heads * self.hd)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, s, _ = x.shape
    q = rope(self.q_proj(x).reshape(b, s, self.heads, self.hd))
    k = rope(self.k_proj(x).reshape(b, s, self.kv_heads, self.hd))
    v = self.v_proj(x).reshape(b, s, self.kv_heads, self.hd)
    h = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # GQA: kv heads are shared
    return self.o_proj(h.reshape(b, s, self.heads * self.hd))


class MLP(nnx.Module):
  def __init__(self, d: int, f: int, rngs: nnx.Rngs):
    lin = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
    self.gate_proj, self.up_proj, self.down_proj = lin(d, f), lin(d, f), lin(f, d)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  def __init__(self, args: argparse.Namespace, remat: bool, rngs: nnx.Rngs):
    self.remat = remat
    self.input_layernorm = nnx.RMSNorm(args.d_model, rngs=rngs)
    self.attn = Attention(args.d_model, args.heads, args.kv_heads, rngs)
    self.post_attention_layernorm = nnx.RMSNorm(args.d_model, rngs=rngs)
    self.mlp = MLP(args.d_model, args.ffn, rngs)

  def block(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.input_layernorm(x))
    return x + self.mlp(self.post_attention_layernorm(x))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.remat:  # as tunix: remat the unbound method, the module as its first argument
      return nnx.remat(Block.block)(self, x)
    return self.block(x)


class Llama(nnx.Module):
  """`tokens (B, S) int32 -> logits (B, S, V)`."""

  def __init__(self, args: argparse.Namespace, remat: bool, rngs: nnx.Rngs):
    self.embedder = nnx.Embed(args.vocab, args.d_model, rngs=rngs)
    self.layers = nnx.List([Block(args, remat, rngs) for _ in range(args.layers)])
    self.final_norm = nnx.RMSNorm(args.d_model, rngs=rngs)
    self.lm_head = nnx.Linear(args.d_model, args.vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embedder(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(self.final_norm(x))


# ---------------------------------------------------------------------------------------------
# Setup shared with the smoke test
# ---------------------------------------------------------------------------------------------

def build(args: argparse.Namespace) -> dict[str, Any]:
  """Both graphs over one state, their plans and the LoRA tree (B = 1e-3)."""
  graph_plain, state = nnx.split(Llama(args, False, nnx.Rngs(0)))
  graph_remat, state_remat = nnx.split(Llama(args, True, nnx.Rngs(0)))
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state, state_remat)
  if not all(jax.tree.leaves(same)):
    raise AssertionError("the remat and plain models were initialised differently")
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, args.vocab, jnp.int32)
  config = lj.LoraConfig(targets=TARGETS, rank=args.rank, alpha=args.alpha)
  out: dict[str, Any] = {"state": state, "tokens": tokens}
  for name, graph in (("plain", graph_plain), ("remat", graph_remat)):
    apply = lambda s, x, graph=graph: nnx.merge(graph, s)(x)
    out[f"apply_{name}"] = apply
    out[f"plan_{name}"] = lj.plan(config, state, apply, args=(tokens,))
  out["tree"] = nonzero_b(lj.attach(out["plan_plain"], state, jax.random.key(2)))
  return out


def check(setup: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
  """Raises unless both plans are the same 7-per-layer all-`dot_general` plan and the remat LoRA
  step's loss and adapter gradients equal the plain one's; returns the figures."""
  plain, remat = setup["plan_plain"], setup["plan_remat"]
  if plain != remat or len(plain.sites) != 7 * args.layers:
    raise AssertionError(f"plans differ or select the wrong kernels:\n{plain}\n{remat}")
  if not all(tuple(map(str, s.use)) == ("dot_general",) for s in plain.sites):
    raise AssertionError(f"not every use is a low-rank dot_general:\n{plain}")
  adapters, base = lj.split(setup["tree"])
  tokens = setup["tokens"]

  def loss_grads(name):
    f = lambda ad: xent(lj.unmerged(setup[f"apply_{name}"], plain)(lj.combine(base, ad), tokens), tokens)
    return jax.jit(jax.value_and_grad(f))(adapters)

  (l_plain, g_plain), (l_remat, g_remat) = loss_grads("plain"), loss_grads("remat")
  err = max(float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)))
  scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g_plain))
  if abs(float(l_plain) - float(l_remat)) > 1e-5 or not err <= 1e-4 * scale:
    raise AssertionError(f"remat changes the LoRA step: loss {l_plain} vs {l_remat}, "
                         f"adapter gradients differ by {err:.2e}")
  return {"sites": len(plain.sites), "loss_diff": abs(float(l_plain) - float(l_remat)),
          "max_abs_grad_diff": err, "max_abs_grad": scale}


def lora_forward_flops(plan: lj.Plan, tokens: int) -> float:
  """FLOPs of every site's low-rank forward `(x·A)·B` (two matmuls) over `tokens` rows; the scale
  multiply and the add are left out (T·r and T·fan_out elementwise FLOPs, reported apart)."""
  return float(sum(2 * tokens * s.rank * (s.fan_in + s.fan_out) for s in plan.sites))


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
  sizes = dict(layers=4, d_model=256, heads=8, kv_heads=2, ffn=768, vocab=1024, batch=4, seq=128)
  return parse_step_args(__doc__ or "", sizes, QUICK, "remat_results.json", argv, reps=15)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  start(f"Llama-3-shaped NNX, {args.layers} layers, d={args.d_model}, {args.heads} heads / "
        f"{args.kv_heads} kv heads, MLP {args.ffn}, vocab {args.vocab}, batch {args.batch} x {args.seq}; "
        f"LoRA r={args.rank}, alpha={args.alpha:g}; AdamW; {args.reps} reps")
  setup = build(args)
  checks = check(setup, args)
  print(f"check: {checks['sites']} sites, all dot_general, same plan with and without remat; "
        f"remat vs plain LoRA step: |loss diff| {checks['loss_diff']:.1e}, "
        f"max|grad diff| {checks['max_abs_grad_diff']:.1e} (max|grad| {checks['max_abs_grad']:.1e})")

  state, tokens, plan = setup["state"], setup["tokens"], setup["plan_plain"]
  adapters, base = lj.split(setup["tree"])
  tx = optax.adamw(args.lr)
  variants = []
  for name in ("plain", "remat"):
    suffix = "" if name == "plain" else "_remat"
    apply = setup[f"apply_{name}"]
    variants.append(Variant(f"full_ft{suffix}", "train", jax.jit(full_step(apply, tx), donate_argnums=(0, 1)),
                            [copy_tree(state), tx.init(state), tokens], n_state=2))
    ad = copy_tree(adapters)
    step = jax.jit(lora_step(apply, plan, tx), donate_argnums=(0, 1))
    variants.append(Variant(f"lora{suffix}", "train", step, [ad, tx.init(ad), base, tokens], n_state=2))
  checks.update(time_steps(variants, args.reps))
  results = ratio_results(variants, [("full_ft", "full_ft"), ("full_ft_remat", "full_ft"),
                                     ("lora", "full_ft"), ("lora_remat", "lora")])
  print()
  print(ratio_table(results))

  by = {v.name: v for v in variants}
  accounting = None
  if all(v.flops for v in variants):
    d_base = by["full_ft_remat"].flops - by["full_ft"].flops
    d_lora = by["lora_remat"].flops - by["lora"].flops
    lora_fwd = lora_forward_flops(plan, args.batch * args.seq)
    ms = lambda name: next(r["median_ms"] for r in results if r["variant"] == name)
    accounting = {"delta_base_flops": d_base, "delta_lora_flops": d_lora, "lora_forward_flops": lora_fwd,
                  "delta_lora_over_delta_base": d_lora / d_base,
                  "delta_lora_over_expected": d_lora / (d_base + lora_fwd),
                  "time_delta_lora_ms": ms("lora_remat") - ms("lora"),
                  "time_delta_base_ms": ms("full_ft_remat") - ms("full_ft")}
    print(f"\nFLOP accounting: remat adds {d_lora / 1e9:.4f} GFLOP to the LoRA step, {d_base / 1e9:.4f} to "
          f"full fine-tuning (the base's recomputation; ratio {d_lora / d_base:.3f}); LoRA forward "
          f"{lora_fwd / 1e9:.4f} GFLOP; Δ_lora / (Δ_base + LoRA forward) = "
          f"{accounting['delta_lora_over_expected']:.3f}")
    print(f"time: remat adds {accounting['time_delta_lora_ms']:.1f} ms to the LoRA step, "
          f"{accounting['time_delta_base_ms']:.1f} ms to full fine-tuning")
  return write_results(args, {"checks": checks, "results": results, "flop_accounting": accounting})


if __name__ == "__main__":
  main()
