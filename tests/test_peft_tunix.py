"""`lj.peft_key_map.tunix` against the real thing: google-tunix Llama 3, Qwen 3 (dense) and Gemma 3
in JAX, the transformers PyTorch models of the same architectures with the same base weights, and
PyTorch PEFT.

The base weights are drawn for the tunix model and converted to the torch model by inverting
tunix's own HF -> tunix conversion table (`tunix.models.*.params*._get_key_and_transform_mapping`:
per torch key, the tunix path, the transpose and the reshape), not by the key maps under test.
Per model, with a tiny config (2 layers, d = 32):
- base: tunix's logits equal transformers' (the conversion and the two architectures agree),
- (a) lora_jax adapter with random nonzero factors -> `lj.export_peft` -> `PeftModel.from_pretrained`
  on the torch model: logits equal `lj.unmerged`'s, and `lj.merge`'s kernels (converted the same
  way) equal PEFT's `merge_and_unload` weights,
- (b) an adapter made by PEFT in torch (random factors) -> `lj.import_peft` onto the tunix params:
  `lj.unmerged`'s logits equal PEFT's.
Adapter features are spread over the models: rank/alpha patterns and rsLoRA (Llama 3), embedding
LoRA and `modules_to_save` (Qwen 3), Gemma 3's fused `kv_einsum` as PEFT's `k_proj` + `v_proj`
(both ways). One jitted program per model computes every JAX logit.
"""

import dataclasses
import functools
import pathlib
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import optional
from flax import nnx

import lora_jax as lj
from lora_jax._src import tree as lj_tree

torch, peft, transformers = optional("torch"), optional("peft"), optional("transformers")
with warnings.catch_warnings():
  # tunix 0.1.7 imports jax.experimental.shard_map (deprecated in JAX 0.8); not ours to fix.
  warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"tunix\.")
  optional("tunix")
  from tunix.models.gemma3 import model as gemma3
  from tunix.models.gemma3 import params_safetensors as gemma3_params
  from tunix.models.llama3 import model as llama3
  from tunix.models.llama3 import params as llama3_params
  from tunix.models.qwen3 import model as qwen3
  from tunix.models.qwen3 import params as qwen3_params

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:tunix"),
              pytest.mark.filterwarnings("ignore:'sharding' is deprecated:DeprecationWarning")]

N_LAYERS, B, T, VOCAB = 2, 1, 8, 64
D, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 32, 4, 2, 8, 64
# tunix 0.1.7's Llama 3 / Qwen 3 attention calls apply_rope without the config's rope_theta (its
# default is 1e6), so the torch models get 1e6.
ROPE_THETA = 1_000_000
FAST_COMPILE = {"xla_backend_optimization_level": 0}
RTOL = 1e-5  # relative to the largest logit
ATTN_MLP = (r"layers/\d+/(attn/(q_proj|k_proj|v_proj|o_proj|q_einsum|q?kv_einsum|attn_vec_einsum)/w"
            r"|mlp/\w+_proj/kernel)")


@dataclasses.dataclass(frozen=True)
class Model:
  build: Callable[[], nnx.Module]  # the tunix model (under nnx.eval_shape)
  torch_model: Callable[[], Any]  # the transformers model, random weights
  conversion: dict[str, Any]  # tunix's {torch key regex: (tunix key, (permute, reshape) | None)}
  key_map: lj.peft_key_map.KeyMap
  export: dict[str, Any]  # LoraConfig fields of the lora_jax adapter exported
  peft_config: dict[str, Any]  # peft.LoraConfig fields of the torch adapter imported


HF_SIZES = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=HIDDEN, num_hidden_layers=N_LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                attn_implementation="eager")


