"""PEFT import/export: round trips, file and config checks, orientation refusals, and interop
with PyTorch PEFT itself."""

import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as st
from conftest import optional

import lora_jax as lj

KEY_MAP = lj.peft_key_map.linen(scanned=("layers",))
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _read_weights(directory):
  return st.load_file(str(directory / WEIGHTS))


def _write_weights(directory, tensors):
  st.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / WEIGHTS),
               metadata={"format": "pt"})


class Layer(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(8, name="fc")(h)), None


class Net(nn.Module):
  """fc1 (8,16); query (16,2,4) used as Linear(16, 8); a scanned stack layers/fc (3,8,8); head (8,5)."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(16, name="fc1")(x))
    h = nn.DenseGeneral((2, 4), name="query")(h).reshape(*x.shape[:-1], 8)
    h, _ = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(name="layers")(h, None)
    return nn.Dense(5, name="head")(h)


def _random_factors(tree, seed):
  """Non-zero A and B (numpy draws: no compilation per shape)."""
  adapters, base = lj.split(tree)
  rng = np.random.default_rng(seed)
  return lj.combine(base, jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), adapters))


def _init(model, batch, seed):
  x = jax.random.normal(jax.random.key(seed), (batch, 8))
  return model, jax.jit(model.init)(jax.random.key(seed + 1), x), x


@pytest.fixture(scope="module")
def net():
  return _init(Net(), 4, seed=0)


def _adapted(net, scaling):
  model, variables, x = net
  config = lj.LoraConfig(targets=r"params/(fc1|query|layers/fc|head)/kernel", rank=2, alpha=4.0,
                         rank_pattern={r".*head.*": 3}, alpha_pattern={r".*query.*": 5.0},
                         scaling=scaling)
  plan = lj.plan(config, variables, apply_fn=model.apply, args=(x,))
  return plan, _random_factors(lj.attach(plan, variables, jax.random.key(2)), seed=3)


def _site_fields(plan):
  return [(s.path, s.shape, s.layout, s.rank, s.alpha, s.scale) for s in plan.sites]


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_export_import_round_trip_is_bit_identical(net, tmp_path, scaling):
  model, variables, x = net
  plan, tree = _adapted(net, scaling)
  lj.export_peft(tmp_path, plan, tree, key_map=KEY_MAP)
  got, got_plan = lj.import_peft(tmp_path, variables, key_map=KEY_MAP, apply_fn=model.apply,
                                 args=(x,))
  assert _site_fields(got_plan) == _site_fields(plan)
  assert got_plan.config.scaling == scaling
  want_leaves, got_leaves = lj.split(tree)[0], lj.split(got)[0]
  assert jax.tree_util.tree_structure(got_leaves) == jax.tree_util.tree_structure(want_leaves)
  for w, g in zip(jax.tree_util.tree_leaves(want_leaves), jax.tree_util.tree_leaves(got_leaves)):
    assert g.dtype == w.dtype and np.array_equal(np.asarray(g), np.asarray(w))
  y = lj.unmerged(model.apply, plan)(tree, x)
  assert np.array_equal(np.asarray(lj.unmerged(model.apply, got_plan)(got, x)), np.asarray(y))
  assert not np.allclose(np.asarray(y), np.asarray(model.apply(variables, x)), atol=1e-3)


def test_export_writes_peft_layout(net, tmp_path):
  """Key names, transposes, flattening of (16,2,4) and one module per scanned layer, by hand."""
  plan, tree = _adapted(net, "standard")
  lj.export_peft(tmp_path, plan, tree, key_map=KEY_MAP, base_model_name_or_path="toy")
  tensors = _read_weights(tmp_path)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  p = {k: np.asarray(v) for k, v in tree["params"]["query"].items()}
  pre = "base_model.model."
  np.testing.assert_array_equal(tensors[pre + "query.lora_A.weight"], p["kernel_lora_a"].T)
  np.testing.assert_array_equal(tensors[pre + "query.lora_B.weight"],
                                p["kernel_lora_b"].reshape(2, 8).T)
  stack = {k: np.asarray(v) for k, v in tree["params"]["layers"]["fc"].items()}
  for layer in range(3):
    np.testing.assert_array_equal(tensors[f"{pre}layers.{layer}.fc.lora_A.weight"],
                                  stack["kernel_lora_a"][layer].T)
    np.testing.assert_array_equal(tensors[f"{pre}layers.{layer}.fc.lora_B.weight"],
                                  stack["kernel_lora_b"][layer].T)
  assert tensors[pre + "head.lora_A.weight"].shape == (3, 8)
  assert len(tensors) == 2 * 6
  assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "toy"
  assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 4, False)
  assert config["rank_pattern"] == {"head": 3} and config["alpha_pattern"] == {"query": 5}
  assert config["target_modules"] == sorted(["fc1", "query", "head"] +
                                            [f"layers.{i}.fc" for i in range(3)])


def test_patterns_resolve_like_peft_for_suffix_names():
  """A module `fc` and a module `b.fc` with different ranks: PEFT matches pattern keys as dotted
  suffixes, so `b.fc` needs its own entry before `fc`."""
  from lora_jax._src.peft import _patterns, _peft_lookup
  values = {"fc": 4, "b.fc": 8, "a.fc": 8, "c": 8}
  default, pattern = _patterns(values)
  assert default == 8
  assert {m: _peft_lookup(pattern, default, m) for m in values} == values


# ---------------------------------------------------------------- errors

def test_import_errors_name_the_key_and_leave_base_untouched(net, tmp_path):
  model, variables, x = net
  plan, tree = _adapted(net, "standard")
  lj.export_peft(tmp_path, plan, tree, key_map=KEY_MAP)
  before = jax.tree_util.tree_map(np.array, variables)

  with pytest.raises(ValueError, match="apply_fn"):  # multi-axis query kernel needs its use
    lj.import_peft(tmp_path, variables, key_map=KEY_MAP)

  dense = lj.plan(lj.LoraConfig(targets=r"params/(fc1|head)/kernel", rank=2), variables)
  lj.export_peft(tmp_path / "dense", dense, lj.attach(dense, variables, jax.random.key(0)))
  wrong = dict(variables, params=dict(variables["params"], fc1={"kernel": jnp.zeros((8, 12))}))
  with pytest.raises(ValueError, match=r"model\.fc1: lora_A \(2, 8\) / lora_B \(16, 2\) "
                     r"do not fit params/fc1/kernel of shape \(8, 12\).*needs \(2, 8\) / \(12, 2\)"):
    lj.import_peft(tmp_path / "dense", wrong)

  with pytest.raises(ValueError, match=r"layers\.0\.fc.*no lora_jax path|layers/0/fc"):
    lj.import_peft(tmp_path, variables, key_map=lj.peft_key_map.linen(), apply_fn=model.apply,
                   args=(x,))

  tensors = _read_weights(tmp_path)
  tensors["base_model.model.nope.lora_A.weight"] = np.zeros((2, 8), np.float32)
  tensors["base_model.model.nope.lora_B.weight"] = np.zeros((8, 2), np.float32)
  _write_weights(tmp_path, tensors)
  with pytest.raises(ValueError, match=r"base_model\.model\.nope\.lora_A.*params/nope/kernel"):
    lj.import_peft(tmp_path, variables, key_map=KEY_MAP, apply_fn=model.apply, args=(x,))

  os.remove(tmp_path / "adapter_config.json")
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    lj.import_peft(tmp_path, variables, key_map=KEY_MAP)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)


def test_import_rejects_a_stack_with_a_missing_layer(net, tmp_path):
  model, variables, x = net
  plan, tree = _adapted(net, "standard")
  lj.export_peft(tmp_path, plan, tree, key_map=KEY_MAP)
  tensors = _read_weights(tmp_path)
  for f in "AB":
    del tensors[f"base_model.model.layers.2.fc.lora_{f}.weight"]
  _write_weights(tmp_path, tensors)
  with pytest.raises(ValueError, match=r"'layers\.2\.fc' is missing"):
    lj.import_peft(tmp_path, variables, key_map=KEY_MAP, apply_fn=model.apply, args=(x,))


def test_export_errors_name_the_path(net, tmp_path):
  plan, tree = _adapted(net, "standard")
  with pytest.raises(ValueError, match=r"params/layers/fc/kernel: stacked.*scanned=\('layers',\)"):
    lj.export_peft(tmp_path / "a", plan, tree)
  partial = lj.peft_key_map.from_dict({"params/fc1/kernel": "fc1", "params/query/kernel": "q",
                                       "params/layers/fc/kernel": "layers.{}.fc"})
  with pytest.raises(ValueError, match="params/head/kernel: the key map gives no PEFT module"):
    lj.export_peft(tmp_path / "b", plan, tree, key_map=partial)
  clash = lj.peft_key_map.from_dict({"params/fc1/kernel": "x", "params/query/kernel": "x",
                                     "params/layers/fc/kernel": "l{}", "params/head/kernel": "h"})
  with pytest.raises(ValueError, match="both map to PEFT module 'x'"):
    lj.export_peft(tmp_path / "c", plan, tree, key_map=clash)
  assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))


def test_from_dict_key_map_round_trips_stacks(net, tmp_path):
  model, variables, x = net
  plan, tree = _adapted(net, "standard")
  key_map = {"params/fc1/kernel": "model.up", "params/query/kernel": "model.attn.q_proj",
             "params/layers/fc/kernel": "model.layers.{}.mlp", "params/head/kernel": "lm_head"}
  lj.export_peft(tmp_path, plan, tree, key_map=key_map)
  tensors = _read_weights(tmp_path)
  assert "base_model.model.model.layers.1.mlp.lora_B.weight" in tensors
  got, got_plan = lj.import_peft(tmp_path, variables, key_map=key_map, apply_fn=model.apply,
                                 args=(x,))
  assert _site_fields(got_plan) == _site_fields(plan)
  jax.tree_util.tree_map(np.testing.assert_array_equal, lj.split(got)[0], lj.split(tree)[0])


# ---------------------------------------------------------------- files and config

@pytest.fixture(scope="module")
def dense_source(net, tmp_path_factory):
  """A PEFT directory for fc1 (8, 16) and head (8, 5): non-square, importable without apply_fn."""
  _, variables, _ = net
  plan = lj.plan(lj.LoraConfig(targets=r"params/(fc1|head)/kernel", rank=2, alpha=4.0), variables)
  tree = _random_factors(lj.attach(plan, variables, jax.random.key(0)), seed=1)
  directory = tmp_path_factory.mktemp("dense") / "adapter"
  lj.export_peft(directory, plan, tree)
  return directory, variables, plan, tree


@pytest.fixture
def dense_adapter(dense_source, tmp_path):
  """A fresh copy of `dense_source`'s directory, free to edit."""
  directory, variables, plan, tree = dense_source
  return pathlib.Path(shutil.copytree(directory, tmp_path / "adapter")), variables, plan, tree


