"""Many adapters on one base (issue 14): mixed-adapter batches and hot swap, side by side in one run.

The reference model of `common.py` (decoder-only LM, vocab 8192, d 512, 6 layers, 8 heads, MLP 4x;
forward of batch 8 x 128, float32) with LoRA r=8, alpha=16 on query/key/value/out/fc1/fc2 of every
block. N adapters of that plan (random A, non-zero B, a different B per adapter) are stacked into a
bank (`lj.stack_adapters`); the mixed batch gives example b adapter `ids[b]` in one call of
`lj.unmerged(apply, bank.plan, adapter_ids=ids, scale=bank.scale)`.

Groups (each timed interleaved A B C, B C A, ...; medians over --reps calls after warm-up):

  forward   base                    the model alone
            single adapter          `lj.unmerged` with one adapter for the whole batch (reference)
            mixed, N adapters       one call, example b with adapter b % N (N = --adapters)
            loop, N jitted calls    one jitted single-adapter forward per adapter on its sub-batch
            loop in one jit         the same loop unrolled inside one jitted function
            torch base / peft single adapter / peft mixed (`adapter_names=`), the PyTorch twin
  adapters  mixed with d distinct adapters (bank of d, ids b % d) at --scaling-batch x
            --scaling-seq tokens, vs the single-adapter forward of that shape, and the loop of d
            jitted single-adapter calls on the sub-batches vs the mixed call
  batch     mixed (8 adapters) vs single adapter at batch 1, 2, 4, ... x --seq

Checks: every mixed-batch row equals its adapter applied alone (max |logits difference|), and the
base-only rows (id -1) equal the base; hot swap: compiles (jax.monitoring) and jit cache entries
across 10 swaps of banks of different ranks <= r_max and alphas, and of single adapters padded to
r_max.

  python benchmarks/multi_adapter.py --reps 5                    # the CPU run of RESULTS.md (~30 min loaded)
  python benchmarks/multi_adapter.py --reps 5 --groups adapters  # one group only
  python benchmarks/multi_adapter.py --quick                     # tiny model, smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (TARGETS, Setup, Variant, add_model_args, build, cache_size,  # noqa: E402
                    check_model_args, compile_variant, format_table, machine, nonzero_b,
                    ratio_results, ratio_table, threads, time_interleaved, write_results)

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_args(p)
  p.add_argument("--adapters", type=int, default=8, help="distinct adapters in the mixed batch")
  p.add_argument("--reps", type=int, default=7, help="timed calls per variant (default 7)")
  p.add_argument("--scaling-adapters", type=int, nargs="*", default=[1, 2, 4, 8, 32],
                 help="distinct adapters in the batch for the adapter-count sweep")
  p.add_argument("--scaling-batch", type=int, default=32,
                 help="batch of the adapter-count sweep (>= the largest count, default 32)")
  p.add_argument("--scaling-seq", type=int, default=32,
                 help="tokens per sequence in the adapter-count sweep (default 32: 32 x 32 tokens, "
                      "as many as 8 x 128)")
  p.add_argument("--scaling-batches", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                 help="batch sizes of the batch sweep (x --seq tokens)")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch + PEFT twin")
  p.add_argument("--groups", nargs="+", default=["forward", "adapters", "batch"],
                 choices=["forward", "adapters", "batch"], help="which groups to run (default all)")
  p.add_argument("--out", default=os.path.join(HERE, "multi_adapter_results.json"),
                 help="where to write every measurement (default benchmarks/multi_adapter_results.json)")
  args = p.parse_args(argv)
  check_model_args(p, args)
  if args.quick:
    args.adapters = min(args.adapters, args.batch)
    args.scaling_batch, args.scaling_seq = 8, 16
    args.scaling_adapters = [a for a in args.scaling_adapters if a <= 8]
    args.scaling_batches = [b for b in args.scaling_batches if b <= 4]
  if args.adapters > args.batch:
    p.error(f"--adapters {args.adapters} > --batch {args.batch}: not all would be in the batch")
  if max(args.scaling_adapters, default=0) > args.scaling_batch:
    p.error(f"--scaling-batch {args.scaling_batch} is below the largest of --scaling-adapters")
  return args


# ---------------------------------------------------------------------------------------------
# Adapters and the forwards
# ---------------------------------------------------------------------------------------------

def make_adapters(s: Setup, n: int, seed: int, rank: int | None = None, alpha: float | None = None,
                  plan: lj.Plan | None = None) -> list[tuple[Any, lj.Plan]]:
  """`n` adapters `(LoRA leaves, plan)` for the reference LM: random A, B shifted by a different
  non-zero value per adapter, so each adapter's term is distinct and does real arithmetic. Under
  `s.plan` unless `plan` is given."""
  plan = plan or s.plan
  keys = jax.random.split(jax.random.key(seed), n)
  return [(lj.split(nonzero_b(lj.attach(plan, s.variables, k), 1e-3 * (1 + i % 7)))[0], plan)
          for i, k in enumerate(keys)]


def rank_plan(s: Setup, rank: int, alpha: float) -> lj.Plan:
  """The reference plan at another rank and alpha."""
  config = lj.LoraConfig(targets=TARGETS, rank=rank, alpha=alpha)
  return lj.plan(config, s.variables, s.model.apply, args=(s.tokens,))


def mixed_fn(apply: Callable) -> Callable:
  """`(base, bank, ids, tokens) -> logits`, jitted: example b with adapter `ids[b]` of the bank
  (-1: the base alone), the bank's per-adapter scales as data."""
  def fwd(base, bank, ids, tokens):
    tree = lj.combine(base, lj.bank_tree(bank))
    return lj.unmerged(apply, bank.plan, adapter_ids=ids, scale=bank.scale)(tree, tokens)
  return jax.jit(fwd)


