"""The model zoo every apply-path test runs on: the ways a kernel is stored and used.

Each entry gives base variables, the function to adapt (`fn(variables, x)`), an input, the
config targets and, for the FLOP bound, how many rows pass through each adapted kernel. Shapes are
small but chosen so that materialising `W + ΔW` would cost more FLOPs than the low-rank terms
(so the FLOP test can tell the two apart).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

RANK = 2


@dataclasses.dataclass
class Entry:
  name: str
  variables: Any
  fn: Callable
  x: Any
  targets: str
  n_sites: int
  rows: int  # rows (tokens / output positions) through each kernel per stack slice
  splits: int = 1  # pieces the out side is split into before use (each piece is one use)
  reverse_mode: bool = True  # False: a while_loop with a traced bound, so check jvp, not grad
  ragged_groups: tuple[int, ...] | None = None  # kernels used through lax.ragged_dot


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(48)(x))
    x = nn.relu(nn.Dense(48)(x))
    return nn.Dense(16)(x)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=32, deterministic=True)(h)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(32, name="fc2")(nn.gelu(nn.Dense(64, name="fc1")(h)))


class Layer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.tanh(nn.Dense(32)(x)), None


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(nn.remat(Layer), variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)
    x, _ = layers(name="layers")(x, None)
    return x


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    return x.mean(axis=(1, 2))


class TiedLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(64, 32)
    h = embed(tokens)
    return embed.attend(jnp.tanh(h))


class EinsumHeads(nn.Module):
  """A custom module: kernel stored (H, D, hd), used through jnp.einsum."""

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.normal(0.1), (4, 32, 8))
    h = jnp.einsum("btd,hdk->bthk", x, w)
    w2 = self.param("proj", nn.initializers.normal(0.1), (4, 8, 32))
    return jnp.einsum("bthk,hkd->btd", jnp.tanh(h), w2)


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(24, 48, rngs=rngs)
    self.l2 = nnx.Linear(48, 16, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def plain_fn(params, x):
  """A plain jnp function whose kernel is stored (out, in) and used as x @ W.T."""
  h = jnp.tanh(x @ params["w1"].T + params["b1"])
  return h @ params["w2"].T


class EqxBlock(eqx.Module):
  """An equinox attention block: `eqx.nn.Linear` stores `weight` as `(out, in)`, used `weight @ x`."""
  norm: eqx.nn.LayerNorm
  attn: eqx.nn.MultiheadAttention
  fc1: eqx.nn.Linear
  fc2: eqx.nn.Linear

  def __init__(self, key):
    k = jax.random.split(key, 3)
    self.norm = eqx.nn.LayerNorm(32)
    self.attn = eqx.nn.MultiheadAttention(num_heads=2, query_size=32, key=k[0])
    self.fc1 = eqx.nn.Linear(32, 64, key=k[1])
    self.fc2 = eqx.nn.Linear(64, 32, key=k[2])

  def __call__(self, x):  # x: (T, D), one sequence
    h = jax.vmap(self.norm)(x)
    x = x + self.attn(h, h, h)
    return x + jax.vmap(lambda t: self.fc2(jax.nn.gelu(self.fc1(t))))(x)


class TupleParams(NamedTuple):
  w1: jax.Array
  b1: jax.Array
  w2: jax.Array


def namedtuple_fn(p: TupleParams, x):
  return jnp.tanh(x @ p.w1 + p.b1) @ p.w2


@functools.partial(jax.tree_util.register_dataclass, data_fields=["embed", "heads"],
                   meta_fields=["temperature"])
@dataclasses.dataclass
class DataclassModel:
  """A registered-dataclass model: an embedding `(V, D)` looked up, then a `(D, H, hd)` einsum."""
  embed: jax.Array
  heads: jax.Array
  temperature: float

  def __call__(self, tokens):
    h = jnp.tanh(self.embed[tokens])
    return jnp.einsum("btd,dhk->bthk", h, self.heads) / self.temperature


L, E = 3, 4  # layers of a stacked kernel, experts of an MoE stack


def layers_loop_fn(p, x):
  """A stack `(L, D, D)` indexed per layer in a Python loop: `slice` + `squeeze`."""
  for l in range(L):
    x = x + jnp.tanh(x @ p["w"][l])
  return x


def layers_fori_fn(p, x):
  """The same stack indexed by the traced loop counter of a `fori_loop`: `dynamic_slice`."""
  return jax.lax.fori_loop(0, L, lambda i, h: h + jnp.tanh(h @ p["w"][i]), x)


def layers_while_fn(p, x):
  """... and of a `while_loop` with a traced bound (the loop count comes from the data)."""
  n = jnp.minimum(jnp.sum(jnp.ones_like(x[0, :1], jnp.int32)) * L, L)
  def body(c):
    i, h = c
    return i + 1, h + jnp.tanh(h @ p["w"][i])
  return jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]


def moe_fn(p, x):
  """Qwen3-MoE-style experts `(E, D, F)` / `(E, F, D)`, each picked out and used per expert."""
  gates = jax.nn.softmax(x @ p["router"])
  out = jnp.zeros_like(x)
  for e in range(E):
    h = jax.nn.silu(x @ p["gate"][e]) * (x @ p["up"][e])
    out = out + gates[:, e:e + 1] * (h @ p["down"][e])
  return out


def fused_qkv_fn(p, x):
  """A fused `(D, 3·D)` projection split into q, k, v before use (`split` on the out axis)."""
  q, k, v = jnp.split(p["qkv"], 3, axis=1)
  att = jax.nn.softmax((x @ q) @ (x @ k).T / 4.0)
  return att @ (x @ v)


def size1_axes_fn(p, x):
  """Kernels stored with a size-1 axis and squeezed, or given one with `W[None]`."""
  h = jnp.tanh(x @ jnp.squeeze(p["one"], 0))
  return jnp.einsum("bd,lde->lbe", h, p["w"][None])[0]


GROUPS = (1, 2, 0, 1)  # tokens per expert, already sorted by expert (as MoE dispatch leaves them)


def moe_ragged_fn(p, x):
  """Experts `(E, D, F)` applied with `lax.ragged_dot` (grouped matmul, MaxText/tunix MoE)."""
  groups = jnp.array(GROUPS, jnp.int32)
  h = jax.nn.silu(jax.lax.ragged_dot(x, p["gate"], groups)) * jax.lax.ragged_dot(x, p["up"], groups)
  return jax.lax.ragged_dot(h, p["down"], groups)


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(32, 32, rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.lin(x))


class NNXRematScan(nnx.Module):
  """Layers built with `nnx.vmap`, run with `nnx.scan` over an `nnx.remat` step (the scan hands
  the layers' state back as an output), plus a head under `nnx.remat` alone (tunix's remat)."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NNXBlock(rngs)
    self.blocks = make(rngs)
    self.head = NNXBlock(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def step(x, block):
      return block(x)
    return nnx.remat(lambda m, x: m(x))(self.head, step(x, self.blocks))


def concat_qkv_fn(p, x):
  """Separately stored q, k, v `(D, D)` (adapted) and a gate `(D, D)` (not adapted) concatenated
  into one `(D, 4·D)` projection, split back after the matmul."""
  fused = x @ jnp.concatenate([p["q"], p["k"], p["v"], p["gate"]], axis=1)
  q, k, v, g = jnp.split(fused, 4, axis=1)
  return jax.nn.softmax(q @ k.T / 4.0) @ v * jax.nn.sigmoid(g)


def layer_write_fn(p, x):
  """A layer stack `(L, D, D)` rebuilt by writing a separately stored layer into it
  (`lax.dynamic_update_index_in_dim`), then scanned."""
  stack = jax.lax.dynamic_update_index_in_dim(p["w"], p["new"], 1, 0)
  return jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, stack)[0]


