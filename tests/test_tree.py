import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax._src import tree as lj_tree
import zoo


def _mlp_tree(**cfg):
  e = zoo.entries()["mlp"]
  p = lj.plan(lj.LoraConfig(**{"targets": r".*/kernel", "rank": 2, **cfg}), e.variables)
  return e, p, lj.attach(p, e.variables, jax.random.key(0))


def test_attach_adds_siblings_with_b_zero():
  e, p, tree = _mlp_tree()
  for s in p.sites:
    scope = tree["params"][s.path.split("/")[1]]
    assert scope["kernel_lora_a"].shape == s.a_shape and scope["kernel_lora_b"].shape == s.b_shape
    assert not np.any(scope["kernel_lora_b"])
    assert scope["kernel_lora_a"].dtype == jnp.float32
  assert set(tree["params"]["Dense_0"]) == {"kernel", "bias", "kernel_lora_a", "kernel_lora_b"}


def test_init_distributions():
  w = {"w": jnp.zeros((4096, 64))}
  for init, check in (
      ("kaiming_uniform", lambda a: (np.abs(a).max() <= 1 / 64 + 1e-7 and  # 1/sqrt(fan_in=4096)
                                     abs(a.std() - (1 / 64) / np.sqrt(3)) < 2e-4)),
      ("gaussian", lambda a: abs(a.std() - 1 / 16) < 2e-3 and abs(a.mean()) < 2e-3)):
    p = lj.plan(lj.LoraConfig(targets="w", rank=16, init=init), w)
    a = np.asarray(lj.attach(p, w, jax.random.key(0))["w_lora_a"])
    assert check(a), init


def test_strip_is_bit_exact_and_identity():
  e, p, tree = _mlp_tree()
  base = lj.strip(tree)
  assert jax.tree_util.tree_structure(base) == jax.tree_util.tree_structure(e.variables)
  for (pa, a), (pb, b) in zip(lj_tree.flatten(base).items(), lj_tree.flatten(e.variables).items()):
    assert pa == pb and a is b


def test_split_combine_round_trip_and_mask():
  e, p, tree = _mlp_tree()
  adapters, base = lj.split(tree)
  assert sorted(lj_tree.flatten(adapters)) == sorted(
      f"{s.path}{suf}" for s in p.sites for suf in ("_lora_a", "_lora_b"))
  back = lj.combine(base, adapters)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
  mask = lj.trainable_mask(tree)
  assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(tree)
  for path, m in lj_tree.flatten(mask).items():
    assert m == path.endswith(("_lora_a", "_lora_b")), path
  with pytest.raises(ValueError, match="must hold only LoRA leaves"):
    lj.combine(base, base)
  bad = {"params": {"Nope": {"kernel_lora_a": jnp.zeros(2), "kernel_lora_b": jnp.zeros(2)}}}
  with pytest.raises(ValueError, match="params/Nope/kernel: no kernel leaf of that name in the base"):
    lj.combine(base, bad)


def test_tree_that_does_not_match_plan_fails_naming_path():
  e, p, tree = _mlp_tree()
  other = jax.tree_util.tree_map(lambda x: x, tree)
  other["params"]["Dense_1"]["kernel_lora_b"] = jnp.zeros((3, 48))
  with pytest.raises(ValueError, match=r"params/Dense_1/kernel_lora_b: shape \(3, 48\) does not match"):
    lj.merge(p, other)
  small = {"params": {**e.variables["params"], "Dense_0": {"kernel": jnp.zeros((5, 48)), "bias": jnp.zeros(48)}}}
  with pytest.raises(ValueError, match=r"params/Dense_0/kernel: kernel shape \(5, 48\)"):
    lj.attach(p, small, jax.random.key(0))


def test_nnx_state_boxes_are_transparent_and_kept():
  e = zoo.entries()["nnx"]
  p = lj.plan(lj.LoraConfig(targets=e.targets, rank=2), e.variables, apply_fn=e.fn, args=(e.x,))
  assert p.paths == ("l1/kernel", "l2/kernel")
  tree = lj.attach(p, e.variables, jax.random.key(0))
  assert isinstance(tree["l1"]["kernel_lora_a"], nnx.Param)
  assert isinstance(tree, nnx.State)
  merged = lj.merge(p, tree)
  assert isinstance(merged["l1"]["kernel"], nnx.Param)
  np.testing.assert_allclose(e.fn(merged, e.x), e.fn(e.variables, e.x), rtol=1e-6)
  mask = lj.trainable_mask(tree)
  assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(tree)