def single_fn(apply: Callable, plan: lj.Plan) -> Callable:
  """`(base, adapter leaves, tokens) -> logits`, jitted: one adapter for the whole batch."""
  return jax.jit(lambda base, ad, tokens: lj.unmerged(apply, plan)(lj.combine(base, ad), tokens))


def groups_of(ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
  """`[(adapter, rows)]`: the rows of each distinct id, in id order."""
  return [(int(k), np.flatnonzero(ids == k)) for k in np.unique(ids)]


def loop_calls(single: Callable, base: Any, adapters: list, tokens: jax.Array,
               ids: np.ndarray) -> Callable[[], list]:
  """What a serving loop without mixed batches does: one jitted single-adapter forward per
  adapter on its sub-batch (sub-batches gathered up front)."""
  work = [(adapters[k][0], tokens[rows]) for k, rows in groups_of(ids)]
  return lambda: [single(base, ad, x) for ad, x in work]


def loop_in_one_jit(apply: Callable, plan: lj.Plan, ids: np.ndarray) -> Callable:
  """`(base, [adapter leaves], tokens) -> logits`, jitted: the per-adapter loop unrolled in one
  program (static sub-batches), outputs scattered back into batch order."""
  groups = groups_of(ids)

  def fwd(base, ads, tokens):
    outs = [lj.unmerged(apply, plan)(lj.combine(base, ads[k]), tokens[rows]) for k, rows in groups]
    order = np.argsort(np.concatenate([rows for _, rows in groups]))
    return jnp.concatenate(outs)[order]
  return jax.jit(fwd)


# ---------------------------------------------------------------------------------------------
# PyTorch + PEFT
# ---------------------------------------------------------------------------------------------

def torch_variants(args: argparse.Namespace, s: Setup, adapters: list, ids: np.ndarray
                   ) -> tuple[list[Variant], dict[str, Any]] | str:
  """torch base, PEFT with one adapter, PEFT's mixed batch (`adapter_names=`): the same weights
  and adapters as the JAX variants. Returns the variants and a check of PEFT's mixed logits
  against lora_jax's, or why they cannot run."""
  import torch_lm
  if torch_lm.missing():
    return torch_lm.missing()
  if jax.default_backend() != "cpu":
    return "n/a (the twin runs on CPU only here)"
  import peft
  import torch
  torch.set_num_threads(threads())
  host = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
  variables = host(s.variables)
  base = torch_lm.from_flax(args, variables)
  pmodel = torch_lm.peft_model(torch_lm.from_flax(args, variables), args.rank, args.alpha)
  names = ["default"] + [f"a{k}" for k in range(1, len(adapters))]
  config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                           target_modules=list(torch_lm.KINDS))
  for k, (ad, _) in enumerate(adapters):
    if k:
      pmodel.add_adapter(names[k], config)
    torch_lm.load_adapters(pmodel, lj.combine(variables, host(ad)), args.layers, names[k])
  pmodel.set_adapter("default")
  pmodel.eval()
  tokens = torch.tensor(np.asarray(s.tokens), dtype=torch.long)
  per_row = [names[i] if i >= 0 else "__base__" for i in ids]

  def peft_mixed(x):
    with torch.inference_mode():
      return pmodel(x, adapter_names=per_row)

  variants = [
      Variant("torch base", "forward", torch_lm.forward(base), [tokens], jitted=False, block=lambda o: o),
      Variant("peft single adapter", "forward", torch_lm.forward(pmodel), [tokens], jitted=False,
              block=lambda o: o),
      Variant(f"peft mixed, {len(adapters)} adapters", "forward", peft_mixed, [tokens], jitted=False,
              block=lambda o: o)]
  return variants, {"peft_mixed_logits": peft_mixed(tokens).numpy()}


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def row_check(mixed: Callable, single: Callable, base_fn: Callable, base: Any, bank: Any,
              adapters: list, tokens: jax.Array, ids: np.ndarray) -> dict[str, float]:
  """Max |logits difference| of every mixed-batch row vs its adapter applied alone to the whole
  batch, and of the base-only rows (id -1) vs the base; `ids` gets a -1 row for the check."""
  ids = ids.copy()
  ids[-1] = -1
  out = np.asarray(mixed(base, bank, jnp.asarray(ids), tokens))
  ref = np.asarray(base_fn(base, tokens))
  diff_ad, scale = 0.0, float(np.max(np.abs(ref)))
  for k, rows in groups_of(ids):
    want = ref[rows] if k < 0 else np.asarray(single(base, adapters[k][0], tokens))[rows]
    d = float(np.max(np.abs(out[rows] - want)))
    if k < 0:
      diff_base = d
    else:
      diff_ad = max(diff_ad, d)
  return {"max_abs_diff_adapter_rows": diff_ad, "max_abs_diff_base_rows": diff_base,
          "max_abs_logit": scale}


