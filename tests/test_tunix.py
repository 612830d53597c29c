"""google-tunix's own Flax NNX models through lora_jax: Llama 3 (remat NONE and BLOCK), Qwen 3 with
mixture-of-experts MLPs (the experts targeted) and Gemma 3 (float32 and bfloat16 parameters).

Per model, every attention and MLP kernel (and expert stack) is targeted, and:
- the plan keeps every use low-rank, with the layouts tunix's einsum strings imply,
- with B = 0 (what `lj.attach` starts from) both paths give the base model's logits bit for bit,
- with random nonzero factors `lj.unmerged` equals `lj.merged` (logits, and gradients w.r.t. A and
  B), and, for bfloat16, both stay as close to a float32 evaluation of the same numbers as the
  base model itself does,
- the FLOPs of the unmerged forward exceed the base's by at most the low-rank terms.

Models are built abstractly (`nnx.eval_shape`) and filled with numpy draws: tunix's eager
initialisers compile one XLA program per parameter (10-25 s per model on two busy cores), and its
MLP kernels start at zero, which would hide every MLP adapter. Two `jit`s per model and dtype (the
three forwards; both backward passes); XLA compiling them is most of this module's time.
"""

import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Callable

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import optional
from flax import nnx
from test_apply import _flops  # the FLOP count the zoo's bound uses (lowered program)

import lora_jax as lj
from lora_jax._src import tree as lj_tree

with warnings.catch_warnings():
  # tunix 0.1.7 imports jax.experimental.shard_map (deprecated in JAX 0.8); not ours to fix.
  warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"tunix\.")
  optional("tunix")
  from tunix.models.gemma3 import model as gemma3
  from tunix.models.llama3 import model as llama3
  from tunix.models.qwen3 import model as qwen3

# tunix's model code uses APIs that JAX / Flax deprecated after 0.1.7 was written (`.value`,
# `pxla.thread_resources`, `nnx.Param(sharding=...)`): warnings in their code, not in lora_jax.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:tunix"),
              pytest.mark.filterwarnings("ignore:'sharding' is deprecated:DeprecationWarning")]

L = lj.Layout
RANK, ALPHA = 2, 4.0
# One decoder layer: tunix runs its layers in a Python loop, so a second adds no structure, only
# ~8 s of XLA compile. B·T rows go through every kernel (every expert: tunix's dense CPU MoE path).
N_LAYERS, B, T, VOCAB = 1, 1, 8, 128
D, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 64, 4, 2, 16, 128
# XLA's backend optimisation level 0 halves the compile time of these programs (what this module
# spends its time on); every check here holds at any level, and the FLOP bound reads the program
# before XLA's passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
ATTN_MLP = (r".*/(q_proj|k_proj|v_proj|o_proj|q_einsum|kv_einsum|attn_vec_einsum|gate_proj|up_proj|down_proj)"
            r"(/w|/kernel)?")  # the MoE expert stacks are Params of their own, without /w

MLP_LAYOUTS = {"mlp/gate_proj/kernel": L((), (0,), (1,)), "mlp/up_proj/kernel": L((), (0,), (1,)),
               "mlp/down_proj/kernel": L((), (0,), (1,))}
LLAMA_ATTN = {  # q/k/v (D, N, H): 'BTD,DNH->BTNH'; o (N, H, D): 'BTNH,NHD->BTD'
  "attn/q_proj/w": L((), (0,), (1, 2)), "attn/k_proj/w": L((), (0,), (1, 2)),
  "attn/v_proj/w": L((), (0,), (1, 2)), "attn/o_proj/w": L((), (0, 1), (2,))}
EXPERTS = {  # (E, D, F) / (E, F, D) indexed per expert: the expert axis is a stack axis
  "mlp/gate_proj": L((0,), (1,), (2,)), "mlp/up_proj": L((0,), (1,), (2,)),
  "mlp/down_proj": L((0,), (1,), (2,))}
GEMMA_ATTN = {  # q (N, D, H): 'BTD,NDH->BTNH'; kv (2, K, D, H): 'BSD,CKDH->CBSKH'; out (N, H, D)
  "attn/q_einsum/w": L((), (1,), (0, 2)), "attn/kv_einsum/w": L((), (2,), (0, 1, 3)),
  "attn/attn_vec_einsum/w": L((), (0, 1), (2,))}


@dataclasses.dataclass(frozen=True)
class Case:
  build: Callable[[], nnx.Module]  # the tunix model, under nnx.eval_shape
  layouts: dict[str, lj.Layout]  # per layer: path suffix -> expected layout
  remat: bool = False  # whether the traced forward must contain a remat region


def _llama(remat):
  cfg = llama3.ModelConfig(num_layers=N_LAYERS, vocab_size=VOCAB, embed_dim=D, hidden_dim=HIDDEN,
                           num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=KV_HEADS, rope_theta=10_000,
                           norm_eps=1e-5, remat_config=remat)
  return lambda: llama3.Llama3(cfg, rngs=nnx.Rngs(0))


