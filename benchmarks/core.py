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
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj

TARGETS = r"params/block_\d+/(attn/(query|key|value|out)|fc1|fc2)/kernel"
KINDS = ("query", "key", "value", "out", "fc1", "fc2")


# ---------------------------------------------------------------------------------------------
# The model: a compact pre-LN decoder-only LM (untied embedding / lm_head).
# ---------------------------------------------------------------------------------------------

class Block(nn.Module):
  d_model: int
  heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    # MultiHeadDotProductAttention's projections are DenseGeneral layers named query/key/value/out:
    # query/key/value kernels are (D, H, hd), the out kernel is (H, hd, D).
    h = nn.LayerNorm(name="ln1")(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, mask=mask)
    x = x + h
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.Dense(self.mlp_ratio * self.d_model, name="fc1")(h)
    h = nn.gelu(h)
    h = nn.Dense(self.d_model, name="fc2")(h)
    return x + h


class LM(nn.Module):
  vocab: int
  d_model: int
  heads: int
  layers: int
  max_len: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, self.d_model))
    x = x + pos[: tokens.shape[1]]
    mask = nn.make_causal_mask(tokens)
    for i in range(self.layers):
      x = Block(self.d_model, self.heads, name=f"block_{i}")(x, mask)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(self.vocab, use_bias=False, name="lm_head")(x)


