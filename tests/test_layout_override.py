"""Per-path layout overrides (`LoraConfig.layout_pattern`): the escape hatch where inference
cannot decide, and one adapter per projection of a fused kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lora_jax as lj
from lora_jax._src import tree as lj_tree

KV = "stack=(0) in=(2) out=(1,3)"


def _kv():
  k = jax.random.split(jax.random.key(0), 2)
  params = {"kv_einsum": jax.random.normal(k[0], (2, 3, 16, 4)) * 0.3}  # gemma: (2, K, D, H)
  x = jax.random.normal(k[1], (2, 5, 16))
  return params, x, lambda p, x: jnp.einsum("bsd,ckdh->cbskh", x, p["kv_einsum"])


def _random(tree, seed=3):
  adapters, base = lj.split(tree)
  leaves, treedef = jax.tree_util.tree_flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return lj.combine(base, treedef.unflatten([0.3 * jax.random.normal(k, x.shape)
                                             for k, x in zip(keys, leaves)]))


def test_fused_kv_kernel_gets_one_adapter_per_projection():
  params, x, fn = _kv()
  config = lj.LoraConfig(targets="kv_einsum", rank=2, alpha=4.0, layout_pattern={"kv_einsum": KV})
  plan = lj.plan(config, params, apply_fn=fn, args=(x,))
  (site,) = plan.sites
  assert site.layout == lj.Layout((0,), (2,), (1, 3))
  assert (site.a_shape, site.b_shape) == ((2, 16, 2), (2, 2, 3, 4))
  assert [str(u) for u in site.use] == ["dot_general"]
  tree = _random(lj.attach(plan, params, jax.random.key(1)))

  # float64 reference: projection c (k or v) gets its own ΔW_c = s · A[c] · B[c].
  flat = lj_tree.flatten(tree)
  a, b = (np.asarray(flat["kv_einsum" + f], np.float64) for f in ("_lora_a", "_lora_b"))
  w = np.asarray(params["kv_einsum"], np.float64)
  delta = site.scale * np.einsum("cdr,crkh->ckdh", a, b)
  want = np.einsum("bsd,ckdh->cbskh", np.asarray(x, np.float64), w + delta)
  np.testing.assert_allclose(lj.unmerged(fn, plan)(tree, x), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lj.merged(fn, plan)(tree, x), want, rtol=1e-5, atol=1e-5)
  # The two projections are independent: changing v's factors leaves k's output alone.
  moved = dict(tree, kv_einsum_lora_b=tree["kv_einsum_lora_b"].at[1].add(1.0))
  y0, y1 = lj.unmerged(fn, plan)(tree, x), lj.unmerged(fn, plan)(moved, x)
  assert np.array_equal(y0[0], y1[0]) and not np.allclose(y0[1], y1[1])


def test_override_plans_a_multi_axis_kernel_without_apply_fn():
  params, _, _ = _kv()
  with pytest.raises(ValueError, match="no unambiguous layout"):
    lj.plan(lj.LoraConfig(targets="kv_einsum", rank=2), params)
  plan = lj.plan(lj.LoraConfig(targets="kv_einsum", rank=2, layout_pattern={".*": KV}), params)
  assert plan.sites[0].layout == lj.Layout((0,), (2,), (1, 3)) and plan.sites[0].use == ()


def test_override_that_does_not_fit_the_shape_names_the_path():
  params, x, fn = _kv()
  config = lj.LoraConfig(targets="kv_einsum", rank=2, layout_pattern={"kv.*": "in=(2) out=(1,3)"})
  with pytest.raises(ValueError, match=r"kv_einsum: LoraConfig.layout_pattern: layout stack=\(\) "
                                       r"in=\(2\) out=\(1,3\) does not fit a kernel of shape "
                                       r"\(2, 3, 16, 4\)"):
    lj.plan(config, params, apply_fn=fn, args=(x,))


def test_override_that_would_materialise_names_both_layouts():
  w = jax.random.normal(jax.random.key(0), (3, 8, 8)) * 0.3  # a stack scanned over axis 0
  fn = lambda p, x: lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, p["w"])[0]
  config = lj.LoraConfig(targets="w", rank=2, layout_pattern={"w": "in=(0,1) out=(2)"})
  with pytest.raises(ValueError, match=r"w: LoraConfig.layout_pattern gives layout stack=\(\) "
                                       r"in=\(0,1\) out=\(2\) .* uses this kernel as stack=\(0\) "
                                       r"in=\(1\) out=\(2\) .*materialised \(scan over a non-stack"):
    lj.plan(config, {"w": w}, apply_fn=fn, args=(jnp.ones((2, 8)),))


@pytest.mark.parametrize("value, error, message", [
    ("in=(1)", ValueError, r"layout_pattern\['w'\]: layout 'in=\(1\)': expected"),
    ("stack=(0) in=(1) out=(2) in=(3)", ValueError, r"unexpected or repeated 'in'"),
    ("rows=(0) in=(1) out=(2)", ValueError, r"unexpected or repeated 'rows'"),
    (3, TypeError, r"layout_pattern\['w'\]: expected a layout like"),
])
def test_bad_override_values_name_the_field(value, error, message):
  with pytest.raises(error, match=message):
    lj.LoraConfig(targets="w", layout_pattern={"w": value})


def test_override_round_trips_through_json_and_checkpoints(tmp_path):
  params, x, fn = _kv()
  config = lj.LoraConfig(targets="kv_einsum", rank=2, layout_pattern={"kv_einsum": " stack=(0)  in=(2) out=(1, 3)"})
  assert config.layout_pattern == (("kv_einsum", KV),)  # canonical text
  assert lj.LoraConfig.from_json(config.to_json()) == config
  plan = lj.plan(config, params, apply_fn=fn, args=(x,))
  tree = _random(lj.attach(plan, params, jax.random.key(1)))
  lj.save_adapter(tmp_path / "a", plan, tree)
  loaded, plan2 = lj.load_adapter(tmp_path / "a", params)
  assert plan2.sites[0].layout == plan.sites[0].layout and plan2.config == config
  np.testing.assert_array_equal(lj.unmerged(fn, plan2)(loaded, x), lj.unmerged(fn, plan)(tree, x))


def test_import_peft_takes_a_square_kernels_orientation_from_an_override(tmp_path):
  # A square kernel stored (out, in) and used as x @ W.T: refused without apply_fn (a guess);
  # a layout override states the orientation, and the import equals the one read off apply_fn.
  w = jax.random.normal(jax.random.key(0), (8, 8)) * 0.3
  fn = lambda p, x: x @ p["params"]["proj"]["kernel"].T
  x = jax.random.normal(jax.random.key(1), (3, 8))
  params = {"params": {"proj": {"kernel": w}}}
  plan = lj.plan(lj.LoraConfig(targets=".*kernel", rank=2), params, apply_fn=fn, args=(x,))
  assert plan.sites[0].layout == lj.Layout((), (1,), (0,))
  tree = _random(lj.attach(plan, params, jax.random.key(2)))
  lj.export_peft(tmp_path / "peft", plan, tree)
  with pytest.raises(ValueError, match="square kernel"):
    lj.import_peft(tmp_path / "peft", params)
  via_fn, _ = lj.import_peft(tmp_path / "peft", params, apply_fn=fn, args=(x,))
  via_override, plan2 = lj.import_peft(tmp_path / "peft", params,
                                       layout_pattern={".*kernel": "in=(1) out=(0)"})
  assert plan2.sites[0].layout == lj.Layout((), (1,), (0,))
  for p, leaf in lj_tree.flatten(via_fn).items():
    np.testing.assert_array_equal(leaf, lj_tree.flatten(via_override)[p], err_msg=p)
  np.testing.assert_allclose(lj.unmerged(fn, plan2)(via_override, x), lj.unmerged(fn, plan)(tree, x),
                             rtol=1e-6, atol=1e-6)
