"""Mixed-adapter batches (`lj.unmerged(fn, plan, adapter_ids=ids)`) and hot swap (scales as data).

References are independent of the interpreter's mixed path: each adapter's own merged forward
`fn(W + ΔW_i)` on the batch (rows are independent in these models), the base model for `-1`
rows, and the merged path's gradients per adapter.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import lora_jax as lj

SPECS = ((2, 4.0), (1, 8.0))  # (rank, alpha) of the bank's two adapters (padded to rank 2)


def _adapters(entry, specs=SPECS, traced=True):
  """`(adapter tree, plan)` per spec, random A and B (B = 0 after attach would hide bugs)."""
  out = []
  for seed, (rank, alpha) in enumerate(specs):
    config = lj.LoraConfig(targets=entry.targets, rank=rank, alpha=alpha)
    plan = (lj.plan(config, entry.variables, entry.fn, (entry.x,)) if traced
            else lj.plan(config, entry.variables))
    adapters = lj.split(lj.attach(plan, entry.variables, jax.random.key(seed)))[0]
    rng = np.random.default_rng(seed)
    out.append((jax.tree.map(lambda v, rng=rng: jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype),
                             adapters), plan))
  return out


@functools.cache
def _setup(name):
  """`(entry, adapters, bank)` of a model, built once per session (planning traces the model)."""
  entry = {"remat_jit_cond": _block_entry, "routed_moe": _routed_moe_entry}.get(
      name, lambda: zoo.entries()[name])()
  adapters = _adapters(entry)
  return entry, adapters, lj.stack_adapters(adapters)


def _block_fn(p, x):
  """A block with remat, an inner jit and a cond (its predicate is a parameter, not per example)."""
  @jax.checkpoint
  def body(h):
    h = jax.jit(lambda h: jnp.tanh(h @ p["w1"]))(h)
    return jax.lax.cond(p["flag"] > 0, lambda h: h @ p["w2"], lambda h: -(h @ p["w2"]), h)
  return body(x)


def _block_entry():
  r = np.random.default_rng(5)
  params = {"w1": jnp.asarray(0.2 * r.standard_normal((32, 48)), jnp.float32),
            "w2": jnp.asarray(0.2 * r.standard_normal((48, 32)), jnp.float32), "flag": jnp.ones(())}
  return zoo.Entry("remat_jit_cond", params, _block_fn,
                   jnp.asarray(r.standard_normal((5, 32)), jnp.float32), "w1|w2", 2, 5)


def _routed_moe_fn(p, x):
  """A top-1 MoE on `x (B, T, D)`: tokens sorted by expert, `lax.ragged_dot` per expert group
  (group sizes computed from the batch, so a mixed batch gives each example its own)."""
  b, t, d = x.shape
  tokens = x.reshape(b * t, d)
  expert = jnp.argmax(tokens @ p["router"], axis=-1)
  order = jnp.argsort(expert, stable=True)
  sizes = jnp.bincount(expert, length=p["gate"].shape[0]).astype(jnp.int32)
  xs = tokens[order]
  h = jax.nn.silu(jax.lax.ragged_dot(xs, p["gate"], sizes)) * jax.lax.ragged_dot(xs, p["up"], sizes)
  y = jax.lax.ragged_dot(h, p["down"], sizes)
  return jnp.zeros_like(y).at[order].set(y).reshape(b, t, -1)


def _routed_moe_entry():
  r = np.random.default_rng(6)
  params = {"router": jnp.asarray(r.standard_normal((16, 3)), jnp.float32),
            **{n: jnp.asarray(0.3 * r.standard_normal(s), jnp.float32)
               for n, s in (("gate", (3, 16, 24)), ("up", (3, 16, 24)), ("down", (3, 24, 16)))}}
  return zoo.Entry("routed_moe", params, _routed_moe_fn,
                   jnp.asarray(r.standard_normal((5, 4, 16)), jnp.float32), "gate|up|down", 3, 20)


def _mixed(entry, bank):
  @jax.jit
  def run(bank_tree, scale, ids, x):
    return lj.unmerged(entry.fn, bank.plan, adapter_ids=ids, scale=scale)(
        lj.combine(entry.variables, bank_tree), x)
  return run


# (a) a linen MLP, (b)+(c) a linen scan over a remat'd layer, a plain remat/jit/cond block,
# (d) an MoE whose experts are picked out of a stacked kernel, (e) one whose experts run as
# `lax.ragged_dot` groups with per-example group sizes.
@pytest.mark.parametrize("name", ["mlp", "scan_remat", "remat_jit_cond", "moe_experts", "routed_moe"])
def test_mixed_batch_equals_each_adapter_alone(name):
  entry, adapters, bank = _setup(name)
  batch = entry.x.shape[0]
  ids = jnp.asarray(([1, -1, 0, 1, 0] * 2)[:batch], jnp.int32)
  y = _mixed(entry, bank)(lj.bank_tree(bank), bank.scale, ids, entry.x)

  @jax.jit  # one program: each adapter's merged forward on the whole batch
  def references(trees):
    return [lj.merged(entry.fn, plan)(lj.combine(entry.variables, t), entry.x)
            for t, (_, plan) in zip(trees, adapters)]

  merged = references([t for t, _ in adapters])
  base = jax.jit(entry.fn)(entry.variables, entry.x)  # the base program on its own
  assert y.shape == base.shape
  for i, ref in enumerate(merged):
    rows = np.flatnonzero(np.asarray(ids) == i)
    assert float(jnp.abs(ref[rows] - base[rows]).max()) > 1e-2  # the adapter matters here
    np.testing.assert_allclose(y[rows], ref[rows], rtol=2e-5, atol=2e-5 * float(jnp.abs(ref).max()))
  off = np.flatnonzero(np.asarray(ids) == -1)
  np.testing.assert_array_equal(y[off], base[off])


def _flops(f, *args):
  """FLOPs of the lowered program (before fusion; see test_apply._flops for why)."""
  cost = jax.jit(f).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


@pytest.mark.parametrize("name", ["mlp", "moe_experts"])
def test_mixed_flops_are_base_plus_per_example_low_rank_terms(name):
  entry, _, bank = _setup(name)
  batch = entry.x.shape[0]
  ids = jnp.arange(batch, dtype=jnp.int32) % len(bank) - 1  # every adapter and the base
  base = _flops(entry.fn, entry.variables, entry.x)
  mixed = _flops(lambda t, s, i, x: lj.unmerged(entry.fn, bank.plan, adapter_ids=i, scale=s)(
      lj.combine(entry.variables, t), x), lj.bank_tree(bank), bank.scale, ids, entry.x)
  low_rank, materialise = 0.0, 0.0
  for s in bank.plan.sites:
    stack = math.prod(s.shape[j] for j in s.layout.stack_axes)
    # per row: x·A, ·B (2 FLOPs per multiply-add), the scale, the add; at r_max for every row
    per_row = 2 * s.rank * (s.fan_in + s.fan_out) + s.rank + 2 * s.fan_out
    low_rank += stack * len(s.use) * entry.rows * per_row
    materialise += stack * 2 * s.fan_in * s.fan_out * s.rank * batch  # W + ΔW_i per example
  slack = 4 * batch * len(bank.plan.sites)  # picking each example's scale (-1: zero)
  assert low_rank < materialise
  assert 0 < mixed - base <= low_rank + slack, (mixed - base, low_rank, materialise)


@pytest.mark.parametrize("name", ["scan_remat", "routed_moe"])
def test_mixed_batch_gradients_train_every_adapter_at_once(name):
  """d loss / d bank factors equals, per adapter, the merged path's gradient over its rows (the
  rank-1 adapter's padded column gets zero gradient)."""
  entry, adapters, bank = _setup(name)
  ids = jnp.asarray([1, 0, -1, 1, 0][:entry.x.shape[0]], jnp.int32)
  weights = jnp.asarray(np.random.default_rng(0).standard_normal(entry.x.shape), jnp.float32)

  def loss(bank_tree):
    y = lj.unmerged(entry.fn, bank.plan, adapter_ids=ids, scale=bank.scale)(
        lj.combine(entry.variables, bank_tree), entry.x)
    return jnp.sum(y * weights)

  grads = jax.jit(jax.grad(loss))(lj.bank_tree(bank))
  got = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  for i, (tree, plan) in enumerate(adapters):
    rows = np.asarray(ids) == i

    def ref_loss(t, plan=plan, rows=rows):
      y = lj.merged(entry.fn, plan)(lj.combine(entry.variables, t), entry.x)
      return jnp.sum(jnp.where(rows.reshape(-1, *[1] * (y.ndim - 1)), y * weights, 0.0))

    ref = jax.grad(ref_loss)(tree)
    for p, r in jax.tree_util.tree_leaves_with_path(ref):
      g = got[jax.tree_util.keystr(p)][i]
      rank = plan.sites[0].rank
      own = g[..., :rank] if jax.tree_util.keystr(p).endswith("_lora_a']") else g[..., :rank, :]
      np.testing.assert_allclose(own, r, rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max() + 1e-30))
      assert float(jnp.abs(g).sum()) == pytest.approx(float(jnp.abs(own).sum()))  # padding: 0
    # One SGD step on the bank, back into a bank: adapter i is its own factors minus 0.1 × the
    # merged path's gradient.
    stepped = jax.tree.map(lambda f, g: f - 0.1 * g, lj.bank_tree(bank), grads)
    back, _ = lj.select_adapter(lj.bank_from_tree(bank, stepped), i, plan)
    want = jax.tree.map(lambda f, g: f - 0.1 * g, tree, ref)
    for (p, b), w in zip(jax.tree_util.tree_leaves_with_path(back), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(b, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()), err_msg=str(p))
  bad = jax.tree.map(lambda f: f[:1], lj.bank_tree(bank))
  with pytest.raises(ValueError, match=r"bank_from_tree: .*_lora_a: shape \(1,"):
    lj.bank_from_tree(bank, bad)


