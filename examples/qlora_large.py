"""QLoRA on a model that does not fit: a ~3 B parameter Llama-shaped decoder fine-tuned on CPU.

Full fine-tuning of this model in float32 with AdamW needs 16 bytes per parameter (weights,
gradients, two moments): ~48 GB, twice this 24 GiB machine. QLoRA (Dettmers et al. 2023) keeps the
frozen base in 4-bit NormalFloat (`lj.quantize(..., "nf4")`, ~0.52 bytes per parameter with double
quantization) and trains low-rank adapters in float32; `lj.unmerged` dequantizes each kernel where it
is used, one layer at a time inside the `lax.scan` over the layers.

The weights are random (this is about memory, not about what the model knows) and the float32 model
is never held: each layer is drawn in float32 by a jitted function, quantized by `lj.quantize`
(through a one-layer plan of the same function) and written into the stacked quantized arrays
in place. The embedding and the output head stay in bfloat16, as bitsandbytes leaves `lm_head`
unquantized. A few AdamW steps on the adapters follow, on one fixed batch of random tokens.

It prints what it actually used (peak RSS of the process, compiled memory of the train step) next
to what full fine-tuning (float32 + AdamW) and LoRA on a bfloat16 base would need (computed).

    nice python examples/qlora_large.py                  # ~3.0 B parameters, a few minutes on 2 cores
    python examples/qlora_large.py --layers 2 --d-model 64 --ffn 128 --heads 4 --kv-heads 2 \\
        --vocab 256 --seq 16 --steps 3                   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import resource
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from summary import print_table  # examples/summary.py: a fixed-width table
from tqdm import tqdm

import lora_jax as lj

KERNELS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Shape:
  """A Llama-shaped decoder (defaults: Llama 3.2 3B's blocks with Llama 2's 32k vocabulary)."""
  layers: int = 28
  d_model: int = 3072
  heads: int = 24
  kv_heads: int = 8
  ffn: int = 8192
  vocab: int = 32000

  @property
  def head_dim(self) -> int:
    return self.d_model // self.heads

  def layer_shapes(self) -> dict[str, tuple[int, ...]]:
    """One layer's parameters: kernels `(in, out)`, RMSNorm gains `(d_model,)`."""
    d, kv, f = self.d_model, self.kv_heads * self.head_dim, self.ffn
    return {"attn_norm": (d,), "wq": (d, d), "wk": (d, kv), "wv": (d, kv), "wo": (d, d),
            "mlp_norm": (d,), "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}

  def abstract(self, layers: int | None = None) -> dict[str, Any]:
    """The parameter tree as `ShapeDtypeStruct`s, the layers stacked on a leading axis."""
    n = self.layers if layers is None else layers
    sds = jax.ShapeDtypeStruct
    return {"embed": sds((self.vocab, self.d_model), jnp.bfloat16),
            "layers": {k: sds((n, *s), jnp.float32) for k, s in self.layer_shapes().items()},
            "norm": sds((self.d_model,), jnp.float32),
            "head": sds((self.d_model, self.vocab), jnp.bfloat16)}

  def n_params(self) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(self.abstract()))


