"""lj.merge refuses non-finite kernels when asked (check_finite) and rounds integer kernels to
nearest with saturation, as a float64 numpy reference does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj


def _tree(kernels, rank, alpha):
  variables = {"params": {name: {"kernel": jnp.asarray(k)} for name, k in kernels.items()}}
  plan = lj.plan(lj.LoraConfig(targets=r"params/.*/kernel", rank=rank, alpha=alpha), variables)
  return plan, lj.attach(plan, variables, jax.random.key(0))


def _set_factors(tree, name, a, b):
  tree["params"][name]["kernel_lora_a"] = jnp.asarray(a, jnp.float32)
  tree["params"][name]["kernel_lora_b"] = jnp.asarray(b, jnp.float32)


def test_merge_check_finite_refuses_a_nan_factor_naming_the_path():
  rng = np.random.default_rng(0)
  plan, tree = _tree({"a": rng.normal(size=(4, 6)).astype(np.float32),
                      "b": rng.normal(size=(6, 3)).astype(np.float32)}, rank=2, alpha=2.0)
  b_factor = rng.normal(size=(2, 3)).astype(np.float32)
  b_factor[1, 2] = np.nan
  _set_factors(tree, "b", rng.normal(size=(6, 2)), b_factor)
  before = jax.tree_util.tree_map(np.array, tree)
  merged = lj.merge(plan, tree)  # unchecked: the NaN goes through, in column 2 of b only
  assert np.isnan(np.asarray(merged["params"]["b"]["kernel"])[:, 2]).all()
  assert np.isfinite(np.asarray(merged["params"]["a"]["kernel"])).all()
  result = None
  with pytest.raises(ValueError, match=r"lj\.merge: params/b/kernel: the merged kernel has "
                                       r"non-finite values.*nothing was merged"):
    result = lj.merge(plan, tree, check_finite=True)
  assert result is None
  jax.tree_util.tree_map(np.testing.assert_array_equal, tree, before)
  _set_factors(tree, "b", rng.normal(size=(6, 2)), np.where(np.isnan(b_factor), 0.0, b_factor))
  fixed = lj.merge(plan, tree, check_finite=True)
  assert np.isfinite(np.asarray(fixed["params"]["b"]["kernel"])).all()


def _reference(w, a, b, scale):
  """float64 `W + scale·A·B`, rounded to nearest and clipped to W's integer range."""
  info = np.iinfo(w.dtype)
  exact = w.astype(np.float64) + scale * (np.asarray(a, np.float64) @ np.asarray(b, np.float64))
  return np.clip(np.rint(exact), info.min, info.max).astype(w.dtype)


def test_merge_int8_kernel_rounds_to_nearest_and_saturates():
  w = np.array([[-5, -5, 127, -128, 10], [-5, 0, 126, -127, -10]], np.int8)
  plan, tree = _tree({"q": w}, rank=1, alpha=1.0)  # scale 1
  a = np.ones((2, 1), np.float32)
  b = np.array([[0.6, 0.4, 0.7, -0.7, -0.4]], np.float32)
  _set_factors(tree, "q", a, b)
  got = np.asarray(lj.merge(plan, tree)["params"]["q"]["kernel"])
  assert got.dtype == np.int8
  # -5 + 0.6 -> -4 and -5 + 0.4 -> -5 (truncation would give -4 for both); 127 + 0.7 saturates
  np.testing.assert_array_equal(got, [[-4, -5, 127, -128, 10], [-4, 0, 127, -128, -10]])
  np.testing.assert_array_equal(got, _reference(w, a, b, 1.0))


def test_merge_int8_kernel_matches_a_float64_reference():
  rng = np.random.default_rng(3)
  w = rng.integers(-128, 128, size=(16, 12)).astype(np.int8)
  plan, tree = _tree({"q": w}, rank=3, alpha=6.0)  # scale 2
  a, b = rng.normal(size=(16, 3)) * 4, rng.normal(size=(3, 12)) * 4  # |ΔW| up to ~200: saturates
  _set_factors(tree, "q", a, b)
  a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
  want = _reference(w, a32, b32, plan.sites[0].scale)
  got = np.asarray(lj.merge(plan, tree)["params"]["q"]["kernel"])
  assert ((want == 127) | (want == -128)).sum() > 10  # saturation is exercised
  np.testing.assert_array_equal(got, want)