def _edit_config(directory, **fields):
  path = directory / CONFIG
  config = json.loads(path.read_text())
  config.update(fields)
  path.write_text(json.dumps(config))
  return str(path)


BAD_CONFIG = [
    (dict(r="2"), r"r: expected a positive integer, got '2'"),
    (dict(r=2.0), r"r: expected a positive integer, got 2\.0"),
    (dict(r=True), r"r: expected a positive integer, got True"),
    (dict(r=0), r"r: expected a positive integer, got 0"),
    (dict(r=None), r"r: expected a positive integer, got None"),
    (dict(lora_alpha="4"), r"lora_alpha: expected a finite number > 0, got '4'"),
    (dict(lora_alpha=True), r"lora_alpha: expected a finite number > 0, got True"),
    (dict(lora_alpha=float("nan")), r"lora_alpha: expected a finite number > 0, got nan"),
    (dict(lora_alpha=10 ** 400), r"lora_alpha: expected a finite number > 0, got 1000"),
    (dict(lora_alpha=-4), r"lora_alpha: expected a finite number > 0, got -4"),
    (dict(lora_alpha=[4]), r"lora_alpha: expected a finite number > 0, got \[4\]"),
    (dict(alpha_pattern={"head": "2"}), r"alpha_pattern\['head'\]: expected a finite number > 0"),
    (dict(alpha_pattern=["head"]), r"alpha_pattern: expected a \{module pattern: value\} object"),
    (dict(rank_pattern={"head": 2.0}), r"rank_pattern\['head'\]: expected a positive integer"),
    (dict(rank_pattern={"(": 2}), r"rank_pattern\['\('\]: invalid regex"),
    (dict(use_rslora="yes"), r"use_rslora: expected true or false, got 'yes'"),
    (dict(lora_dropout=1.0), r"lora_dropout: expected a number in \[0, 1\), got 1\.0"),
    (dict(lora_dropout="0.1"), r"lora_dropout: expected a number in \[0, 1\), got '0\.1'"),
    (dict(init_lora_weights=1), r"init_lora_weights: expected true, false or a string, got 1"),
    (dict(peft_type="IA3"), r"peft_type: only plain LoRA adapters .* got 'IA3'"),
    (dict(use_dora=True), r"use_dora: DoRA adapters are not supported, got True"),
    (dict(use_dora="false"), r"use_dora: DoRA adapters are not supported, got 'false'"),
    (dict(r=3), r"r / rank_pattern: gives PEFT module 'fc1' r=3, but .*fc1\.lora_A\.weight has "
                r"rank 2"),
    (dict(rank_pattern={"head": 3}), r"r / rank_pattern: gives PEFT module 'head' r=3"),
]