def shard_map_mlp_fn(p, x):
  """A tensor-parallel MLP in `jax.shard_map`: column-parallel W1, row-parallel W2 and a `psum`
  (a one-device mesh here; tests/test_sharding.py runs it on eight)."""
  P = jax.sharding.PartitionSpec
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
  body = lambda x, w1, w2: jax.lax.psum(jnp.tanh(x @ w1) @ w2, "model")
  return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, "model"), P("model", None)),
                       out_specs=P())(x, p["w1"], p["w2"])


def _linen(name, module, x, targets, n_sites, rows):
  variables = jit_make(lambda: module.init(jax.random.key(0), x))
  return Entry(name, variables, module.apply, x, targets, n_sites, rows)


def normal(rng: np.random.Generator, shape: tuple[int, ...], std: float = 1.0) -> jax.Array:
  """A float32 normal draw made in numpy and put on the device (`jax.random` compiles a program
  per shape: the zoo's draws cost more CPU than the tests that use them)."""
  return jax.device_put((std * rng.standard_normal(shape)).astype(np.float32))


# The zoo's parameters are inputs, compared with nothing: XLA's backend optimisation level 0 (cheaper
# compiles, other float rounding) is fine for making them, never for what a test checks.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _key_order(tree: Any) -> Any:
  """The key order of nested plain dicts (None elsewhere)."""
  return {k: _key_order(v) for k, v in tree.items()} if type(tree) is dict else None


def _in_key_order(order: Any, tree: Any) -> Any:
  """`tree` with its plain dicts' keys in `order` (pytree functions rebuild dicts sorted by key)."""
  return tree if order is None else {k: _in_key_order(o, tree[k]) for k, o in order.items()}


def jit_make(make: Callable[[], Any]) -> Any:
  """`make()` (a model and its initialisers) as one XLA program instead of one per eager op, with
  its dicts in the order `make` built them (the order of sites and of error messages)."""
  static = []

  def arrays():
    made = make()
    dynamic, rest = eqx.partition(made, eqx.is_array)
    static.append((rest, _key_order(made)))
    return dynamic

  dynamic = jax.jit(arrays, compiler_options=FAST_COMPILE)()
  return _in_key_order(static[0][1], eqx.combine(dynamic, static[0][0]))