def _tiny(params, x):
  return jnp.tanh(x @ params["l1"]["kernel"]) @ params["l2"]["kernel"]


def _tiny_reference(base, adapter, plan, x):
  """float64 numpy: `y = tanh(x·W1')·W2'` with `W' = W + s·A·B`, and d sum(y²) / d (A, B)."""
  f64 = lambda v: np.asarray(v, np.float64)
  s1, s2 = (plan.site(f"{n}/kernel").scale for n in ("l1", "l2"))
  (a1, b1), (a2, b2) = ((f64(adapter[n]["kernel_lora_a"]), f64(adapter[n]["kernel_lora_b"]))
                        for n in ("l1", "l2"))
  w1 = f64(base["l1"]["kernel"]) + s1 * a1 @ b1
  w2 = f64(base["l2"]["kernel"]) + s2 * a2 @ b2
  t = np.tanh(f64(x) @ w1)
  y = t @ w2
  dw2 = t.T @ (2 * y)
  dw1 = f64(x).T @ ((2 * y) @ w2.T * (1 - t * t))
  grads = {"l1": (s1 * dw1 @ b1.T, s1 * a1.T @ dw1), "l2": (s2 * dw2 @ b2.T, s2 * a2.T @ dw2)}
  return y, grads


def test_hot_swap_of_any_rank_and_alpha_compiles_once():
  """10 adapters of ranks 1..4 and different alphas swapped into a jitted forward and a jitted
  train step (`pad_adapter`: rank padded, scale as data), and banks of the same N swapped into a
  mixed forward: one compilation each; outputs and gradients equal each adapter's own (float64
  numpy reference of the merged model)."""
  rng = np.random.default_rng(3)
  base = {"l1": {"kernel": jnp.asarray(rng.standard_normal((6, 8)), jnp.float32)},
          "l2": {"kernel": jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)}}
  x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
  adapters = []
  for k in range(10):
    rank, alpha = 1 + k % 4, float(1 + 3 * k)
    plan = lj.plan(lj.LoraConfig(targets=r".*/kernel", rank=rank, alpha=alpha), base)
    factor = lambda *shape: jnp.asarray(0.3 * rng.standard_normal(shape), jnp.float32)
    adapters.append(({"l1": {"kernel_lora_a": factor(6, rank), "kernel_lora_b": factor(rank, 8)},
                      "l2": {"kernel_lora_a": factor(8, rank), "kernel_lora_b": factor(rank, 5)}}, plan))

  def fwd(tree, scale, x, plan):
    return lj.unmerged(_tiny, plan, scale=scale)(lj.combine(base, tree), x)

  def step(tree, scale, x, plan):  # one SGD step on sum(y²)
    g = jax.grad(lambda t: jnp.sum(fwd(t, scale, x, plan) ** 2))(tree)
    return jax.tree.map(lambda t, g: t - 0.1 * g, tree, g)

  fwd_jit = jax.jit(fwd, static_argnums=3)
  step_jit = jax.jit(step, static_argnums=3)
  outputs = []
  for tree, plan in adapters:
    padded, padded_plan, scale = lj.pad_adapter((tree, plan), 4)
    y, grads = _tiny_reference(base, tree, plan, x)
    outputs.append(y)
    np.testing.assert_allclose(fwd_jit(padded, scale, x, padded_plan), y, rtol=1e-5,
                               atol=1e-5 * np.abs(y).max())
    stepped = step_jit(padded, scale, x, padded_plan)
    r = plan.sites[0].rank
    for n, (ga, gb) in grads.items():
      a, b = (stepped[n][f"kernel_lora_{f}"] for f in "ab")
      assert not np.any(np.asarray(a[:, r:])) and not np.any(np.asarray(b[r:]))  # padding stays 0
      for new, old, g in ((a[:, :r], tree[n]["kernel_lora_a"], ga), (b[:r], tree[n]["kernel_lora_b"], gb)):
        # the step's gradient, judged against the gradient's scale (alpha/r reaches 28 here)
        np.testing.assert_allclose((old - new) / 0.1, g, rtol=1e-4, atol=1e-5 * np.abs(g).max())
  assert fwd_jit._cache_size() == 1 and step_jit._cache_size() == 1

  serve = None
  ids = jnp.asarray([2, 0, -1, 1], jnp.int32)
  for first in range(0, 9, 3):  # banks of three adapters each, ranks padded to 4
    bank = lj.stack_adapters(adapters[first:first + 3], pad_to=4)
    serve = serve or _mixed(zoo.Entry("tiny", base, _tiny, x, r".*/kernel", 2, 4), bank)
    y = serve(lj.bank_tree(bank), bank.scale, ids, x)
    for b, i in enumerate(np.asarray(ids)):
      own = outputs[first + i] if i >= 0 else _tiny(base, x)
      np.testing.assert_allclose(y[b], own[b], rtol=1e-5, atol=1e-5 * np.abs(own).max())
  assert serve is not None and serve._cache_size() == 1


