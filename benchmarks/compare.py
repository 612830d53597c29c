"""lora_jax against the alternatives and the machine's limits, side by side in one run.

The reference model (`common.LM`: decoder-only, vocab 8192, d 512, 6 layers, 8 heads, MLP 4x,
batch 8 x 128; float32 on CPU, bfloat16 on GPU) with LoRA r=8, alpha=16 on query/key/value/out/
fc1/fc2 of every block, AdamW. Every alternative builds the same architecture, loaded with the same
weights and adapter values (see `qwix_lm.py`, `nnx_lm.py`, `torch_lm.py`; the test
`tests/test_compare_bench.py` checks that they compute the same function).

Groups (each timed interleaved A B C, B C A, ...; medians over --reps calls after warm-up):

  train    lora_jax (split)      grads for the adapters only, `lj.unmerged`, adamw     (vs lora_jax)
           lora_jax freeze_base  grads over the LoRA tree, `lj.freeze_base(adamw)`
           full fine-tune        grads and adamw for all params                        (reference)
           qwix LoRA             `qwix.LoraProvider` + `apply_lora_to_model`, adapters only
           nnx LoRALinear        Flax NNX `nnx.LoRALinear` (no alpha scaling), LoRAParams only
           torch+peft LoRA       PyTorch + PEFT `LoraConfig`, eager, AdamW on adapters
  forward  base / lora_jax merged / lora_jax unmerged / qwix / nnx / torch base / peft unmerged /
           peft merged (`merge_and_unload`)
  merge    lora_jax merge        `jit(lj.merge, donate)` of all adapters into the kernels
           read+write pass       `jit(k * c, donate)` over the same kernels: the bandwidth limit

Beside the times: FLOPs from `cost_analysis` (JAX variants) and achieved FLOP/s as % of the
measured matmul peak (a large `jnp.dot` timed in the same run); compiled memory (`memory_analysis`:
args + outputs + temps - aliased); peak RSS of each train variant in its own process; trace +
compile time of the LoRA vs full step; a recompilation check when other adapters are swapped in.

  python benchmarks/compare.py            # the full CPU run (~10 min on 2 cores)
  python benchmarks/compare.py --quick    # tiny model, smoke run (< 2 min)
  python benchmarks/compare.py --scale    # bigger model for a GPU (untested here: no GPU lent)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax._src import tree as lj_tree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nnx_lm  # noqa: E402
import qwix_lm  # noqa: E402
from common import (Setup, Variant, add_model_args, build, cache_size, check_model_args,  # noqa: E402
                    compile_variant, copy_tree, format_table, frozen_step, full_step, lora_step,
                    machine, median_ms, nonzero_b, threads, time_interleaved, xent)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCALE = dict(layers=12, d_model=1024, heads=16, vocab=32768, batch=16, seq=512)
REFS = {"train": "full fine-tune", "forward": "base", "merge": "read+write pass"}
OURS = {"train": "lora_jax (split)", "forward": "lora_jax unmerged", "merge": "lora_jax merge"}
LORA_TRAIN = ("lora_jax (split)", "lora_jax freeze_base", "qwix LoRA", "nnx LoRALinear",
              "torch+peft LoRA")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_args(p)
  p.add_argument("--scale", action="store_true",
                 help="bigger model for a GPU: " + ", ".join(f"{k}={v}" for k, v in SCALE.items()))
  p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                 help="auto: float32 on CPU, bfloat16 on GPU/TPU")
  p.add_argument("--reps", type=int, default=7, help="timed calls per train variant (>= 5)")
  p.add_argument("--forward-reps", type=int, default=None, help="default: 2 x --reps")
  p.add_argument("--merge-reps", type=int, default=None, help="default: 2 x --reps")
  p.add_argument("--no-rss", action="store_true", help="skip the per-process peak RSS runs")
  p.add_argument("--json", default=os.path.join(HERE, "compare_results.json"),
                 help="where to write every measurement (default benchmarks/compare_results.json)")
  p.add_argument("--png", default=None, help="bar chart (default docs/compare_<backend>.png)")
  p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.scale and not args.quick:
    for k, v in SCALE.items():
      setattr(args, k, v)
  check_model_args(p, args)
  args.forward_reps = args.forward_reps or 2 * args.reps
  args.merge_reps = args.merge_reps or 2 * args.reps
  if min(args.reps, args.forward_reps, args.merge_reps) < 5:
    p.error("--reps, --forward-reps and --merge-reps must be >= 5")
  if args.dtype == "auto":
    args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return args


# ---------------------------------------------------------------------------------------------
# The variants. Each builder returns a Variant, or a string saying why it cannot run here.
# ---------------------------------------------------------------------------------------------

class Builders:
  """Lazily built variants (a per-process RSS run builds only the one it measures)."""

  def __init__(self, args: argparse.Namespace, setup: Setup, dtype: Any):
    self.args, self.s, self.dtype = args, setup, dtype
    self.apply = setup.model.apply
    self.tx = optax.adamw(args.lr)
    self.adapters, self.base = lj.split(setup.tree)
    self._torch = None

  # --- lora_jax / full fine-tuning ----------------------------------------------------------
  def lj_split(self) -> Variant:
    ad = copy_tree(self.adapters)
    return Variant("lora_jax (split)", "train",
                   jax.jit(lora_step(self.apply, self.s.plan, self.tx), donate_argnums=(0, 1)),
                   [ad, self.tx.init(ad), self.base, self.s.tokens], n_state=2)

  def lj_frozen(self) -> Variant:
    tree, tx_frozen = copy_tree(self.s.tree), lj.freeze_base(self.tx, self.s.tree)
    return Variant("lora_jax freeze_base", "train",
                   jax.jit(frozen_step(self.apply, self.s.plan, tx_frozen), donate_argnums=(0, 1)),
                   [tree, tx_frozen.init(tree), self.s.tokens], n_state=2)

  def full(self) -> Variant:
    params = copy_tree(self.s.variables)
    return Variant("full fine-tune", "train",
                   jax.jit(full_step(self.apply, self.tx), donate_argnums=(0, 1)),
                   [params, self.tx.init(params), self.s.tokens], n_state=2)

  # --- qwix ---------------------------------------------------------------------------------
  def _qwix(self):
    if qwix_lm.missing():
      return qwix_lm.missing()
    qmodel = qwix_lm.lora_model(self.s.model, self.args.rank, self.args.alpha)
    return qmodel, qwix_lm.tree_from_lora_jax(self.s.tree)

  def qwix_train(self) -> Variant | str:
    q = self._qwix()
    if isinstance(q, str):
      return q
    qmodel, qtree = q
    ad, base = qwix_lm.split(qtree)
    ad = copy_tree(ad)
    return Variant("qwix LoRA", "train",
                   jax.jit(qwix_lm.train_step(qmodel, self.tx, xent), donate_argnums=(0, 1)),
                   [ad, self.tx.init(ad), base, self.s.tokens], n_state=2)

  def qwix_forward(self) -> Variant | str:
    q = self._qwix()
    if isinstance(q, str):
      return q
    qmodel, qtree = q
    return Variant("qwix", "forward", jax.jit(qwix_lm.forward(qmodel)), [qtree, self.s.tokens])

  # --- Flax NNX -----------------------------------------------------------------------------
  def _nnx(self):
    return nnx_lm.from_lora_jax(self.args, self.s.plan, self.s.tree, self.dtype)

  def nnx_train(self) -> Variant:
    graphdef, lora, rest = self._nnx()
    lora = copy_tree(lora)  # donated; its leaves may share buffers with the lora_jax tree
    return Variant("nnx LoRALinear", "train",
                   jax.jit(nnx_lm.train_step(graphdef, self.tx, xent), donate_argnums=(0, 1)),
                   [lora, self.tx.init(lora), rest, self.s.tokens], n_state=2)

  def nnx_forward(self) -> Variant:
    graphdef, lora, rest = self._nnx()
    return Variant("nnx LoRALinear", "forward", jax.jit(nnx_lm.forward(graphdef)),
                   [lora, rest, self.s.tokens])

  # --- PyTorch + PEFT -----------------------------------------------------------------------
  def _torch_models(self):
    """(base model, PEFT model, tokens, block) on the torch device, or why not."""
    import torch_lm  # imported only here: the JAX variants' RSS runs never load torch
    if torch_lm.missing():
      return torch_lm.missing()
    import torch
    if self._torch is None:
      on_gpu = jax.default_backend() != "cpu"
      if on_gpu and not torch.cuda.is_available():
        return "n/a (torch has no CUDA here)"
      device = "cuda" if on_gpu else "cpu"
      torch.set_num_threads(threads())
      tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.args.dtype]
      host = jax.tree.map(lambda x: np.asarray(x, np.float32), self.s.tree)  # LoRA tree on host
      base = torch_lm.from_flax(self.args, host)
      pmodel = torch_lm.peft_model(torch_lm.from_flax(self.args, host), self.args.rank,
                                   self.args.alpha)
      torch_lm.load_adapters(pmodel, host, self.args.layers)
      base, pmodel = base.to(device, tdtype), pmodel.to(device, tdtype)
      tokens = torch.tensor(np.asarray(self.s.tokens), dtype=torch.long, device=device)
      sync = torch.cuda.synchronize if on_gpu else (lambda: None)
      self._torch = (base, pmodel, tokens, lambda out: (sync(), out)[1])
    return self._torch

  def _torch_variant(self, name: str, group: str, make: Callable) -> Variant | str:
    import torch_lm
    t = self._torch_models()
    if isinstance(t, str):
      return t
    base, pmodel, tokens, block = t
    return Variant(name, group, make(torch_lm, base, pmodel), [tokens], jitted=False, block=block)

  def peft_train(self) -> Variant | str:
    return self._torch_variant("torch+peft LoRA", "train",
                               lambda tl, b, p: tl.train_step(p, self.args.lr))

  def torch_base_forward(self) -> Variant | str:
    return self._torch_variant("torch base", "forward", lambda tl, b, p: tl.forward(b))

  def peft_forward(self) -> Variant | str:
    return self._torch_variant("peft unmerged", "forward", lambda tl, b, p: tl.forward(p))

  def peft_merged_forward(self) -> Variant | str:
    return self._torch_variant("peft merged", "forward",
                               lambda tl, b, p: tl.forward(tl.merged_copy(p)))

  # --- forwards and merge -------------------------------------------------------------------
  def forwards(self) -> list[Variant | str]:
    apply, plan, tree, tokens = self.apply, self.s.plan, self.s.tree, self.s.tokens
    merged = jax.block_until_ready(jax.jit(lambda t: lj.merge(plan, t))(tree))
    unmerged_apply = lj.unmerged(apply, plan)
    return [
        Variant("base", "forward", jax.jit(lambda v, x: apply(v, x)), [lj.strip(tree), tokens]),
        Variant("lora_jax merged", "forward", jax.jit(lambda v, x: apply(v, x)), [merged, tokens]),
        Variant("lora_jax unmerged", "forward", jax.jit(lambda t, x: unmerged_apply(t, x)),
                [tree, tokens]),
        self.qwix_forward(), self.nnx_forward(), self.torch_base_forward(), self.peft_forward(),
        self.peft_merged_forward()]

  def merges(self) -> list[Variant]:
    """Both donate their input; `prepare` hands each call a fresh copy (untimed)."""
    plan, tree = self.s.plan, self.s.tree
    kernels = {p: lj_tree.flatten(tree)[p] for p in plan.paths}
    touch = lambda ks: {p: k * jnp.asarray(1.0001, k.dtype) for p, k in ks.items()}
    return [
        Variant("lora_jax merge", "merge", jax.jit(lambda t: lj.merge(plan, t), donate_argnums=0),
                [tree], prepare=lambda _: [copy_tree(tree)]),
        Variant("read+write pass", "merge", jax.jit(touch, donate_argnums=0), [kernels],
                prepare=lambda _: [copy_tree(kernels)]),
    ]

  def train(self) -> dict[str, Callable[[], Variant | str]]:
    return {"lora_jax (split)": self.lj_split, "lora_jax freeze_base": self.lj_frozen,
            "full fine-tune": self.full, "qwix LoRA": self.qwix_train,
            "nnx LoRALinear": self.nnx_train, "torch+peft LoRA": self.peft_train}


# ---------------------------------------------------------------------------------------------
# Limits and checks
# ---------------------------------------------------------------------------------------------

def matmul_peak(dtype: Any, n: int, reps: int = 10) -> float:
  """FLOP/s of one jitted `(n, n) @ (n, n)` in `dtype`: the best of `reps` after warm-up (a
  limit, so the fastest call; a median under load under-states it)."""
  k1, k2 = jax.random.split(jax.random.key(1))
  a = jax.random.normal(k1, (n, n), dtype)
  b = jax.random.normal(k2, (n, n), dtype)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(dot(a, b))
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / min(times)


def swap_check(b: Builders, split_v: Variant, unmerged_v: Variant) -> dict[str, Any]:
  """Call the LoRA train step and the unmerged forward with other adapters of the same shapes;
  count backend compiles (jax.monitoring) and jit cache entries before and after."""
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if (
      event == "/jax/core/compile/backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    sizes = (cache_size(split_v.fn), cache_size(unmerged_v.fn))
    other = nonzero_b(lj.attach(b.s.plan, b.s.variables, jax.random.key(123)), 2e-3)
    ad = copy_tree(lj.split(other)[0])  # the step donates it; `other` is used below
    jax.block_until_ready(split_v.fn(ad, b.tx.init(ad), b.base, b.s.tokens))
    jax.block_until_ready(unmerged_v.fn(other, b.s.tokens))
    after = (cache_size(split_v.fn), cache_size(unmerged_v.fn))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return {"backend_compiles": len(compiles), "cache_sizes_before": sizes, "cache_sizes_after": after,
          "recompiled": bool(compiles) or sizes != after}


def max_rss_mb() -> float:
  """This process's peak resident set size. `VmHWM` is reset by `exec`; `ru_maxrss` is not (a
  child started from a large parent would report the parent's size)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(args: argparse.Namespace) -> None:
  """Build one train variant (or none: 'setup'), run it 3 times, print its peak RSS."""
  setup = build(args, jnp.dtype(args.dtype), verbose=False)
  if args.rss_child != "setup":
    v = Builders(args, setup, jnp.dtype(args.dtype)).train()[args.rss_child]()
    if isinstance(v, str):
      print("RSS " + json.dumps({"n/a": v}))
      return
    for _ in range(3):
      v.block(v.call())
  print("RSS " + json.dumps({"max_rss_mb": max_rss_mb()}))