def swap_check(args: argparse.Namespace, s: Setup, mixed: Callable, ids: jax.Array) -> dict[str, Any]:
  """Ten banks of `--adapters` adapters with ranks in [1, r] and alphas in [1, 4r] (padded to
  r = --rank), and ten single adapters of such ranks and alphas padded to r (one-adapter banks,
  `select_adapter` inside the jitted forward), each swapped into its jitted forward after one
  warm-up call: backend compiles (jax.monitoring) and jit cache entries counted around the swaps."""
  rng = np.random.default_rng(1)
  ranks = sorted({int(x) for x in rng.integers(1, args.rank + 1, 4)} | {1, args.rank})
  alphas = (1.0, 4.0, float(args.alpha), 4.0 * args.rank)
  plans: dict[tuple[int, float], lj.Plan] = {}  # one (abstract) trace per (rank, alpha) used
  base = lj.strip(s.tree)
  banks, singles = [], []
  for i in range(10):
    chosen = [(int(rng.choice(ranks)), float(rng.choice(alphas))) for _ in range(args.adapters)]
    ads = []
    for k, (r, a) in enumerate(chosen):
      if (r, a) not in plans:
        plans[r, a] = rank_plan(s, r, a)
      ads.append(make_adapters(s, 1, 100 * i + k, plan=plans[r, a])[0])
    banks.append((lj.stack_adapters(ads, pad_to=args.rank), chosen))
    singles.append((lj.stack_adapters(ads[:1], names=["slot"], pad_to=args.rank), chosen[0]))

  @jax.jit
  def serve_one(base, slot, tokens):
    tree, plan = lj.select_adapter(slot, 0)
    return lj.unmerged(s.model.apply, plan)(lj.combine(base, tree), tokens)

  jax.block_until_ready(mixed(base, banks[0][0], ids, s.tokens))
  jax.block_until_ready(serve_one(base, singles[0][0], s.tokens))
  compiles: list[str] = []
  listener = lambda event, duration, **kw: compiles.append(event) if (
      event == "/jax/core/compile/backend_compile_duration") else None
  before = (cache_size(mixed), cache_size(serve_one))
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for (bank, _), (slot, _) in zip(banks, singles):
      jax.block_until_ready(mixed(base, bank, ids, s.tokens))
      jax.block_until_ready(serve_one(base, slot, s.tokens))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  after = (cache_size(mixed), cache_size(serve_one))
  return {"swaps": len(banks), "bank_ranks_alphas": [c for _, c in banks],
          "single_ranks_alphas": [c for _, c in singles], "backend_compiles": len(compiles),
          "cache_sizes_before": before, "cache_sizes_after": after,
          "recompiled": bool(compiles) or before != after}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def timed(variants: list[Variant], reps: int, prime: bool) -> None:
  for v in variants:
    compile_variant(v)
    print(f"  {v.name:<28} ready in {v.warmup_s:6.1f} s", flush=True)
  time_interleaved(variants, reps, prime=prime)


