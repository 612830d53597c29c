"""Adapter banks (stack / select) and adapter algebra (weighted_adapter) against the merged path,
float64 numpy and PyTorch PEFT's own `add_weighted_adapter`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import optional

import lora_jax as lj

# One 2-D kernel, one with a stack axis and a multi-axis out group, one with a multi-axis in
# group. PEFT sees the stack slices q[0], q[1] as two Linear(4, 6) modules.
SHAPES = {"a": (5, 7), "q": (2, 4, 2, 3), "o": (2, 3, 4)}
LAYOUTS = {r"q/kernel": "stack=(0) in=(1) out=(2,3)", r"o/kernel": "in=(0,1) out=(2)"}
MODULES = {"a": ("a/kernel", ()), "q0": ("q/kernel", (0,)), "q1": ("q/kernel", (1,)),
           "o": ("o/kernel", ())}
# name: (rank, alpha, rslora)
SPECS = {"x": (3, 6.0, False), "y": (3, 5.0, True), "z": (3, 2.0, False),
         "u": (2, 4.0, False), "v": (4, 3.0, True)}


@pytest.fixture(scope="module")
def base():
  rng = np.random.default_rng(0)
  return {k: {"kernel": jnp.asarray(rng.standard_normal(s), jnp.float32)} for k, s in SHAPES.items()}


def _adapter(base, name, seed):
  rank, alpha, rslora = SPECS[name]
  config = lj.LoraConfig(targets=r".*/kernel", rank=rank, alpha=alpha,
                         scaling="rslora" if rslora else "standard", layout_pattern=LAYOUTS)
  plan = lj.plan(config, base)
  rng = np.random.default_rng(seed)
  factors = {s.path.split("/")[0]: {
      "kernel_lora_a": jnp.asarray(rng.standard_normal(s.a_shape), jnp.float32),
      "kernel_lora_b": jnp.asarray(rng.standard_normal(s.b_shape), jnp.float32)} for s in plan.sites}
  return lj.combine(base, factors), plan


@pytest.fixture(scope="module")
def adapters(base):
  return {name: _adapter(base, name, seed) for seed, name in enumerate(SPECS)}


def _delta64(tree, plan):
  """`{path: ΔW (*stack, fan_in, fan_out)}` in float64 numpy, straight from the factors."""
  leaves = lj.split(tree)[0]
  out = {}
  for s in plan.sites:
    key = s.path.split("/")[0]
    a = np.asarray(leaves[key]["kernel_lora_a"], np.float64)
    b = np.asarray(leaves[key]["kernel_lora_b"], np.float64)
    n = len(s.layout.stack_axes)
    a = a.reshape(*a.shape[:n], s.fan_in, a.shape[-1])
    b = b.reshape(*b.shape[:n], b.shape[n], s.fan_out)
    out[s.path] = s.scale * a @ b
  return out


def _by_module(deltas, plan):
  """`{PEFT module: ΔW (out, in)}` from `lj.delta`'s `{path: ΔW}` (kernel axis order)."""
  out = {}
  for m, (path, index) in MODULES.items():
    s = plan.site(path)
    d = np.asarray(deltas[path]).reshape(-1, s.fan_in, s.fan_out)
    out[m] = d[index[0] if index else 0].T
  return out


# ---- banks -----------------------------------------------------------------------------------

def test_stack_pads_and_select_with_own_plan_round_trips_bit_for_bit(adapters):
  pairs = [adapters["u"], adapters["v"], adapters["y"]]
  bank = lj.stack_adapters(pairs, names=["u", "v", "y"])
  assert bank.lora_a["q/kernel"].shape == (3, 2, 4, 4) and bank.lora_b["q/kernel"].shape == (3, 2, 4, 2, 3)
  assert bank.plan.site("q/kernel").rank == 4 and bank.plan.site("q/kernel").scale == 1.0
  np.testing.assert_array_equal(bank.rank["a/kernel"], [2, 4, 3])
  np.testing.assert_allclose(bank.scale["a/kernel"], [p.site("a/kernel").scale for _, p in pairs])
  assert not np.any(bank.lora_a["o/kernel"][0, ..., 2:]) and not np.any(bank.lora_b["o/kernel"][0, 2:])
  for i, (tree, plan) in enumerate(pairs):
    for which in (i, bank.names[i]):
      got, got_plan = lj.select_adapter(bank, which, plan)
      assert got_plan is plan
      want = lj.split(tree)[0]
      assert jax.tree.structure(got) == jax.tree.structure(want)
      jax.tree.map(np.testing.assert_array_equal, got, want)