def peak_rss(argv: list[str], name: str) -> float | None:
  out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--no-rss",
                        "--rss-child", name], capture_output=True, text=True)
  for line in out.stdout.splitlines():
    if line.startswith("RSS "):
      return json.loads(line[4:]).get("max_rss_mb")
  print(f"  RSS run for {name!r} failed:\n{out.stderr[-2000:]}")
  return None


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def rows_of(groups: dict[str, list[Variant | tuple[str, str]]], peak: float,
            rss: dict[str, float | None]) -> list[dict[str, Any]]:
  rows = []
  for group, vs in groups.items():
    by = {v.name: v for v in vs if isinstance(v, Variant)}
    ours, ref = by.get(OURS[group]), by.get(REFS[group])
    for v in vs:
      if not isinstance(v, Variant):
        rows.append({"group": group, "variant": v[0], "status": v[1]})
        continue
      ms = median_ms(v)
      rows.append({
          "group": group, "variant": v.name, "status": "ok", "median_ms": ms,
          "min_ms": 1e3 * min(v.times), "max_ms": 1e3 * max(v.times),
          "times_ms": [1e3 * t for t in v.times],
          "vs_lora_jax": ms / median_ms(ours) if ours else None,
          "reference": REFS[group], "vs_reference": ms / median_ms(ref) if ref else None,
          "flops": v.flops, "flop_ratio_vs_reference": (v.flops / ref.flops if v.flops and ref
                                                        and ref.flops else None),
          "pct_of_peak": 100 * v.flops / (ms / 1e3) / peak if v.flops else None,
          "memory": v.memory, "trace_s": v.lower_s, "compile_s": v.compile_s,
          "peak_rss_mb": rss.get(v.name)})
  return rows


