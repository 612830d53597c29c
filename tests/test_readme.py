"""The README's quickstart must run as written."""

import pathlib
import re


def test_readme_quickstart_runs():
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  section = text.split("## Quickstart", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace = {}
  exec(compile(code, "README.md:quickstart", "exec"), namespace)
  assert namespace["y_merged"].shape == (8, 16, 64)
  assert float(abs(namespace["y_unmerged"] - namespace["y_merged"]).max()) < 1e-5


def test_readme_equinox_example_trains_and_merges():
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  section = text.split("### Any pytree: equinox, NamedTuples, dataclasses", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace = {}
  exec(compile(code, "README.md:equinox", "exec"), namespace)
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