def test_select_default_plan_applies_as_the_original(adapters, base):
  """Default select: padded to r_max, scale folded into B, one static plan. ΔW and the merged
  kernels equal the original adapter's (zero padding adds exact zeros; the fold is one rounding)."""
  pairs = [adapters["u"], adapters["v"], adapters["x"]]
  bank = lj.stack_adapters(pairs)
  for i, (tree, plan) in enumerate(pairs):
    sel, sel_plan = lj.select_adapter(bank, i)
    assert sel_plan == bank.plan
    got = lj.delta(sel_plan, lj.combine(base, sel))
    want = _delta64(tree, plan)
    for s in plan.sites:
      scale = np.abs(want[s.path]).max()
      np.testing.assert_allclose(np.asarray(got[s.path], np.float64).reshape(want[s.path].shape),
                                 want[s.path], atol=2e-6 * scale, rtol=0)
    merged_sel = lj.merge(sel_plan, lj.combine(base, sel))
    merged_own = lj.merge(plan, tree)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), merged_sel,
                 merged_own)


def _mlp(params, x):
  return jnp.tanh(x @ params["l1"]["kernel"]) @ params["l2"]["kernel"]


def test_select_under_jit_compiles_once_for_every_adapter_and_bank():
  """`unmerged` on `select_adapter(bank, i)` with traced `i`: equal to each adapter's own unmerged
  forward, and one compilation for every `i` and for a second bank of other ranks and alphas."""
  rng = np.random.default_rng(1)
  base = {"l1": {"kernel": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)},
          "l2": {"kernel": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)}}
  x = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)

  def adapter(rank, alpha, seed):
    plan = lj.plan(lj.LoraConfig(targets=r".*/kernel", rank=rank, alpha=alpha), base)
    tree = lj.attach(plan, base, jax.random.key(seed))
    r = np.random.default_rng(seed)
    return lj.combine(base, jax.tree.map(lambda v: jnp.asarray(r.standard_normal(v.shape), v.dtype),
                                         lj.split(tree)[0])), plan

  pairs = [[adapter(1, 2.0, 0), adapter(3, 5.0, 1)], [adapter(2, 7.0, 2), adapter(3, 1.0, 3)]]
  banks = [lj.stack_adapters(own, pad_to=3) for own in pairs]

  @jax.jit
  def serve(bank, i, x):
    tree, plan = lj.select_adapter(bank, i)
    return lj.unmerged(_mlp, plan)(lj.combine(base, tree), x)

  for bank, own in zip(banks, pairs):
    for i, (tree, plan) in enumerate(own):
      want = jax.jit(lj.unmerged(_mlp, plan))(tree, x)
      np.testing.assert_allclose(serve(bank, jnp.int32(i), x), want, rtol=2e-6, atol=2e-6)
  assert serve._cache_size() == 1