def test_mixed_errors_name_the_problem():
  entry, _, bank = _setup("remat_jit_cond")
  tree = lj.combine(entry.variables, lj.bank_tree(bank))
  run = lambda **kw: lj.unmerged(entry.fn, bank.plan, **kw)(tree, entry.x)
  with pytest.raises(ValueError, match="1-D int"):
    run(adapter_ids=jnp.zeros((5, 1), jnp.int32))
  with pytest.raises(ValueError, match="no array argument has 3 examples"):
    run(adapter_ids=jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match=r"scale\['w1'\] has shape \(\), expected \(2,\)"):
    run(adapter_ids=jnp.zeros(5, jnp.int32), scale={"w1": 1.0})
  with pytest.raises(ValueError, match="w1_lora_a: shape"):
    lj.unmerged(entry.fn, bank.plan, adapter_ids=jnp.zeros(5, jnp.int32))(
        lj.combine(entry.variables, lj.select_adapter(bank, 0)[0]), entry.x)


def test_batch_axis_and_per_example_dropout():
  """Activations `(T, batch, D)` with `batch_axis=1` against float64 numpy per example; with a
  dropout key, the base-only example is untouched and each adapted one draws its own mask."""
  rng = np.random.default_rng(0)
  w = rng.standard_normal((6, 5))
  fn = lambda p, x: x @ p["w"]
  base = {"w": jnp.asarray(w, jnp.float32)}
  adapters = []
  for rank, alpha in ((2, 2.0), (1, 5.0)):
    plan = lj.plan(lj.LoraConfig(targets="w", rank=rank, alpha=alpha, dropout=0.5), base)
    adapters.append(({"w_lora_a": rng.standard_normal((6, rank)),
                      "w_lora_b": rng.standard_normal((rank, 5))}, plan))
  bank = lj.stack_adapters([(jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), t), p)
                            for t, p in adapters])
  x = rng.standard_normal((3, 4, 6))
  ids = jnp.asarray([0, 1, -1, 0], jnp.int32)
  tree = lj.combine(base, lj.bank_tree(bank))
  run = lambda key=None: lj.unmerged(fn, bank.plan, key, adapter_ids=ids, batch_axis=1,
                                     scale=bank.scale)(tree, jnp.asarray(x, jnp.float32))
  y = run()
  for b, i in enumerate(np.asarray(ids)):
    t, plan = adapters[i] if i >= 0 else (None, None)
    w_b = w if t is None else w + plan.sites[0].scale * t["w_lora_a"] @ t["w_lora_b"]
    np.testing.assert_allclose(y[:, b], x[:, b] @ w_b, rtol=1e-5, atol=1e-5)
  dropped = run(jax.random.key(1))
  np.testing.assert_array_equal(dropped[:, 2], y[:, 2])
  # examples 0 and 3 share adapter 0 but not their masks
  assert not np.allclose(dropped[:, 0], y[:, 0])
  assert not np.allclose(dropped[:, 3] - y[:, 3], dropped[:, 0] - y[:, 0])