def table(rows: list[dict[str, Any]]) -> str:
  head = ("group", "variant", "median ms", "min..max ms", "vs lora_jax", "vs ref", "GFLOP",
          "% peak", "compiled MB", "RSS MB", "trace s", "compile s")
  lines, rules, last = [], [], None
  f = lambda x, spec, suffix="": "-" if x is None else f"{x:{spec}}{suffix}"
  for r in rows:
    if r["group"] != last and last is not None:
      rules.append(len(lines))
    last = r["group"]
    if r["status"] != "ok":
      lines.append((r["group"], r["variant"], r["status"], *[""] * 9))
      continue
    lo, hi = r["min_ms"], r["max_ms"]
    lines.append((
        r["group"], r["variant"] + (" (ref)" if r["variant"] == REFS[r["group"]] else ""),
        f"{r['median_ms']:.2f}", f"{lo:.2f}..{hi:.2f}" if hi < 10 else f"{lo:.1f}..{hi:.1f}",
        f(r["vs_lora_jax"], ".3f", "x"), f(r["vs_reference"], ".3f", "x"),
        f(r["flops"] and r["flops"] / 1e9, ".2f"), f(r["pct_of_peak"], ".1f", "%"),
        f(r["memory"] and r["memory"]["peak"] / 2 ** 20, ".1f"), f(r["peak_rss_mb"], ".0f"),
        f(r["trace_s"], ".2f"), f(r["compile_s"], ".2f")))
  return format_table(head, lines, rules_before=tuple(rules))