@pytest.mark.parametrize("fields, match", BAD_CONFIG, ids=[f"{f!r:.40}" for f, _ in BAD_CONFIG])
def test_import_config_errors_name_the_file_and_field(dense_adapter, fields, match):
  directory, variables, _, _ = dense_adapter
  path = _edit_config(directory, **fields)
  with pytest.raises(ValueError, match=re.escape(path) + ".*" + match):
    lj.import_peft(directory, variables)


def test_import_config_control_and_malformed_json(dense_adapter):
  """The fixture imports as is (so the refusals above are the edits'), and a config that is not
  a JSON object is refused naming the file."""
  directory, variables, plan, tree = dense_adapter
  got, got_plan = lj.import_peft(directory, variables)
  assert _site_fields(got_plan) == _site_fields(plan)
  jax.tree_util.tree_map(np.testing.assert_array_equal, lj.split(got)[0], lj.split(tree)[0])
  path = directory / CONFIG
  path.write_text("[1, 2]")
  with pytest.raises(ValueError, match=re.escape(str(path)) + ": expected a JSON object"):
    lj.import_peft(directory, variables)
  path.write_text("{r: 2")
  with pytest.raises(ValueError, match=re.escape(str(path)) + ": not valid JSON"):
    lj.import_peft(directory, variables)