def test_banks_keep_the_adapters_containers():
  """NNX `State` with `Param` boxes and a list (factors in `LoraWeight` nodes): select gives back
  the same tree structure and values, also from a bank passed through `jit`."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self):
      self.l1 = nnx.Linear(3, 4, rngs=nnx.Rngs(0))

  nnx_state = nnx.split(Net())[1]
  as_list = [jnp.ones((3, 4)), jnp.zeros((2,))]
  for base, target in ((nnx_state, r"l1/kernel"), (as_list, r"0")):
    pairs = []
    for rank, seed in ((1, 0), (2, 1)):
      plan = lj.plan(lj.LoraConfig(targets=target, rank=rank), base)
      adapters = lj.split(lj.attach(plan, base, jax.random.key(seed)))[0]
      draw = np.random.default_rng(seed).standard_normal
      pairs.append((jax.tree.map(lambda v, draw=draw: jnp.asarray(draw(v.shape), v.dtype), adapters),
                    plan))
    bank, own_plan = lj.stack_adapters(pairs), pairs[0][1]
    pick = jax.jit(lambda bank, plan=own_plan: lj.select_adapter(bank, 0, plan)[0])
    for got in (lj.select_adapter(bank, 0, own_plan)[0], pick(bank)):
      assert jax.tree.structure(got) == jax.tree.structure(pairs[0][0])
      jax.tree.map(np.testing.assert_array_equal, got, pairs[0][0])


def test_bank_errors(adapters, base):
  (tree, plan), (tree_v, plan_v) = adapters["x"], adapters["v"]
  other = lj.plan(lj.LoraConfig(targets=r"a/kernel", rank=3), base)
  with pytest.raises(ValueError, match="same sites"):
    lj.stack_adapters([(tree, plan), (lj.split(tree)[0], other)])
  with pytest.raises(ValueError, match="distinct strings"):
    lj.stack_adapters([(tree, plan), (tree_v, plan_v)], names=["m", "m"])
  with pytest.raises(ValueError, match=r"a/kernel_lora_a: shape \(5, 4\) does not match its plan.s \(5, 3\)"):
    lj.stack_adapters([(tree, plan), (tree_v, plan)])
  bank = lj.stack_adapters([(tree, plan), (tree_v, plan_v)], names=["x", "v"])
  with pytest.raises(KeyError, match="no adapter named 'w'"):
    lj.select_adapter(bank, "w")
  with pytest.raises(IndexError, match="out of range"):
    lj.select_adapter(bank, 2)
  with pytest.raises(ValueError, match="a/kernel: adapter 1 has rank 4, the plan only 3"):
    lj.select_adapter(bank, "v", plan)


# ---- weighted_adapter: exact types and definitions -------------------------------------------

def test_cat_is_exact_for_different_ranks_and_negative_weights(adapters, base):
  names, weights = ["u", "v", "x"], [1.25, -0.5, 0.75]
  tree, plan = lj.weighted_adapter([adapters[n] for n in names], weights, "cat")
  assert plan.site("q/kernel").rank == 9 and plan.site("q/kernel").scale == 1.0
  got = lj.delta(plan, lj.combine(base, tree))
  for s in plan.sites:
    want = sum(w * _delta64(*adapters[n])[s.path] for n, w in zip(names, weights))
    np.testing.assert_allclose(np.asarray(got[s.path], np.float64).reshape(want.shape), want,
                               atol=2e-6 * np.abs(want).max(), rtol=0)


def test_svd_is_the_best_rank_r_approximation_per_stack_slice(adapters, base, tmp_path):
  """`svd` is the truncated SVD of `Σ w_i ΔW_i` per stack slice (Eckart-Young, float64 numpy):
  exact where that sum has rank <= svd_rank (q, o: rank 5 on 4x6 slices), truncated on a (5x7).
  The result's plan (alpha = r) passes the checkpoint's record checks."""
  names, weights = ["u", "x"], [0.5, -1.5]
  tree, plan = lj.weighted_adapter([adapters[n] for n in names], weights, "svd", svd_rank=4)
  lj.save_adapter(tmp_path / "svd", plan, lj.combine(base, tree))
  loaded, loaded_plan = lj.load_adapter(tmp_path / "svd", base)
  assert loaded_plan == plan
  jax.tree.map(np.testing.assert_array_equal, lj.split(loaded)[0], tree)
  got = lj.delta(plan, lj.combine(base, tree))
  for s in plan.sites:
    total = sum(w * _delta64(*adapters[n])[s.path] for n, w in zip(names, weights))
    total = total.reshape(-1, s.fan_in, s.fan_out)
    u, sv, vh = np.linalg.svd(total, full_matrices=False)
    want = (u[..., :4] * sv[..., None, :4]) @ vh[..., :4, :]
    if s.path == "a/kernel":
      assert sv[0, 4] > 0.01 * sv[0, 0]  # a real truncation, not a no-op
    np.testing.assert_allclose(np.asarray(got[s.path], np.float64).reshape(want.shape), want,
                               atol=1e-5 * np.abs(want).max(), rtol=0)


def test_a_bank_and_pairs_give_the_same_result(adapters):
  pairs = [adapters["x"], adapters["y"]]
  a = lj.weighted_adapter(pairs, [0.3, 0.9], "linear")
  b = lj.weighted_adapter(lj.stack_adapters(pairs, pad_to=4), [0.3, 0.9], "linear")
  assert a[1] == b[1]
  jax.tree.map(np.testing.assert_array_equal, a[0], b[0])


def test_dare_with_density_one_is_the_plain_type(adapters):
  pairs, weights = [adapters["x"], adapters["y"], adapters["z"]], [0.7, -1.3, 0.4]
  key = jax.random.key(0)
  for dare, plain, density in (("dare_linear", "linear", None), ("dare_ties_svd", "ties_svd", 1.0)):
    got = lj.weighted_adapter(pairs, weights, dare, density=1.0, key=key)
    want = lj.weighted_adapter(pairs, weights, plain, density=density)
    jax.tree.map(np.testing.assert_array_equal, got[0], want[0])


def test_dare_drops_at_rate_one_minus_density_and_rescales(adapters):
  """DARE by its definition: with the second weight 0, the result's A is the first adapter's
  weighted A with each entry kept with probability p and divided by p; its mean over keys is
  `linear`'s (unbiased); equal keys give equal results."""
  pairs, weights, p = [adapters["x"], adapters["z"]], [0.8, 0.0], 0.3

  @jax.jit
  @jax.vmap
  def dare(key):
    return lj.weighted_adapter(pairs, weights, "dare_linear", density=p, key=key)[0]

  keys = jax.random.split(jax.random.key(1), 400)
  keys = keys.at[-1].set(keys[0])
  got = np.asarray(dare(keys)["q"]["kernel_lora_a"], np.float64)  # (keys, 2, 4, 3)
  linear = np.asarray(lj.weighted_adapter(pairs, weights, "linear")[0]["q"]["kernel_lora_a"], np.float64)
  np.testing.assert_array_equal(got[-1], got[0])
  assert not np.array_equal(got[0], got[1])
  got = got[:-1]
  kept = got != 0
  assert abs(kept.mean() - p) < 0.025  # 9576 Bernoulli(0.3) draws: std 0.005
  np.testing.assert_allclose(got[kept], np.broadcast_to(linear / p, got.shape)[kept], rtol=1e-6)
  # Mean of 399 draws of linear·Bernoulli(p)/p: std |linear|·sqrt((1-p)/p)/sqrt(399) = 0.076·|linear|.
  assert np.all(np.abs(got.mean(0) - linear) < 0.35 * np.abs(linear) + 1e-6)