def build() -> list[Entry]:
  rng = np.random.default_rng(42)
  seq = normal(rng, (2, 3, 32))
  entries = [
      _linen("mlp", MLP(), normal(rng, (4, 24)), r".*/kernel", 3, 4),
      _linen("attention_block", Block(), seq, r".*/(query|key|value|out|fc1|fc2)/kernel", 6, 6),
      _linen("scan_remat", Stack(), normal(rng, (4, 32)), r".*/kernel", 1, 4),
      _linen("cnn", CNN(), normal(rng, (1, 4, 4, 16)), r".*/kernel", 2, 16),
      _linen("embed_tied", TiedLM(), jnp.array([[1, 5, 7], [2, 63, 0]]), r".*/embedding", 1, 6),
      _linen("einsum_module", EinsumHeads(), seq, r".*/(kernel|proj)", 2, 6),
  ]
  graphdef, state = jit_make(lambda: nnx.split(NNXMLP(nnx.Rngs(0))))
  entries.append(Entry("nnx", state, lambda s, x: nnx.merge(graphdef, s)(x),
                       normal(rng, (4, 24)), r".*/kernel", 2, 4))
  params = {"w1": normal(rng, (48, 24), 0.2), "b1": jnp.zeros(48),
            "w2": normal(rng, (16, 48), 0.2)}
  entries.append(Entry("plain_transposed", params, plain_fn, normal(rng, (4, 24)),
                       r"w\d", 2, 4))
  key = jax.random.key(7)
  mlp = jit_make(lambda: eqx.nn.MLP(24, 16, width_size=48, depth=2, key=key))
  entries.append(Entry("eqx_mlp", mlp, lambda m, x: jax.vmap(m)(x), normal(rng, (4, 24)),
                       r"layers/\d/weight", 3, 4))
  block = jit_make(lambda: EqxBlock(jax.random.fold_in(key, 1)))
  entries.append(Entry("eqx_attention", block, lambda m, x: jax.vmap(m)(x), seq,
                       r".*_proj/weight|fc\d/weight", 6, 6))
  tuple_params = TupleParams(normal(rng, (24, 48), 0.2), jnp.zeros(48),
                             normal(rng, (48, 16), 0.2))
  entries.append(Entry("namedtuple", tuple_params, namedtuple_fn, normal(rng, (4, 24)),
                       r"w\d", 2, 4))
  dc = DataclassModel(normal(rng, (64, 32)), normal(rng, (32, 4, 8), 0.2), 2.0)
  entries.append(Entry("dataclass", dc, lambda m, t: m(t), jnp.array([[1, 5, 7], [2, 63, 0]]),
                       r"embed|heads", 2, 6))
  xs = normal(rng, (4, 32))
  stack = {"w": normal(rng, (L, 32, 32), 0.2)}
  for name, fn in (("layers_loop", layers_loop_fn), ("layers_fori", layers_fori_fn),
                   ("layers_while", layers_while_fn)):
    entries.append(Entry(name, stack, fn, xs, "w", 1, 4, reverse_mode=name != "layers_while"))
  moe = {"router": normal(rng, (32, E)), "gate": normal(rng, (E, 32, 48), 0.2),
         "up": normal(rng, (E, 32, 48), 0.2), "down": normal(rng, (E, 48, 32), 0.2)}
  entries.append(Entry("moe_experts", moe, moe_fn, xs, "gate|up|down", 3, 4))
  entries.append(Entry("fused_qkv", {"qkv": normal(rng, (32, 96), 0.2)}, fused_qkv_fn, xs,
                       "qkv", 1, 4, splits=3))
  size1 = {"one": normal(rng, (1, 32, 32), 0.2), "w": normal(rng, (32, 48), 0.2)}
  entries.append(Entry("size1_axes", size1, size1_axes_fn, xs, "one|w", 2, 4))
  entries.append(Entry("moe_ragged", {k: v for k, v in moe.items() if k != "router"}, moe_ragged_fn, xs,
                       "gate|up|down", 3, 4, ragged_groups=GROUPS))
  qkv = {n: normal(rng, (32, 32), 0.2) for n in ("q", "k", "v", "gate")}
  entries.append(Entry("concat_qkv", qkv, concat_qkv_fn, xs, "q|k|v", 3, 4))
  entries.append(Entry("layer_write", {"w": stack["w"], "new": normal(rng, (32, 32), 0.2)},
                       layer_write_fn, xs, "w|new", 2, 4))
  mlp_tp = {"w1": normal(rng, (32, 48), 0.2), "w2": normal(rng, (48, 32), 0.2)}
  entries.append(Entry("shard_map_mlp", mlp_tp, shard_map_mlp_fn, xs, "w1|w2", 2, 4))
  nnx_graph, nnx_state = jit_make(lambda: nnx.split(NNXRematScan(nnx.Rngs(3))))
  entries.append(Entry("nnx_remat_scan", nnx_state, lambda s, x: nnx.merge(nnx_graph, s)(x), xs,
                       r".*/kernel", 2, 4))
  return entries


@functools.lru_cache(maxsize=None)
def entries() -> dict[str, Entry]:
  """The zoo, built once per test session."""
  return {e.name: e for e in build()}