class _Unpickled:
  """Unpickling this creates `marker`: proof that a pickle was (not) loaded."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return open, (self.marker, "w")


def test_import_refuses_a_pytorch_bin_without_loading_it(dense_adapter):
  directory, variables, _, _ = dense_adapter
  marker = directory.parent / "unpickled"
  os.remove(directory / WEIGHTS)
  (directory / "adapter_model.bin").write_bytes(pickle.dumps(_Unpickled(str(marker))))
  before = jax.tree_util.tree_map(np.array, variables)
  with pytest.raises(FileNotFoundError) as info:
    lj.import_peft(directory, variables)
  message = str(info.value)
  assert f"{directory / WEIGHTS} does not exist, but {directory / 'adapter_model.bin'}" in message
  assert "never loads" in message
  assert ("python -c \"import torch, safetensors.torch as st; st.save_file(torch.load("
          "'adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\"") in message
  assert not marker.exists()
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)
  os.remove(directory / "adapter_model.bin")  # neither file: the plain message
  with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors does not exist \(a"):
    lj.import_peft(directory, variables)


def test_import_refuses_corrupt_or_non_float_weights(dense_adapter):
  directory, variables, _, _ = dense_adapter
  path = directory / WEIGHTS
  raw = path.read_bytes()
  header = re.escape(str(path)) + r": not a valid safetensors file \(.*"
  for bad, why in [(raw[:-3], "not fully covered"), (raw[:5], "too small"),
                   (raw + b"\0" * 8, "not fully covered"),
                   ((10 ** 12).to_bytes(8, "little") + raw[8:], "header too large")]:
    path.write_bytes(bad)
    with pytest.raises(ValueError, match=header + why):
      lj.import_peft(directory, variables)
  path.write_bytes(raw)
  tensors = _read_weights(directory)
  key = "base_model.model.fc1.lora_A.weight"
  tensors[key] = tensors[key].astype(np.int32)
  _write_weights(directory, tensors)
  with pytest.raises(ValueError, match=re.escape(f"tensor '{key}' has dtype I32")):
    lj.import_peft(directory, variables)


# ---------------------------------------------------------------- kernel orientation

class TLinear(nn.Module):
  """A torch-style linear layer: `kernel` stored (out, in) and used as `x @ kernel.T + bias`."""
  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.normal(0.3), (self.features, x.shape[-1]))
    b = self.param("bias", nn.initializers.normal(0.1), (self.features,))
    return x @ w.T + b


class TorchStyle(nn.Module):
  """fc (8, 8) stored (in, out); proj (8, 8) and out (5, 8) stored (out, in), used as x @ W.T."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(8, name="fc")(x))
    h = jnp.tanh(TLinear(8, name="proj")(h))
    return TLinear(5, name="out")(h)


