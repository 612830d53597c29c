"""Shared pieces of the benchmarks: the reference linen LM, its LoRA plan, and the timing helpers.

`core.py` (LoRA vs full fine-tuning, forwards) and `compare.py` (lora_jax vs qwix, Flax NNX,
PyTorch + PEFT) build the same model from here and time it the same way, so their numbers can be
read side by side.
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
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj

TARGETS = r"params/block_\d+/(attn/(query|key|value|out)|fc1|fc2)/kernel"
KINDS = ("query", "key", "value", "out", "fc1", "fc2")
QUICK = dict(layers=2, d_model=64, heads=4, vocab=256, batch=2, seq=32, rank=4)


# ---------------------------------------------------------------------------------------------
# The model: a compact pre-LN decoder-only LM (untied embedding / lm_head).
# ---------------------------------------------------------------------------------------------

class Block(nn.Module):
  d_model: int
  heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    # MultiHeadDotProductAttention's projections are DenseGeneral layers named query/key/value/out:
    # query/key/value kernels are (D, H, hd), the out kernel is (H, hd, D).
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    h = nn.LayerNorm(name="ln1", **kw)(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn", **kw)(h, mask=mask)
    x = x + h
    h = nn.LayerNorm(name="ln2", **kw)(x)
    h = nn.Dense(self.mlp_ratio * self.d_model, name="fc1", **kw)(h)
    h = nn.gelu(h)
    h = nn.Dense(self.d_model, name="fc2", **kw)(h)
    return x + h


class LM(nn.Module):
  vocab: int
  d_model: int
  heads: int
  layers: int
  max_len: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    x = nn.Embed(self.vocab, self.d_model, name="embed", **kw)(tokens)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, self.d_model),
                     self.dtype)
    x = x + pos[: tokens.shape[1]]
    mask = nn.make_causal_mask(tokens)
    for i in range(self.layers):
      x = Block(self.d_model, self.heads, dtype=self.dtype, name=f"block_{i}")(x, mask)
    x = nn.LayerNorm(name="ln_f", **kw)(x)
    return nn.Dense(self.vocab, use_bias=False, name="lm_head", **kw)(x)


def xent(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Next-token cross-entropy (computed in float32 whatever the model's dtype)."""
  logits = logits.astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def add_model_args(p: argparse.ArgumentParser) -> None:
  """The model / LoRA / timing flags both benchmarks share."""
  p.add_argument("--layers", type=int, default=6, help="transformer blocks (default 6)")
  p.add_argument("--d-model", type=int, default=512, help="model width (default 512)")
  p.add_argument("--heads", type=int, default=8, help="attention heads; must divide --d-model")
  p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192)")
  p.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
  p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
  p.add_argument("--rank", type=int, default=8, help="LoRA rank r on every adapted kernel")
  p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / r)")
  p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
  p.add_argument("--no-prime", action="store_true",
                 help="do not precede each timed call with an untimed call of the same variant")
  p.add_argument("--quick", action="store_true",
                 help="tiny model (2 layers, d=64, vocab 256, batch 2, seq 32, r=4) for a smoke run")