def forward_group(args: argparse.Namespace, s: Setup) -> tuple[list[Variant], dict[str, Any]]:
  """The batch-8 comparison and its checks."""
  apply, base = s.model.apply, lj.strip(s.tree)
  adapters = make_adapters(s, args.adapters, seed=1)
  bank = lj.stack_adapters(adapters, pad_to=args.rank)
  ids = np.arange(args.batch, dtype=np.int32) % args.adapters
  mixed, single = mixed_fn(apply), single_fn(apply, s.plan)
  base_fn = jax.jit(lambda v, x: apply(v, x))
  checks = row_check(mixed, single, base_fn, base, bank, adapters, s.tokens, ids)
  n = args.adapters
  loop = loop_calls(single, base, adapters, s.tokens, ids)
  variants = [
      Variant("base", "forward", base_fn, [base, s.tokens]),
      Variant("single adapter", "forward", single, [base, adapters[0][0], s.tokens]),
      Variant(f"mixed, {n} adapters", "forward", mixed, [base, bank, jnp.asarray(ids), s.tokens]),
      Variant(f"loop, {n} jitted calls", "forward", loop, [], jitted=False),
      Variant("loop in one jit", "forward", loop_in_one_jit(apply, s.plan, ids),
              [base, [a for a, _ in adapters], s.tokens])]
  if not args.no_torch:
    twin = torch_variants(args, s, adapters, ids)
    if isinstance(twin, str):
      checks["torch"] = twin
    else:
      variants += twin[0]
      ours = np.asarray(mixed(base, bank, jnp.asarray(ids), s.tokens))
      checks["peft_mixed_vs_ours_max_abs_diff"] = float(np.max(np.abs(twin[1]["peft_mixed_logits"] - ours)))
  swap = swap_check(args, s, mixed, jnp.asarray(ids))
  return variants, {**checks, "hot_swap": swap}


def sweep_adapters(args: argparse.Namespace, s: Setup) -> list[Variant]:
  """Mixed with d distinct adapters in a batch of --scaling-batch x --scaling-seq, the loop of d
  jitted single-adapter calls on the sub-batches, and the single-adapter forward of that shape."""
  apply, base = s.model.apply, lj.strip(s.tree)
  tokens = jax.random.randint(jax.random.key(7), (args.scaling_batch, args.scaling_seq), 0,
                              args.vocab, jnp.int32)
  adapters = make_adapters(s, max(args.scaling_adapters), seed=2)
  mixed, single = mixed_fn(apply), single_fn(apply, s.plan)
  out = [Variant("single adapter", "adapters", single, [base, adapters[0][0], tokens])]
  for d in args.scaling_adapters:
    bank = lj.stack_adapters(adapters[:d], pad_to=args.rank)
    ids = np.arange(args.scaling_batch, dtype=np.int32) % d
    out += [Variant(f"mixed, {d} distinct", "adapters", mixed, [base, bank, jnp.asarray(ids), tokens]),
            Variant(f"loop, {d} jitted calls", "adapters", loop_calls(single, base, adapters, tokens, ids),
                    [], jitted=False)]
  return out