def _qwen3_moe():
  cfg = qwen3.ModelConfig(num_layers=N_LAYERS, vocab_size=VOCAB, embed_dim=D, hidden_dim=HIDDEN,
                          num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=KV_HEADS, rope_theta=10_000,
                          norm_eps=1e-6, num_experts=4, num_experts_per_tok=2)
  return lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))


def _gemma3(dtype):
  # A local sliding-window layer (tunix's layer pattern starts with five of them), window < T.
  cfg = gemma3.ModelConfig(num_layers=N_LAYERS, num_embed=VOCAB, embed_dim=D, hidden_dim=HIDDEN,
                           num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=KV_HEADS,
                           sliding_window_size=4, param_dtype=dtype)
  return lambda: gemma3.Gemma3(cfg, rngs=nnx.Rngs(0))


CASES = {
  "llama3": Case(_llama(llama3.RematConfig.NONE), {**LLAMA_ATTN, **MLP_LAYOUTS}),
  "llama3_remat_block": Case(_llama(llama3.RematConfig.BLOCK), {**LLAMA_ATTN, **MLP_LAYOUTS}, remat=True),
  "qwen3_moe": Case(_qwen3_moe(), {**LLAMA_ATTN, **EXPERTS}),
  "gemma3_f32": Case(_gemma3(jnp.float32), {**GEMMA_ATTN, **MLP_LAYOUTS}),
  "gemma3_bf16": Case(_gemma3(jnp.bfloat16), {**GEMMA_ATTN, **MLP_LAYOUTS}),
}


def _inputs():
  rng = np.random.default_rng(0)
  tokens = jax.device_put(rng.integers(0, VOCAB, (B, T)).astype(np.int32))
  positions = jax.device_put(np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy())
  causal = jax.device_put(np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T)).copy())
  return tokens, positions, causal


def _fill(abstract, rng, std=0.2):
  """Numpy draws of the abstract leaves' shapes and dtypes (made on the host: `jax.random` per
  leaf would compile a program per shape)."""
  def draw(x):
    assert jnp.issubdtype(x.dtype, jnp.floating), x
    return jax.device_put((rng.standard_normal(x.shape) * std).astype(x.dtype))
  return jax.tree_util.tree_map(draw, abstract)


@functools.cache
def _setup(name):
  """(case, fn, state, args, plan, adapters with B = 0, adapters with random B)."""
  case = CASES[name]
  graphdef, abstract = nnx.split(nnx.eval_shape(case.build))
  rng = np.random.default_rng(1)
  state = _fill(abstract, rng)
  fn = lambda s, *a: nnx.merge(graphdef, s)(*a[:2], None, a[2])[0]  # (tokens, positions, cache, mask)
  args = _inputs()
  plan = lj.plan(lj.LoraConfig(targets=ATTN_MLP, rank=RANK, alpha=ALPHA), state, fn, args)
  shapes = {}
  for s in plan.sites:
    shapes[s.path + "_lora_a"] = jax.ShapeDtypeStruct(s.a_shape, jnp.dtype(s.factor_dtype))
    shapes[s.path + "_lora_b"] = jax.ShapeDtypeStruct(s.b_shape, jnp.dtype(s.factor_dtype))
  random = _fill(shapes, rng, std=0.3)
  at_init = {k: (v if k.endswith("_lora_a") else jnp.zeros_like(v)) for k, v in random.items()}
  return case, fn, state, args, plan, at_init, random


@functools.cache
def _compiled(name):
  """`(forward, grads)`, one XLA program each per model and dtype:
  `forward(state, adapters, args)`: the base, unmerged and merged logits;
  `grads(state, adapters, cot, args)`: per path (unmerged, merged), d<logits, cot>/d(A, B).
  The forward is not taken from `jax.vjp`: differentiating changes XLA's fusion of the forward
  (residuals are kept), which moves the logits by float reassociation (~1e-7) and would blur the
  exact B = 0 check."""
  _, fn, _, _, plan, _, _ = _setup(name)

  def forward(state, adapters, args):
    tree = lj.combine(state, adapters)
    return fn(state, *args), lj.unmerged(fn, plan)(tree, *args), lj.merged(fn, plan)(tree, *args)

  def grads(state, adapters, cot, args):
    def loss(make, ad):
      y = make(fn, plan)(lj.combine(state, ad), *args)
      return jnp.sum(y.astype(jnp.float32) * cot)
    return tuple(jax.grad(functools.partial(loss, make))(adapters) for make in (lj.unmerged, lj.merged))
  return jax.jit(forward, compiler_options=FAST_COMPILE), jax.jit(grads, compiler_options=FAST_COMPILE)


def _cot():
  return jax.device_put(np.random.default_rng(2).standard_normal((B, T, VOCAB)).astype(np.float32))


NAMES = list(CASES)


@pytest.mark.parametrize("name", NAMES)
def test_plan_is_low_rank_with_the_einsum_layouts(name):
  case, fn, state, args, plan, _, _ = _setup(name)
  assert len(plan.sites) == N_LAYERS * len(case.layouts), str(plan)
  for s in plan.sites:
    m = re.fullmatch(r"layers/(\d+)/(.*)", s.path)
    assert m and m.group(2) in case.layouts, s.path
    assert s.layout == case.layouts[m.group(2)], (s.path, s.layout)
    assert s.use and all(u.kind == "low_rank" for u in s.use), f"{s.path}: {s.use}"
  # remat BLOCK must really put the blocks under remat (else the case tests nothing new).
  prims = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      prims.add(eqn.primitive)
      for sub in jex.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(state, *args).jaxpr)
  assert (jex.primitives.remat_p in prims) == case.remat, sorted(map(str, prims))


