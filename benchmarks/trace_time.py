"""Trace/lower and compile time of the LoRA train step vs the plain (full fine-tuning) step, for
unscanned stacks of 4, 16 and 32 layers: the interpreter's cost grows with the program, and should
grow linearly, with lowering the LoRA step at most ~2x lowering the plain one.

    python benchmarks/trace_time.py                 # layers 4 16 32, d=256
    python benchmarks/trace_time.py --layers 4 8    # any list

Each row builds fresh jitted steps (nothing cached between them) and times `lower` (tracing, the
interpreter, lowering to StableHLO; `--repeat` times, each with a fresh `jax.jit`, the minimum
kept), `compile` (XLA, once) and `lj.plan` (once). Wall and process CPU time are both recorded:
lowering is single-threaded Python, so on a shared machine its CPU time is the steadier figure.
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


def _lower(make, args: tuple, repeat: int) -> tuple:
  """`(lowered, min wall s, min CPU s)` over `repeat` lowerings of fresh `make()` jits."""
  walls, cpus = [], []
  for _ in range(repeat):
    fn = jax.jit(make())
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = fn.lower(*args)
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  return lowered, min(walls), min(cpus)


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
  lowered_full, lower_full_s, lower_full_cpu_s = _lower(
      lambda: full_step(model.apply, tx), (variables, full_state, tokens), args.repeat)
  _, compile_full_s = _time(lowered_full.compile)
  lowered_lora, lower_lora_s, lower_lora_cpu_s = _lower(
      lambda: lora_step(model.apply, plan, tx), (adapters, lora_state, base, tokens), args.repeat)
  _, compile_lora_s = _time(lowered_lora.compile)
  return {"layers": layers, "sites": len(plan.sites), "plan_s": plan_s,
          "lower_full_s": lower_full_s, "lower_lora_s": lower_lora_s,
          "lower_full_cpu_s": lower_full_cpu_s, "lower_lora_cpu_s": lower_lora_cpu_s,
          "compile_full_s": compile_full_s, "compile_lora_s": compile_lora_s}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32], help="stack depths to time")
  p.add_argument("--d-model", type=int, default=256, help="model width (default 256)")
  p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
  p.add_argument("--vocab", type=int, default=1024, help="vocabulary (default 1024)")
  p.add_argument("--batch", type=int, default=4, help="sequences per batch (default 4)")
  p.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
  p.add_argument("--repeat", type=int, default=3, help="lowerings per step and depth (min kept)")
  p.add_argument("--out", default="benchmarks/trace_time_results.json", help="JSON results file")
  args = p.parse_args()
  rows = [row(n, args) for n in args.layers]
  head = ("layers", "sites", "plan s", "lower full s", "lower LoRA s", "ratio", "full cpu s",
          "LoRA cpu s", "cpu ratio", "compile full s", "compile LoRA s", "ratio")
  print("  ".join(f"{h:>14}" for h in head))
  for r in rows:
    cells = (r["layers"], r["sites"], f"{r['plan_s']:.2f}", f"{r['lower_full_s']:.2f}",
             f"{r['lower_lora_s']:.2f}", f"{r['lower_lora_s'] / r['lower_full_s']:.2f}x",
             f"{r['lower_full_cpu_s']:.2f}", f"{r['lower_lora_cpu_s']:.2f}",
             f"{r['lower_lora_cpu_s'] / r['lower_full_cpu_s']:.2f}x",
             f"{r['compile_full_s']:.2f}", f"{r['compile_lora_s']:.2f}",
             f"{r['compile_lora_s'] / r['compile_full_s']:.2f}x")
    print("  ".join(f"{c:>14}" for c in cells))
  for prev, r in zip(rows, rows[1:]):
    k = r["layers"] / prev["layers"]
    print(f"{prev['layers']} -> {r['layers']} layers ({k:g}x): lower CPU time grows "
          f"{r['lower_full_cpu_s'] / prev['lower_full_cpu_s']:.2f}x (full), "
          f"{r['lower_lora_cpu_s'] / prev['lower_lora_cpu_s']:.2f}x (LoRA)")
  with open(args.out, "w") as f:
    json.dump({"args": vars(args), "rows": rows, "jax": jax.__version__}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