def test_weighted_adapter_errors(adapters):
  pairs = [adapters["u"], adapters["x"]]
  with pytest.raises(ValueError, match="a/kernel: combination_type='linear' needs adapters of one rank"):
    lj.weighted_adapter(pairs, [1.0, 1.0], "linear")
  with pytest.raises(ValueError, match="needs density"):
    lj.weighted_adapter(pairs, [1.0, 1.0], "ties_svd")
  with pytest.raises(ValueError, match="pass key="):
    lj.weighted_adapter(pairs, [1.0, 1.0], "dare_linear_svd", density=0.5)
  with pytest.raises(ValueError, match="one number per adapter"):
    lj.weighted_adapter(pairs, [1.0], "cat")
  with pytest.raises(ValueError, match="combination_type must be one of"):
    lj.weighted_adapter(pairs, [1.0, 1.0], "mean")
  with pytest.raises(ValueError, match=r"q/kernel: svd_rank 5 exceeds min\(fan_in=4"):
    lj.weighted_adapter(pairs, [1.0, 1.0], "svd", svd_rank=5)


# ---- weighted_adapter against PEFT's add_weighted_adapter ------------------------------------

@pytest.fixture(scope="module")
def peft_model(adapters):
  torch, peft = optional("torch"), optional("peft")

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.a, self.q0, self.q1 = torch.nn.Linear(5, 7), torch.nn.Linear(4, 6), torch.nn.Linear(4, 6)
      self.o = torch.nn.Linear(6, 4)

  model = None
  for name, (tree, plan) in adapters.items():
    rank, alpha, rslora = SPECS[name]
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora,
                             target_modules=list(MODULES), init_lora_weights=False)
    if model is None:
      model = peft.get_peft_model(Net(), config, adapter_name=name)
    else:
      model.add_adapter(name, config)
    leaves = lj.split(tree)[0]
    with torch.no_grad():
      for module, (path, index) in MODULES.items():
        site = plan.site(path)
        key = path.split("/")[0]
        a = np.asarray(leaves[key]["kernel_lora_a"])[index].reshape(site.fan_in, site.rank)
        b = np.asarray(leaves[key]["kernel_lora_b"])[index].reshape(site.rank, site.fan_out)
        layer = model.base_model.model.get_submodule(module)
        layer.lora_A[name].weight.copy_(torch.from_numpy(a.T.copy()))
        layer.lora_B[name].weight.copy_(torch.from_numpy(b.T.copy()))
  return torch, model