@pytest.mark.parametrize("name", NAMES)
def test_init_equals_base(name):
  _, _, state, args, _, at_init, _ = _setup(name)
  base, unmerged, merged = _compiled(name)[0](state, at_init, args)
  # B = 0: the low-rank term is an exact zero added to the base output (merged: W + 0 = W).
  np.testing.assert_array_equal(unmerged, base)
  np.testing.assert_array_equal(merged, base)


def _max_abs(x):
  return float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32))))


@pytest.mark.parametrize("name", [n for n in NAMES if not n.endswith("bf16")])
def test_unmerged_equals_merged_float32(name):
  _, _, state, args, _, _, random = _setup(name)
  forward, grads = _compiled(name)
  base, y_u, y_m = forward(state, random, args)
  assert _max_abs(y_u - base) > 1e-1, "random factors must change the logits"
  np.testing.assert_allclose(y_u, y_m, rtol=2e-5, atol=2e-5 * _max_abs(y_m))
  g_u, g_m = (lj_tree.flatten(g) for g in grads(state, random, _cot(), args))
  assert g_u.keys() == g_m.keys() == set(random)
  for p in g_u:
    assert _max_abs(g_m[p]) > 0, p
    np.testing.assert_allclose(g_u[p], g_m[p], rtol=1e-4, atol=1e-4 * _max_abs(g_m[p]), err_msg=p)


def test_unmerged_equals_merged_bfloat16():
  """bfloat16 keeps 8 significant bits, and the two paths round at different places (merged:
  W + ΔW once per kernel; unmerged: x·W, x·A and (x·A)·B in bf16), so they agree only to bf16
  noise. Both are measured against the float32 evaluation of the same numbers (the bf16
  parameters upcast, the float32 factors; run by the float32 Gemma 3 case's programs, where
  unmerged equals merged to 2e-5). Yardsticks, measured on the same model rather than assumed:
  logits within twice the base model's own bf16-vs-float32 distance (0.065 of logits up to 12
  here; both paths are at 0.065); each factor's gradient within twice the worst relative error
  (L2) of the merged path's bf16 gradients (2.5% here; the unmerged path's worst is 2.8%)."""
  _, _, state, args, _, _, random = _setup("gemma3_bf16")
  ref_forward, ref_grads = _compiled("gemma3_f32")
  state32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), state)
  base_ref, y_ref, _ = ref_forward(state32, random, args)
  base, y_u, y_m = _compiled("gemma3_bf16")[0](state, random, args)
  base_noise = _max_abs(base.astype(jnp.float32) - base_ref)
  assert 0 < base_noise < 0.05 * _max_abs(base_ref)
  assert _max_abs(y_ref - base_ref) > 20 * base_noise, "random factors must change the logits"
  for path_name, y in (("unmerged", y_u), ("merged", y_m)):
    assert _max_abs(y.astype(jnp.float32) - y_ref) <= 2 * base_noise, path_name

  g_ref, _ = (lj_tree.flatten(g) for g in ref_grads(state32, random, _cot(), args))
  g_u, g_m = (lj_tree.flatten(g) for g in _compiled("gemma3_bf16")[1](state, random, _cot(), args))
  assert g_u.keys() == g_m.keys() == g_ref.keys() == set(random)
  rel = lambda g, p: float(jnp.linalg.norm(g[p] - g_ref[p]) / jnp.linalg.norm(g_ref[p]))
  merged_noise = max(rel(g_m, p) for p in g_ref)
  assert 0 < merged_noise < 0.2
  for p in g_ref:
    assert rel(g_u, p) <= 2 * merged_noise, (p, rel(g_u, p), merged_noise)


@pytest.mark.parametrize("name", NAMES)
def test_unmerged_flops_only_add_low_rank_terms(name):
  _, fn, state, args, plan, _, random = _setup(name)
  tree = lj.combine(state, random)
  base_flops = _flops(fn, state, *args)
  lora_flops = _flops(lj.unmerged(fn, plan), tree, *args)
  rows = B * T  # every expert sees every token on tunix's dense CPU MoE path
  low_rank = materialise = 0.0
  for s in plan.sites:
    stack = math.prod(s.shape[j] for j in s.layout.stack_axes)
    materialise += stack * 2 * s.fan_in * s.fan_out * s.rank
    # x·A then ·B (2 FLOPs per multiply-add), the scale, and the add onto the base output.
    low_rank += stack * len(s.use) * rows * (2 * s.rank * (s.fan_in + s.fan_out) + s.rank + 2 * s.fan_out)
  assert low_rank < materialise, "shapes must make materialising costlier than low-rank"
  extra = lora_flops - base_flops
  assert 0 < extra <= low_rank, (extra, low_rank, materialise)