def _llama_like(name, tunix_model, params, hf_config, hf_model, eps, export, peft_config):
  """Llama 3 and the dense Qwen 3: the same sizes and names in tunix and transformers."""
  cfg = tunix_model.ModelConfig(num_layers=N_LAYERS, vocab_size=VOCAB, embed_dim=D, hidden_dim=HIDDEN,
                                num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=KV_HEADS,
                                rope_theta=ROPE_THETA, norm_eps=eps)
  hf = hf_config(**HF_SIZES, rms_norm_eps=eps, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
  build = getattr(tunix_model, name.capitalize())  # llama3.Llama3, qwen3.Qwen3
  return Model(lambda: build(cfg, rngs=nnx.Rngs(0)), lambda: hf_model(hf),
               params._get_key_and_transform_mapping(cfg), lj.peft_key_map.tunix(name), export,
               peft_config)


def _llama():
  return _llama_like(
      "llama3", llama3, llama3_params, transformers.LlamaConfig, transformers.LlamaForCausalLM, 1e-5,
      dict(targets=ATTN_MLP, rank=4, alpha=8.0, rank_pattern={r".*/o_proj/w": 2},
           alpha_pattern={r".*/mlp/down_proj/kernel": 3.0}),
      dict(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"o_proj": 2, "gate_proj": 3},
           alpha_pattern={"v_proj": 5}, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"]))


def _qwen3():
  return _llama_like(
      "qwen3", qwen3, qwen3_params, transformers.Qwen3Config, transformers.Qwen3ForCausalLM, 1e-6,
      dict(targets=r"embedder/input_embedding|layers/\d+/attn/(q|v)_proj/w|layers/1/mlp/up_proj/kernel",
           rank=3, alpha=5.0, scaling="rslora", modules_to_save=["lm_head"]),
      dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "k_proj", "o_proj", "down_proj"],
           modules_to_save=["lm_head"]))


def _gemma3(kv_heads=KV_HEADS):
  # Both layers are local sliding-window layers (tunix's and transformers' patterns start with
  # five), window 4 < T. With kv_heads == HEADS, tunix fuses q/k/v into one qkv_einsum.
  cfg = gemma3.ModelConfig(num_layers=N_LAYERS, num_embed=VOCAB, embed_dim=D, hidden_dim=HIDDEN,
                           num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=kv_heads,
                           sliding_window_size=4, param_dtype=jnp.float32)
  hf = transformers.Gemma3TextConfig(**{**HF_SIZES, "num_key_value_heads": kv_heads}, rms_norm_eps=1e-6,
                                     sliding_window=4, query_pre_attn_scalar=HEAD_DIM,
                                     hidden_activation="gelu_pytorch_tanh")
  key_map = lj.peft_key_map.tunix("gemma3", qkv_einsum=kv_heads == HEADS)
  return Model(
      lambda: gemma3.Gemma3(cfg, rngs=nnx.Rngs(0)), lambda: transformers.Gemma3ForCausalLM(hf),
      gemma3_params._get_key_and_transform_mapping(cfg), key_map,
      dict(targets=ATTN_MLP, rank=2, alpha=4.0, layout_pattern=key_map.layout_pattern,
           rank_pattern={r".*/q?kv_einsum/w": 3}),
      dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]))


MODELS = {"llama3": _llama, "qwen3": _qwen3, "gemma3": _gemma3}


def _inputs():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
  causal = np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T)).copy()
  return tokens, positions, causal


def _fill(abstract, rng, std=0.2):
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray((rng.standard_normal(x.shape) * std).astype(x.dtype)), abstract)


