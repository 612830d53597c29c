"""LoRA on a small decoder-only transformer LM: pretrain on one rule, adapt to a related rule.

The data is generated, so nothing is downloaded. Every sequence is an arithmetic progression
modulo the vocabulary size V: `x_t = (x_0 + t·k) mod V`, with a random start `x_0` and a random
step `k` per sequence. From two tokens on, the next token is determined, so the model has to read
the step off its context (attention) and add it (MLP).

1. pretrain a linen transformer (token + position embeddings, pre-LN blocks of causal
   `nn.MultiHeadDotProductAttention` + MLP, the blocks stacked with `nn.scan`) on steps k in {1, 2, 3};
2. the new task: the same progressions counting *down*, k in {-1, -2, -3};
3. attach LoRA adapters to the attention query and value kernels of every layer (`--targets`
   picks others; the plan gives each scanned `(L, ...)` kernel one adapter per layer) and train
   only them, differentiating only the adapters so no base-weight gradient is ever built; full
   fine-tuning from the same base runs beside it, for loss and tokens/s.

It reports the loss and next-token accuracy on the new task before/after, merged vs unmerged
agreement, adapter size vs model size, and tokens/s of the LoRA step vs the full fine-tuning step.

    python examples/transformer_lm.py                               # ~1-2 min on 2 CPU cores
    python examples/transformer_lm.py --layers 6 --d-model 512 --batch-size 64 --steps 2000  # GPU
"""

from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import lora_jax as lj
from summary import print_table  # examples/summary.py: a fixed-width table


class Block(nn.Module):
  """Pre-LN transformer block: causal self-attention, then a GELU MLP, both residual."""
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, _):  # x: (batch, T, d_model); `_` is the (unused) per-layer scan input
    causal = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))  # (batch, 1, T, T)
    h = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, deterministic=True, name="attn")(h, mask=causal)
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.Dense(x.shape[-1], name="fc2")(nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(h)))
    return x + h, None


class TransformerLM(nn.Module):
  """Decoder-only LM. Block parameters are stacked along a leading layer axis by `nn.scan`:
  e.g. params/layers/attn/query/kernel has shape (layers, d_model, heads, d_model // heads)."""
  vocab: int
  max_len: int
  d_model: int
  num_heads: int
  num_layers: int
  mlp_dim: int

  @nn.compact
  def __call__(self, tokens):  # tokens: (batch, T) int -> logits (batch, T, vocab)
    x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, self.d_model))
    x = x + pos[: tokens.shape[1]]
    layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=self.num_layers)
    x, _ = layers(self.num_heads, self.mlp_dim, name="layers")(x, None)
    return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))


def progressions(key, batch: int, length: int, vocab: int, steps: jax.Array) -> jax.Array:
  """(batch, length) int32 sequences x_t = (x_0 + t·k) mod vocab, x_0 uniform, k drawn from the
  1-D array `steps` (an array, so one compiled train step serves both rules)."""
  start_key, step_key = jax.random.split(key)
  start = jax.random.randint(start_key, (batch, 1), 0, vocab)
  k = jax.random.choice(step_key, steps, (batch, 1))
  return (start + k * jnp.arange(length)) % vocab