class Sharded(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    return nn.Dense(8, kernel_init=init)(x)


def test_partitioned_boxes_get_matching_names():
  m, x = Sharded(), jnp.ones((2, 4))
  v = m.init(jax.random.key(0), x)
  p = lj.plan(lj.LoraConfig(targets=".*/kernel", rank=2), v, apply_fn=m.apply, args=(x,))
  assert p.paths == ("params/Dense_0/kernel",)
  tree = lj.attach(p, v, jax.random.key(1))
  a, b = tree["params"]["Dense_0"]["kernel_lora_a"], tree["params"]["Dense_0"]["kernel_lora_b"]
  assert isinstance(a, nn.Partitioned) and a.names == ("embed", None) and b.names == (None, "mlp")
  adapters, base = lj.split(tree)
  adapters = jax.tree_util.tree_map(lambda t: jnp.full_like(t, 0.5), adapters)
  tree = lj.combine(base, adapters)
  y_u, y_m = lj.unmerged(m.apply, p)(tree, x), lj.merged(m.apply, p)(tree, x)
  np.testing.assert_allclose(y_u, y_m, rtol=1e-6)
  assert float(jnp.abs(y_u - m.apply(v, x)).max()) > 0.1


def test_adapters_outside_the_plan_are_rejected():
  e, p, tree = _mlp_tree()
  small = lj.plan(lj.LoraConfig(targets=r"params/Dense_0/kernel", rank=2), e.variables)
  with pytest.raises(ValueError, match=r"params/Dense_1/kernel_lora_a: LoRA leaf not in the plan"):
    lj.unmerged(e.fn, small)(tree, e.x)


def test_kernel_in_a_list_becomes_a_lora_weight_node_with_the_same_names():
  params = {"layers": [jnp.ones((4, 4)), 2 * jnp.ones((4, 4))]}
  p = lj.plan(lj.LoraConfig(targets=r"layers/\d", rank=2), params)
  assert p.paths == ("layers/0", "layers/1")
  tree = lj.attach(p, params, jax.random.key(0))
  assert isinstance(tree["layers"][0], lj.LoraWeight) and tree["layers"][0].w is params["layers"][0]
  assert list(lj_tree.flatten(tree)) == ["layers/0", "layers/0_lora_a", "layers/0_lora_b",
                                         "layers/1", "layers/1_lora_a", "layers/1_lora_b"]
  adapters, base = lj.split(tree)
  assert base["layers"][1] is params["layers"][1]
  assert adapters["layers"][0].w is None and adapters["layers"][0].lora_a.shape == (4, 2)
  back = lj.combine(base, adapters)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)


def test_returned_nnx_trees_share_no_variables_with_the_model():
  # nnx.split hands out the model's own mutable Variables; if a tree we return kept them,
  # nnx.update(model, merged) would silently rewrite the LoRA tree (and the base) too.
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jax.random.normal(jax.random.key(1), (2, 4))
  p = lj.plan(lj.LoraConfig(targets="kernel", rank=2), state, apply_fn=fn, args=(x,))
  tree = lj.attach(p, state, jax.random.key(0))
  adapters, base = lj.split(tree)
  tree = lj.combine(base, jax.tree.map(lambda a: a + 0.5, adapters))  # nonzero B
  kernel, bias = np.asarray(state["kernel"].get_value()), np.asarray(state["bias"].get_value())
  adapters, base = lj.split(tree)
  before = np.asarray(lj.unmerged(fn, p)(tree, x))
  returned = {"attach": lj.attach(p, state, jax.random.key(0)), "merge": lj.merge(p, tree),
              "strip": lj.strip(tree), "split": adapters, "base": base,
              "combine": lj.combine(base, adapters)}
  ids = lambda t: {id(v) for v in jax.tree.leaves(t, is_leaf=lambda v: isinstance(v, nnx.Variable))}
  model_vars = ids(nnx.state(model))
  for name, t in returned.items():
    assert not ids(t) & model_vars, name
  nnx.update(model, lj.merge(p, tree))  # the merged weights go into the live model
  np.testing.assert_allclose(np.asarray(model(x)), before, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(lj.unmerged(fn, p)(tree, x)), before)
  np.testing.assert_array_equal(np.asarray(lj.strip(tree)["kernel"].get_value()), kernel)
  np.testing.assert_array_equal(np.asarray(lj.strip(tree)["bias"].get_value()), bias)


def test_combine_refuses_a_base_that_still_has_adapters():
  # combine(tree_with_lora, new) used to keep the old adapters silently.
  params = {"dense": {"kernel": jnp.ones((4, 3))}}
  p = lj.plan(lj.LoraConfig(targets=r".*kernel", rank=2), params)
  tree = lj.attach(p, params, jax.random.key(0))
  new, _ = lj.split(lj.attach(p, params, jax.random.key(1)))
  with pytest.raises(ValueError, match=r"combine: `base` already carries LoRA leaves \(e.g. "
                                       r"'dense/kernel_lora_a'\)"):
    lj.combine(tree, new)
  got = lj.combine(lj.strip(tree), new)
  assert got["dense"]["kernel_lora_a"] is new["dense"]["kernel_lora_a"]