def _to_torch(model: Model, state, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
  """The torch state dict (keys and shapes of `shapes`) holding `state`'s weights, by tunix's
  table run backwards: a tunix value is `torch.permute(p).reshape(r)`, so the torch tensor is
  `value.reshape(permuted shape)` with the permutation undone. Gemma 3's q/k/v go through
  tunix's `tmp.*` names into `q_einsum (N, D, H)` / `kv_einsum (2, K, D, H)`, from `(D, ·, H)`."""
  flat = {p.replace("/", "."): np.asarray(lj_tree.unbox(x)) for p, x in lj_tree.flatten(state).items()}
  for layer in range(N_LAYERS):
    attn = f"layers.{layer}.attn."
    if attn + "q_einsum.w" in flat:
      flat[f"tmp.{attn}q"] = flat[attn + "q_einsum.w"].transpose(1, 0, 2)
      flat[f"tmp.{attn}k"], flat[f"tmp.{attn}v"] = flat[attn + "kv_einsum.w"].transpose(0, 2, 1, 3)
    if attn + "qkv_einsum.w" in flat:  # tunix stacks [q, k, v], each (N, D, H)
      qkv = flat[attn + "qkv_einsum.w"].transpose(0, 2, 1, 3)
      flat[f"tmp.{attn}q"], flat[f"tmp.{attn}k"], flat[f"tmp.{attn}v"] = qkv
  out = {}
  for key, shape in shapes.items():
    found = [(m, target, rule) for pat, (target, rule) in model.conversion.items()
             if (m := re.fullmatch(pat, key))]
    assert len(found) == 1, (key, found)
    m, target, rule = found[0]
    name = m.expand(target)
    if name == "unused.lm_head.weight":  # Gemma 3 ties its head to the embedding
      name = "embedder.input_embedding"
    value = flat[name]
    if rule is not None:
      permute, _ = rule
      value = value.reshape([shape[p] for p in permute]).transpose(np.argsort(permute))
    assert value.shape == shape, (key, name, value.shape, shape)
    out[key] = torch.from_numpy(np.array(value, copy=True, order="C"))
  return out


def _torch_model(model: Model, state):
  torch.manual_seed(0)
  module = model.torch_model().eval()
  shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
  module.load_state_dict(_to_torch(model, state, shapes))
  return module


def _torch_logits(module, tokens):
  with torch.no_grad():
    return module(input_ids=torch.from_numpy(tokens).long()).logits.numpy()


def _random_adapters(plan, state, rng):
  """`state` with random nonzero factors for `plan`, and trained copies of its modules_to_save
  leaves that differ from the base (numpy draws: `lj.attach`'s initialisers would compile a
  program per shape)."""
  adapters = {}
  for s in plan.sites:
    for suffix, shape in (("_lora_a", s.a_shape), ("_lora_b", s.b_shape)):
      adapters[s.path + suffix] = jnp.asarray(rng.standard_normal(shape) * 0.3, s.factor_dtype)
  leaves = lj_tree.flatten(state)
  for path in plan.saved:
    adapters[path + "_lora_full"] = lj_tree.unbox(leaves[path]) + 0.1
  return lj.combine(state, adapters)


def _peft_adapter(model: Model, state, directory):
  """A PEFT adapter made in torch with random factors (and modules_to_save copies), saved to
  `directory`; returns its logits."""
  module = peft.get_peft_model(_torch_model(model, state), peft.LoraConfig(**model.peft_config))
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "lora_" in name or "modules_to_save" in name:
        p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
  # PEFT's "auto" saves a targeted embedding's base table too (with a warning): asked for outright
  module.save_pretrained(str(directory), save_embedding_layers="embed_tokens" in str(model.peft_config))
  return _torch_logits(module.eval(), _inputs()[0])


def _build(model: Model):
  """`(state, fn, args, rng)`: the tunix model's random params, its forward `fn(state, *args)` and
  the inputs (tokens, positions, causal mask); `fn.graphdef` is the model's graph."""
  graphdef, abstract = nnx.split(nnx.eval_shape(model.build))
  rng = np.random.default_rng(1)
  state = _fill(abstract, rng)
  fn = lambda s, *a: nnx.merge(graphdef, s)(*a[:2], None, a[2])[0]  # (tokens, positions, cache, mask)
  fn.graphdef = graphdef
  return state, fn, tuple(jnp.asarray(x) for x in _inputs()), rng


@functools.cache
def _setup(name, directory):
  """Everything one model's tests check, computed once: the tunix params, the plans and trees of
  the exported (a) and imported (b) adapters, the JAX logits (one program) and the torch ones."""
  model = MODELS[name]()
  state, fn, args, rng = _build(model)
  plan_a = lj.plan(lj.LoraConfig(**model.export), state, fn, args)
  tree_a = _random_adapters(plan_a, state, rng)
  lj.export_peft(directory / "a", plan_a, tree_a, key_map=model.key_map)
  torch_b = _peft_adapter(model, state, directory / "b")
  tree_b, plan_b = lj.import_peft(directory / "b", state, key_map=model.key_map, apply_fn=fn,
                                  args=args)

  def forward(state, tree_a, tree_b, args):
    return (fn(state, *args), lj.unmerged(fn, plan_a)(tree_a, *args),
            lj.unmerged(fn, plan_b)(tree_b, *args))
  jax_logits = [np.asarray(y) for y in jax.jit(forward, compiler_options=FAST_COMPILE)(
      state, tree_a, tree_b, args)]
  return model, state, plan_a, tree_a, plan_b, jax_logits, torch_b


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("peft_tunix")


def _close(got, want, what):
  scale = float(np.max(np.abs(want)))
  np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * scale, err_msg=what)


