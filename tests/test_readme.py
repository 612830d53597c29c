"""The README's code must run as written."""

import pathlib
import re


def _run_first_block_after(heading: str) -> dict:
  """Execute the first python block after `heading` in the README; returns its namespace."""
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  code = re.search(r"```python\n(.*?)```", text.split(heading, 1)[1], re.S).group(1)
  namespace = {}
  exec(compile(code, f"README.md:{heading}", "exec"), namespace)
  return namespace


def test_readme_quickstart_runs():
  namespace = _run_first_block_after("## Quickstart")
  assert namespace["y_merged"].shape == (8, 16, 64)
  assert float(abs(namespace["y_unmerged"] - namespace["y_merged"]).max()) < 1e-5


def test_readme_equinox_example_trains_and_merges():
  namespace = _run_first_block_after("### Any pytree: equinox, NamedTuples, dataclasses")
  import equinox as eqx
  import jax
  import jax.numpy as jnp
  import lora_jax as lj
  plan, merged, x = namespace["plan"], namespace["merged"], namespace["x"]
  assert [s.layout for s in plan.sites] == [lj.Layout((), (1,), (0,))] * 3
  assert isinstance(merged, eqx.nn.MLP)
  tree = eqx.combine(namespace["trainable"], namespace["frozen"])
  want = lj.unmerged(namespace["fn"], plan)(tree, x)
  assert float(jnp.abs(jax.vmap(merged)(x) - want).max()) < 1e-5
  assert float(jnp.abs(want - jax.vmap(namespace["model"])(x)).max()) > 0  # the step moved B


def test_readme_maxtext_moe_example_is_low_rank_and_exact():
  namespace = _run_first_block_after("### Stacks, experts, fused kernels, control flow")
  import jax
  import jax.numpy as jnp
  import numpy as np
  import lora_jax as lj
  plan, params, fn, x = namespace["plan"], namespace["params"], namespace["fn"], namespace["x"]
  assert [s.layout for s in plan.sites] == [
    lj.Layout((1,), (0,), (2,)), lj.Layout((0, 1), (2,), (3,)), lj.Layout((0, 1), (2,), (3,))]
  assert all(u.kind == "low_rank" for s in plan.sites for u in s.use)
  np.testing.assert_array_equal(namespace["y"], jax.jit(fn)(params, x))  # B = 0 at init
  adapters, base = lj.split(namespace["tree"])
  adapters = jax.tree.map(lambda f: f + 0.01 * jnp.cos(jnp.arange(f.size).reshape(f.shape)), adapters)
  tree = lj.combine(base, adapters)  # B != 0 too
  want = fn(lj.merge(plan, tree), x)
  assert float(jnp.abs(want - fn(params, x)).max()) > 1e-2
  assert float(jnp.abs(want).max()) < 10  # outputs O(10): float32 rounding of two summation orders
  np.testing.assert_allclose(jax.jit(lj.unmerged(fn, plan))(tree, x), want, rtol=1e-5, atol=1e-5)


def test_readme_qlora_example_runs():
  namespace = _run_first_block_after("## Quantized base (QLoRA)")
  import lora_jax as lj
  assert all(isinstance(namespace["base"][k], lj.QuantizedArray) for k in ("w1", "w2"))
  assert namespace["merged"]["w1"].dtype == "bfloat16" and namespace["w"]["w2"].shape == (512, 64)
  assert float(abs(namespace["grads"]["w2_lora_b"]).max()) > 0