def chart(rows: list[dict[str, Any]], path: str, title: str) -> str | None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  groups = list(dict.fromkeys(r["group"] for r in rows))
  fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.2 + 0.45 * len(rows)),
                           gridspec_kw={"height_ratios": [sum(r["group"] == g for r in rows)
                                                          for g in groups]})
  for ax, g in zip(np.atleast_1d(axes), groups):
    rs = [r for r in rows if r["group"] == g and r["status"] == "ok"][::-1]
    colors = ["tab:blue" if r["variant"].startswith("lora_jax") else
              "tab:gray" if r["variant"] == REFS[g] else "tab:orange" for r in rs]
    ax.barh([r["variant"] for r in rs], [r["median_ms"] for r in rs], color=colors)
    for i, r in enumerate(rs):
      ax.text(r["median_ms"], i, f" {r['median_ms']:.1f} ms", va="center", fontsize=8)
    ax.set_title(f"{g} (median ms; blue: lora_jax, gray: reference)", fontsize=9)
    ax.set_xlim(0, 1.25 * max(r["median_ms"] for r in rs))
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def targets(rows: list[dict[str, Any]], swap: dict[str, Any]) -> list[tuple[str, str, bool]]:
  by = {(r["group"], r["variant"]): r for r in rows if r["status"] == "ok"}
  out = []
  ours = by.get(("train", OURS["train"]))
  others = [by[("train", n)] for n in LORA_TRAIN[2:] if ("train", n) in by]
  if ours and others:
    best = min(others, key=lambda r: r["median_ms"])
    out.append(("LoRA step fastest of the LoRA variants",
                f"{ours['median_ms']:.1f} ms vs best other {best['variant']} {best['median_ms']:.1f} ms",
                ours["median_ms"] <= best["median_ms"]))
  if ours and ours["vs_reference"]:
    out.append(("LoRA step <= 0.75x full fine-tune",
                f"{ours['vs_reference']:.3f}x (FLOP ratio {ours['flop_ratio_vs_reference']:.3f}x)",
                ours["vs_reference"] <= 0.75))
  for name, limit in (("lora_jax unmerged", 1.05), ("lora_jax merged", 1.02)):
    r = by.get(("forward", name))
    if r:
      out.append((f"{name} forward <= {limit}x base", f"{r['vs_reference']:.3f}x",
                  r["vs_reference"] <= limit))
  r = by.get(("merge", OURS["merge"]))
  if r:
    out.append(("merge <= 2x the read+write pass", f"{r['vs_reference']:.2f}x",
                r["vs_reference"] <= 2))
  out.append(("no recompilation on adapter swap",
              f"{swap['backend_compiles']} backend compiles, jit cache sizes "
              f"{swap['cache_sizes_before']} -> {swap['cache_sizes_after']}", not swap["recompiled"]))
  return out


