"""Both apply paths against the plain math in float64 (numpy, independent of lora_jax)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src import tree as lj_tree
import zoo


def _random_factors(tree, seed=0):
  adapters, base = lj.split(tree)
  leaves, treedef = jax.tree_util.tree_flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return lj.combine(base, jax.tree_util.tree_unflatten(treedef, leaves))


def _f64(x):
  return np.asarray(x, np.float64)


def test_merge_matches_float64_math_for_multi_axis_kernels():
  e = zoo.entries()["einsum_module"]  # kernel (H, D, hd) with in=(D), proj (H, hd, D) with in=(H, hd)
  p = lj.plan(lj.LoraConfig(targets=e.targets, rank=3, alpha=5.0), e.variables, e.fn, (e.x,))
  tree = _random_factors(lj.attach(p, e.variables, jax.random.key(0)))
  merged = lj.merge(p, tree)["params"]
  t = tree["params"]
  s = 5.0 / 3
  want_k = _f64(t["kernel"]) + s * np.einsum("dr,rhk->hdk", _f64(t["kernel_lora_a"]), _f64(t["kernel_lora_b"]))
  want_p = _f64(t["proj"]) + s * np.einsum("hkr,rd->hkd", _f64(t["proj_lora_a"]), _f64(t["proj_lora_b"]))
  np.testing.assert_allclose(merged["kernel"], want_k, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(merged["proj"], want_p, rtol=1e-5, atol=1e-5)
  assert set(merged) == {"kernel", "proj"}


def test_unmerged_dense_matches_float64_math():
  e = zoo.entries()["plain_transposed"]  # W stored (out, in), used as x @ W.T
  p = lj.plan(lj.LoraConfig(targets=e.targets, rank=2, alpha=3.0, scaling="rslora"), e.variables,
              e.fn, (e.x,))
  tree = _random_factors(lj.attach(p, e.variables, jax.random.key(0)))
  s = 3.0 / np.sqrt(2)
  x = _f64(e.x)
  h = np.tanh(x @ _f64(tree["w1"]).T + _f64(tree["b1"])
              + s * (x @ _f64(tree["w1_lora_a"])) @ _f64(tree["w1_lora_b"]))
  want = h @ _f64(tree["w2"]).T + s * (h @ _f64(tree["w2_lora_a"])) @ _f64(tree["w2_lora_b"])
  np.testing.assert_allclose(jax.jit(lj.unmerged(e.fn, p))(tree, e.x), want, rtol=1e-4, atol=1e-4)


def test_unmerged_conv_and_embedding_match_flax_layers_on_merged_weights():
  # Reference: Flax's own layers applied to W + ΔW computed in float64 by numpy.
  for name in ("cnn", "embed_tied"):
    e = zoo.entries()[name]
    p = lj.plan(lj.LoraConfig(targets=e.targets, rank=2, alpha=2.0), e.variables, e.fn, (e.x,))
    tree = _random_factors(lj.attach(p, e.variables, jax.random.key(1)))
    ref_vars = jax.tree_util.tree_map(lambda x: x, lj.strip(tree))
    for s in p.sites:
      scope, leaf = s.path.rsplit("/", 1)
      node = tree
      for k in scope.split("/"):
        node = node[k]
      a, b = _f64(node[leaf + "_lora_a"]), _f64(node[leaf + "_lora_b"])
      delta = (a.reshape(-1, s.rank) @ b).reshape(s.shape) * s.scale
      ref_node = ref_vars
      for k in scope.split("/"):
        ref_node = ref_node[k]
      ref_node[leaf] = jnp.asarray(_f64(node[leaf]) + delta, jnp.float32)
    np.testing.assert_allclose(lj.unmerged(e.fn, p)(tree, e.x), e.fn(ref_vars, e.x),
                               rtol=1e-4, atol=1e-4, err_msg=name)


def test_merge_keeps_dtype_and_accumulates_in_float32():
  w = {"w": (jax.random.normal(jax.random.key(0), (16, 16)) * 1).astype(jnp.bfloat16)}
  p = lj.plan(lj.LoraConfig(targets="w", rank=4, alpha=4.0), w)
  tree = lj.attach(p, w, jax.random.key(1))
  tree["w_lora_b"] = jnp.full((4, 16), 1e-3, jnp.float32)
  merged = lj.merge(p, tree)["w"]
  assert merged.dtype == jnp.bfloat16
  want = (_f64(w["w"]) + _f64(tree["w_lora_a"]) @ _f64(tree["w_lora_b"])).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(merged, np.float32),
                                np.asarray(jnp.asarray(want).astype(jnp.bfloat16), np.float32))
  assert lj.strip(tree)["w"] is w["w"]


def test_delta_is_zero_at_init_and_merge_jits_with_donation():
  e = zoo.entries()["attention_block"]
  p = lj.plan(lj.LoraConfig(targets=e.targets, rank=2), e.variables, e.fn, (e.x,))
  tree = lj.attach(p, e.variables, jax.random.key(0))
  assert all(not np.any(d) for d in lj.delta(p, tree).values())
  eager = lj.merge(p, _random_factors(tree))
  merge = jax.jit(lj.merge, static_argnums=0, donate_argnums=1)
  copy = jax.tree_util.tree_map(jnp.copy, _random_factors(tree))  # donation consumes it
  # The kernels are updated in place; A and B have no output to alias, which JAX says.
  with pytest.warns(UserWarning, match="donated buffers were not usable"):
    merged = merge(p, copy)
  merged, eager = lj_tree.flatten(merged), lj_tree.flatten(eager)
  assert sorted(merged) == sorted(eager)
  for path in eager:
    np.testing.assert_allclose(merged[path], eager[path], rtol=1e-6, atol=1e-6, err_msg=path)


def test_unmerged_general_contractions_match_float64_math():
  # Kernel axes as dot_general *batch* dims (a stack used in a batched matmul) and a kernel on
  # the left-hand side: the general einsum path of the dot_general rule.
  def fn(p, x):
    y = jnp.tanh(jnp.einsum("lbd,ldf->lbf", x, p["stacked"]))
    return jnp.einsum("od,lbd->lbo", p["w2"], y)

  k = jax.random.split(jax.random.key(0), 3)
  params = {"stacked": jax.random.normal(k[0], (3, 8, 6)), "w2": jax.random.normal(k[1], (5, 6))}
  x = jax.random.normal(k[2], (3, 4, 8))
  p = lj.plan(lj.LoraConfig(targets=".*", rank=2, alpha=3.0), params, fn, (x,))
  assert [s.layout for s in p.sites] == [lj.Layout((0,), (1,), (2,)), lj.Layout((), (1,), (0,))]
  assert all(s.low_rank for s in p.sites)
  tree = _random_factors(lj.attach(p, params, jax.random.key(1)))
  s = 1.5
  a1, b1 = _f64(tree["stacked_lora_a"]), _f64(tree["stacked_lora_b"])
  y = np.tanh(np.einsum("lbd,ldf->lbf", _f64(x), _f64(params["stacked"]) + s * a1 @ b1))
  w2 = _f64(params["w2"]) + s * (_f64(tree["w2_lora_a"]) @ _f64(tree["w2_lora_b"])).T
  want = np.einsum("od,lbd->lbo", w2, y)
  np.testing.assert_allclose(jax.jit(lj.unmerged(fn, p))(tree, x), want, rtol=1e-4, atol=1e-4)


def test_kernels_reshaped_within_a_side_stay_low_rank():
  # W (D, H*hd) viewed as (D, H, hd), and V (H, hd, D) flattened to (H*hd, D) before use.
  def fn(p, x):
    h = jnp.einsum("btd,dhk->bthk", x, p["w"].reshape(8, 2, 3))
    return h.reshape(*h.shape[:2], 6) @ p["v"].reshape(6, 8)

  k = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(k[0], (8, 6)), "v": jax.random.normal(k[1], (2, 3, 8))}
  x = jax.random.normal(k[2], (2, 3, 8))
  p = lj.plan(lj.LoraConfig(targets=".*", rank=2, alpha=2.0), params, fn, (x,))
  assert [s.layout for s in p.sites] == [lj.Layout((), (0,), (1,)), lj.Layout((), (0, 1), (2,))]
  assert all(tuple(map(str, s.use)) == ("dot_general",) for s in p.sites)
  tree = _random_factors(lj.attach(p, params, jax.random.key(1)))
  w = _f64(params["w"]) + _f64(tree["w_lora_a"]) @ _f64(tree["w_lora_b"])
  v = _f64(params["v"]) + np.einsum("hkr,rd->hkd", _f64(tree["v_lora_a"]), _f64(tree["v_lora_b"]))
  h = np.einsum("btd,dhk->bthk", _f64(x), w.reshape(8, 2, 3))
  want = h.reshape(2, 3, 6) @ v.reshape(6, 8)
  np.testing.assert_allclose(jax.jit(lj.unmerged(fn, p))(tree, x), want, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_keeps_dtype_and_matches_merged():
  import flax.linen as nn
  model = nn.Dense(16, dtype=jnp.bfloat16)  # f32 params, bf16 compute (a cast on the kernel)
  x = jax.random.normal(jax.random.key(0), (4, 32))
  v = model.init(jax.random.key(1), x)
  p = lj.plan(lj.LoraConfig(targets=".*/kernel", rank=4), v, model.apply, (x,))
  assert p.sites[0].low_rank
  tree = _random_factors(lj.attach(p, v, jax.random.key(2)))
  y_u = jax.jit(lj.unmerged(model.apply, p))(tree, x)
  y_m = jax.jit(lj.merged(model.apply, p))(tree, x)
  assert y_u.dtype == y_m.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y_u, np.float32), np.asarray(y_m, np.float32),
                             rtol=5e-2, atol=5e-2 * float(jnp.abs(y_m.astype(jnp.float32)).max()))
