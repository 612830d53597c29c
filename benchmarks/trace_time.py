"""Trace/lower and compile time of the LoRA train step vs the plain (full fine-tuning) step, for
unscanned stacks of 4, 16 and 32 layers: the interpreter's cost grows with the program, and should
grow linearly, with lowering the LoRA step at most ~2x lowering the plain one.

    python benchmarks/trace_time.py                 # layers 4 16 32, d=256
    python benchmarks/trace_time.py --layers 4 8    # any list

Each row builds fresh jitted steps (nothing cached between them) and times, once each, `lower`
(tracing, the interpreter, lowering to StableHLO) and `compile` (XLA), plus `lj.plan`.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from common import KINDS, LM, TARGETS, full_step, lora_step


def _time(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def row(layers: int, args: argparse.Namespace) -> dict:
  model = LM(args.vocab, args.d_model, args.heads, layers, args.seq)
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, args.vocab, jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0), tokens)
  config = lj.LoraConfig(targets=TARGETS, rank=8, alpha=16.0)
  plan, plan_s = _time(lambda: lj.plan(config, variables, model.apply, args=(tokens,)))
  assert len(plan.sites) == layers * len(KINDS) and all(s.low_rank for s in plan.sites)
  tree = lj.attach(plan, variables, jax.random.key(2))
  adapters, base = lj.split(tree)
  tx = optax.adamw(1e-4)

  full_state, lora_state = jax.eval_shape(tx.init, variables), jax.eval_shape(tx.init, adapters)
  full = jax.jit(full_step(model.apply, tx))
  lowered_full, lower_full_s = _time(lambda: full.lower(variables, full_state, tokens))
  _, compile_full_s = _time(lowered_full.compile)
  lora = jax.jit(lora_step(model.apply, plan, tx))
  lowered_lora, lower_lora_s = _time(lambda: lora.lower(adapters, lora_state, base, tokens))
  _, compile_lora_s = _time(lowered_lora.compile)
  return {"layers": layers, "sites": len(plan.sites), "plan_s": plan_s,
          "lower_full_s": lower_full_s, "lower_lora_s": lower_lora_s,
          "compile_full_s": compile_full_s, "compile_lora_s": compile_lora_s}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32], help="stack depths to time")
  p.add_argument("--d-model", type=int, default=256, help="model width (default 256)")
  p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
  p.add_argument("--vocab", type=int, default=1024, help="vocabulary (default 1024)")
  p.add_argument("--batch", type=int, default=4, help="sequences per batch (default 4)")
  p.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
  p.add_argument("--out", default="benchmarks/trace_time_results.json", help="JSON results file")
  args = p.parse_args()
  rows = [row(n, args) for n in args.layers]
  head = ("layers", "sites", "plan s", "lower full s", "lower LoRA s", "ratio", "compile full s",
          "compile LoRA s", "ratio")
  print("  ".join(f"{h:>14}" for h in head))
  for r in rows:
    cells = (r["layers"], r["sites"], f"{r['plan_s']:.2f}", f"{r['lower_full_s']:.2f}",
             f"{r['lower_lora_s']:.2f}", f"{r['lower_lora_s'] / r['lower_full_s']:.2f}x",
             f"{r['compile_full_s']:.2f}", f"{r['compile_lora_s']:.2f}",
             f"{r['compile_lora_s'] / r['compile_full_s']:.2f}x")
    print("  ".join(f"{c:>14}" for c in cells))
  with open(args.out, "w") as f:
    json.dump({"args": vars(args), "rows": rows, "jax": jax.__version__}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
