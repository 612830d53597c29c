"""lj.quantize: NF4 bit-exact with bitsandbytes' CPU path, int8 / fp8 against numpy references,
and a quantized tree through the tree functions, jit, merge and adapter checkpoints.

Tiny kernels; bitsandbytes and torch come from the interop extra (`optional`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax._src.quantize import DYNAMIC_MAP, NF4_VALUES, torch_cpu_mean
from tests.conftest import optional

L = lj.Layout


@pytest.fixture(scope="module")
def bnb():
  optional("torch")
  return optional("bitsandbytes.functional")


def _weights(shape, seed=0, zero_row=True):
  w = (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)
  if zero_row:
    w[..., 3] = 0  # an all-zero output channel: zero block maxima
  return w


def _bits(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32)).view(np.uint32)


def _bnb_dequant(bnb, weight_out_in, block_size, double_quant, torch_dtype):
  import torch
  t = torch.from_numpy(np.ascontiguousarray(weight_out_in)).to(torch_dtype)
  packed, state = bnb.quantize_4bit(t, blocksize=block_size, compress_statistics=double_quant,
                                    quant_type="nf4")
  return packed, state, bnb.dequantize_4bit(packed, state).float().numpy()


def test_tables_are_bitsandbytes(bnb):
  assert (bnb.create_dynamic_map().numpy() == DYNAMIC_MAP).all()
  assert (bnb.get_4bit_type("nf4", device="cpu").numpy() == NF4_VALUES).all()


@pytest.mark.parametrize("n", [7, 16, 100, 1000, 4096, 40000])
def test_mean_is_torch_cpu_mean_bit_for_bit(n):
  torch = optional("torch")
  x = np.random.default_rng(n).random((1, n)).astype(np.float32) * 0.1
  assert torch_cpu_mean(x, torch.get_num_threads())[0] == np.float32(torch.from_numpy(x[0]).mean().item())


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nf4_dequantize_is_bitsandbytes_bit_for_bit(bnb, double_quant, dtype):
  import torch
  w = _weights((256, 40))  # (in, out): 160 blocks of 64
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  packed, state, ref = _bnb_dequant(bnb, w.T, 64, double_quant, tdtype)
  q = lj._src.quantize.quantize_kernel(jnp.asarray(w, dtype), L((), (0,), (1,)), "nf4",
                                        block_size=64, double_quant=double_quant)
  assert (np.asarray(q.codes).reshape(-1) == packed.numpy().reshape(-1)).all()
  if double_quant:
    assert (np.asarray(q.scales) == state.absmax.numpy()).all()
    assert (np.asarray(q.scale_absmax) == state.state2.absmax.numpy()).all()
    assert np.asarray(q.scale_offset) == state.offset.numpy()
  deq = q.dequantize()
  assert deq.dtype == jnp.dtype(dtype) and deq.shape == w.shape
  np.testing.assert_array_equal(_bits(deq), ref.T.view(np.uint32))


def test_nf4_stacked_multi_axis_kernel_matches_bitsandbytes_per_stack_index(bnb):
  import torch
  # (heads=2, in=32, out=(3, 8)) with the stack axis in the middle of the stored order.
  w = _weights((32, 2, 3, 8), seed=1, zero_row=False)
  layout = L((1,), (0,), (2, 3))
  q = lj._src.quantize.quantize_kernel(jnp.asarray(w), layout, "nf4", block_size=32)
  deq = np.asarray(q.dequantize())
  for h in range(2):
    weight = w[:, h].reshape(32, 24).T  # PyTorch (out, in) of stack entry h
    _, _, ref = _bnb_dequant(bnb, weight, 32, True, torch.float32)
    np.testing.assert_array_equal(deq[:, h].reshape(32, 24).T.view(np.uint32), ref.view(np.uint32))
    # one stack entry, read alone
    np.testing.assert_array_equal(_bits(q.take(h).dequantize()), deq[:, h].view(np.uint32))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_per_channel_formats_against_numpy(fmt):
  import ml_dtypes
  w = _weights((64, 12), seed=2)
  q = lj._src.quantize.quantize_kernel(jnp.asarray(w), L((), (0,), (1,)), fmt)
  top = 127.0 if fmt == "int8" else 448.0
  scale = np.asarray(q.scales)  # per output channel: max|w| / top (XLA may multiply by 1/top)
  np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / np.float32(top), rtol=2e-7, atol=0)
  safe = np.where(scale == 0, np.float32(1), scale)
  if fmt == "int8":
    codes = np.clip(np.round(w / safe), -127, 127).astype(np.float32)
  else:
    codes = (w / safe).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(q.codes).astype(np.float32).T, codes)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), codes * scale)
  # half a code step: scale/2 for int8; e4m3 has 3 mantissa bits (|w|/16, scale·2^-10 subnormal)
  bound = scale * 0.5 if fmt == "int8" else np.abs(w) / 16 + scale * 2.0**-10
  assert np.all(np.abs(np.asarray(q.dequantize()) - w) <= bound * (1 + 1e-6))
  assert q.nbytes / q.size <= 1.02 + 4 / 64


@pytest.fixture(scope="module")
def quantized_mlp():
  rng = np.random.default_rng(3)
  dense = lambda n_in, n_out: {"kernel": jnp.asarray(rng.standard_normal((n_in, n_out)) * 0.1, jnp.float32),
                               "bias": jnp.zeros(n_out, jnp.float32)}
  variables = {"params": {"Dense_0": dense(64, 8), "Dense_1": dense(64, 64)}}
  x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
  # no apply function: 2-D kernels are (in, out), nothing traced
  plan = lj.plan(lj.LoraConfig(targets=r".*/kernel", rank=2, alpha=4.0), variables)
  rng = np.random.default_rng(4)
  # nonzero factors of the plan's shapes (lj.attach would compile its initialisers: seconds)
  adapters = {"params": {s.path.split("/")[1]: {
      "kernel_lora_a": jnp.asarray(rng.standard_normal(s.a_shape) * 0.1, jnp.float32),
      "kernel_lora_b": jnp.asarray(rng.standard_normal(s.b_shape) * 0.1, jnp.float32)} for s in plan.sites}}
  return plan, lj.combine(variables, adapters), x


def test_quantized_tree_through_tree_functions_jit_and_checkpoint(quantized_mlp, tmp_path):
  plan, tree, _ = quantized_mlp
  qtree = lj.quantize(plan, tree, "nf4", block_size=32)
  kernel = "params/Dense_0/kernel"
  leaves = lj._src.tree.flatten(qtree)
  assert isinstance(leaves[kernel], lj.QuantizedArray) and leaves[kernel].shape == (64, 8)
  adapters, base = lj.split(qtree)
  # quantizing the base alone (before attaching) gives the same quantized kernels
  before = lj.quantize(plan, lj.strip(tree), "nf4", block_size=32)
  np.testing.assert_array_equal(lj._src.tree.flatten(before)[kernel].codes, leaves[kernel].codes)
  assert lj.split(lj.combine(before, adapters))[0].keys() == adapters.keys()
  assert isinstance(lj._src.tree.flatten(base)[kernel], lj.QuantizedArray)
  assert all(k.endswith(("_lora_a", "_lora_b")) for k in lj._src.tree.flatten(adapters))
  again = lj.combine(base, adapters)
  assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(qtree)
  mask = lj.trainable_mask(qtree)
  assert lj._src.tree.flatten(mask)[kernel] is False
  assert isinstance(lj._src.tree.flatten(lj.strip(qtree))[kernel], lj.QuantizedArray)
  through = jax.jit(lambda t: t)(qtree)
  np.testing.assert_array_equal(lj.dequantize(through)["params"]["Dense_0"]["kernel"],
                                lj.dequantize(qtree)["params"]["Dense_0"]["kernel"])
  # the optimizer holds state for the adapters only, and updates leave the codes alone
  tx = lj.freeze_base(optax.sgd(0.1), qtree)
  state = tx.init(qtree)
  assert not any(x.dtype == jnp.uint8 for x in jax.tree_util.tree_leaves(state))
  lj.save_adapter(tmp_path / "a", plan, qtree)
  restored, _ = lj.load_adapter(tmp_path / "a", lj.strip(qtree))
  np.testing.assert_array_equal(lj.split(restored)[0]["params"]["Dense_0"]["kernel_lora_a"],
                                adapters["params"]["Dense_0"]["kernel_lora_a"])


def test_merge_folds_delta_into_the_dequantized_base(quantized_mlp):
  plan, tree, _ = quantized_mlp
  qtree = lj.quantize(plan, tree, "int8")
  merged = lj.merge(plan, qtree, dtype=jnp.bfloat16)
  deq = lj.dequantize(qtree)
  for layer in ("Dense_0", "Dense_1"):
    p = deq["params"][layer]
    ref = (np.asarray(p["kernel"], np.float64)
           + plan.site(f"params/{layer}/kernel").scale * np.asarray(p["kernel_lora_a"], np.float64)
           @ np.asarray(p["kernel_lora_b"], np.float64))
    got = merged["params"][layer]["kernel"]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-2, atol=1e-3)
    assert "kernel_lora_a" not in merged["params"][layer]


def test_bytes_per_parameter():
  w = jnp.asarray(_weights((1024, 64), seed=5))
  layout = L((), (0,), (1,))
  per = lambda **kw: lj._src.quantize.quantize_kernel(w, layout, **kw).nbytes / w.size
  assert per(format="nf4", double_quant=True) <= 0.52
  assert per(format="nf4", double_quant=False) <= 0.57
  assert per(format="int8") <= 1.02


def test_errors_name_the_path(quantized_mlp):
  plan, tree, _ = quantized_mlp
  with pytest.raises(ValueError, match="unsupported format 'nf3'"):
    lj.quantize(plan, tree, "nf3")
  with pytest.raises(ValueError, match=r"params/Dense_0/kernel: NF4 block size 48 does not divide the input"):
    lj.quantize(plan, tree, "nf4", block_size=48)
  three_d = {"w": jnp.ones((4, 8, 8)), "v": jnp.ones((8, 8))}
  p = lj.plan(lj.LoraConfig(targets="v", rank=2), three_d, lambda v, x: x @ v["v"], (jnp.ones((2, 8)),))
  with pytest.raises(ValueError, match=r"lj.quantize: w: a 3-D kernel with no layout"):
    lj.quantize(p, three_d, "int8", everything=True)
  q = lj.quantize(p, {"w": jnp.ones((8, 8)), "v": jnp.ones((8, 8))}, "int8", everything=True)
  assert isinstance(q["w"], lj.QuantizedArray) and isinstance(q["v"], lj.QuantizedArray)


# --- the unmerged path: dequantized at each use -------------------------------------------------

def _zoo_entry(name):
  """One entry of tests/zoo.py, built alone (`zoo.entries()` initialises the whole zoo)."""
  from tests import zoo
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.standard_normal((4, 32 if name != "mlp" else 24)), jnp.float32)
  if name == "moe_experts":
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) * 0.2, jnp.float32)
    moe = {"router": normal(32, zoo.E), "gate": normal(zoo.E, 32, 48), "up": normal(zoo.E, 32, 48),
           "down": normal(zoo.E, 48, 32)}
    return zoo.Entry(name, moe, zoo.moe_fn, x, "gate|up|down", 3, 4)
  module = {"mlp": zoo.MLP, "scan_remat": zoo.Stack}[name]()
  return zoo._linen(name, module, x, r".*/kernel", 0, 4)


def _zoo_case(name):
  e = _zoo_entry(name)
  plan = lj.plan(lj.LoraConfig(targets=e.targets, rank=2, alpha=4.0), e.variables, e.fn, (e.x,))
  rng = np.random.default_rng(0)
  factors = {s.path: (jnp.asarray(rng.standard_normal(s.a_shape) * 0.1, jnp.float32),
                      jnp.asarray(rng.standard_normal(s.b_shape) * 0.1, jnp.float32)) for s in plan.sites}
  tree = lj._src.adapters.put_factors(e.variables, {s.path: (s.layout, *factors[s.path]) for s in plan.sites},
                                      "test")
  adapters, base = lj.split(tree)
  return e, plan, adapters, lj.quantize(plan, base, "nf4", block_size=8)


@pytest.mark.parametrize("name", ["mlp", "scan_remat", "moe_experts"])
def test_unmerged_on_quantized_base_equals_unmerged_on_its_dequantized_copy(name):
  e, plan, adapters, qbase = _zoo_case(name)
  f = lj.unmerged(e.fn, plan)

  @jax.jit
  def value_and_grad(adapters, base):
    return jax.value_and_grad(lambda ad: jnp.sum(f(lj.combine(base, ad), e.x) ** 2))(adapters)

  yq, gq = value_and_grad(adapters, qbase)
  yd, gd = value_and_grad(adapters, lj.dequantize(qbase))
  np.testing.assert_allclose(yq, yd, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(gq), jax.tree_util.tree_leaves(gd)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_scanned_stack_is_dequantized_per_layer():
  e, plan, adapters, qbase = _zoo_case("scan_remat")
  (site,) = plan.sites
  assert site.layout.stack_axes == (0,)
  hlo = jax.jit(lj.unmerged(e.fn, plan)).lower(lj.combine(qbase, adapters), e.x).compile().as_text()
  layers, n_in, n_out = site.shape
  assert f"f32[{layers},{n_in},{n_out}]" not in hlo  # no dequantized copy of the whole stack
  assert f"u8[{layers},{n_out},{n_in // 2}]" in hlo  # the codes go into the loop


def test_peft_adapter_on_a_bitsandbytes_nf4_model_round_trips(tmp_path):
  """A PEFT adapter on a bitsandbytes NF4 model, imported onto `lj.quantize(..., "nf4")` of the
  same float weights, gives PEFT's outputs; exported back, it loads in PEFT on the bnb model
  exactly as PEFT's own file does."""
  torch, peft = optional("torch"), optional("peft")
  bnb = optional("bitsandbytes")
  torch.set_num_threads(1)
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  kernels = {"fc1": (rng.standard_normal((64, 128)) * 0.1).astype(np.float32),
             "fc2": (rng.standard_normal((128, 64)) * 0.1).astype(np.float32)}

  def nf4_linear(k):
    layer = bnb.nn.Linear4bit(*k.shape, bias=False, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.from_numpy(k.T.copy()), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True, blocksize=64)
    return layer.to("cpu")  # quantizes the weight

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.fc1, self.fc2 = nf4_linear(kernels["fc1"]), nf4_linear(kernels["fc2"])

    def forward(self, x):
      return self.fc2(torch.tanh(self.fc1(x)))

  bnb_model = Net

  def run(model, x):
    with torch.no_grad():
      return model(torch.from_numpy(np.array(x))).numpy()

  source = peft.get_peft_model(bnb_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
  with torch.no_grad():
    for name, param in source.named_parameters():
      if "lora_" in name:
        param.copy_(torch.randn_like(param) * 0.1)
  source.save_pretrained(str(tmp_path / "peft"))
  x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
  fn = lambda v, x: jnp.tanh(x @ v["fc1"]["kernel"]) @ v["fc2"]["kernel"]
  base = {name: {"kernel": jnp.asarray(k)} for name, k in kernels.items()}
  plan = lj.plan(lj.LoraConfig(targets=r".*/kernel", rank=4), base, fn, (x,))
  qbase = lj.quantize(plan, base, "nf4")
  key_map = {"fc1/kernel": "fc1", "fc2/kernel": "fc2"}
  tree, plan = lj.import_peft(tmp_path / "peft", qbase, key_map=key_map, apply_fn=fn, args=(x,))
  ours = np.asarray(lj.unmerged(fn, plan)(tree, x))
  np.testing.assert_allclose(ours, run(source, x), rtol=1e-5, atol=1e-6)
  assert not np.allclose(ours, fn(base, x), atol=1e-2)  # NF4 and the adapter both matter
  lj.export_peft(tmp_path / "back", plan, tree, key_map=key_map)
  back = peft.PeftModel.from_pretrained(bnb_model(), str(tmp_path / "back"))
  # PEFT reloading its own adapter onto a fresh bnb model moves the outputs by ~1e-2 from the
  # model it was saved from (a PEFT/bitsandbytes load quirk); ours loads exactly as PEFT's own.
  own = peft.PeftModel.from_pretrained(bnb_model(), str(tmp_path / "peft"))
  np.testing.assert_array_equal(run(back, x), run(own, x))