def lm_loss(logits, tokens) -> jax.Array:
  """Mean next-token cross-entropy over the predictable targets x_2 .. x_{T-1} (x_1 depends on
  the unseen step k, so no model can predict it). logits (batch, T, V), tokens (batch, T)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, 1:-1], tokens[:, 2:]).mean()


def lm_metrics(logits, tokens) -> tuple[float, float]:
  """(loss, next-token accuracy) over the same targets, as Python floats (for reporting)."""
  accuracy = jnp.mean(jnp.argmax(logits[:, 1:-1], -1) == tokens[:, 2:])
  return float(lm_loss(logits, tokens)), float(accuracy)


def make_train_step(loss_fn, tx, batch_size: int, seq_len: int, vocab: int):
  """A jitted step `(params, opt_state, frozen, key, rule_steps) -> (params, opt_state, loss)`
  on a fresh batch of progressions. `loss_fn(params, frozen, tokens)` is differentiated w.r.t.
  `params` only; `frozen` is an argument rather than a closure constant, so the compiled step does
  not embed it. `params` and `opt_state` are donated (updated in place)."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, frozen, key, rule_steps):
    tokens = progressions(key, batch_size, seq_len, vocab, rule_steps)
    loss, grads = jax.value_and_grad(loss_fn)(params, frozen, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train(step, tx, params, frozen, rule_steps, steps: int, key, desc: str):
  """Run `steps` of `step` from a fresh `tx` state. Returns (params, per-step losses, seconds per
  step): the first step (compilation, if not compiled yet) is left out of the timing, which ends
  when the result is ready on the device."""
  opt_state = tx.init(params)
  keys = jax.random.split(key, steps)
  losses = []  # device scalars: no host sync inside the loop
  t0 = None
  for i in tqdm(range(steps), desc=desc, leave=False, mininterval=1.0):
    params, opt_state, loss = step(params, opt_state, frozen, keys[i], rule_steps)
    losses.append(loss)
    if i == 0:
      jax.block_until_ready(loss)
      t0 = time.perf_counter()
  params = jax.block_until_ready(params)
  seconds_per_step = (time.perf_counter() - t0) / max(steps - 1, 1)
  return params, np.asarray(jnp.stack(losses)), seconds_per_step


def n_params(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def n_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Pretrain a small transformer LM on arithmetic progressions mod V counting up, "
                  "adapt it with LoRA to progressions counting down, compare with full "
                  "fine-tuning.")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed for initialisation, LoRA A init and the generated data")
  parser.add_argument("--vocab", type=int, default=32, help="vocabulary size V (the modulus)")
  parser.add_argument("--seq-len", type=int, default=24, help="tokens per sequence T")
  parser.add_argument("--d-model", type=int, default=64, help="model width")
  parser.add_argument("--heads", type=int, default=4, help="attention heads")
  parser.add_argument("--layers", type=int, default=2, help="transformer blocks (under nn.scan)")
  parser.add_argument("--mlp-dim", type=int, default=0, help="MLP hidden width (0: 4 x d-model)")
  parser.add_argument("--batch-size", type=int, default=64, help="sequences per training step")
  parser.add_argument("--pretrain-steps", type=int, default=300,
                      help="steps of pretraining on the original rule")
  parser.add_argument("--steps", type=int, default=200,
                      help="steps of LoRA training, and of full fine-tuning, on the new rule")
  parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
  parser.add_argument("--alpha", type=float, default=16.0,
                      help="LoRA alpha; the update is scaled by alpha / rank")
  parser.add_argument("--targets", default=r".*/(query|value)/kernel",
                      help="regex over '/'-joined parameter paths selecting the kernels to adapt "
                           "(e.g. '.*/(query|key|value|out|fc1|fc2)/kernel' for all linear layers)")
  parser.add_argument("--lr", type=float, default=3e-3,
                      help="AdamW learning rate for pretraining and full fine-tuning")
  parser.add_argument("--lora-lr", type=float, default=1e-2, help="AdamW learning rate for LoRA")
  parser.add_argument("--eval-size", type=int, default=512, help="sequences in each evaluation set")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  t_start = time.perf_counter()
  old_rule, new_rule = jnp.array([1, 2, 3]), jnp.array([-1, -2, -3])  # the steps k of each task
  model = TransformerLM(vocab=args.vocab, max_len=args.seq_len, d_model=args.d_model,
                        num_heads=args.heads, num_layers=args.layers,
                        mlp_dim=args.mlp_dim or 4 * args.d_model)
  keys = jax.random.split(jax.random.key(args.seed), 7)
  old_eval = progressions(keys[0], args.eval_size, args.seq_len, args.vocab, old_rule)
  new_eval = progressions(keys[1], args.eval_size, args.seq_len, args.vocab, new_rule)
  batch = (args.batch_size, args.seq_len, args.vocab)
  print(f"task: x_t = (x_0 + t*k) mod {args.vocab}, {args.seq_len} tokens per sequence; "
        f"pretrain on k in {old_rule.tolist()}, adapt to k in {new_rule.tolist()}\n")

  # 1. Pretrain the whole model on the original rule. The same compiled step is reused for full
  # fine-tuning below.
  forward = jax.jit(model.apply)
  full_tx = optax.adamw(args.lr)
  full_loss = lambda params, _, tokens: lm_loss(model.apply(params, tokens), tokens)
  full_step = make_train_step(full_loss, full_tx, *batch)
  variables = jax.jit(model.init)(keys[2], old_eval[:1])
  pretrained, _, _ = train(full_step, full_tx, variables, None, old_rule, args.pretrain_steps,
                           keys[3], "pretrain")
  base_old = lm_metrics(forward(pretrained, old_eval), old_eval)
  base_new = lm_metrics(forward(pretrained, new_eval), new_eval)
  print(f"pretrained base ({args.pretrain_steps} steps, {time.perf_counter() - t_start:.0f}s): "
        f"original rule loss {base_old[0]:.3f} (accuracy {base_old[1]:.1%}); new rule loss "
        f"{base_new[0]:.3f} (accuracy {base_new[1]:.1%})\n")

  # 2. The LoRA plan, read off an abstract trace of model.apply: the scanned kernels get
  # stack=(layers) (one adapter per layer), and attention's (d, heads, head_dim) query kernel
  # gets in=(d) out=(heads, head_dim).
  config = lj.LoraConfig(targets=args.targets, rank=args.rank, alpha=args.alpha)
  plan = lj.plan(config, pretrained, apply_fn=model.apply, args=(new_eval[:1],))
  print(f"{plan}\n")
  tree = lj.attach(plan, pretrained, keys[4])  # B = 0: the model is unchanged at step 0

  # 3. Train the adapters only. Splitting the tree and differentiating w.r.t. `adapters` alone
  # means no gradient and no optimizer state is ever built for the frozen base.
  adapters, base = lj.split(tree)
  apply_lora = lj.unmerged(model.apply, plan)  # x·W + scale·(x·A)·B, W + ΔW never formed

  def lora_loss(adapters, base, tokens):
    return lm_loss(apply_lora(lj.combine(base, adapters), tokens), tokens)

  lora_tx = optax.adamw(args.lora_lr)
  lora_step = make_train_step(lora_loss, lora_tx, *batch)
  adapters, _, lora_sps = train(lora_step, lora_tx, adapters, base, new_rule, args.steps, keys[5],
                                "LoRA")
  tree = lj.combine(base, adapters)

  # 4. Unmerged (as trained) vs merged (W' = W + scale·A·B folded in: a plain model again).
  logits_unmerged = jax.jit(apply_lora)(tree, new_eval)
  merged_vars = lj.merge(plan, tree)
  logits_merged = forward(merged_vars, new_eval)
  lora_new = lm_metrics(logits_unmerged, new_eval)
  merged_new = lm_metrics(logits_merged, new_eval)
  merged_old = lm_metrics(forward(merged_vars, old_eval), old_eval)
  max_diff = float(jnp.max(jnp.abs(logits_unmerged - logits_merged)))
  logit_scale = float(jnp.max(jnp.abs(logits_merged)))

  # 5. Full fine-tuning from the same base (a copy: the step donates its params), same batches.
  full = jax.tree.map(jnp.copy, base)
  full, _, full_sps = train(full_step, full_tx, full, None, new_rule, args.steps, keys[5],
                            "full fine-tune")
  full_new = lm_metrics(forward(full, new_eval), new_eval)
  full_old = lm_metrics(forward(full, old_eval), old_eval)

  n_adapter, n_model = n_params(adapters), n_params(base)
  b_adapter, b_model = n_bytes(adapters), n_bytes(base)
  print(f"LoRA unmerged vs merged on the new-rule eval set: max |logits difference| = "
        f"{max_diff:.2e} (logits up to {logit_scale:.1f})")
  print(f"adapter: {n_adapter:,} params, {b_adapter / 1024:.1f} KiB = "
        f"{100 * n_adapter / n_model:.2f}% of the model's {n_model:,} params, "
        f"{b_model / 1024:.1f} KiB")
  tokens_per_step = args.batch_size * args.seq_len
  lora_tps, full_tps = tokens_per_step / lora_sps, tokens_per_step / full_sps
  print(f"train step throughput (after compilation): LoRA {lora_tps:,.0f} tokens/s, full "
        f"fine-tuning {full_tps:,.0f} tokens/s (LoRA/full = {lora_tps / full_tps:.2f}x)")

  rows = [
      ("pretrained base", "-", f"{base_new[0]:.3f}", f"{base_new[1]:.1%}", f"{base_old[0]:.3f}", "-"),
      (f"LoRA r={args.rank}, unmerged", f"{n_adapter:,}", f"{lora_new[0]:.3f}",
       f"{lora_new[1]:.1%}", "", f"{lora_tps:,.0f}"),
      (f"LoRA r={args.rank}, merged", f"{n_adapter:,}", f"{merged_new[0]:.3f}",
       f"{merged_new[1]:.1%}", f"{merged_old[0]:.3f}", ""),
      ("full fine-tuning", f"{n_model:,}", f"{full_new[0]:.3f}", f"{full_new[1]:.1%}",
       f"{full_old[0]:.3f}", f"{full_tps:,.0f}"),
  ]
  print(f"\nSummary ({args.steps} steps of {args.batch_size} x {args.seq_len} tokens, eval on "
        f"{args.eval_size} sequences per rule):")
  print_table(("model", "trainable params", "new loss", "new acc", "old loss", "train tokens/s"),
              rows)
  print(f"total wall time {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
  main()
