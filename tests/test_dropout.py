import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
import zoo


def _setup(name="mlp", dropout=0.5):
  e = zoo.entries()[name]
  p = lj.plan(lj.LoraConfig(targets=e.targets, rank=2, dropout=dropout), e.variables, e.fn, (e.x,))
  tree = lj.attach(p, e.variables, jax.random.key(0))
  adapters, base = lj.split(tree)
  adapters = jax.tree_util.tree_map(lambda a: a + 0.3, adapters)
  return e, p, tree, lj.combine(base, adapters)


def test_dropout_only_touches_the_lora_path():
  e, p, tree_init, tree = _setup()
  key = jax.random.key(1)
  # B = 0 at init: whatever dropout does to the LoRA input, the base output is untouched.
  np.testing.assert_allclose(lj.unmerged(e.fn, p, dropout_key=key)(tree_init, e.x),
                             e.fn(e.variables, e.x), rtol=1e-6, atol=1e-6)
  no_key = lj.unmerged(e.fn, p)(tree, e.x)
  np.testing.assert_allclose(no_key, lj.merged(e.fn, p)(tree, e.x), rtol=1e-5, atol=1e-5)
  y1 = lj.unmerged(e.fn, p, dropout_key=key)(tree, e.x)
  y1b = jax.jit(lambda t, k: lj.unmerged(e.fn, p, dropout_key=k)(t, e.x))(tree, key)
  y2 = lj.unmerged(e.fn, p, dropout_key=jax.random.key(2))(tree, e.x)
  np.testing.assert_allclose(y1, y1b, rtol=1e-5, atol=1e-5)  # deterministic for a key
  assert float(jnp.abs(y1 - no_key).max()) > 1e-2 and float(jnp.abs(y1 - y2).max()) > 1e-2


def test_inverted_dropout_is_unbiased_on_a_linear_model():
  w = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
  fn = lambda v, x: x @ v["w"]
  x = jax.random.normal(jax.random.key(1), (4, 16))
  p = lj.plan(lj.LoraConfig(targets="w", rank=2, dropout=0.5), w, fn, (x,))
  tree = lj.attach(p, w, jax.random.key(2))
  tree["w_lora_b"] = jnp.ones((2, 8))
  keys = jax.random.split(jax.random.key(3), 4000)
  ys = jax.jit(jax.vmap(lambda k: lj.unmerged(fn, p, dropout_key=k)(tree, x)))(keys)
  want = lj.unmerged(fn, p)(tree, x)
  lora_term = want - fn(w, x)
  np.testing.assert_allclose(ys.mean(0), want, atol=0.1 * float(jnp.abs(lora_term).max()))


def test_dropout_masks_differ_across_scanned_layers():
  # With identical factors in every layer, identical masks would give a layer-independent
  # LoRA term; per-step keys make the layers' masks differ.
  e, p, _, tree = _setup("scan_remat", dropout=0.5)
  adapters, base = lj.split(tree)
  a = adapters["params"]["layers"]["Dense_0"]
  a["kernel_lora_a"] = jnp.broadcast_to(a["kernel_lora_a"][:1], a["kernel_lora_a"].shape)
  a["kernel_lora_b"] = jnp.broadcast_to(a["kernel_lora_b"][:1], a["kernel_lora_b"].shape)
  tree = lj.combine(base, adapters)
  key = jax.random.key(5)
  y = jax.jit(lambda t: lj.unmerged(e.fn, p, dropout_key=key)(t, e.x))(tree)
  grads = jax.grad(lambda ad: jnp.sum(lj.unmerged(e.fn, p, dropout_key=key)(lj.combine(base, ad), e.x)))(adapters)
  g = grads["params"]["layers"]["Dense_0"]["kernel_lora_a"]
  assert np.isfinite(np.asarray(y)).all()
  # gradient rows zeroed by dropout differ between layers
  zero_rows = [set(np.where(np.all(np.asarray(g[l]) == 0, axis=1))[0]) for l in range(3)]
  assert zero_rows[0] != zero_rows[1] or zero_rows[1] != zero_rows[2]


def test_new_adapter_values_do_not_recompile():
  e, p, _, tree = _setup(dropout=0.0)
  traces = []

  @jax.jit
  def f(t):
    traces.append(1)
    return lj.unmerged(e.fn, p)(t, e.x)

  f(tree)
  f(jax.tree_util.tree_map(lambda a: a * 2.0, tree))
  assert len(traces) == 1