@pytest.fixture(scope="module")
def torch_style():
  return _init(TorchStyle(), 6, seed=11)


def _subset(src, dst, modules):
  """A copy of the PEFT directory `src` holding only `modules`' factors."""
  os.makedirs(dst)
  (dst / CONFIG).write_text((src / CONFIG).read_text())
  _write_weights(dst, {k: v for k, v in _read_weights(src).items()
                       if k.split(".")[2] in modules})
  return dst


def _assert_orientation_refused(directory, variables, apply_fn=None, args=()):
  """Each kernel alone: the square ones and the (out, in) one are refused, naming the path."""
  square = r"square kernel \(8, 8\): whether it is stored \(in, out\).*cannot be read off its shape"
  for module, match in [("fc", square), ("proj", square),
                        ("out", r"kernel of shape \(5, 8\) matches PEFT module 'out' \(in=8, "
                                r"out=5\) only as \(out, in\).*not transposed silently")]:
    only = _subset(directory, directory.parent / f"only-{module}", {module})
    with pytest.raises(ValueError, match=rf"lj\.import_peft: params/{module}/kernel: {match}.*"
                                         r"pass `apply_fn=` \(and `args=`\)"):
      lj.import_peft(only, variables, apply_fn=apply_fn, args=args)


def test_kernels_stored_out_in_round_trip_with_apply_fn_and_are_refused_without(torch_style,
                                                                                tmp_path):
  model, variables, x = torch_style
  plan = lj.plan(lj.LoraConfig(targets=r"params/(fc|proj|out)/kernel", rank=2), variables,
                 apply_fn=model.apply, args=(x,))
  layouts = {s.path: (s.layout.in_axes, s.layout.out_axes) for s in plan.sites}
  assert layouts == {"params/fc/kernel": ((0,), (1,)), "params/proj/kernel": ((1,), (0,)),
                     "params/out/kernel": ((1,), (0,))}
  tree = _random_factors(lj.attach(plan, variables, jax.random.key(0)), seed=1)
  lj.export_peft(tmp_path / "all", plan, tree)
  got, got_plan = lj.import_peft(tmp_path / "all", variables, apply_fn=model.apply, args=(x,))
  assert _site_fields(got_plan) == _site_fields(plan)
  jax.tree_util.tree_map(np.testing.assert_array_equal, lj.split(got)[0], lj.split(tree)[0])
  with pytest.raises(ValueError, match=r"params/fc/kernel: square kernel"):
    lj.import_peft(tmp_path / "all", variables)
  _assert_orientation_refused(tmp_path / "all", variables)
  # a function that never reads the kernels decides nothing either
  with pytest.raises(ValueError, match=r"params/fc/kernel: square kernel.*`apply_fn` never uses"):
    lj.import_peft(tmp_path / "all", variables, apply_fn=lambda v, x: x, args=(x,))


# ---------------------------------------------------------------- interop with PyTorch PEFT

@pytest.fixture(scope="module")
def torch_peft():
  """torch and peft; optional locally, required (a failure, not a skip) when CI sets
  LORA_JAX_REQUIRE_INTEROP=1."""
  torch, peft = optional("torch"), optional("peft")
  torch.set_num_threads(1)
  return torch, peft


