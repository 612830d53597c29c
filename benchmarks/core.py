"""Core benchmark: LoRA vs full fine-tuning, unmerged / merged forward vs the base forward.

One run, one model, the same inputs for every variant. A decoder-only linen transformer LM
(default: 6 layers, d=512, 8 heads, MLP 4x, vocab 8192, batch 8, seq 128, float32) gets LoRA
(r=8, alpha=16) on every attention query/key/value/out kernel and every MLP fc1/fc2 kernel.

Rows (each a median over `--reps` timed calls, `--forward-reps` for the forwards; variants
interleaved within their group, A B C / B C A / C A B ...):

  train steps (AdamW, params and optimizer state donated)
    full_ft        grads for all params, adamw on all params                       (reference)
    lora           grads for the adapters only (`lj.split`), through `lj.unmerged`; adamw on adapters
    freeze_base    grads over the whole LoRA tree through `lj.unmerged`, `lj.freeze_base(adamw)`
  forwards
    base           model.apply on the base variables                               (reference)
    unmerged       lj.unmerged(model.apply, plan) on the LoRA tree
    merged         model.apply on variables merged once, outside the timed function
    merge+forward  model.apply(lj.merge(plan, tree)) inside one jitted function

Ratios are median wall time(row) / median wall time(reference) (the targets are judged on these),
next to the same ratio of process CPU time (less sensitive to other load on a shared machine) and
the FLOP ratio from XLA's `cost_analysis()` of the compiled function.
Targets: lora <= 0.75x full_ft, unmerged <= 1.05x base, merged <= 1.02x base.

  python benchmarks/core.py                  # the full run (several minutes on a 2-core CPU)
  python benchmarks/core.py --quick          # tiny model, smoke run (< 1 minute)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (TARGETS, Variant, add_model_args, build, cache_size, check_model_args,  # noqa: E402
                    compile_variant, copy_tree, format_table, frozen_step, full_step, lora_step,
                    machine, median_cpu_ms, median_ms, time_interleaved)


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_args(p)
  p.add_argument("--reps", type=int, default=10, help="timed calls per variant (>= 5)")
  p.add_argument("--forward-reps", type=int, default=None,
                 help="timed calls per forward variant (default: 3 x --reps; forwards are cheap "
                      "and their targets are tight)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "core_results.json"))
  args = p.parse_args(argv)
  check_model_args(p, args)
  if args.forward_reps is None:
    args.forward_reps = 3 * args.reps
  if args.reps < 5 or args.forward_reps < 5:
    p.error("--reps and --forward-reps must be >= 5")
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")  # float32 everywhere on CPU
  info = machine()
  print(f"machine: {info['cpu']}, {info['cores']} cores, backend={info['backend']}; "
        f"jax {info['jax']}, flax {info['flax']}, optax {info['optax']}, lora_jax {info['lora_jax']}")
  print(f"model: {args.layers} layers, d={args.d_model}, {args.heads} heads, MLP 4x, "
        f"vocab {args.vocab}, batch {args.batch}, seq {args.seq}, float32; "
        f"LoRA r={args.rank}, alpha={args.alpha:g}; AdamW lr={args.lr:g}; "
        f"reps={args.reps} (train) / {args.forward_reps} (forward)")

  setup = build(args)
  model, tokens, variables, plan, tree = (setup.model, setup.tokens, setup.variables, setup.plan,
                                          setup.tree)
  apply = model.apply
  adapters, base = lj.split(tree)
  unmerged_apply = lj.unmerged(apply, plan)
  tx = optax.adamw(args.lr)

  # --- train steps --------------------------------------------------------------------------
  tx_frozen = lj.freeze_base(tx, tree)
  full_params = copy_tree(variables)
  lora_adapters = copy_tree(adapters)
  frozen_tree = copy_tree(tree)
  train = [
      Variant("full_ft", "train", jax.jit(full_step(apply, tx), donate_argnums=(0, 1)),
              [full_params, tx.init(full_params), tokens], n_state=2),
      Variant("lora", "train", jax.jit(lora_step(apply, plan, tx), donate_argnums=(0, 1)),
              [lora_adapters, tx.init(lora_adapters), base, tokens], n_state=2),
      Variant("freeze_base", "train", jax.jit(frozen_step(apply, plan, tx_frozen), donate_argnums=(0, 1)),
              [frozen_tree, tx_frozen.init(frozen_tree), tokens], n_state=2),
  ]

  # --- forwards -----------------------------------------------------------------------------
  merged_vars = jax.block_until_ready(jax.jit(lambda t: lj.merge(plan, t))(tree))
  forward = [
      Variant("base", "forward", jax.jit(lambda v, x: apply(v, x)), [lj.strip(tree), tokens]),
      Variant("unmerged", "forward", jax.jit(lambda t, x: unmerged_apply(t, x)), [tree, tokens]),
      Variant("merged", "forward", jax.jit(lambda v, x: apply(v, x)), [merged_vars, tokens]),
      Variant("merge+forward", "forward", jax.jit(lambda t, x: apply(lj.merge(plan, t), x)),
              [tree, tokens]),
  ]

  # correctness sanity: unmerged == merged == merge+forward (to float32 rounding)
  y_un = forward[1].fn(tree, tokens)
  y_m = forward[2].fn(merged_vars, tokens)
  y_mf = forward[3].fn(tree, tokens)
  err_un = float(jnp.max(jnp.abs(y_un - y_m)))
  err_mf = float(jnp.max(jnp.abs(y_mf - y_m)))
  print(f"check: max|unmerged - merged| = {err_un:.2e}, max|merge+forward - merged| = {err_mf:.2e}")

  variants = train + forward
  print("\ncompiling + warming up ...", flush=True)
  for v in variants:
    compile_variant(v)
    print(f"  {v.name:<14} {v.warmup_s:6.1f} s   flops={v.flops:.4g}" if v.flops
          else f"  {v.name:<14} {v.warmup_s:6.1f} s   flops=n/a", flush=True)
  sizes_before = {v.name: cache_size(v.fn) for v in variants}

  print(f"\ntiming {args.reps} interleaved reps of the train steps, {args.forward_reps} of the "
        "forwards ...", flush=True)
  load_before = os.getloadavg()
  t0 = time.perf_counter()
  # No host<->device transfer may happen inside a timed call (all inputs are device arrays).
  with jax.transfer_guard("disallow"):
    time_interleaved(train, args.reps, prime=not args.no_prime)
    time_interleaved(forward, args.forward_reps, prime=not args.no_prime)
  load_after = os.getloadavg()
  print(f"  done in {time.perf_counter() - t0:.1f} s; load average (1 min) before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f} on {os.cpu_count()} cores")
  if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1) + 1:
    print("WARNING: the machine was busy with other work; wall times are noisy (see cpu ratio)")
  recompiled = [v.name for v in variants
                if sizes_before[v.name] is not None and cache_size(v.fn) != sizes_before[v.name]]
  if recompiled:
    print(f"WARNING: recompiled during timing: {recompiled}")

  by = {v.name: v for v in variants}
  rows = [  # (row, reference, time target)
      ("full_ft", "full_ft", None),
      ("lora", "full_ft", 0.75),
      ("freeze_base", "full_ft", None),
      ("base", "base", None),
      ("unmerged", "base", 1.05),
      ("merged", "base", 1.02),
      ("merge+forward", "base", None),
  ]
  results = []
  for name, ref, target in rows:
    v, r = by[name], by[ref]
    t_ratio = median_ms(v) / median_ms(r)
    c_ratio = median_cpu_ms(v) / median_cpu_ms(r)
    f_ratio = v.flops / r.flops if v.flops and r.flops else None
    results.append({
        "variant": name, "group": v.group, "reference": ref,
        "median_ms": median_ms(v), "min_ms": 1e3 * min(v.times), "max_ms": 1e3 * max(v.times),
        "times_ms": [1e3 * t for t in v.times], "time_ratio": t_ratio,
        "median_cpu_ms": median_cpu_ms(v), "cpu_times_ms": [1e3 * t for t in v.cpu_times],
        "cpu_ratio": c_ratio,
        "flops": v.flops, "flop_ratio": f_ratio, "target": target,
        "met": None if target is None else bool(t_ratio <= target), "compile_s": v.warmup_s})

  # --- the table ----------------------------------------------------------------------------
  head = ("variant", "vs", "median ms", "min..max ms", "time ratio", "cpu ratio", "GFLOP",
          "FLOP ratio", "target", "met")
  lines = []
  for r in results:
    lines.append((
        r["variant"], r["reference"], f"{r['median_ms']:.2f}",
        (f"{r['min_ms']:.2f}..{r['max_ms']:.2f}" if r["max_ms"] < 10
         else f"{r['min_ms']:.1f}..{r['max_ms']:.1f}"), f"{r['time_ratio']:.3f}x", f"{r['cpu_ratio']:.3f}x",
        f"{r['flops'] / 1e9:.2f}" if r["flops"] else "n/a",
        f"{r['flop_ratio']:.3f}x" if r["flop_ratio"] is not None else "n/a",
        f"<= {r['target']:.2f}x" if r["target"] is not None else "-",
        "-" if r["met"] is None else ("yes" if r["met"] else "NO")))
  print()
  print(format_table(head, lines, rules_before=(3,)))
  print(f"\nLoRA step FLOP limit for reference: ~0.69x of full fine-tuning "
        f"(measured FLOP ratio {results[1]['flop_ratio']:.3f}x)" if results[1]["flop_ratio"]
        else "")

  out = {
      "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
      "machine": info,
      "config": {k: v for k, v in vars(args).items() if k != "out"},
      "lora": {"targets": TARGETS, "sites": len(plan.sites), "lora_params": plan.num_params,
               "base_params": plan.base_params, "uses": sorted({str(u) for s in plan.sites for u in s.use})},
      "checks": {"max_abs_unmerged_vs_merged": err_un, "max_abs_merge_forward_vs_merged": err_mf,
                 "recompiled_during_timing": recompiled,
                 "loadavg_before_timing": load_before, "loadavg_after_timing": load_after},
      "results": results,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