CASES = [
    ("linear", ["x", "y", "z"], [0.7, -1.3, 0.4], {}),
    ("ties", ["x", "y", "z"], [0.7, -1.3, 0.4], {"density": 0.5}),
    ("ties", ["y", "x", "z"], [1.1, 0.6, -0.9], {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune", ["x", "y", "z"], [0.7, -1.3, 0.4], {"density": 0.4}),
    ("cat", ["u", "v", "x"], [1.2, -0.6, 0.5], {}),
    ("svd", ["u", "v", "x"], [1.2, -0.6, 0.5], {}),
    ("svd", ["x", "v"], [0.9, 0.8], {"svd_rank": 2}),
    ("svd", ["u", "v", "x"], [1.2, -0.6, 0.5], {"svd_clamp": 0.9}),
    ("ties_svd", ["u", "v", "x"], [1.2, -0.6, 0.5], {"density": 0.6}),
    ("ties_svd", ["u", "v"], [-1.0, 0.7], {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", ["u", "v", "x"], [1.2, -0.6, 0.5], {"density": 0.5, "svd_rank": 3}),
    ("svd", ["v"], [-2.0], {}),  # one adapter: every type is linear
]


@pytest.mark.parametrize("kind,names,weights,options", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_peft_add_weighted_adapter(peft_model, adapters, base, kind, names, weights, options,
                                           monkeypatch):
  """ΔW of our result equals PEFT's `lora_B @ lora_A` for the same inputs. Singular vectors
  are defined up to sign, and torch's LAPACK picks other signs than JAX's: the clamp quantile
  depends on them, so PEFT runs here on numpy's SVD (LAPACK gesdd, JAX's convention)."""
  torch, model = peft_model

  def lapack_svd(x, full_matrices=True, driver=None):
    del driver
    u, s, vh = np.linalg.svd(x.detach().numpy(), full_matrices=full_matrices)
    return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)

  monkeypatch.setattr(torch.linalg, "svd", lapack_svd)
  new = f"{kind}_{abs(hash((tuple(names), tuple(weights), tuple(options.items()))))}"
  model.add_weighted_adapter(names, weights, new, combination_type=kind, **options)
  try:
    tree, plan = lj.weighted_adapter([adapters[n] for n in names], weights, kind, **options)
    ours = _by_module(lj.delta(plan, lj.combine(base, tree)), plan)
    for module, got in ours.items():
      layer = model.base_model.model.get_submodule(module)
      with torch.no_grad():
        want = (layer.lora_B[new].weight @ layer.lora_A[new].weight).numpy()
      rank = plan.site(MODULES[module][0]).rank
      # PEFT's new adapter has alpha = r but keeps the first adapter's use_rslora: then its scale
      # is sqrt(r) where alpha = r means 1. We take 1 (see weighted_adapter's docstring).
      assert layer.r[new] == rank
      assert layer.scaling[new] == pytest.approx(np.sqrt(rank) if SPECS[names[0]][2] else 1.0)
      np.testing.assert_allclose(got, want, atol=3e-6 * np.abs(want).max(), rtol=0,
                                 err_msg=f"{kind} {module}")
  finally:
    model.delete_adapter(new)