class MLP(nn.Module):
  """fc1 (8,16), query (16,2,4) flattened to 8 features (a torch Linear(16, 8)), head (8,5)."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(16, name="fc1")(x))
    h = jnp.tanh(nn.DenseGeneral((2, 4), name="query")(h).reshape(*x.shape[:-1], 8))
    return nn.Dense(5, name="head")(h)


@pytest.fixture(scope="module")
def mlp():
  return _init(MLP(), 6, seed=5)


def _torch_mlp(torch, variables):
  """The same MLP in torch: Linear weight (out, in) = Flax kernel (in, out) transposed."""
  p = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in variables["params"].items()}

  class TorchMLP(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.fc1, self.query, self.head = (torch.nn.Linear(8, 16), torch.nn.Linear(16, 8),
                                         torch.nn.Linear(8, 5))

    def forward(self, x):
      return self.head(torch.tanh(self.query(torch.tanh(self.fc1(x)))))

  m = TorchMLP()
  with torch.no_grad():
    for name in ("fc1", "query", "head"):
      kernel = p[name]["kernel"].reshape(p[name]["kernel"].shape[0], -1)
      getattr(m, name).weight.copy_(torch.from_numpy(kernel.T.copy()))
      getattr(m, name).bias.copy_(torch.from_numpy(p[name]["bias"].reshape(-1).copy()))
  return m.eval()


def _torch_out(torch, module, x):
  with torch.no_grad():
    return module(torch.from_numpy(np.array(x))).numpy()


def test_torch_mlp_matches_flax_mlp(torch_peft, mlp):
  torch, _ = torch_peft
  model, variables, x = mlp
  np.testing.assert_allclose(_torch_out(torch, _torch_mlp(torch, variables), x),
                             model.apply(variables, x), atol=1e-5)


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_exported_adapter_loads_in_peft(torch_peft, mlp, tmp_path, scaling):
  torch, peft = torch_peft
  model, variables, x = mlp
  config = lj.LoraConfig(targets=r"params/(fc1|query|head)/kernel", rank=2, alpha=4.0,
                         rank_pattern={r".*head.*": 3}, alpha_pattern={r".*query.*": 5.0},
                         scaling=scaling)
  plan = lj.plan(config, variables, apply_fn=model.apply, args=(x,))
  tree = _random_factors(lj.attach(plan, variables, jax.random.key(7)), seed=8)
  lj.export_peft(tmp_path, plan, tree)
  peft_model = peft.PeftModel.from_pretrained(_torch_mlp(torch, variables), str(tmp_path)).eval()
  ours = np.asarray(lj.unmerged(model.apply, plan)(tree, x))
  assert not np.allclose(ours, model.apply(variables, x), atol=1e-2)  # the adapter matters
  np.testing.assert_allclose(_torch_out(torch, peft_model, x), ours, rtol=1e-5, atol=1e-5)


def test_peft_adapter_imports_into_lora_jax(torch_peft, mlp, tmp_path):
  torch, peft = torch_peft
  model, variables, x = mlp
  torch.manual_seed(0)
  config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "query", "head"],
                           rank_pattern={"head": 3}, alpha_pattern={"query": 6}, use_rslora=True)
  peft_model = peft.get_peft_model(_torch_mlp(torch, variables), config)
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if "lora_B" in name:
        param.normal_()
  peft_model.save_pretrained(str(tmp_path))
  want = _torch_out(torch, peft_model.eval(), x)

  tree, plan = lj.import_peft(tmp_path, variables, apply_fn=model.apply, args=(x,))
  by_path = {s.path: (s.rank, s.alpha, s.scale) for s in plan.sites}
  assert by_path == {"params/fc1/kernel": (2, 4.0, 4 / np.sqrt(2)),
                     "params/query/kernel": (2, 6.0, 6 / np.sqrt(2)),
                     "params/head/kernel": (3, 4.0, 4 / np.sqrt(3))}
  assert not np.allclose(want, model.apply(variables, x), atol=1e-2)
  np.testing.assert_allclose(lj.unmerged(model.apply, plan)(tree, x), want, rtol=1e-5, atol=1e-5)

  merged = lj.merge(plan, tree)["params"]
  torch_merged = peft_model.merge_and_unload()
  for name in ("fc1", "query", "head"):
    kernel = np.asarray(merged[name]["kernel"])
    np.testing.assert_allclose(kernel.reshape(kernel.shape[0], -1).T,
                               getattr(torch_merged, name).weight.detach().numpy(), atol=1e-6)


def test_key_maps_name_modules_both_ways():
  cases = [(lj.peft_key_map.linen(), "params/block_0/attn/query/kernel", (), "block_0.attn.query"),
           (lj.peft_key_map.linen(scanned=("enc/layers",)), "params/enc/layers/mlp/fc/kernel", (2,),
            "enc.layers.2.mlp.fc"),
           (lj.peft_key_map.nnx(), "blocks/0/linear/kernel", (), "blocks.0.linear"),
           (lj.peft_key_map.nnx(scanned=("blocks",)), "blocks/linear/kernel", (11,),
            "blocks.11.linear"),
           (lj.peft_key_map.from_dict({"w/q": "model.layers.{}.q_proj"}), "w/q", (3,),
            "model.layers.3.q_proj")]
  for key_map, path, index, module in cases:
    assert key_map.to_peft(path, index) == module
    assert key_map.from_peft(module) == (path, index)
  assert lj.peft_key_map.linen().to_peft("params/block_0/attn/query/bias", ()) is None
  assert lj.peft_key_map.from_dict({"w/q": "q"}).from_peft("k") is None


def test_readme_peft_snippet_runs(net, tmp_path, monkeypatch):
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  section = text.split("### To and from PyTorch PEFT", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  model, variables, x = net
  plan, tree = _adapted(net, "rslora")
  monkeypatch.chdir(tmp_path)
  namespace = dict(lj=lj, model=model, variables=variables, x=x, plan=plan, tree=tree)
  exec(compile(code, "README.md:peft", "exec"), namespace)
  assert (tmp_path / "adapter_peft" / "adapter_config.json").exists()
  assert _site_fields(namespace["plan"]) == _site_fields(plan)
  jax.tree_util.tree_map(np.testing.assert_array_equal, lj.split(namespace["tree"])[0],
                         lj.split(tree)[0])


def test_nnx_state_round_trip(tmp_path):
  from flax import nnx

  class Two(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.l2 = nnx.Linear(6, 10, rngs=rngs), nnx.Linear(10, 4, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  graphdef, state = nnx.split(Two(nnx.Rngs(0)))
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jnp.ones((3, 6))
  plan = lj.plan(lj.LoraConfig(targets=r"l\d/kernel", rank=2), state)
  tree = _random_factors(lj.attach(plan, state, jax.random.key(0)), seed=1)
  lj.export_peft(tmp_path, plan, tree, key_map=lj.peft_key_map.nnx())
  tensors = _read_weights(tmp_path)
  assert sorted(tensors) == [f"base_model.model.l{i}.lora_{f}.weight" for i in (1, 2) for f in "AB"]
  got, got_plan = lj.import_peft(tmp_path, state, key_map=lj.peft_key_map.nnx())
  assert _site_fields(got_plan) == _site_fields(plan)
  assert isinstance(got["l1"]["kernel_lora_a"], nnx.Param)
  np.testing.assert_array_equal(lj.unmerged(fn, got_plan)(got, x), lj.unmerged(fn, plan)(tree, x))


def _torch_style(torch, variables):
  """TorchStyle in torch: fc's Linear weight is its kernel transposed; proj's and out's are their
  kernels as stored."""
  p = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in variables["params"].items()}

  class Twin(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.fc, self.proj, self.out = (torch.nn.Linear(8, 8), torch.nn.Linear(8, 8),
                                      torch.nn.Linear(8, 5))

    def forward(self, x):
      return self.out(torch.tanh(self.proj(torch.tanh(self.fc(x)))))

  m = Twin()
  with torch.no_grad():
    for name, weight in (("fc", p["fc"]["kernel"].T), ("proj", p["proj"]["kernel"]),
                         ("out", p["out"]["kernel"])):
      getattr(m, name).weight.copy_(torch.from_numpy(weight.copy()))
      getattr(m, name).bias.copy_(torch.from_numpy(p[name]["bias"].copy()))
  return m.eval()


def test_square_kernel_stored_out_in_matches_peft_only_with_apply_fn(torch_peft, torch_style,
                                                                     tmp_path):
  """proj is square and stored (out, in), like HF Flax GPT-2's c_proj: guessing (in, out) put
  the adapter in transposed with no error. With apply_fn it matches PEFT; without, it is refused."""
  torch, peft = torch_peft
  model, variables, x = torch_style
  torch.manual_seed(0)
  twin = _torch_style(torch, variables)
  np.testing.assert_allclose(_torch_out(torch, twin, x), model.apply(variables, x), atol=1e-5)
  peft_model = peft.get_peft_model(twin, peft.LoraConfig(r=2, lora_alpha=4,
                                                         target_modules=["fc", "proj", "out"]))
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if "lora_B" in name:
        param.normal_()
  peft_model.save_pretrained(str(tmp_path / "all"))
  want = _torch_out(torch, peft_model.eval(), x)

  tree, plan = lj.import_peft(tmp_path / "all", variables, apply_fn=model.apply, args=(x,))
  saved = _read_weights(tmp_path / "all")
  for name in ("fc", "proj", "out"):  # the factors are PEFT's, transposed, bit for bit
    p = tree["params"][name]
    for f in "ab":
      np.testing.assert_array_equal(p[f"kernel_lora_{f}"],
                                    saved[f"base_model.model.{name}.lora_{f.upper()}.weight"].T)
  assert not np.allclose(want, model.apply(variables, x), atol=1e-2)
  np.testing.assert_allclose(lj.unmerged(model.apply, plan)(tree, x), want, rtol=1e-5, atol=1e-5)
  merged, torch_merged = lj.merge(plan, tree)["params"], peft_model.merge_and_unload()
  for name, as_torch in (("fc", lambda k: k.T), ("proj", lambda k: k), ("out", lambda k: k)):
    np.testing.assert_allclose(as_torch(np.asarray(merged[name]["kernel"])),
                               getattr(torch_merged, name).weight.detach().numpy(), atol=1e-6)

  with pytest.raises(ValueError, match=r"params/fc/kernel: square kernel"):
    lj.import_peft(tmp_path / "all", variables)
  _assert_orientation_refused(tmp_path / "all", variables)


def test_bf16_peft_adapter_imports_as_float32(torch_peft, mlp, tmp_path):
  """A PEFT adapter saved in bfloat16 (a bf16 torch model) reads through the safetensors
  package's numpy API with the values kept exactly."""
  torch, _ = torch_peft
  from safetensors.torch import save_file
  _, variables, _ = mlp
  pre = "base_model.model."
  tensors = {f"{pre}fc1.lora_A.weight": torch.randn(2, 8).bfloat16(),
             f"{pre}fc1.lora_B.weight": torch.randn(16, 2).bfloat16()}
  save_file(tensors, str(tmp_path / WEIGHTS), metadata={"format": "pt"})
  (tmp_path / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
  tree, plan = lj.import_peft(tmp_path, variables)
  assert plan.paths == ("params/fc1/kernel",)
  fc1 = tree["params"]["fc1"]
  assert fc1["kernel_lora_a"].dtype == jnp.float32
  for f in "ab":
    want = tensors[f"{pre}fc1.lora_{f.upper()}.weight"].float().numpy().T
    np.testing.assert_array_equal(fc1[f"kernel_lora_{f}"], want)


def test_bin_conversion_command_from_the_error_works(torch_peft, mlp, tmp_path):
  """PEFT's pickle format is refused; the one-line conversion in the message makes it loadable."""
  torch, peft = torch_peft
  model, variables, x = mlp
  torch.manual_seed(1)
  config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "head"])
  peft_model = peft.get_peft_model(_torch_mlp(torch, variables), config)
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if "lora_B" in name:
        param.normal_()
  peft_model.save_pretrained(str(tmp_path), safe_serialization=False)
  assert not (tmp_path / WEIGHTS).exists() and (tmp_path / "adapter_model.bin").exists()
  with pytest.raises(FileNotFoundError) as info:
    lj.import_peft(tmp_path, variables)
  command = str(info.value).splitlines()[-1].strip()
  assert "python -c" in command
  subprocess.run(["bash", "-c", command.replace("python -c", f"{sys.executable} -c", 1)],
                 check=True)
  tree, plan = lj.import_peft(tmp_path, variables)
  np.testing.assert_allclose(lj.unmerged(model.apply, plan)(tree, x),
                             _torch_out(torch, peft_model.eval(), x), rtol=1e-5, atol=1e-5)