def check_model_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if args.quick:
    for k, v in QUICK.items():
      setattr(args, k, v)
  if args.d_model % args.heads:
    p.error(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")


@dataclasses.dataclass
class Setup:
  """The reference model with LoRA attached: everything the variants are built from."""
  model: LM
  tokens: jax.Array  # (batch, seq) int32
  variables: Any  # the base linen variables
  plan: lj.Plan
  tree: Any  # variables + kernel_lora_a / kernel_lora_b (B made non-zero, see `build`)


def build(args: argparse.Namespace, dtype: Any = jnp.float32, verbose: bool = True) -> Setup:
  """Initialise the LM, plan LoRA on exactly the 6 kernel kinds of every layer (checked: every
  use a factored `dot_general`), attach adapters and make B non-zero (1e-3) so every LoRA term
  does real arithmetic (A and B are runtime inputs either way, nothing constant-folds)."""
  model = LM(args.vocab, args.d_model, args.heads, args.layers, args.seq, dtype=dtype)
  k_init, k_tok, k_lora = jax.random.split(jax.random.key(0), 3)
  tokens = jax.random.randint(k_tok, (args.batch, args.seq), 0, args.vocab, jnp.int32)
  variables = jax.jit(model.init)(k_init, tokens)
  config = lj.LoraConfig(targets=TARGETS, rank=args.rank, alpha=args.alpha)
  plan = lj.plan(config, variables, model.apply, args=(tokens,))
  if verbose:
    print("\nplan:")
    print(plan)
  want = {f"params/block_{i}/{'attn/' if k in ('query', 'key', 'value', 'out') else ''}{k}/kernel"
          for i in range(args.layers) for k in KINDS}
  if set(plan.paths) != want:
    raise SystemExit(f"plan selects the wrong kernels: extra {sorted(set(plan.paths) - want)}, "
                     f"missing {sorted(want - set(plan.paths))}")
  not_factored = [s.path for s in plan.sites if tuple(map(str, s.use)) != ("dot_general",)]
  if not_factored:
    raise SystemExit(f"sites not kept factored as a single dot_general: "
                     f"{[(p, plan.site(p).use) for p in not_factored]}")
  if verbose:
    print(f"check: {len(plan.sites)} sites = {args.layers} layers x {len(KINDS)} kinds, "
          "every use 'dot_general' (nothing materialised)")
  tree = nonzero_b(lj.attach(plan, variables, k_lora))
  return Setup(model, tokens, variables, plan, tree)


def nonzero_b(tree: Any, value: float = 1e-3) -> Any:
  """`tree` with every `*_lora_b` leaf shifted by `value` (B = 0 at init would make LoRA a no-op)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + jnp.asarray(value, x.dtype)
      if jax.tree_util.keystr(p).endswith("_lora_b']") else x, tree)


def copy_tree(tree: Any) -> Any:
  """Fresh buffers (donated buffers must not be shared between variants)."""
  return jax.tree_util.tree_map(jnp.copy, tree)


def full_step(apply: Callable, tx: optax.GradientTransformation) -> Callable:
  """`(params, opt_state, tokens) -> (params, opt_state, loss)`: full fine-tuning."""
  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(lambda p: xent(apply(p, tokens), tokens))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def lora_step(apply: Callable, plan: lj.Plan, tx: optax.GradientTransformation) -> Callable:
  """`(adapters, opt_state, base, tokens) -> (adapters, opt_state, loss)`: gradients for the
  adapters of `lj.split` only, through `lj.unmerged`; `tx` on the adapters."""
  def step(adapters, opt_state, base, tokens):
    def loss_fn(ad):
      return xent(lj.unmerged(apply, plan)(lj.combine(base, ad), tokens), tokens)
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss
  return step


def frozen_step(apply: Callable, plan: lj.Plan, tx_frozen: optax.GradientTransformation) -> Callable:
  """`(tree, opt_state, tokens) -> (tree, opt_state, loss)`: gradients over the whole LoRA tree
  through `lj.unmerged`, `tx_frozen = lj.freeze_base(tx, tree)`."""
  unmerged_apply = lj.unmerged(apply, plan)

  def step(tree, opt_state, tokens):
    loss, grads = jax.value_and_grad(lambda t: xent(unmerged_apply(t, tokens), tokens))(tree)
    updates, opt_state = tx_frozen.update(grads, opt_state, tree)
    return optax.apply_updates(tree, updates), opt_state, loss
  return step


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


def memory_of(compiled) -> dict[str, int] | None:
  """Bytes from `Compiled.memory_analysis()`: arguments, outputs, temporaries, aliased (donated
  arguments reused for outputs) and `peak` = args + outputs + temps - aliased (what the executable
  holds at once, at most)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if m is None:
    return None
  get = lambda name: int(getattr(m, name, 0) or 0)
  out = {"args": get("argument_size_in_bytes"), "outputs": get("output_size_in_bytes"),
         "temps": get("temp_size_in_bytes"), "aliased": get("alias_size_in_bytes")}
  out["peak"] = out["args"] + out["outputs"] + out["temps"] - out["aliased"]
  return out


def threads() -> int:
  """The thread count XLA:CPU uses (one per core this process may run on); torch is set to it."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cache_size(fn) -> int | None:
  size = getattr(fn, "_cache_size", None)
  return size() if callable(size) else None


@dataclasses.dataclass
class Variant:
  """One timed function. `call()` runs it once on its current state and returns outputs to block
  on; train steps feed their (donated) params and optimizer state back in.

  `jitted` variants are lowered and compiled up front (FLOPs, memory, trace and compile time);
  others (PyTorch) are plain callables. `prepare`, if given, refreshes `args` before every call,
  untimed (e.g. a fresh copy of a tree the call donates and does not give back)."""
  name: str
  group: str
  fn: Any
  args: list
  n_state: int = 0  # leading args that are donated state, replaced by the first outputs
  jitted: bool = True
  prepare: Callable[[list], list] | None = None
  block: Callable[[Any], Any] = jax.block_until_ready
  flops: float | None = None
  memory: dict | None = None
  lower_s: float | None = None  # trace + lower
  compile_s: float | None = None  # XLA compile
  warmup_s: float = 0.0  # everything before timing (lower + compile + two warm-up calls)
  times: list = dataclasses.field(default_factory=list)  # wall seconds per call
  cpu_times: list = dataclasses.field(default_factory=list)  # process CPU seconds (all threads)

  def call(self, prepared: bool = False):
    if self.prepare is not None and not prepared:
      self.args = self.prepare(self.args)
    out = self.fn(*self.args)
    if self.n_state:
      self.args[: self.n_state] = list(out[: self.n_state])
    return out


def compile_variant(v: Variant) -> None:
  """Lower + compile (timed separately, FLOPs and memory read off the executable), then two
  warm-up calls through the jit cache."""
  t0 = time.perf_counter()
  if v.jitted:
    if v.prepare is not None:
      v.args = v.prepare(v.args)
    lowered = v.fn.lower(*v.args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    v.lower_s, v.compile_s = t1 - t0, t2 - t1
    v.flops, v.memory = flops_of(compiled), memory_of(compiled)
  v.block(v.call())
  v.block(v.call())
  v.warmup_s = time.perf_counter() - t0


def time_interleaved(variants: list[Variant], reps: int, prime: bool = True) -> None:
  """A B C, B C A, C A B, ...: each rep times every variant once (blocking on the outputs),
  rotating the order so that no variant always runs first or after the same neighbour.

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
        v.block(v.call())
      if v.prepare is not None:  # untimed: refresh the donated inputs
        v.args = v.prepare(v.args)
      c0, t0 = time.process_time(), time.perf_counter()
      v.block(v.call(prepared=True))
      v.times.append(time.perf_counter() - t0)
      v.cpu_times.append(time.process_time() - c0)


def median_ms(v: Variant) -> float:
  return 1e3 * statistics.median(v.times)


def median_cpu_ms(v: Variant) -> float:
  return 1e3 * statistics.median(v.cpu_times)


def format_table(head: tuple, lines: list[tuple], rules_before: tuple[int, ...] = (),
                 left: int = 2) -> str:
  """Fixed-width text table: the first `left` columns left-aligned, the rest right-aligned, a
  dashed rule under the header and before each line index in `rules_before`."""
  widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
  fmt = lambda row: "  ".join(str(c).rjust(w) if i >= left else str(c).ljust(w)
                              for i, (c, w) in enumerate(zip(row, widths))).rstrip()
  rule = fmt(["-" * w for w in widths])
  out = [fmt(head), rule]
  for i, line in enumerate(lines):
    if i in rules_before:
      out.append(rule)
    out.append(fmt(line))
  return "\n".join(out)


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
# The train-step benchmarks (moe.py, remat.py): one parser, one timing loop, one ratio table
# ---------------------------------------------------------------------------------------------

def parse_step_args(doc: str, sizes: dict[str, int], quick: dict[str, int], out_name: str,
                    argv=None, reps: int = 10) -> argparse.Namespace:
  """Flags `--<size>` for each model size in `sizes` (defaults), LoRA rank/alpha, AdamW lr,
  `--reps`, `--quick` (replaces the sizes by `quick`) and `--out` (default `out_name` next to
  this file)."""
  p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  for name, default in sizes.items():
    p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=f"default {default}")
  p.add_argument("--rank", type=int, default=8, help="LoRA rank r on every adapted kernel")
  p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / r)")
  p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
  p.add_argument("--reps", type=int, default=reps, help=f"timed calls per variant (default {reps})")
  p.add_argument("--quick", action="store_true", help="tiny model for a smoke run")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), out_name))
  args = p.parse_args(argv)
  if args.quick:
    for k, v in quick.items():
      setattr(args, k, v)
  return args