def main(argv=None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")  # float32 everywhere on CPU
  warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
  if args.rss_child:
    return rss_child(args)
  dtype = jnp.dtype(args.dtype)
  info = machine()
  for name in ("qwix", "torch", "peft"):
    try:
      info[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      info[name] = None
  info["torch_threads"] = threads()
  print(f"machine: {info['cpu']}, {info['cores']} cores, backend={info['backend']}; jax "
        f"{info['jax']}, flax {info['flax']}, optax {info['optax']}, qwix {info['qwix']}, torch "
        f"{info['torch']} ({info['torch_threads']} threads), peft {info['peft']}")
  print(f"model: {args.layers} layers, d={args.d_model}, {args.heads} heads, MLP 4x, vocab "
        f"{args.vocab}, batch {args.batch} x seq {args.seq}, {args.dtype}; LoRA r={args.rank}, "
        f"alpha={args.alpha:g}; AdamW lr={args.lr:g}; reps {args.reps} train / "
        f"{args.forward_reps} forward / {args.merge_reps} merge")

  setup = build(args, dtype, verbose=False)
  print(f"plan: {len(setup.plan.sites)} sites, {setup.plan.num_params:,} LoRA params "
        f"({100 * setup.plan.num_params / setup.plan.base_params:.2f}% of {setup.plan.base_params:,})")
  b = Builders(args, setup, dtype)
  groups: dict[str, list] = {"train": [], "forward": [], "merge": []}
  for name, make in b.train().items():
    groups["train"].append(make())
  groups["forward"] = b.forwards()
  groups["merge"] = b.merges()
  for g, vs in groups.items():  # not installed -> ("name", "n/a ...") rows
    names = (list(b.train()) if g == "train" else
             ["base", "lora_jax merged", "lora_jax unmerged", "qwix", "nnx LoRALinear",
              "torch base", "peft unmerged", "peft merged"] if g == "forward" else [])
    groups[g] = [v if isinstance(v, Variant) else (names[i], v) for i, v in enumerate(vs)]

  print("\ncompiling + warming up ...", flush=True)
  for g, vs in groups.items():
    for v in vs:
      if isinstance(v, Variant):
        compile_variant(v)
        print(f"  {g:<8} {v.name:<22} {v.warmup_s:6.1f} s", flush=True)

  peak = matmul_peak(dtype, 512 if args.quick else 2048 if info["backend"] == "cpu" else 8192)
  print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s ({args.dtype})")

  print("\ntiming ...", flush=True)
  load_before = os.getloadavg()
  t0 = time.perf_counter()
  for g, reps in (("train", args.reps), ("forward", args.forward_reps), ("merge", args.merge_reps)):
    time_interleaved([v for v in groups[g] if isinstance(v, Variant)], reps,
                     prime=not args.no_prime)
  load_after = os.getloadavg()
  print(f"  done in {time.perf_counter() - t0:.1f} s; load average (1 min) before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores")

  by = {(g, v.name): v for g, vs in groups.items() for v in vs if isinstance(v, Variant)}
  swap = swap_check(b, by[("train", OURS["train"])], by[("forward", OURS["forward"])])

  rss: dict[str, float | None] = {}
  if not args.no_rss:
    print("\npeak RSS, one process per variant ...", flush=True)
    names = ["setup", OURS["train"], REFS["train"]] if args.quick else ["setup", *b.train()]
    for name in names:
      if isinstance(by.get(("train", name)), Variant) or name == "setup":
        rss[name] = peak_rss(argv, name)
        print(f"  {name:<22} {rss[name]:.0f} MB" if rss[name] else f"  {name:<22} -", flush=True)

  rows = rows_of(groups, peak, rss)
  print()
  print(table(rows))
  merge_mem = by[("merge", OURS["merge"])].memory
  kernel_bytes = sum(x.nbytes for p, x in lj_tree.flatten(setup.tree).items()
                     if p in setup.plan.paths)
  merge_check = None
  if merge_mem:
    extra = merge_mem["peak"] - merge_mem["args"]
    merge_check = {"kernel_bytes": kernel_bytes, **merge_mem, "peak_minus_args": extra,
                   "one_copy": extra < 0.5 * kernel_bytes}
    print(f"\nmerge memory (compiled): args {merge_mem['args'] / 2**20:.1f} MB, outputs "
          f"{merge_mem['outputs'] / 2**20:.1f} MB, aliased {merge_mem['aliased'] / 2**20:.1f} MB, "
          f"temps {merge_mem['temps'] / 2**20:.1f} MB -> peak {merge_mem['peak'] / 2**20:.1f} MB "
          f"= args + {extra / 2**20:.1f} MB (adapted kernels: {kernel_bytes / 2**20:.1f} MB; "
          f"{'no second copy' if merge_check['one_copy'] else 'HOLDS A SECOND COPY'})")
  lora_r, full_r = by[("train", OURS["train"])], by[("train", "full fine-tune")]
  print(f"trace+lower / compile: LoRA step {lora_r.lower_s:.2f} / {lora_r.compile_s:.2f} s, "
        f"full fine-tune {full_r.lower_s:.2f} / {full_r.compile_s:.2f} s")
  checks = targets(rows, swap)
  print("\ntargets:")
  for what, value, ok in checks:
    print(f"  {'met ' if ok else 'MISS'}  {what}: {value}")

  png = args.png or os.path.join(ROOT, "docs", f"compare_{info['backend']}.png")
  png = chart(rows, png, f"{args.layers}L d={args.d_model} LM, batch {args.batch}x{args.seq}, "
                         f"{args.dtype}, {info['backend']} ({info['cpu']}, {info['cores']} cores)")
  out = {"command": " ".join(["python", "benchmarks/compare.py", *argv]), "machine": info,
         "config": {k: v for k, v in vars(args).items() if k not in ("json", "png", "rss_child")},
         "matmul_peak_flops": peak, "loadavg_before_timing": load_before,
         "loadavg_after_timing": load_after, "rows": rows, "merge_memory": merge_check,
         "adapter_swap": swap, "peak_rss_mb": rss,
         "targets": [{"target": w, "value": v, "met": ok} for w, v, ok in checks]}
  os.makedirs(os.path.dirname(os.path.abspath(args.json)) or ".", exist_ok=True)
  with open(args.json, "w") as fh:
    json.dump(out, fh, indent=2, default=str)
  print(f"wrote {args.json}" + (f" and {png}" if png else ""))
  return out


if __name__ == "__main__":
  main()
