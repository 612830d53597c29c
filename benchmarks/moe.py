"""MoE benchmark: LoRA on a Qwen3-MoE-shaped layer stack, experts targeted or not, vs full fine-tuning.

A plain-`jnp` decoder (parameters a dict pytree): per layer RMSNorm, attention with q/k/v/o
`(D, D)` kernels, Qwen3's per-head q/k RMSNorm and RoPE, then a top-k routed MoE FFN whose experts
are stacked kernels `gate`/`up` `(E, D, F)` and `down` `(E, F, D)` (SwiGLU). Dispatch is the
sparse one MaxText uses (`sparse_matmul`: sort the token copies by expert, `lax.ragged_dot` per
stacked kernel with the per-expert group sizes, unsort, weight and sum); tunix's Megablox MoE layer
calls the same grouped matmul (`gmm`). The interpreter's `ragged_dot` rule keeps each expert's ΔW
factored: `x·W_g + s·((x·A_g)·B_g)`, both low-rank products ragged dots with the same groups.

Train steps (AdamW; params and optimizer state donated; one token batch for all):

  lora_experts   LoRA on q/k/v/o and the expert kernels gate/up/down (`lj.split`: adapter grads only)
  full_ft        grads for all params, AdamW on all params                     (reference)
  lora_attn      LoRA on q/k/v/o only, experts excluded

Reported: the FLOP ratio (`cost_analysis()` of the compiled step) and the median wall / process
CPU time ratio of lora_experts against full_ft and against lora_attn, and a check that every use
of every site in the lora_experts plan is low-rank (nothing materialised). The benchmark asserts
that the unmerged forward equals the merged one (`lj.merge`) with B non-zero.

  python benchmarks/moe.py            # 4 layers, d=256, 8 experts top-2, F=512, 2 x 64 tokens
  python benchmarks/moe.py --quick    # tiny smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Variant, copy_tree, full_step, lora_step, nonzero_b,  # noqa: E402
                    parse_step_args, ratio_results, ratio_table, start, time_steps, write_results)

ATTN = r"layer_\d+/attn/(q|k|v|o)"
EXPERTS = r"layer_\d+/moe/(gate|up|down)"
QUICK = dict(layers=1, d_model=32, heads=4, experts=4, top_k=2, ffn=64, vocab=64, batch=2, seq=16, rank=4)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def init(key: jax.Array, args: argparse.Namespace) -> dict[str, Any]:
  """Parameters: `embed (V, D)`, per layer `attn/{q,k,v,o} (D, D)`, q/k norms `(hd,)`, `moe/router
  (D, E)`, `moe/{gate,up} (E, D, F)`, `moe/down (E, F, D)`, RMSNorm scales; `lm_head (D, V)`."""
  d, f, e, hd = args.d_model, args.ffn, args.experts, args.d_model // args.heads
  keys = iter(jax.random.split(key, 2 + 8 * args.layers))
  normal = lambda shape, fan_in: jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(fan_in)
  params: dict[str, Any] = {"embed": normal((args.vocab, d), 1.0) * 0.02}
  for i in range(args.layers):
    params[f"layer_{i}"] = {
        "ln1": jnp.ones(d), "ln2": jnp.ones(d),
        "attn": {"q": normal((d, d), d), "k": normal((d, d), d), "v": normal((d, d), d),
                 "o": normal((d, d), d), "q_norm": jnp.ones(hd), "k_norm": jnp.ones(hd)},
        "moe": {"router": normal((d, e), d), "gate": normal((e, d, f), d), "up": normal((e, d, f), d),
                "down": normal((e, f, d), f)},
    }
  params["ln_f"] = jnp.ones(d)
  params["lm_head"] = normal((d, args.vocab), d)
  return params


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x: jax.Array, base: float = 1e6) -> jax.Array:
  """Rotary position embedding on `x (B, S, H, hd)` (half-split form, Qwen3's base)."""
  s, hd = x.shape[1], x.shape[-1]
  freq = base ** (-jnp.arange(0, hd // 2, dtype=jnp.float32) * 2 / hd)
  angle = jnp.arange(s, dtype=jnp.float32)[:, None] * freq[None]  # (S, hd/2)
  cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
  x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(p: dict[str, Any], x: jax.Array, heads: int) -> jax.Array:
  b, s, d = x.shape
  split = lambda t: t.reshape(b, s, heads, d // heads)
  q = rope(rms_norm(split(x @ p["q"]), p["q_norm"]))
  k = rope(rms_norm(split(x @ p["k"]), p["k_norm"]))
  h = jax.nn.dot_product_attention(q, k, split(x @ p["v"]), is_causal=True)
  return h.reshape(b, s, d) @ p["o"]


def moe(p: dict[str, Any], x: jax.Array, top_k: int) -> jax.Array:
  """Top-k routed SwiGLU experts, sparse dispatch: each token's k copies sorted by expert, one
  `lax.ragged_dot` per stacked kernel over the sorted rows, then unsorted and weighted."""
  b, s, d = x.shape
  tokens = x.reshape(b * s, d)
  e = p["router"].shape[-1]
  probs = jax.nn.softmax((tokens @ p["router"]).astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)  # (T, k)
  weights = (weights / jnp.sum(weights, axis=-1, keepdims=True)).astype(x.dtype)
  flat = experts.reshape(-1)  # (T·k,) expert of each token copy
  order = jnp.argsort(flat)
  rows = tokens[order // top_k]  # (T·k, D), grouped by expert
  groups = jnp.bincount(flat, length=e).astype(jnp.int32)
  h = jax.nn.silu(jax.lax.ragged_dot(rows, p["gate"], groups)) * jax.lax.ragged_dot(rows, p["up"], groups)
  y = jax.lax.ragged_dot(h, p["down"], groups)  # (T·k, D)
  y = jnp.zeros_like(y).at[order].set(y).reshape(b * s, top_k, d)
  return jnp.einsum("tkd,tk->td", y, weights).reshape(b, s, d)


def make_apply(args: argparse.Namespace):
  """`apply(params, tokens (B, S) int32) -> logits (B, S, V)`."""
  def apply(params: dict[str, Any], tokens: jax.Array) -> jax.Array:
    x = params["embed"][tokens]
    for i in range(args.layers):
      p = params[f"layer_{i}"]
      x = x + attention(p["attn"], rms_norm(x, p["ln1"]), args.heads)
      x = x + moe(p["moe"], rms_norm(x, p["ln2"]), args.top_k)
    return rms_norm(x, params["ln_f"]) @ params["lm_head"]
  return apply


# ---------------------------------------------------------------------------------------------
# Setup shared with the smoke test
# ---------------------------------------------------------------------------------------------

def build(args: argparse.Namespace, names: tuple[str, ...] = ("experts", "attn")) -> dict[str, Any]:
  """The model, its plans (`names`: experts targeted / excluded) and LoRA trees (B = 1e-3)."""
  apply = make_apply(args)
  k_init, k_tok, k_lora = jax.random.split(jax.random.key(0), 3)
  params = init(k_init, args)
  tokens = jax.random.randint(k_tok, (args.batch, args.seq), 0, args.vocab, jnp.int32)
  out: dict[str, Any] = {"apply": apply, "params": params, "tokens": tokens}
  for name in names:
    targets = {"experts": f"{ATTN}|{EXPERTS}", "attn": ATTN}[name]
    config = lj.LoraConfig(targets=targets, rank=args.rank, alpha=args.alpha)
    plan = lj.plan(config, params, apply, args=(tokens,))
    out[f"plan_{name}"] = plan
    out[f"tree_{name}"] = nonzero_b(lj.attach(plan, params, k_lora))
  return out


def check(setup: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
  """Raises unless the experts plan adapts 7 kernels per layer with every use low-rank (expert
  kernels through `ragged_dot`, stacked `(E, D, F)` as stack/in/out) and the unmerged forward
  equals the merged one; returns the figures."""
  plan = setup["plan_experts"]
  if len(plan.sites) != 7 * args.layers:
    raise AssertionError(f"experts plan selects {len(plan.sites)} kernels, want {7 * args.layers}")
  uses = {s.path: tuple(str(u) for u in s.use) for s in plan.sites}
  materialised = {s.path: uses[s.path] for s in plan.sites if not s.low_rank}
  if materialised:
    raise AssertionError(f"materialised uses in the experts plan: {materialised}")
  for s in plan.sites:
    if s.path.rsplit("/", 1)[-1] in ("gate", "up", "down"):
      if uses[s.path] != ("ragged_dot",) or s.layout.stack_axes != (0,):
        raise AssertionError(f"{s.path}: use {uses[s.path]}, layout {s.layout.describe(s.shape)}")
  apply, tree, tokens = setup["apply"], setup["tree_experts"], setup["tokens"]
  y_un = jax.jit(lj.unmerged(apply, plan))(tree, tokens)
  y_m = jax.jit(lambda t, x: apply(lj.merge(plan, t), x))(tree, tokens)
  y_base = jax.jit(apply)(setup["params"], tokens)
  err = float(jnp.max(jnp.abs(y_un - y_m)))
  effect = float(jnp.max(jnp.abs(y_un - y_base)))
  if not err <= 1e-3 * effect:
    raise AssertionError(f"unmerged vs merged forward differ by {err:.2e} (LoRA effect {effect:.2e})")
  return {"sites": len(plan.sites), "uses": sorted({u for us in uses.values() for u in us}),
          "max_abs_unmerged_vs_merged": err, "max_abs_lora_effect": effect}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
  sizes = dict(layers=4, d_model=256, heads=4, experts=8, top_k=2, ffn=512, vocab=1024, batch=2, seq=64)
  return parse_step_args(__doc__ or "", sizes, QUICK, "moe_results.json", argv)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  start(f"{args.layers} layers, d={args.d_model}, {args.heads} heads, {args.experts} experts "
        f"top-{args.top_k}, expert FFN {args.ffn}, vocab {args.vocab}, batch {args.batch} x {args.seq}; "
        f"LoRA r={args.rank}, alpha={args.alpha:g}; AdamW; {args.reps} reps")
  setup = build(args)
  checks = check(setup, args)
  print(f"check: {checks['sites']} sites, uses {checks['uses']} (nothing materialised); "
        f"max|unmerged - merged| = {checks['max_abs_unmerged_vs_merged']:.2e} "
        f"(LoRA effect {checks['max_abs_lora_effect']:.2e})")

  apply, params, tokens = setup["apply"], setup["params"], setup["tokens"]
  tx = optax.adamw(args.lr)
  variants = [Variant("full_ft", "train", jax.jit(full_step(apply, tx), donate_argnums=(0, 1)),
                      [copy_tree(params), tx.init(params), tokens], n_state=2)]
  for name in ("experts", "attn"):
    adapters, base = lj.split(setup[f"tree_{name}"])
    adapters = copy_tree(adapters)
    step = jax.jit(lora_step(apply, setup[f"plan_{name}"], tx), donate_argnums=(0, 1))
    variants.append(Variant(f"lora_{name}", "train", step, [adapters, tx.init(adapters), base, tokens],
                            n_state=2))
  checks.update(time_steps(variants, args.reps))
  results = ratio_results(variants, [("full_ft", "full_ft"), ("lora_experts", "full_ft"),
                                     ("lora_attn", "full_ft"), ("lora_experts", "lora_attn")])
  print()
  print(ratio_table(results, rules_before=(3,)))
  return write_results(args, {"checks": checks, "lora_params": {
      name: setup[f"plan_{name}"].num_params for name in ("experts", "attn")},
      "plan_experts": str(setup["plan_experts"]), "results": results})


if __name__ == "__main__":
  main()