NAMES = list(MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_base_logits_equal_transformers(name, workdir):
  model, state, *_, (base, _, _), _ = _setup(name, workdir / name)
  _close(base, _torch_logits(_torch_model(model, state), _inputs()[0]), name)


@pytest.mark.parametrize("name", NAMES)
def test_exported_adapter_loads_in_peft(name, workdir):
  model, state, plan_a, tree_a, _, (base, ours, _), _ = _setup(name, workdir / name)
  assert float(np.max(np.abs(ours - base))) > 0.1 * float(np.max(np.abs(base))), "adapter is a no-op"
  loaded = peft.PeftModel.from_pretrained(_torch_model(model, state), str(workdir / name / "a")).eval()
  _close(ours, _torch_logits(loaded, _inputs()[0]), name)
  _merged_close(model, plan_a, tree_a, loaded.merge_and_unload())


@pytest.mark.parametrize("name", NAMES)
def test_peft_adapter_imports_onto_tunix(name, workdir):
  _, _, _, _, plan_b, (base, _, ours), torch_b = _setup(name, workdir / name)
  assert float(np.max(np.abs(torch_b - base))) > 0.1 * float(np.max(np.abs(base))), "adapter is a no-op"
  _close(ours, torch_b, name)
  assert plan_b.sites


def _merged_close(model, plan, tree, peft_merged):
  """`lj.merge`'s kernels, converted as the base weights are, equal PEFT's merged weights."""
  want = peft_merged.state_dict()
  # one program (eager, lj.merge compiles an XLA program per op and shape: seconds here)
  merged = jax.jit(functools.partial(lj.merge, plan), compiler_options=FAST_COMPILE)(tree)
  ours = _to_torch(model, merged, {k: tuple(v.shape) for k, v in want.items()})
  assert ours.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_allclose(ours[key].numpy(), value.numpy(), rtol=1e-6, atol=1e-6, err_msg=key)


def test_gemma3_qkv_einsum_exports_as_tunix_converts(tmp_path):
  """Gemma 3 with as many KV heads as query heads: `qkv_einsum (3, N, D, H)` per layer, exported
  as PEFT's q_proj / k_proj / v_proj (its fused axis a stack axis by the map's layout_pattern).
  Checked through weights (no forward compile): PEFT's merge_and_unload equals lj.merge run through
  tunix's conversion, and the import takes the file back bit for bit."""
  model = _gemma3(kv_heads=HEADS)
  state, fn, args, rng = _build(model)
  plan = lj.plan(lj.LoraConfig(**model.export), state, fn, args)
  fused = [s for s in plan.sites if s.path.endswith("qkv_einsum/w")]
  assert len(fused) == N_LAYERS and all(s.layout.stack_axes == (0,) for s in fused), str(plan)
  tree = _random_adapters(plan, state, rng)
  lj.export_peft(tmp_path, plan, tree, key_map=model.key_map)
  loaded = peft.PeftModel.from_pretrained(_torch_model(model, state), str(tmp_path))
  modules = set(loaded.peft_config["default"].target_modules)
  assert {f"model.layers.{i}.self_attn.{p}_proj" for i in range(N_LAYERS) for p in "qkv"} <= modules
  _merged_close(model, plan, tree, loaded.merge_and_unload())
  got, got_plan = lj.import_peft(tmp_path, state, key_map=model.key_map, apply_fn=fn, args=args)
  assert got_plan.sites == plan.sites
  want, got = lj_tree.flatten(lj.split(tree)[0]), lj_tree.flatten(lj.split(got)[0])
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)


def test_readme_tunix_snippet_exports_what_peft_serves(tmp_path, monkeypatch):
  """The README's "Train in JAX, serve with vLLM/transformers" code, run as written on a tiny
  tunix Gemma 3 (`train` draws random factors): PEFT loads the adapter it exports onto the
  transformers model, `merge_and_unload` equals `lj.merge`, and the import takes it back exactly."""
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  heading = "### Train in JAX, serve with vLLM/transformers"
  code = re.search(r"```python\n(.*?)```", text.split(heading, 1)[1], re.S).group(1)
  assert len(code.strip().splitlines()) <= 10
  model = _gemma3()
  state, fn, (tokens, positions, mask), rng = _build(model)
  namespace = dict(lj=lj, jax=jax, nnx=nnx, model=nnx.merge(fn.graphdef, state), tokens=tokens,
                   positions=positions, mask=mask,
                   train=lambda fn, plan, tree: _random_adapters(plan, lj.split(tree)[1], rng))
  monkeypatch.chdir(tmp_path)
  exec(compile(code, f"README.md:{heading}", "exec"), namespace)
  plan, tree = namespace["plan"], namespace["tree"]
  assert any(s.path.endswith("kv_einsum/w") for s in plan.sites)
  loaded = peft.PeftModel.from_pretrained(_torch_model(model, state), str(tmp_path / "adapter"))
  _merged_close(model, plan, tree, loaded.merge_and_unload())
  assert namespace["back_plan"].sites == plan.sites
  want, got = (lj_tree.flatten(lj.split(t)[0]) for t in (tree, namespace["back"]))
  assert want.keys() == got.keys() and all(np.array_equal(got[p], want[p]) for p in want)


