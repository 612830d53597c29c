"""PEFT's vocabulary and complete adapters: `target_modules` names and `"all-linear"`,
`modules_to_save` through every tree function and checkpoints, embedding LoRA, Conv1D export, and
`layers_to_transform`, checked against PyTorch PEFT itself."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as st
from conftest import optional

import lora_jax as lj

V, D, H, C, T = 11, 6, 8, 3, 5  # vocabulary, embedding, hidden, classes, tokens


class Classifier(nn.Module):
  """embed_tokens (V, D) -> fc (D, H) -> tanh -> mean over tokens -> proj (H, H) -> classifier."""

  @nn.compact
  def __call__(self, tokens):
    h = jnp.tanh(nn.Dense(H, name="fc")(nn.Embed(V, D, name="embed_tokens")(tokens)))
    return nn.Dense(C, name="classifier")(nn.Dense(H, name="proj")(h.mean(-2)))


KEY_MAP = {"params/embed_tokens/embedding": "embed_tokens", "params/fc/kernel": "fc",
           "params/proj/kernel": "proj", "params/classifier/kernel": "classifier"}


@pytest.fixture(scope="module")
def clf():
  model = Classifier()
  tokens = jax.random.randint(jax.random.key(0), (4, T), 0, V)
  return model, jax.jit(model.init)(jax.random.key(1), tokens), tokens


def _plan(clf, **fields):
  model, variables, tokens = clf
  return lj.plan(lj.LoraConfig(rank=2, alpha=3.0, **fields), variables, model.apply, (tokens,))


def test_target_modules_resolve_like_the_regex(clf):
  by_name = _plan(clf, target_modules=["fc", "params.proj"])
  by_regex = _plan(clf, targets=r"params/(fc|proj)/kernel")
  assert by_name.sites == by_regex.sites
  # all-linear: the dense kernels, not the embedding (a lookup) nor the head (the last use)
  assert _plan(clf, target_modules="ALL-LINEAR").sites == by_regex.sites
  config = lj.LoraConfig(target_modules=["fc"], modules_to_save=["classifier"])
  assert lj.LoraConfig.from_json(config.to_json()) == config and hash(config) == hash(
      lj.LoraConfig.from_json(config.to_json()))
  with pytest.raises(ValueError, match=r"target_modules\[0\]: 'fcc' names no module.*params/fc"):
    _plan(clf, target_modules=["fcc"])
  with pytest.raises(TypeError, match=r"target_modules: .*got the string 'fc'.*targets="):
    lj.LoraConfig(target_modules="fc")
  with pytest.raises(ValueError, match=r"params/fc/bias: selected by LoraConfig.targets but it is a "
                     r"1-D array of shape \(8,\), not a kernel"):
    _plan(clf, targets=r".*fc.*")
  with pytest.raises(ValueError, match="'all-linear' needs `apply_fn="):
    lj.plan(lj.LoraConfig(target_modules="all-linear"), clf[1])


def _random(tree, seed):
  adapters, base = lj.split(tree)
  rng = np.random.default_rng(seed)
  return lj.combine(base, jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.5, a.dtype), adapters))


@pytest.fixture(scope="module")
def adapted(clf):
  plan = _plan(clf, target_modules=["embed_tokens", "fc"], modules_to_save=["classifier"])
  return plan, _random(lj.attach(plan, clf[1], jax.random.key(2)), seed=3)


def test_modules_to_save_is_trained_in_full(clf, adapted, tmp_path):
  model, variables, tokens = clf
  plan, tree = adapted
  assert plan.saved == ("params/classifier/bias", "params/classifier/kernel")
  assert "trained in full (modules_to_save): params/classifier/bias" in str(plan)
  adapters, base = lj.split(tree)
  assert set(adapters["params"]["classifier"]) == {"kernel_lora_full", "bias_lora_full"}
  assert lj.trainable_mask(tree)["params"]["classifier"] == {
      "kernel": False, "kernel_lora_full": True, "bias": False, "bias_lora_full": True}
  # the function sees the trained copy; the merged variables hold it; strip gives the original
  copy = tree["params"]["classifier"]
  merged = lj.merge(plan, tree)
  np.testing.assert_array_equal(merged["params"]["classifier"]["kernel"], copy["kernel_lora_full"])
  assert lj.strip(tree)["params"]["classifier"]["kernel"] is variables["params"]["classifier"]["kernel"]
  np.testing.assert_allclose(lj.unmerged(model.apply, plan)(tree, tokens),
                             model.apply(merged, tokens), rtol=1e-5, atol=1e-6)
  # freeze_base trains the copy (and only adapters)
  import optax
  tx = lj.freeze_base(optax.sgd(1.0), tree)
  grads = jax.tree_util.tree_map(jnp.ones_like, tree)
  updates, _ = tx.update(grads, tx.init(tree), tree)
  new = lj.apply_updates(tree, updates)
  np.testing.assert_array_equal(new["params"]["classifier"]["bias_lora_full"],
                                copy["bias_lora_full"] - 1)
  assert new["params"]["classifier"]["bias"] is tree["params"]["classifier"]["bias"]
  # checkpoints carry the copies
  lj.save_adapter(tmp_path / "ckpt", plan, tree)
  loaded, loaded_plan = lj.load_adapter(tmp_path / "ckpt", variables)
  assert loaded_plan.saved == plan.saved
  for a, b in zip(jax.tree_util.tree_leaves(lj.split(loaded)[0]), jax.tree_util.tree_leaves(adapters)):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def torch_peft():
  torch, peft = optional("torch"), optional("peft")
  torch.set_num_threads(1)
  return torch, peft


def _torch_classifier(torch, variables, conv1d=False):
  """The same classifier in torch (Linear weight = kernel.T; a transformers Conv1D's = kernel)."""
  p = {k: {n: np.array(v) for n, v in d.items()} for k, d in variables["params"].items()}
  from transformers.pytorch_utils import Conv1D

  class TorchClassifier(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.embed_tokens = torch.nn.Embedding(V, D)
      self.fc = Conv1D(H, D) if conv1d else torch.nn.Linear(D, H)
      self.proj = Conv1D(H, H) if conv1d else torch.nn.Linear(H, H)
      self.classifier = torch.nn.Linear(H, C)

    def get_input_embeddings(self):  # how PEFT's save_embedding_layers finds the table
      return self.embed_tokens

    def get_output_embeddings(self):
      return None

    def forward(self, tokens):
      h = torch.tanh(self.fc(self.embed_tokens(tokens)))
      return self.classifier(self.proj(h.mean(-2)))

  m = TorchClassifier()
  with torch.no_grad():
    m.embed_tokens.weight.copy_(torch.from_numpy(p["embed_tokens"]["embedding"]))
    for name in ("fc", "proj", "classifier"):
      kernel = p[name]["kernel"] if conv1d and name != "classifier" else p[name]["kernel"].T
      getattr(m, name).weight.copy_(torch.from_numpy(kernel.copy()))
      getattr(m, name).bias.copy_(torch.from_numpy(p[name]["bias"]))
  return m.eval()


def _logits(torch, module, tokens):
  with torch.no_grad():
    return module(torch.from_numpy(np.array(tokens)).long()).numpy()


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_export_with_modules_to_save_and_embedding_loads_in_peft(torch_peft, clf, adapted, tmp_path,
                                                                 conv1d):
  torch, peft = torch_peft
  model, variables, tokens = clf
  plan, tree = adapted
  lj.export_peft(tmp_path, plan, tree, key_map=KEY_MAP, fan_in_fan_out=conv1d)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["modules_to_save"] == ["classifier"] and config["fan_in_fan_out"] == conv1d
  tensors = st.load_file(str(tmp_path / "adapter_model.safetensors"))
  pre = "base_model.model."
  np.testing.assert_array_equal(tensors[pre + "classifier.weight"],
                                np.asarray(tree["params"]["classifier"]["kernel_lora_full"]).T)
  emb = {k: np.asarray(v) for k, v in tree["params"]["embed_tokens"].items()}
  np.testing.assert_array_equal(tensors[pre + "embed_tokens.lora_embedding_A"], emb["embedding_lora_a"].T)
  np.testing.assert_array_equal(tensors[pre + "embed_tokens.lora_embedding_B"], emb["embedding_lora_b"].T)
  np.testing.assert_array_equal(tensors[pre + "embed_tokens.base_layer.weight"], emb["embedding"])
  peft_model = peft.PeftModel.from_pretrained(_torch_classifier(torch, variables, conv1d), tmp_path)
  want = np.asarray(lj.unmerged(model.apply, plan)(tree, tokens))
  assert not np.allclose(want, model.apply(variables, tokens), atol=1e-2)
  np.testing.assert_allclose(_logits(torch, peft_model, tokens), want, rtol=1e-5, atol=1e-6)
  merged = peft_model.merge_and_unload()
  np.testing.assert_allclose(_logits(torch, merged, tokens), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("save_embedding_layers", [False, True])
def test_peft_adapter_with_modules_to_save_and_embedding_imports(torch_peft, clf, tmp_path,
                                                                 save_embedding_layers):
  torch, peft = torch_peft
  model, variables, tokens = clf
  torch.manual_seed(0)
  config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["embed_tokens", "fc", "proj"],
                           modules_to_save=["classifier"], init_lora_weights=False,
                           layers_to_transform=None)
  peft_model = peft.get_peft_model(_torch_classifier(torch, variables), config)
  with torch.no_grad():
    for p in peft_model.base_model.model.classifier.modules_to_save.default.parameters():
      p.add_(torch.randn_like(p))
  peft_model.save_pretrained(tmp_path, save_embedding_layers=save_embedding_layers)
  with open(tmp_path / "adapter_config.json") as f:
    assert json.load(f)["modules_to_save"] == ["classifier"]
  table = "base_model.model.embed_tokens.base_layer.weight"
  assert (table in st.load_file(str(tmp_path / "adapter_model.safetensors"))) == save_embedding_layers
  tree, plan = lj.import_peft(tmp_path, variables, key_map=KEY_MAP, apply_fn=model.apply,
                              args=(tokens,))
  assert plan.saved == ("params/classifier/bias", "params/classifier/kernel")
  got = np.asarray(lj.unmerged(model.apply, plan)(tree, tokens))
  np.testing.assert_allclose(got, _logits(torch, peft_model.eval(), tokens), rtol=1e-5, atol=1e-6)
  assert not np.allclose(got, model.apply(variables, tokens), atol=1e-2)


class Layer(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(4, name="fc")(h)), None


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
        name="layers")(x, None)[0]


def test_layers_to_transform_imports_the_other_layers_as_zero(tmp_path):
  model, x = Stack(), jnp.ones((2, 4))
  variables = model.init(jax.random.key(0), x)
  key_map = lj.peft_key_map.linen(scanned=("layers",))
  plan = lj.plan(lj.LoraConfig(target_modules=["fc"], rank=2), variables, model.apply, (x,))
  tree = _random(lj.attach(plan, variables, jax.random.key(1)), seed=2)
  lj.export_peft(tmp_path, plan, tree, key_map=key_map)
  tensors = st.load_file(str(tmp_path / "adapter_model.safetensors"))
  st.save_file({k: v for k, v in tensors.items() if ".1." not in k},
               str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  config.update(layers_to_transform=[0, 2], layers_pattern="layers")
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  got, _ = lj.import_peft(tmp_path, variables, key_map=key_map, apply_fn=model.apply, args=(x,))
  for f in ("kernel_lora_a", "kernel_lora_b"):
    want = np.array(tree["params"]["layers"]["fc"][f])
    want[1] = 0
    np.testing.assert_array_equal(got["params"]["layers"]["fc"][f], want)
  config.update(layers_to_transform=None)  # then a missing layer is an error, as before
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"PEFT module 'layers.1.fc' is missing"):
    lj.import_peft(tmp_path, variables, key_map=key_map, apply_fn=model.apply, args=(x,))
