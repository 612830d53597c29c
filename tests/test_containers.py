"""Any pytree: identity is the key path, names are only rendered from it, and every public
function works on containers that cannot take new keys (NamedTuple, registered dataclass,
equinox Module) as on dicts, FrozenDict and lists."""

import dataclasses
import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

import lora_jax as lj
from lora_jax._src import tree as lj_tree


def test_keys_that_render_alike_are_refused_not_merged():
  x, y = jnp.ones((4, 4)), 2 * jnp.ones((4, 4))
  params = {"a/b": {"w": x}, "a": {"b": {"w": y}}}
  with pytest.raises(ValueError, match=r"two leaves render to the same path 'a/b/w'.*\['a/b'\]"):
    lj.plan(lj.LoraConfig(targets=r".*w", rank=2), params)
  assert lj.strip(params) == params  # rebuilt by key path: nothing lost


class Params(NamedTuple):
  w1: jax.Array
  b1: jax.Array
  w2: jax.Array


def tuple_fn(p, x):
  return jnp.tanh(x @ p.w1 + p.b1) @ p.w2


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w1", "w2"], meta_fields=["act"])
@dataclasses.dataclass
class DC:
  w1: jax.Array
  w2: jax.Array
  act: str


def dc_fn(m, x):
  return jnp.tanh(x @ m.w1) @ m.w2 if m.act == "tanh" else None


class EqxMLP(eqx.Module):
  l1: eqx.nn.Linear
  l2: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.l1 = eqx.nn.Linear(8, 16, key=k1)
    self.l2 = eqx.nn.Linear(16, 4, key=k2)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def _cases():
  k = jax.random.split(jax.random.key(0), 4)
  w1, w2 = jax.random.normal(k[0], (8, 16)) * 0.3, jax.random.normal(k[1], (16, 4)) * 0.3
  x = jax.random.normal(k[2], (5, 8))
  dict_fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
  list_fn = lambda p, x: jnp.tanh(x @ p[0]) @ p[1]
  return {
      "namedtuple": (Params(w1, jnp.zeros(16), w2), tuple_fn, x, r"w\d", ("w1", "w2")),
      "dataclass": (DC(w1, w2, "tanh"), dc_fn, x, r"w\d", ("w1", "w2")),
      "equinox": (EqxMLP(k[3]), lambda m, x: jax.vmap(m)(x), x, r"l\d/weight",
                  ("l1/weight", "l2/weight")),
      "frozendict": (FrozenDict({"w1": w1, "w2": w2}), dict_fn, x, r"w\d", ("w1", "w2")),
      "list": ([w1, w2], list_fn, x, r"\d", ("0", "1")),
  }


CASES = _cases()