def zeros(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def on_shapes(fn: Any, tree: Any) -> Any:
  """`fn(variables)` for variables of the shapes of `tree`, traced abstractly inside
  `jax.eval_shape` (nothing allocated): for `lj.plan`, which reads only shapes."""
  found = []
  jax.eval_shape(lambda: found.append(fn(zeros(tree))))
  return found[0]


def rms_norm(x: jax.Array, gain: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * gain


def rope(x: jax.Array) -> jax.Array:
  """Rotary position embedding of `x (B, T, heads, hd)` (base 500000, as Llama 3)."""
  t, hd = x.shape[1], x.shape[-1]
  freq = 500000.0 ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
  angle = jnp.arange(t, dtype=jnp.float32)[:, None] * freq  # (T, hd/2)
  cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
  x1, x2 = x[..., ::2], x[..., 1::2]
  return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)


def forward(params: dict[str, Any], tokens: jax.Array, shape: Shape) -> jax.Array:
  """Logits `(B, T, vocab)` of tokens `(B, T)`: pre-RMSNorm blocks of causal grouped-query
  attention with RoPE and a SwiGLU MLP, scanned over the stacked layers."""
  b, t = tokens.shape
  h, kv, hd = shape.heads, shape.kv_heads, shape.head_dim
  x = params["embed"][tokens].astype(jnp.float32)
  causal = jnp.tril(jnp.ones((t, t), bool))

  def block(x, p):
    y = rms_norm(x, p["attn_norm"])
    q = rope((y @ p["wq"]).reshape(b, t, h, hd))
    k = rope((y @ p["wk"]).reshape(b, t, kv, hd))
    v = (y @ p["wv"]).reshape(b, t, kv, hd)
    q = q.reshape(b, t, kv, h // kv, hd)  # query heads grouped over their shared key/value head
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(hd)
    probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
    att = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, t, h * hd)
    x = x + att @ p["wo"]
    y = rms_norm(x, p["mlp_norm"])
    return x + (jax.nn.silu(y @ p["w_gate"]) * (y @ p["w_up"])) @ p["w_down"], None

  x, _ = jax.lax.scan(block, x, params["layers"])
  return rms_norm(x, params["norm"]) @ params["head"].astype(jnp.float32)


def xent(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def init_layer(key: jax.Array, shape: Shape) -> dict[str, jax.Array]:
  """One layer in float32, stack axis of size 1: kernels of variance `1/fan_in`, gains 1."""
  keys = dict(zip(KERNELS, jax.random.split(key, len(KERNELS))))
  out = {}
  for name, s in shape.layer_shapes().items():
    if name in keys:
      # Uniform with the variance of N(0, 1/fan_in): a third of the time of a normal draw.
      out[name] = jax.random.uniform(keys[name], (1, *s), jnp.float32, -1.0, 1.0) * math.sqrt(3.0 / s[0])
    else:
      out[name] = jnp.ones((1, *s), jnp.float32)
  return out


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stacked: Any, layer: Any, index: jax.Array) -> Any:
  """`stacked[index] = layer[0]` for every array of the tree, in place (donated)."""
  return jax.tree_util.tree_map(
      lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x[0].astype(s.dtype), index, 0), stacked, layer)


def quantized_layers(shape: Shape, plan: lj.Plan, one_layer: lj.Plan, key: jax.Array,
                     block_size: int, progress: bool = True) -> dict[str, Any]:
  """The stacked layers with NF4 kernels (double quantization), built one layer at a time.

  Each layer is drawn by a jitted `init_layer`, quantized by `lj.quantize` with `one_layer`
  (the plan of the same function on a one-layer stack) and written into the preallocated stack
  in place, so at most one layer is ever held in float32.

  Returns:
    `{name: ...}` for every parameter of a layer, stacked on a leading axis of `L` layers: an
    `lj.QuantizedArray` for the adapted kernels of `plan`, a float32 array `(L, d_model)` for
    the RMSNorm gains.
  """
  init = jax.jit(functools.partial(init_layer, shape=shape))
  sites = {s.path: s for s in plan.sites}
  stacked, meta = None, {}
  for index in tqdm(range(shape.layers), desc="init + quantize layers", file=sys.stderr,
                    disable=not progress, mininterval=1.0):
    layer = lj.quantize(one_layer, {"layers": init(jax.random.fold_in(key, index))}, "nf4",
                        block_size=block_size)["layers"]
    if stacked is None:
      meta = {k: q for k, q in layer.items() if isinstance(q, lj.QuantizedArray)}
      # Same containers, each child (codes, statistics) grown to all the layers.
      stacked = jax.tree_util.tree_map(lambda x: jnp.zeros((shape.layers, *x.shape[1:]), x.dtype), layer)
    stacked = _write_layer(stacked, layer, jnp.int32(index))
    del layer
  assert stacked is not None
  out = {}
  for name, value in stacked.items():
    if name in meta:
      q, site = meta[name], sites[f"layers/{name}"]
      value = lj.QuantizedArray(value.codes, value.scales, value.scale_absmax, value.scale_offset,
                                shape=site.shape, dtype=q.dtype, layout=q.layout, format=q.format,
                                block_size=q.block_size)
    out[name] = value
  return out