def start(model: str) -> None:
  """float32 matmuls at full precision; print the machine and `model` (the setup in words)."""
  jax.config.update("jax_default_matmul_precision", "highest")
  info = machine()
  print(f"machine: {info['cpu']}, {info['cores']} cores, backend={info['backend']}; jax {info['jax']}, "
        f"flax {info['flax']}")
  print(f"model: {model}")


def time_steps(variants: list[Variant], reps: int) -> dict[str, Any]:
  """Compile and warm up every variant, then time them interleaved (no host transfers allowed);
  returns the load averages around the timed section."""
  print("compiling + warming up ...", flush=True)
  for v in variants:
    compile_variant(v)
    print(f"  {v.name:<14} {v.warmup_s:6.1f} s  flops={v.flops}", flush=True)
  load_before = os.getloadavg()
  t0 = time.perf_counter()
  with jax.transfer_guard("disallow"):
    time_interleaved(variants, reps)
  load_after = os.getloadavg()
  print(f"timed in {time.perf_counter() - t0:.1f} s; load average {load_before[0]:.2f} -> "
        f"{load_after[0]:.2f} on {os.cpu_count()} cores")
  return {"loadavg_before_timing": load_before, "loadavg_after_timing": load_after}


def ratio_results(variants: list[Variant], rows: list[tuple[str, str]]) -> list[dict[str, Any]]:
  """Per `(variant, reference)` row: median wall / CPU ms, their ratios and the FLOP ratio."""
  by = {v.name: v for v in variants}
  results = []
  for name, ref in rows:
    v, r = by[name], by[ref]
    results.append({
        "variant": name, "reference": ref, "median_ms": median_ms(v), "median_cpu_ms": median_cpu_ms(v),
        "min_ms": 1e3 * min(v.times), "max_ms": 1e3 * max(v.times), "times_ms": [1e3 * t for t in v.times],
        "time_ratio": median_ms(v) / median_ms(r), "cpu_ratio": median_cpu_ms(v) / median_cpu_ms(r),
        "flops": v.flops, "flop_ratio": v.flops / r.flops if v.flops and r.flops else None})
  return results


def ratio_table(results: list[dict[str, Any]], rules_before: tuple[int, ...] = ()) -> str:
  head = ("variant", "vs", "median ms", "min..max ms", "time ratio", "cpu ratio", "GFLOP", "FLOP ratio")
  lines = [(r["variant"], r["reference"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}..{r['max_ms']:.1f}",
            f"{r['time_ratio']:.3f}x", f"{r['cpu_ratio']:.3f}x",
            f"{r['flops'] / 1e9:.4f}" if r["flops"] else "n/a",
            f"{r['flop_ratio']:.3f}x" if r["flop_ratio"] else "n/a") for r in results]
  return format_table(head, lines, rules_before=rules_before)


def write_results(args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
  """`out` with the command line, the machine and the config, written to `args.out` as JSON."""
  out = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "machine": machine(),
         "config": {k: v for k, v in vars(args).items() if k != "out"}, **out}
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {args.out}")
  return out