def _randomize(tree):
  adapters, base = lj.split(tree)
  leaves, treedef = jax.tree_util.tree_flatten(adapters)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  return lj.combine(base, treedef.unflatten(
      [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


@pytest.mark.parametrize("name", list(CASES))
def test_every_function_works_on_the_container(name, tmp_path):
  variables, fn, x, targets, paths = CASES[name]
  plan = lj.plan(lj.LoraConfig(targets=targets, rank=2), variables, apply_fn=fn, args=(x,))
  assert plan.paths == paths and all(s.low_rank for s in plan.sites)
  if name == "equinox":  # eqx.nn.Linear stores (out, in) and computes weight @ x
    assert [s.layout for s in plan.sites] == [lj.Layout((), (1,), (0,))] * 2
  tree = _randomize(lj.attach(plan, variables, jax.random.key(1)))
  assert type(tree) is type(variables)

  # strip gives the base back as the same arrays; the names are the dict-style names.
  base_leaves = lj_tree.flatten(variables)
  names = list(lj_tree.flatten(tree))
  for p in paths:
    assert names[names.index(p) + 1:names.index(p) + 3] == [p + "_lora_a", p + "_lora_b"]
  for p, leaf in lj_tree.flatten(lj.strip(tree)).items():
    assert leaf is base_leaves[p], p

  # merged == unmerged == a float64 numpy reference built from the factors.
  w = {p: np.asarray(lj_tree.unbox(base_leaves[p]), np.float64) for p in paths}
  flat = lj_tree.flatten(tree)
  ref = {}
  for s in plan.sites:
    a, b = (np.asarray(flat[s.path + f], np.float64) for f in ("_lora_a", "_lora_b"))
    d = s.scale * a @ b
    ref[s.path] = w[s.path] + (d.T if s.layout.in_axes == (1,) else d)
  merged = lj.merge(plan, tree)
  for p in paths:
    np.testing.assert_allclose(lj_tree.flatten(merged)[p], ref[p], rtol=1e-5, atol=1e-6)
  y_u = lj.unmerged(fn, plan)(tree, x)
  np.testing.assert_allclose(y_u, fn(merged, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lj.merged(fn, plan)(tree, x), fn(merged, x), rtol=1e-6)

  # split / combine / trainable_mask / freeze_base.
  adapters, base = lj.split(tree)
  assert sorted(p for p, v in lj_tree.flatten(adapters).items() if v is not None) == sorted(
      p + f for p in paths for f in ("_lora_a", "_lora_b"))
  back = lj.combine(base, adapters)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
  mask = lj.trainable_mask(tree)
  assert {p for p, m in lj_tree.flatten(mask).items() if m is True} == {
      p + f for p in paths for f in ("_lora_a", "_lora_b")}
  arrays, static = eqx.partition(tree, eqx.is_array)
  tx = lj.freeze_base(optax.sgd(0.1), arrays)
  grads = jax.grad(lambda t: jnp.sum(lj.unmerged(fn, plan)(eqx.combine(t, static), x) ** 2))(arrays)
  updates, _ = tx.update(grads, tx.init(arrays), arrays)
  new = eqx.combine(optax.apply_updates(arrays, updates), static)
  for p, leaf in lj_tree.flatten(new).items():
    moved = not np.array_equal(np.asarray(lj_tree.unbox(leaf)), np.asarray(lj_tree.unbox(flat[p])))
    assert moved == p.endswith(("_lora_a", "_lora_b")), p

  # Adapter checkpoints round-trip onto the same container type.
  lj.save_adapter(tmp_path / "a", plan, tree)
  loaded, plan2 = lj.load_adapter(tmp_path / "a", variables)
  assert plan2.paths == plan.paths and type(loaded) is type(variables)
  for p, leaf in lj_tree.flatten(loaded).items():
    assert np.array_equal(np.asarray(lj_tree.unbox(leaf)), np.asarray(lj_tree.unbox(flat[p]))), p


def test_equinox_partition_and_filter_grad_workflow():
  variables, fn, x, targets, _ = CASES["equinox"]
  plan = lj.plan(lj.LoraConfig(targets=targets, rank=2), variables, apply_fn=fn, args=(x,))
  tree = _randomize(lj.attach(plan, variables, jax.random.key(1)))
  trainable, frozen = eqx.partition(tree, lj.trainable_mask(tree))

  @eqx.filter_jit
  def loss(trainable, frozen):
    return jnp.sum(lj.unmerged(fn, plan)(eqx.combine(trainable, frozen), x) ** 2)

  grads = eqx.filter_grad(loss)(trainable, frozen)
  want = jax.grad(lambda a: jnp.sum(lj.merged(fn, plan)(lj.combine(lj.split(tree)[1], a), x) ** 2))(
      lj.split(tree)[0])
  got = {p: v for p, v in lj_tree.flatten(grads).items() if v is not None}
  ref = {p: v for p, v in lj_tree.flatten(want).items() if v is not None}
  assert sorted(got) == sorted(ref) == ["l1/weight_lora_a", "l1/weight_lora_b", "l2/weight_lora_a",
                                        "l2/weight_lora_b"]
  for p in got:
    np.testing.assert_allclose(got[p], ref[p], rtol=1e-4, atol=1e-6, err_msg=p)
