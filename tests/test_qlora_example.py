"""examples/qlora_large.py run tiny, in process: the layer-by-layer NF4 base is `lj.quantize` of the
float32 model, the printed bytes are the tree's, the adapters learn, the unmerged quantized forward
is the merged one, and the NF4 step's temporaries exceed the float32 step's by less than one
layer's dequantized kernels. A quantized base sharded over 8 CPU devices (a subprocess) computes
what the unsharded one does."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj

ROOT = pathlib.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import qlora_large as ex  # noqa: E402

TINY = ("--layers 2 --d-model 64 --ffn 128 --heads 4 --kv-heads 2 --vocab 256 --seq 16 --batch 2 "
        "--steps 4 --lr 1e-2 --no-progress").split()


@pytest.fixture(scope="module")
def run():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = ex.main(TINY)
  return {**result, "printed": out.getvalue()}


def test_layer_by_layer_base_is_lj_quantize_of_the_float32_model(run):
  shape, plan = run["shape"], run["plan"]
  # The float32 model the example never holds at once: the same per-layer draws, stacked.
  k_layers = jax.random.split(jax.random.key(0), 3)[0]
  layers = [ex.init_layer(jax.random.fold_in(k_layers, i), shape) for i in range(shape.layers)]
  full = {k: jnp.concatenate([layer[k] for layer in layers]) for k in layers[0]}
  want = lj.quantize(plan, {"layers": full}, "nf4")["layers"]
  got = run["base"]["layers"]
  for name in ex.KERNELS:
    assert isinstance(got[name], lj.QuantizedArray) and got[name].double_quant, name
    assert (got[name].shape, got[name].layout) == (want[name].shape, want[name].layout), name
    for child in ("codes", "scales", "scale_absmax", "scale_offset"):
      np.testing.assert_array_equal(getattr(got[name], child), getattr(want[name], child), err_msg=name)
  for name in ("attn_norm", "mlp_norm"):
    np.testing.assert_array_equal(got[name], full[name])


def test_printed_bytes_are_the_trees(run):
  shape = run["shape"]
  # NF4 with double quantization, from the shapes: per layer and (out, in) kernel, O·I/2 code
  # bytes, one uint8 per block of 64, a float32 per 256 blocks and one float32 mean.
  expected = 0
  for name in ex.KERNELS:
    fan_in, fan_out = shape.layer_shapes()[name]
    blocks = fan_in * fan_out // 64
    expected += shape.layers * (fan_in * fan_out // 2 + blocks + 4 * math.ceil(blocks / 256) + 4)
  assert run["quantized_bytes"] == expected
  leaves = jax.tree_util.tree_leaves(run["base"])
  assert run["base_bytes"] == sum(np.asarray(x).nbytes for x in leaves)
  assert run["adapted"] == shape.layers * sum(math.prod(shape.layer_shapes()[k]) for k in ex.KERNELS)
  per_param = expected / run["adapted"]
  assert 0.5 < per_param <= 0.52
  printed = run["printed"]
  assert f"= {per_param:.3f} bytes/param" in printed, printed
  assert f"{run['n_params'] * 16 / 2**20:.2f} MiB" in printed, printed
  assert f"{run['temp_bytes'] / 2**20:.2f} MiB" in printed, printed


def test_adapters_learn_and_the_unmerged_forward_is_the_merged_one(run):
  losses = run["losses"]
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  shape, plan, base, adapters = run["shape"], run["plan"], run["base"], run["adapters"]
  assert any(np.abs(np.asarray(b)).max() > 0 for p, b in lj._src.tree.flatten(adapters).items()
             if p.endswith("_lora_b")), "B never moved"
  tokens = jax.random.randint(jax.random.key(7), (2, 16), 0, shape.vocab)
  tree = lj.combine(base, adapters)
  fn = functools.partial(ex.forward, shape=shape)
  got = jax.jit(lj.unmerged(fn, plan))(tree, tokens)
  # Reference: W + ΔW formed in float32 on the dequantized base, the plain function.
  want = jax.jit(fn)(lj.merge(plan, tree, dtype=jnp.float32), tokens)
  np.testing.assert_allclose(got, want, atol=2e-4 * float(jnp.abs(want).max()))


def test_nf4_step_temporaries_within_one_layer_of_the_float32_step(run):
  shape, plan, base, adapters = run["shape"], run["plan"], run["base"], run["adapters"]
  tx = optax.adamw(1e-3)
  step = jax.jit(ex.train_step(plan, shape, tx), donate_argnums=(0, 1))  # as the example's
  # The same step on the dequantized (float32) base; the example compiled the NF4 one.
  f32 = step.lower(adapters, tx.init(adapters), lj.dequantize(base), run["tokens"]).compile()
  temps = {"f32": f32.memory_analysis().temp_size_in_bytes, "nf4": run["temp_bytes"]}
  one_layer = 4 * sum(math.prod(shape.layer_shapes()[k]) for k in ex.KERNELS)
  assert temps["nf4"] <= temps["f32"] + one_layer, (temps, one_layer)


def _sharded_probe() -> dict:
  """Run in a subprocess with 8 CPU devices: a scanned stack of NF4 kernels with every quantized
  child sharded on its output-row axis, the jitted unmerged forward vs the unsharded one."""
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  def fn(v, x):  # x: (B, 64); v["w"]: (L, 64, 64) applied layer by layer in a scan
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, v["w"])[0]

  k_w, k_x, k_b = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k_x, (4, 64))
  host = {"w": jax.random.normal(k_w, (2, 64, 64)) / 8}
  plan = lj.plan(lj.LoraConfig(targets="w", rank=4), host, fn, args=(x,))
  tree = lj.quantize(plan, lj.attach(plan, host, jax.random.key(1)), "nf4")
  tree["w_lora_b"] = jax.random.normal(k_b, tree["w_lora_b"].shape) / 10
  mesh = Mesh(np.array(jax.devices()), ("model",))
  row, rep = NamedSharding(mesh, P(None, "model")), NamedSharding(mesh, P())
  q = tree["w"]  # codes (L, O, I/2) and block stats (L, n) by rows; the rest replicated
  sharded = {**tree, "w": lj.QuantizedArray(
      jax.device_put(q.codes, row), jax.device_put(q.scales, row), jax.device_put(q.scale_absmax, rep),
      jax.device_put(q.scale_offset, rep), shape=q.shape, dtype=q.dtype, layout=q.layout,
      format=q.format, block_size=q.block_size)}
  fwd = jax.jit(lj.unmerged(fn, plan))
  got, want = fwd(sharded, x), fwd(tree, x)
  codes = sharded["w"].codes
  return {"devices": jax.device_count(), "codes_shards": len(codes.addressable_shards),
          "codes_spec": str(codes.sharding.spec), "max_diff": float(jnp.abs(got - want).max()),
          "scale": float(jnp.abs(want).max()), "lora_jax": lj.__file__}


def test_sharded_quantized_base_gives_the_unsharded_forward():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
  out = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert pathlib.Path(report["lora_jax"]).is_relative_to(ROOT), report["lora_jax"]
  assert report["devices"] == 8 and report["codes_shards"] == 8, report
  assert report["max_diff"] <= 1e-5 * report["scale"], report


if __name__ == "__main__":
  print(json.dumps(_sharded_probe()))
