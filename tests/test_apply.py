"""The zoo contract: for every way a kernel is stored and used, the unmerged path equals the base
at init, equals the merged path with random factors (values and gradients), keeps every use
low-rank, and costs no more FLOPs than the low-rank terms."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src import tree as lj_tree
import zoo

NAMES = ["mlp", "attention_block", "scan_remat", "cnn", "embed_tied", "einsum_module", "nnx",
         "plain_transposed", "eqx_mlp", "eqx_attention", "namedtuple", "dataclass",
         # reach: per-layer / per-expert indexing, fused-kernel splits, size-1 axes
         "layers_loop", "layers_fori", "layers_while", "moe_experts", "fused_qkv", "size1_axes",
         "moe_ragged", "nnx_remat_scan",
         # reach: kernels concatenated, a layer written into a stack, a shard_map body
         "concat_qkv", "layer_write", "shard_map_mlp"]


@functools.lru_cache(maxsize=None)
def _setup(name):
  entry = zoo.entries()[name]
  config = lj.LoraConfig(targets=entry.targets, rank=zoo.RANK, alpha=3.0)
  plan = lj.plan(config, entry.variables, apply_fn=entry.fn, args=(entry.x,))
  tree = lj.attach(plan, entry.variables, jax.random.key(1))
  return entry, plan, tree


def _randomize(tree, seed):
  """Random A and B (B is zero after attach, which would hide every bug in the low-rank term),
  drawn in numpy: a `jax.random` draw compiles an XLA program per shape."""
  adapters, base = lj.split(tree)
  leaves, treedef = jax.tree_util.tree_flatten(adapters)
  rng = np.random.default_rng(seed)
  leaves = [jax.device_put((0.3 * rng.standard_normal(x.shape)).astype(x.dtype)) for x in leaves]
  return lj.combine(base, jax.tree_util.tree_unflatten(treedef, leaves))


def _flops(f, *args):
  # The FLOPs of the program as emitted (lowered, before XLA's fusion): XLA:CPU duplicates the
  # producer of x (a gelu, a layer norm) into both consumers, the base dot and x·A, and the
  # compiled cost analysis counts that elementwise work twice (fc2 of eqx_attention: +1,920 =
  # 6 rows x 64 x gelu's 5 FLOPs), which is not what this test is about: forming W + ΔW.
  arrays, static = eqx.partition(args, eqx.is_array)  # equinox Modules carry functions too
  cost = jax.jit(lambda a: f(*eqx.combine(a, static))).lower(arrays).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _ragged_low_rank_flops(entry, site):
  """`ragged_dot(x, A_g)` then `ragged_dot(h, B_g)`, lowered on their own, plus the scale and
  the add: XLA's cost model charges a ragged dot as a dense product per group (and masking),
  for the base as for these, so the bound must be costed the same way."""
  groups = jnp.array(entry.ragged_groups, jnp.int32)
  m, g = entry.rows, len(entry.ragged_groups)
  xa = _flops(lambda x, a: jax.lax.ragged_dot(x, a, groups), jnp.ones((m, site.fan_in)),
              jnp.ones((g, site.fan_in, site.rank)))
  hb = _flops(lambda h, b: jax.lax.ragged_dot(h, b, groups), jnp.ones((m, site.rank)),
              jnp.ones((g, site.rank, site.fan_out)))
  return len(site.use) * (xa + hb + m * site.rank + m * site.fan_out)


@pytest.mark.parametrize("name", NAMES)
def test_plan_finds_every_site_low_rank(name):
  entry, plan, _ = _setup(name)
  assert len(plan.sites) == entry.n_sites
  for site in plan.sites:
    assert site.low_rank, f"{site.path}: {site.use}"


@pytest.mark.parametrize("name", NAMES)
def test_init_equals_base(name):
  entry, plan, tree = _setup(name)
  base = eqx.filter_jit(entry.fn)(entry.variables, entry.x)
  # B = 0, so only float reassociation (different fusion) may differ from the base. Both paths in
  # one program: one XLA compile instead of two.
  both = eqx.filter_jit(lambda t, x: (lj.unmerged(entry.fn, plan)(t, x), lj.merged(entry.fn, plan)(t, x)))
  for y in both(tree, entry.x):
    np.testing.assert_allclose(y, base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_unmerged_equals_merged_values_and_grads(name):
  entry, plan, tree = _setup(name)
  tree = _randomize(tree, 7)
  adapters, base = lj.split(tree)
  y_base = np.asarray(eqx.filter_jit(entry.fn)(entry.variables, entry.x))
  cot = jax.device_put(np.random.default_rng(3).standard_normal(y_base.shape).astype(np.float32))

  def loss(apply, adapters):
    return jnp.sum(apply(lj.combine(base, adapters), entry.x) * cot)

  # forward mode where reverse mode cannot run (a while_loop with a traced bound): the same numbers
  diff = jax.grad if entry.reverse_mode else jax.jacfwd

  def values_and_grads(tree, adapters):  # both paths in one program: one XLA compile, not four
    out = {}
    for path_name, make in (("unmerged", lj.unmerged), ("merged", lj.merged)):
      apply = make(entry.fn, plan)
      out[path_name] = (apply(tree, entry.x), diff(functools.partial(loss, apply))(adapters))
    return out

  results = eqx.filter_jit(values_and_grads)(tree, adapters)
  (y_u, g_u), (y_m, g_m) = results["unmerged"], results["merged"]
  assert np.max(np.abs(np.asarray(y_u) - y_base)) > 1e-2, "random factors must change the output"
  np.testing.assert_allclose(y_u, y_m, rtol=2e-5, atol=2e-5)
  flat_u, flat_m = lj_tree.flatten(g_u), lj_tree.flatten(g_m)
  assert flat_u.keys() == flat_m.keys() and len(flat_u) == 2 * entry.n_sites
  for p in flat_u:
    gu, gm = np.asarray(lj_tree.unbox(flat_u[p])), np.asarray(lj_tree.unbox(flat_m[p]))
    assert np.max(np.abs(gm)) > 0, p
    np.testing.assert_allclose(gu, gm, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(gm))), err_msg=p)


@pytest.mark.parametrize("name", NAMES)
def test_unmerged_flops_only_add_low_rank_terms(name):
  entry, plan, tree = _setup(name)
  base_flops = _flops(entry.fn, entry.variables, entry.x)
  lora_flops = _flops(lj.unmerged(entry.fn, plan), tree, entry.x)
  low_rank, materialise = 0.0, 0.0
  for s in plan.sites:
    stack = math.prod(s.shape[j] for j in s.layout.stack_axes)
    materialise += stack * 2 * s.fan_in * s.fan_out * s.rank
    if entry.ragged_groups is not None:  # cost x·A_g and h·B_g as the cost model costs ragged dots
      low_rank += _ragged_low_rank_flops(entry, s)
      continue
    # x·A then ·B (2 FLOPs per multiply-add), the scale, and the add onto the base output.
    fan_out = s.fan_out // entry.splits  # a split kernel: each piece is a use of its own
    per_use = entry.rows * (2 * s.rank * (s.fan_in + fan_out) + s.rank + 2 * fan_out)
    low_rank += stack * len(s.use) * entry.splits * per_use
  assert low_rank < materialise, "zoo shapes must make materialising costlier than low-rank"
  extra = lora_flops - base_flops
  assert 0 < extra <= low_rank, (extra, low_rank, materialise)