def sweep_batch(args: argparse.Namespace, s: Setup) -> list[Variant]:
  """Mixed (bank of --adapters, ids b % N) vs single adapter at each batch of --scaling-batches."""
  apply, base = s.model.apply, lj.strip(s.tree)
  adapters = make_adapters(s, args.adapters, seed=3)
  bank = lj.stack_adapters(adapters, pad_to=args.rank)
  mixed, single = mixed_fn(apply), single_fn(apply, s.plan)
  out = []
  for b in args.scaling_batches:
    tokens = jax.random.randint(jax.random.key(b), (b, args.seq), 0, args.vocab, jnp.int32)
    ids = jnp.arange(b, dtype=jnp.int32) % args.adapters
    out += [Variant(f"single adapter, batch {b}", "batch", single, [base, adapters[0][0], tokens]),
            Variant(f"mixed, batch {b}", "batch", mixed, [base, bank, ids, tokens])]
  return out


def print_checks(checks: dict[str, Any]) -> None:
  swap = checks["hot_swap"]
  lines = [
      ("mixed rows vs each adapter alone", f"max |diff| {checks['max_abs_diff_adapter_rows']:.2e} "
       f"(logits up to {checks['max_abs_logit']:.1f})"),
      ("mixed base rows (id -1) vs base", f"max |diff| {checks['max_abs_diff_base_rows']:.2e}"),
      ("hot swap: 10 banks + 10 single adapters", f"{swap['backend_compiles']} compiles; jit cache "
       f"{swap['cache_sizes_before']} -> {swap['cache_sizes_after']}")]
  if "peft_mixed_vs_ours_max_abs_diff" in checks:
    lines.append(("PEFT mixed vs lora_jax mixed",
                  f"max |diff| {checks['peft_mixed_vs_ours_max_abs_diff']:.2e}"))
  print("\nchecks:")
  print(format_table(("check", "result"), lines, left=2))


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")
  info = machine()
  print(f"machine: {info['cpu']}, {info['cores']} cores, backend={info['backend']}; jax {info['jax']}; "
        f"load average {os.getloadavg()[0]:.1f}")
  s = build(args, verbose=False)
  print(f"model: {args.layers} layers, d {args.d_model}, vocab {args.vocab}, batch {args.batch} x "
        f"{args.seq}; LoRA r={args.rank}, alpha {args.alpha:g} on {len(s.plan.sites)} kernels")
  t0 = time.perf_counter()
  prime = not args.no_prime
  n = args.adapters

  out: dict[str, Any] = {}
  if "forward" in args.groups:
    print("\nforward group (compile + warm-up):")
    fwd, checks = forward_group(args, s)
    timed(fwd, args.reps, prime)
    rows = [("base", "single adapter"), (f"mixed, {n} adapters", "single adapter"),
            (f"loop, {n} jitted calls", f"mixed, {n} adapters"), ("loop in one jit", f"mixed, {n} adapters")]
    if "torch base" in {v.name for v in fwd}:
      rows += [("peft single adapter", "torch base"), (f"peft mixed, {n} adapters", "peft single adapter"),
               (f"peft mixed, {n} adapters", f"mixed, {n} adapters")]
    out["forward"] = ratio_results(fwd, rows)
    print(ratio_table(out["forward"]))
    out["checks"] = checks
    print_checks(checks)

  if "adapters" in args.groups and args.scaling_adapters:
    print(f"\nadapter-count sweep, batch {args.scaling_batch} x {args.scaling_seq} (compile + warm-up):")
    ads = sweep_adapters(args, s)
    timed(ads, args.reps, prime)
    out["adapter_count"] = ratio_results(ads, [(v.name, "single adapter") for v in ads[1:]] + [
        (f"loop, {d} jitted calls", f"mixed, {d} distinct") for d in args.scaling_adapters])
    print(ratio_table(out["adapter_count"]))

  if "batch" in args.groups and args.scaling_batches:
    print(f"\nbatch sweep, x {args.seq} tokens, bank of {n} (compile + warm-up):")
    bat = sweep_batch(args, s)
    timed(bat, args.reps, prime)
    out["batch"] = ratio_results(bat, [(f"mixed, batch {b}", f"single adapter, batch {b}")
                                       for b in args.scaling_batches])
    print(ratio_table(out["batch"]))

  print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average now {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores (a shared machine: medians, and CPU-time ratios beside them)")
  return write_results(args, out)


if __name__ == "__main__":
  main()
