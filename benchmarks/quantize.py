"""QLoRA on the reference LM of `common.py`: the NF4 (and int8) base vs the float32 base, side by
side in one run.

    python benchmarks/quantize.py            # the reference LM (6 layers, d=512, vocab 8192)
    python benchmarks/quantize.py --quick    # smoke run

Reports, for the adapted kernels: bytes per parameter held by the quantized base; compiled memory
(arguments, temporaries) of the LoRA train step (AdamW on the adapters, `lj.unmerged`) on the
float32 base and on the NF4 base; the step time ratio; and the time of `lj.quantize` against one
read+write pass over the same kernels. Writes `quantize_results.json` next to this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import jax
import optax
from common import add_model_args, build, check_model_args, lora_step, memory_of

import lora_jax as lj

try:
  import qwix
  import qwix_lm
  from common import xent
except ImportError:  # the qwix row prints "n/a (not installed)"
  qwix = None


def _median_ms(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def _qwix_row(s, args, adapters, tx) -> dict:
  """qwix's NF4 QLoRA on the same model and adapters (`LoraProvider(weight_qtype="nf4",
  tile_size=64)`: absmax per 64 input weights, no double quantization), the same step timing."""
  if qwix is None:
    return {"missing": "n/a (qwix not installed)"}
  provider = qwix.LoraProvider(module_path=qwix_lm.MODULE_PATH, rank=args.rank, alpha=args.alpha,
                               weight_qtype="nf4", tile_size=64)
  qmodel = qwix.apply_lora_to_model(s.model, provider)
  try:
    abstract = jax.eval_shape(qmodel.init, jax.random.key(0), s.tokens)
  except ValueError as e:  # e.g. a head size that 64 does not divide
    return {"missing": f"n/a ({e})"}
  qparams = qwix.quantize_params(lj.split(s.tree)[1]["params"], abstract["params"])
  qad = qwix_lm.tree_from_lora_jax(adapters)
  step = jax.jit(qwix_lm.train_step(qmodel, tx, xent))
  opt_state = tx.init(qad)
  compiled = step.lower(qad, opt_state, {"params": qparams}, s.tokens).compile()
  jax.block_until_ready(step(qad, opt_state, {"params": qparams}, s.tokens))
  return {"bytes_per_param": None, "memory": memory_of(compiled), "step_ms": _median_ms(
      lambda: step(qad, opt_state, {"params": qparams}, s.tokens), args.reps)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_args(p)
  p.add_argument("--reps", type=int, default=10, help="timed steps per variant (median)")
  args = p.parse_args(argv)
  check_model_args(p, args)
  s = build(args, verbose=False)
  adapters, base = lj.split(s.tree)
  kernels = {site.path: lj._src.tree.flatten(base)[site.path] for site in s.plan.sites}
  n_params = sum(math.prod(site.shape) for site in s.plan.sites)

  copy = jax.jit(lambda ks: jax.tree_util.tree_map(lambda w: w * 1.0, ks))
  jax.block_until_ready(copy(kernels))
  copy_ms = _median_ms(lambda: copy(kernels), 3)
  lj.quantize(s.plan, base, "nf4")  # compiles the quantizers once per kernel shape
  quant_ms = _median_ms(lambda: jax.tree_util.tree_leaves(lj.quantize(s.plan, base, "nf4")), 3)

  variants = {"float32": base, "nf4": lj.quantize(s.plan, base, "nf4"),
              "nf4 (no double quant)": lj.quantize(s.plan, base, "nf4", double_quant=False),
              "int8": lj.quantize(s.plan, base, "int8")}
  tx = optax.adamw(args.lr)
  step = jax.jit(lora_step(s.model.apply, s.plan, tx))
  opt_state = tx.init(adapters)
  rows = {}
  for name, b in variants.items():
    flat = lj._src.tree.flatten(b)
    held = sum((flat[site.path].nbytes if isinstance(flat[site.path], lj.QuantizedArray)
                else flat[site.path].size * flat[site.path].dtype.itemsize) for site in s.plan.sites)
    compiled = step.lower(adapters, opt_state, b, s.tokens).compile()
    jax.block_until_ready(step(adapters, opt_state, b, s.tokens))
    rows[name] = {"bytes_per_param": held / n_params, "memory": memory_of(compiled),
                  "step_ms": _median_ms(lambda b=b: step(adapters, opt_state, b, s.tokens), args.reps)}
  rows["qwix nf4"] = _qwix_row(s, args, adapters, tx)
  layer = max(site.fan_in * site.fan_out for site in s.plan.sites) * 4
  fields = ("layers", "d_model", "heads", "vocab", "batch", "seq", "rank")
  result = {"model": {k: getattr(args, k) for k in fields},
            "adapted_params": n_params, "quantize_ms": quant_ms, "copy_ms": copy_ms, "variants": rows,
            "largest_kernel_f32_bytes": layer, "devices": str(jax.devices()[0].platform)}
  ref = rows["float32"]
  print(f"adapted kernels: {n_params:,} parameters; lj.quantize nf4: {quant_ms:.0f} ms vs one read+write "
        f"pass {copy_ms:.1f} ms ({quant_ms / copy_ms:.0f}x)")
  print(f"{'base':24s}{'bytes/param':>12s}{'args MB':>10s}{'temps MB':>10s}{'step ms':>10s}{'vs f32':>8s}")
  for name, r in rows.items():
    if "missing" in r:
      print(f"{name:24s}{r['missing']}")
      continue
    m = r["memory"] or {}
    per_param = "n/a" if r["bytes_per_param"] is None else f"{r['bytes_per_param']:.3f}"
    print(f"{name:24s}{per_param:>12s}{m.get('args', 0) / 2**20:10.1f}"
          f"{m.get('temps', 0) / 2**20:10.1f}{r['step_ms']:10.1f}{r['step_ms'] / ref['step_ms']:7.2f}x")
  with open(os.path.join(os.path.dirname(__file__), "quantize_results.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