def base_tree(shape: Shape, plan: lj.Plan, one_layer: lj.Plan, key: jax.Array, block_size: int,
              progress: bool = True) -> dict[str, Any]:
  """The frozen base: NF4 layer kernels, float32 gains, bfloat16 embedding and head."""
  k_layers, k_embed, k_head = jax.random.split(key, 3)
  d, v = shape.d_model, shape.vocab
  return {"embed": jax.jit(lambda k: jax.random.normal(k, (v, d), jnp.bfloat16))(k_embed),
          "layers": quantized_layers(shape, plan, one_layer, k_layers, block_size, progress),
          "norm": jnp.ones((d,), jnp.float32),
          "head": jax.jit(lambda k: jax.random.normal(k, (d, v), jnp.bfloat16) / math.sqrt(d))(k_head)}


def size(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def held_bytes(tree: Any) -> int:
  """Bytes held by the arrays of `tree` (a `QuantizedArray` counts its codes and statistics)."""
  return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def train_step(plan: lj.Plan, shape: Shape, tx: optax.GradientTransformation):
  """`(adapters, opt_state, base, tokens) -> (adapters, opt_state, loss)`: the gradient of the
  loss with respect to the adapters only, through `lj.unmerged` on the quantized base."""
  apply = lj.unmerged(functools.partial(forward, shape=shape), plan)

  def step(adapters, opt_state, base, tokens):
    loss, grads = jax.value_and_grad(lambda a: xent(apply(lj.combine(base, a), tokens), tokens))(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  return step


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  d = Shape()
  p.add_argument("--layers", type=int, default=d.layers, help="decoder layers")
  p.add_argument("--d-model", type=int, default=d.d_model, help="model width")
  p.add_argument("--heads", type=int, default=d.heads, help="query heads")
  p.add_argument("--kv-heads", type=int, default=d.kv_heads, help="key/value heads (grouped-query attention)")
  p.add_argument("--ffn", type=int, default=d.ffn, help="SwiGLU hidden width")
  p.add_argument("--vocab", type=int, default=d.vocab, help="vocabulary size")
  p.add_argument("--batch", type=int, default=1, help="sequences per step")
  p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
  p.add_argument("--steps", type=int, default=3, help="AdamW steps on the adapters")
  p.add_argument("--rank", type=int, default=16, help="LoRA rank")
  p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
  p.add_argument("--block-size", type=int, default=64, help="NF4 block size")
  p.add_argument("--seed", type=int, default=0, help="random seed")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p.parse_args(argv)


def setup(args: argparse.Namespace) -> dict[str, Any]:
  """The model of `args`: its `shape`, training `tokens (batch, seq)`, the LoRA `plan` and the
  one-layer plan, the quantized `base` and the `adapters` (B = 0), and `init_s` seconds."""
  shape = Shape(args.layers, args.d_model, args.heads, args.kv_heads, args.ffn, args.vocab)
  tokens = jax.random.randint(jax.random.key(args.seed + 1), (args.batch, args.seq), 0, shape.vocab)
  config = lj.LoraConfig(targets=[f"layers/{k}" for k in KERNELS], rank=args.rank, alpha=2.0 * args.rank)
  make_plan = lambda s: on_shapes(
      lambda v: lj.plan(config, v, functools.partial(forward, shape=s), args=(tokens,)), s.abstract())
  plan, one_layer = make_plan(shape), make_plan(dataclasses.replace(shape, layers=1))
  print(f"model: {shape.n_params() / 1e9:.2f} B parameters ({shape.layers} layers, d_model {shape.d_model}, "
        f"{shape.heads}/{shape.kv_heads} heads, ffn {shape.ffn}, vocab {shape.vocab}); "
        f"LoRA r={args.rank} on {', '.join(KERNELS)} of every layer")
  start = time.perf_counter()
  base = base_tree(shape, plan, one_layer, jax.random.key(args.seed), args.block_size, not args.no_progress)
  # Under `jit` the zero kernels `attach` is given are dead code: only the factors are made.
  adapters = jax.jit(lambda k: lj.split(lj.attach(plan, zeros(shape.abstract()), k))[0])(
      jax.random.key(args.seed + 2))
  return {"shape": shape, "tokens": tokens, "plan": plan, "one_layer": one_layer, "base": base,
          "adapters": adapters, "init_s": time.perf_counter() - start}


def main(argv=None) -> dict[str, Any]:
  """Run the demo; returns the printed figures (bytes, losses) and the trees, for tests."""
  args = parse_args(argv)
  made = setup(args)
  shape, tokens, plan, base, adapters = (made[k] for k in ("shape", "tokens", "plan", "base", "adapters"))
  n_params, init_s = shape.n_params(), made["init_s"]

  adapted = sum(math.prod(s.shape) for s in plan.sites)
  quantized_bytes = sum(held_bytes(base["layers"][k]) for k in KERNELS)
  lora_params = sum(x.size for x in jax.tree_util.tree_leaves(adapters))
  tx = optax.adamw(args.lr)
  opt_state = tx.init(adapters)
  step = jax.jit(train_step(plan, shape, tx), donate_argnums=(0, 1))
  start = time.perf_counter()
  compiled = step.lower(adapters, opt_state, base, tokens).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  print(f"compiled train step: arguments {size(mem.argument_size_in_bytes)}, temporaries "
        f"{size(mem.temp_size_in_bytes)} ({compile_s:.1f} s)", flush=True)

  losses, times = [], []
  for _ in tqdm(range(args.steps), desc="LoRA steps", file=sys.stderr, disable=args.no_progress):
    start = time.perf_counter()
    adapters, opt_state, loss = compiled(adapters, opt_state, base, tokens)
    losses.append(float(loss))
    times.append(time.perf_counter() - start)
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

  base_bytes, lora_bytes = held_bytes(base), held_bytes(adapters)
  lora_train = lora_params * (4 + 4 + 8)  # factors, their gradients, two AdamW moments (float32)
  args_b, temps_b = mem.argument_size_in_bytes, mem.temp_size_in_bytes
  print(f"adapted kernels: {adapted:,} parameters in {size(quantized_bytes)} NF4 = "
        f"{quantized_bytes / adapted:.3f} bytes/param; LoRA factors: {lora_params:,} parameters")
  print(f"init + quantize {init_s:.1f} s, steps {', '.join(f'{t:.1f}' for t in times)} s")
  print(f"loss: {' -> '.join(f'{x:.4f}' for x in losses)}")
  rows = [
      ("full fine-tuning, float32 + AdamW (computed)", size(n_params * 16),
       "weights + grads + 2 moments, 16 B/param"),
      ("LoRA on a bfloat16 base (computed)", size(n_params * 2 + lora_train),
       "base 2 B/param + factors' training state"),
      ("QLoRA (NF4) base + LoRA state (computed)", size(base_bytes + lora_train),
       f"base {base_bytes / n_params:.3f} B/param incl. bf16 embed/head"),
      ("this run: compiled step, arguments", size(args_b), "base + adapters + AdamW state + tokens"),
      ("this run: compiled step, temporaries", size(temps_b),
       "activations, dequantized layer, grads"),
      ("this run: peak RSS of the process", size(peak_rss), "resource.getrusage ru_maxrss"),
  ]
  print_table(("memory", "bytes", "what"), rows)
  return {"n_params": n_params, "adapted": adapted, "quantized_bytes": quantized_bytes,
          "base_bytes": base_bytes, "lora_bytes": lora_bytes, "losses": losses, "args_bytes": args_b,
          "temp_bytes": temps_b, "peak_rss": peak_rss, "base": base, "adapters": adapters,
          "plan": plan, "shape": shape, "tokens": tokens}


if __name__ == "__main__":
  main()