def test_templates_map_both_ways_and_name_what_does_not_fit():
  km = lj.peft_key_map.templates({
      "blocks/{i}/attn/q/w": "model.layers.{i}.self_attn.q_proj",  # unstacked, per-layer list
      "params/scan/fc/kernel": "model.layers.{}.mlp.fc",  # stacked (L, in, out)
      "blocks/{i}/attn/kv/w": ("model.layers.{i}.k.{}", "model.layers.{i}.v.{}"),  # fused + stack
  })
  cases = {("blocks/12/attn/q/w", ()): "model.layers.12.self_attn.q_proj",
           ("params/scan/fc/kernel", (3,)): "model.layers.3.mlp.fc",
           ("blocks/2/attn/kv/w", (1, 4)): "model.layers.2.v.4"}
  for (path, index), module in cases.items():
    assert km.to_peft(path, index) == module
    assert km.from_peft(module) == (path, index)
  assert km.to_peft("blocks/1/attn/o/w", ()) is None and km.from_peft("model.layers.1.o") is None
  with pytest.raises(ValueError, match=r"blocks/2/attn/kv/w: a fused kernel .*layout_pattern"):
    km.to_peft("blocks/2/attn/kv/w", ())
  with pytest.raises(ValueError, match=r"params/scan/fc/kernel: layer index \(1, 2\) does not fit"):
    km.to_peft("params/scan/fc/kernel", (1, 2))
  with pytest.raises(ValueError, match=r"blocks/2/attn/kv/w: layer index \(2, 0\) does not fit"):
    km.to_peft("blocks/2/attn/kv/w", (2, 0))
  with pytest.raises(ValueError, match=r"'a/{i}/w' -> 'a.{j}': the module template must hold"):
    lj.peft_key_map.templates({"a/{i}/w": "a.{j}"})
  with pytest.raises(ValueError, match=r"'a/{}/w': a path template takes named fields"):
    lj.peft_key_map.templates({"a/{}/w": "a.{}"})


def test_tunix_maps_name_every_kernel_and_refuse_unknown_models():
  llama = lj.peft_key_map.tunix("llama3")
  assert llama.to_peft("layers/5/attn/o_proj/w", ()) == "model.layers.5.self_attn.o_proj"
  assert llama.from_peft("lm_head") == ("lm_head/w", ()) and not llama.layout_pattern
  # a 2-D leaf is torch's weight transposed, except the embedding table (torch stores it (V, D))
  assert llama.is_transposed("lm_head/w") and not llama.is_transposed("embedder/input_embedding")
  gemma = lj.peft_key_map.tunix("gemma3")
  assert gemma.from_peft("model.layers.1.self_attn.v_proj") == ("layers/1/attn/kv_einsum/w", (1,))
  assert gemma.from_peft("model.layers.1.self_attn.q_proj") == ("layers/1/attn/q_einsum/w", ())
  qkv = lj.peft_key_map.tunix("gemma3", qkv_einsum=True)
  assert qkv.from_peft("model.layers.1.self_attn.q_proj") == ("layers/1/attn/qkv_einsum/w", (0,))
  config = lj.LoraConfig(targets=".*", layout_pattern=qkv.layout_pattern)
  assert config.layout_for("layers/7/attn/qkv_einsum/w") == lj.Layout((0,), (2,), (1, 3))
  with pytest.raises(ValueError,
                     match=r"model must be one of \['gemma3', 'llama3', 'qwen3', 'qwen3_moe'\], got 'gpt2'"):
    lj.peft_key_map.tunix("gpt2")
  with pytest.raises(ValueError, match="qkv_einsum is a Gemma 3 layout"):
    lj.peft_key_map.tunix("qwen3", qkv_einsum=True)
