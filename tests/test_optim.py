import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jex

import lora_jax as lj
from lora_jax._src import tree as lj_tree
import zoo


def _setup():
  e = zoo.entries()["mlp"]
  p = lj.plan(lj.LoraConfig(targets=e.targets, rank=2), e.variables, e.fn, (e.x,))
  tree = jax.tree_util.tree_map(jnp.copy, lj.attach(p, e.variables, jax.random.key(0)))  # donated
  tree["params"]["Dense_0"]["bias"] = tree["params"]["Dense_0"]["bias"].at[0].set(-0.0)
  y = jnp.sin(jnp.arange(4 * 16, dtype=jnp.float32).reshape(4, 16))
  loss = lambda t: jnp.mean((lj.unmerged(e.fn, p)(t, e.x) - y) ** 2)
  return e, p, tree, loss


def _bits(x):
  return np.asarray(x).view(np.uint32)


@pytest.mark.parametrize("donate", [False, True])
def test_freeze_base_keeps_base_bit_identical_and_state_only_for_adapters(donate):
  e, p, tree, loss = _setup()
  tx = lj.freeze_base(optax.adamw(1e-2), tree)
  state = tx.init(tree)
  state_size = sum(x.size for x in jax.tree_util.tree_leaves(state))
  assert state_size <= 2 * p.num_params + 1  # mu and nu for adapters, one step count

  def step(tree, state):
    grads = jax.grad(loss)(tree)
    updates, state = tx.update(grads, state, tree)
    return optax.apply_updates(tree, updates), state

  step = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  before = {k: np.array(v) for k, v in lj_tree.flatten(tree).items()}
  base_paths = set(lj_tree.flatten(lj.strip(tree)))
  losses = []
  for _ in range(5):
    losses.append(float(loss(tree)))
    tree, state = step(tree, state)
  after = lj_tree.flatten(tree)
  for path in before:
    if path in base_paths:
      np.testing.assert_array_equal(_bits(after[path]), _bits(before[path]), err_msg=path)
    else:
      assert not np.array_equal(np.asarray(after[path]), before[path]), path
  assert losses[-1] < losses[0]


def test_freeze_base_needs_adapters():
  with pytest.raises(ValueError, match="no LoRA leaves"):
    lj.freeze_base(optax.sgd(0.1), {"w": jnp.zeros(3)})


def _dot_output_shapes(jaxpr):
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for sub in jex.jaxprs_in_params(eqn.params):
      shapes += _dot_output_shapes(sub)
  return shapes


def test_adapter_only_gradients_build_no_base_gradient():
  e, p, tree, loss = _setup()
  adapters, base = lj.split(tree)
  kernel_shapes = {s.shape for s in p.sites}
  adapter_grad = jax.make_jaxpr(jax.grad(lambda a: loss(lj.combine(base, a))))(adapters)
  full_grad = jax.make_jaxpr(jax.grad(loss))(tree)
  assert kernel_shapes & set(_dot_output_shapes(full_grad.jaxpr))  # the check can fail
  assert not kernel_shapes & set(_dot_output_shapes(adapter_grad.jaxpr))
  grads = jax.grad(lambda a: loss(lj.combine(base, a)))(adapters)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)


def test_adapter_only_training_with_donation_reduces_loss():
  e, p, tree, loss = _setup()
  adapters, base = lj.split(tree)
  tx = optax.adam(1e-2)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(adapters, opt_state):
    l, g = jax.value_and_grad(lambda a: loss(lj.combine(base, a)))(adapters)
    updates, opt_state = tx.update(g, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, l

  opt_state = tx.init(adapters)
  first = None
  for _ in range(20):
    adapters, opt_state, l = step(adapters, opt_state)
    first = float(l) if first is None else first
  assert float(l) < 0.9 * first


SUBNORMAL, QUIET_NAN, SIGNALLING_NAN = 0x000116C2, 0x7FC00001, 0x7F800001  # float32 bit patterns


def _odd_base_tree():
  """A LoRA tree whose base kernel and bias hold a subnormal (1e-40), a quiet NaN with payload 1,
  a signalling NaN and -0.0: values an eager `x + -0.0` on XLA's CPU does not keep bit for bit."""
  bits = np.array([[SUBNORMAL, QUIET_NAN, SIGNALLING_NAN], [0x80000000, 0x3FC00000, SUBNORMAL],
                   [0, 0, 0], [0x3F800000, 0, QUIET_NAN]], np.uint32)
  assert np.float32(1e-40).view(np.uint32) == SUBNORMAL
  variables = {"params": {"dense": {"kernel": jnp.asarray(bits.view(np.float32)),
                                    "bias": jnp.asarray(bits[0].view(np.float32))}}}
  p = lj.plan(lj.LoraConfig(targets=r".*/kernel", rank=2), variables)
  return lj.attach(p, variables, jax.random.key(0))


def test_apply_updates_outside_jit_keeps_subnormals_and_nan_payloads_bit_identical():
  from lora_jax._src.optim import apply_updates
  tree = _odd_base_tree()
  tx = lj.freeze_base(optax.adam(1e-1), tree)
  state = tx.init(tree)
  before = {k: _bits(v).copy() for k, v in lj_tree.flatten(tree).items()}
  base_paths = set(lj_tree.flatten(lj.strip(tree)))
  for _ in range(2):  # eager: no jit anywhere
    grads = jax.tree_util.tree_map(jnp.ones_like, tree)
    updates, state = tx.update(grads, state, tree)
    new = apply_updates(tree, updates)
    adapters, base = lj.split(new)
    want = optax.apply_updates(lj.split(tree)[0], lj.split(updates)[0])
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_array_equal(_bits(g), _bits(w)),
                           adapters, want)
    flat_new, flat_old = lj_tree.flatten(new), lj_tree.flatten(tree)
    for path in base_paths:
      assert flat_new[path] is flat_old[path], path  # the same object, untouched
      np.testing.assert_array_equal(_bits(flat_new[path]), before[path], err_msg=path)
    tree = new
  for path in set(before) - base_paths:
    assert not np.array_equal(_bits(lj_tree.flatten(tree)[path]), before[path]), path
  jitted = jax.jit(apply_updates)(tree, updates)  # and under jit
  for path in base_paths:
    np.testing.assert_array_equal(_bits(lj_tree.flatten(jitted)[path]), before[path], err_msg=path)


def test_apply_updates_refuses_updates_of_another_tree():
  from lora_jax._src.optim import apply_updates
  tree = _odd_base_tree()
  updates = jax.tree_util.tree_map(jnp.zeros_like, tree)
  del updates["params"]["dense"]["bias"]
  with pytest.raises(ValueError, match=r"'params/dense/bias' has no update"):
    apply_updates(tree, updates)
  updates = dict(jax.tree_util.tree_map(jnp.zeros_like, tree), extra=jnp.zeros(2))
  with pytest.raises(ValueError, match=r"'extra' is an update for no leaf"):
    apply_updates(tree, updates)
