import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import zoo


def _plan(name, **cfg):
  e = zoo.entries()[name]
  config = lj.LoraConfig(**{"targets": e.targets, "rank": 2, "alpha": 4.0, **cfg})
  return lj.plan(config, e.variables, apply_fn=e.fn, args=(e.x,))


def test_attention_layouts_follow_use():
  p = _plan("attention_block")
  lay = lambda suffix: next(s.layout for s in p.sites if s.path.endswith(suffix))
  assert lay("query/kernel") == lj.Layout((), (0,), (1, 2))  # (D, H, hd): in=(D) out=(H, hd)
  assert lay("out/kernel") == lj.Layout((), (0, 1), (2,))  # (H, hd, D): in=(H, hd) out=(D)
  q = next(s for s in p.sites if s.path.endswith("query/kernel"))
  assert q.a_shape == (32, 2) and q.b_shape == (2, 2, 16)


def test_stack_einsum_transposed_and_embedding_layouts():
  (s,) = _plan("scan_remat").sites
  assert s.layout == lj.Layout((0,), (1,), (2,)) and s.a_shape == (3, 32, 2) and s.b_shape == (3, 2, 32)
  k, proj = _plan("einsum_module").sites
  assert k.layout == lj.Layout((), (1,), (0, 2))  # (H, D, hd) used as 'btd,hdk->bthk'
  assert proj.layout == lj.Layout((), (0, 1), (2,))
  w1, w2 = _plan("plain_transposed").sites
  assert w1.layout == lj.Layout((), (1,), (0,))  # stored (out, in), used as x @ W.T
  (emb,) = _plan("embed_tied").sites
  assert emb.layout == lj.Layout((), (0,), (1,)) and tuple(map(str, emb.use)) == ("gather", "dot_general")
  conv = _plan("cnn").sites[0]
  assert conv.layout == lj.Layout((), (0, 1, 2), (3,))


def test_plan_without_apply_fn():
  e = zoo.entries()["cnn"]
  p = lj.plan(lj.LoraConfig(targets=e.targets, rank=2), e.variables)  # conv: (*window, in, out)
  assert [s.layout for s in p.sites] == [lj.Layout((), (0, 1, 2), (3,))] * 2
  e = zoo.entries()["attention_block"]
  with pytest.raises(ValueError, match=r"params/MultiHeadDotProductAttention_0/query/kernel: .*pass `apply_fn=`"):
    lj.plan(lj.LoraConfig(targets=e.targets, rank=2), e.variables)


def test_rules_matching_nothing_list_closest_paths():
  e = zoo.entries()["mlp"]
  with pytest.raises(ValueError, match=r"'params/Dense_9/kernel' matches no variable path.*"
                                       r"params/Dense_\d/kernel"):
    lj.plan(lj.LoraConfig(targets=[r".*/kernel", "params/Dense_9/kernel"]), e.variables)
  with pytest.raises(ValueError, match=r"rank_pattern: '.*/nope' matches no selected kernel"):
    lj.plan(lj.LoraConfig(targets=r".*/kernel", rank=2, rank_pattern={".*/nope": 1}), e.variables)
  with pytest.raises(ValueError, match="excluded"):
    lj.plan(lj.LoraConfig(targets=r".*/kernel", exclude=[".*"]), e.variables)


def test_rank_above_kernel_size_names_path():
  e = zoo.entries()["mlp"]
  with pytest.raises(ValueError, match=r"params/Dense_2/kernel: rank 20 exceeds min\(fan_in=48, fan_out=16\)"):
    lj.plan(lj.LoraConfig(targets=r".*/kernel", rank=20), e.variables)


def test_plan_refuses_a_tree_that_already_has_adapters():
  e = zoo.entries()["mlp"]
  p = lj.plan(lj.LoraConfig(targets=r".*/kernel", rank=2), e.variables)
  tree = lj.attach(p, e.variables, jax.random.key(0))
  with pytest.raises(ValueError, match="already carry LoRA leaves"):
    lj.plan(p.config, tree)
  with pytest.raises(ValueError, match="already carry LoRA leaves"):
    lj.attach(p, tree, jax.random.key(0))


def test_plan_json_round_trip_static_and_table():
  p = _plan("attention_block", rank_pattern={r".*/fc1/kernel": 4}, scaling="rslora")
  p2 = lj.Plan.from_json(p.to_json())
  assert p2 == p and hash(p2) == hash(p)
  table = str(p)
  for s in p.sites:
    assert s.path in table
  assert "in=(32) out=(2,16)" in table and "dot_general" in table and "LoRA params" in table
  fc1 = p.site("params/fc1/kernel")
  assert fc1.rank == 4 and fc1.scale == pytest.approx(4.0 / 2.0)
  assert p.num_params == sum(np.prod(s.a_shape) + np.prod(s.b_shape) for s in p.sites)


class Regularised(nn.Module):
  """Uses its kernel in a dense layer and in a reduction (which cannot stay low-rank)."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(8)
    y = dense(x)
    return y + jnp.sum(dense.variables["params"]["kernel"] ** 2)


def test_other_uses_are_materialised_reported_and_correct():
  m, x = Regularised(), jnp.ones((2, 4))
  v = m.init(jax.random.key(0), x)
  p = lj.plan(lj.LoraConfig(targets=".*/kernel", rank=2), v, apply_fn=m.apply, args=(x,))
  (s,) = p.sites
  assert s.use[0] == lj.Use("low_rank", "dot_general")
  assert any(u.kind == "materialised" and u.primitive == "integer_pow" for u in s.use)
  assert not s.low_rank
  tree = lj.attach(p, v, jax.random.key(1))
  a, base = lj.split(tree)
  a = jax.tree_util.tree_map(lambda t: jnp.ones_like(t) * 0.3, a)
  tree = lj.combine(base, a)
  np.testing.assert_allclose(lj.unmerged(m.apply, p)(tree, x), lj.merged(m.apply, p)(tree, x),
                             rtol=1e-5)


def test_static_python_arguments_stay_static():
  def fn(params, x, *, double: bool):
    y = x @ params["w"]
    return 2 * y if double else y  # a Python branch: `double` must not be traced

  params, x = {"w": jnp.ones((4, 3))}, jnp.ones((2, 4))
  p = lj.plan(lj.LoraConfig(targets="w", rank=1), params, fn, (x,), {"double": True})
  tree = lj.attach(p, params, jax.random.key(0))
  tree["w_lora_b"] = jnp.ones((1, 3))
  for double in (True, False):
    np.testing.assert_allclose(lj.unmerged(fn, p)(tree, x, double=double),
                               lj.merged(fn, p)(tree, x, double=double), rtol=1e-6)


def test_a_regex_matching_a_bias_says_it_is_not_a_kernel():
  params = {"c_attn": {"kernel": jnp.ones((8, 24)), "bias": jnp.zeros(24)}}
  fn = lambda p, x: x @ p["c_attn"]["kernel"] + p["c_attn"]["bias"]
  for apply_fn in (None, fn):
    with pytest.raises(ValueError, match=r"c_attn/bias: selected by LoraConfig.targets but it is a "
                                         r"1-D array of shape \(24,\), not a kernel"):
      lj.plan(lj.LoraConfig(targets=r".*c_attn.*", rank=2), params, apply_fn=apply_fn,
              args=(jnp.ones((2, 8)),))