def xent(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Next-token cross-entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------

def flops_of(compiled) -> float | None:
  """Total FLOPs from `Compiled.cost_analysis()` (a dict, or a list of dicts on some versions)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (some backends do not implement it)
    return None
  if ca is None:
    return None
  if isinstance(ca, dict):
    ca = [ca]
  total = sum(float(d.get("flops", 0.0)) for d in ca if d)
  return total if total > 0 else None


def cache_size(fn) -> int | None:
  size = getattr(fn, "_cache_size", None)
  return size() if callable(size) else None


@dataclasses.dataclass
class Variant:
  """One timed function. `call()` runs it once on its current state and returns outputs to block
  on; train steps feed their (donated) params and optimizer state back in."""
  name: str
  group: str
  fn: Any  # the jitted function
  args: list  # current arguments (updated in place for stateful train steps)
  n_state: int = 0  # leading args that are donated state, replaced by the first outputs
  flops: float | None = None
  compile_s: float = 0.0
  times: list = dataclasses.field(default_factory=list)  # wall seconds per call
  cpu_times: list = dataclasses.field(default_factory=list)  # process CPU seconds (all threads)

  def call(self):
    out = self.fn(*self.args)
    if self.n_state:
      self.args[: self.n_state] = list(out[: self.n_state])
    return out


def compile_variant(v: Variant) -> None:
  t0 = time.perf_counter()
  compiled = v.fn.lower(*v.args).compile()
  v.flops = flops_of(compiled)
  jax.block_until_ready(v.call())  # warm up through the jit cache (compiles the callable path)
  jax.block_until_ready(v.call())
  v.compile_s = time.perf_counter() - t0


def time_interleaved(variants: list[Variant], reps: int, prime: bool = True) -> None:
  """A B C, B C A, C A B, ...: each rep times every variant once (`block_until_ready` on the
  outputs), rotating the order so that no variant always runs first or after the same neighbour.

  With `prime`, every timed call is preceded by one untimed call of the same variant. On this
  CPU a call that directly follows a variant which allocates and frees a lot of memory (e.g.
  merge+forward, which builds a full merged copy of the weights) runs ~5% slower; an identical
  function with identical arguments measured 0.95x "itself" without priming. Priming charges
  each variant only for its own work.

  Besides wall time, the process CPU time of each call is recorded: on a shared machine it is
  less sensitive to other processes competing for the cores than wall time is.
  """
  for rep in range(reps):
    k = rep % len(variants)
    for v in variants[k:] + variants[:k]:
      if prime:
        jax.block_until_ready(v.call())
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(v.call())
      v.times.append(time.perf_counter() - t0)
      v.cpu_times.append(time.process_time() - c0)


def median_ms(v: Variant) -> float:
  return 1e3 * statistics.median(v.times)


def median_cpu_ms(v: Variant) -> float:
  return 1e3 * statistics.median(v.cpu_times)


# ---------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
          "jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib(),
          "flax": flax.__version__, "optax": optax.__version__, "lora_jax": lj.__version__}


def _jaxlib() -> str | None:
  try:
    import jaxlib
    return jaxlib.__version__
  except Exception:  # noqa: BLE001
    return None


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--alpha", type=float, default=16.0)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--reps", type=int, default=10, help="timed calls per variant (>= 5)")
  p.add_argument("--forward-reps", type=int, default=None,
                 help="timed calls per forward variant (default: 3 x --reps; forwards are cheap "
                      "and their targets are tight)")
  p.add_argument("--no-prime", action="store_true",
                 help="do not precede each timed call with an untimed call of the same variant")
  p.add_argument("--quick", action="store_true",
                 help="tiny model (2 layers, d=64, vocab 256, batch 2, seq 32) for a smoke run")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "core_results.json"))
  args = p.parse_args(argv)
  if args.quick:
    args.layers, args.d_model, args.heads, args.vocab = 2, 64, 4, 256
    args.batch, args.seq, args.rank = 2, 32, 4
  if args.forward_reps is None:
    args.forward_reps = 3 * args.reps
  if args.reps < 5 or args.forward_reps < 5:
    p.error("--reps and --forward-reps must be >= 5")
  if args.d_model % args.heads:
    p.error("--d-model must be divisible by --heads")
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

  model = LM(args.vocab, args.d_model, args.heads, args.layers, args.seq)
  k_init, k_tok, k_lora = jax.random.split(jax.random.key(0), 3)
  tokens = jax.random.randint(k_tok, (args.batch, args.seq), 0, args.vocab, jnp.int32)
  variables = jax.jit(model.init)(k_init, tokens)
  apply = model.apply

  # --- the plan: exactly the 6 kernel kinds in every layer, all kept factored (dot_general) ---
  config = lj.LoraConfig(targets=TARGETS, rank=args.rank, alpha=args.alpha)
  plan = lj.plan(config, variables, apply, args=(tokens,))
  print("\nplan:")
  print(plan)
  want = {f"params/block_{i}/{'attn/' if k in ('query', 'key', 'value', 'out') else ''}{k}/kernel"
          for i in range(args.layers) for k in KINDS}
  if set(plan.paths) != want:
    raise SystemExit(f"plan selects the wrong kernels: extra {sorted(set(plan.paths) - want)}, "
                     f"missing {sorted(want - set(plan.paths))}")
  not_factored = [s.path for s in plan.sites if s.use != ("dot_general",)]
  if not_factored:
    raise SystemExit(f"sites not kept factored as a single dot_general: "
                     f"{[(p, plan.site(p).use) for p in not_factored]}")
  print(f"check: {len(plan.sites)} sites = {args.layers} layers x {len(KINDS)} kinds, "
        "every use 'dot_general' (nothing materialised)")

  tree = lj.attach(plan, variables, k_lora)
  # B = 0 at init; make it non-zero so the merged / unmerged checks below compare real LoRA terms
  # (the A, B leaves are runtime inputs either way, so nothing can be constant-folded).
  tree = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 1e-3 if jax.tree_util.keystr(p).endswith("_lora_b']") else x, tree)
  adapters, base = lj.split(tree)
  unmerged_apply = lj.unmerged(apply, plan)
  tx = optax.adamw(args.lr)

  # --- train steps --------------------------------------------------------------------------
  def full_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(lambda p: xent(apply(p, tokens), tokens))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def lora_step(adapters, opt_state, base, tokens):
    def loss_fn(ad):
      return xent(lj.unmerged(apply, plan)(lj.combine(base, ad), tokens), tokens)
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  tx_frozen = lj.freeze_base(tx, tree)

  def frozen_step(tree, opt_state, tokens):
    loss, grads = jax.value_and_grad(lambda t: xent(unmerged_apply(t, tokens), tokens))(tree)
    updates, opt_state = tx_frozen.update(grads, opt_state, tree)
    return optax.apply_updates(tree, updates), opt_state, loss

  copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # donated buffers must not be shared
  full_params = copy(variables)
  lora_adapters = copy(adapters)
  frozen_tree = copy(tree)
  train = [
      Variant("full_ft", "train", jax.jit(full_step, donate_argnums=(0, 1)),
              [full_params, tx.init(full_params), tokens], n_state=2),
      Variant("lora", "train", jax.jit(lora_step, donate_argnums=(0, 1)),
              [lora_adapters, tx.init(lora_adapters), base, tokens], n_state=2),
      Variant("freeze_base", "train", jax.jit(frozen_step, donate_argnums=(0, 1)),
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
    print(f"  {v.name:<14} {v.compile_s:6.1f} s   flops={v.flops:.4g}" if v.flops
          else f"  {v.name:<14} {v.compile_s:6.1f} s   flops=n/a", flush=True)
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
        "met": None if target is None else bool(t_ratio <= target), "compile_s": v.compile_s})

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
  widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
  fmt = lambda row: "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)
                              for i, (c, w) in enumerate(zip(row, widths)))
  print()
  print(fmt(head))
  print(fmt(["-" * w for w in widths]))
  for i, line in enumerate(lines):
    if i == 3:
      print(fmt(["-" * w for w in widths]))
    print(fmt(line))
  print(f"\nLoRA step FLOP limit for reference: ~0.69x of full fine-tuning "
        f"(measured FLOP ratio {results[1]['flop_ratio']:.3f}x)" if results[1]["flop_ratio"]
        else "")

  out = {
      "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
      "machine": info,
      "config": {k: v for k, v in vars(args).items() if k != "out"},
      "lora": {"targets": TARGETS, "sites": len(plan.sites), "lora_params": plan.num_params,
               "base_params": plan.base_params, "uses": sorted({u for s in plan.sites for u in s.use})},
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
