"""PEFT interop for the JAX zoos, against transformers + PEFT themselves: a tied output head
(`ensure_weight_tying`), `layers_to_transform` on export, both ways, on a tiny Llama whose JAX
forward (written here, scanned over a stacked layer axis) takes the torch model's weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as st
from conftest import optional

import lora_jax as lj

V, D, N, K, HD, F, L, T = 32, 16, 2, 1, 8, 24, 2, 5  # vocab, width, heads, kv heads, head, mlp, layers
EPS, THETA = 1e-6, 10000.0
PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj",
                                                                       "down_proj")}
KEY_MAP = {"model/embed_tokens/embedding": "model.embed_tokens",
           **{f"model/layers/{m}/{p}/kernel": f"model.layers.{{}}.{m}.{p}"
              for m, ps in PROJ.items() for p in ps}}


def _rms(x, w):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + EPS) * w


def _rope(x):  # (B, T, heads, HD), transformers' rotate_half convention
  inv = 1.0 / THETA ** (jnp.arange(0, HD, 2, dtype=jnp.float32) / HD)
  ang = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv
  cos, sin = (jnp.concatenate([f(ang)] * 2, -1)[None, :, None] for f in (jnp.cos, jnp.sin))
  x1, x2 = x[..., :HD // 2], x[..., HD // 2:]
  return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def llama(params, tokens):
  """transformers' LlamaForCausalLM (eager attention) with stacked layers and a tied head."""
  p = params["model"]
  table = p["embed_tokens"]["embedding"]
  h = table[tokens]
  b, t = tokens.shape
  causal = jnp.tril(jnp.ones((t, t), bool))

  def layer(h, w):
    a, m = w["self_attn"], w["mlp"]
    x = _rms(h, w["input_layernorm"]["scale"])
    q = _rope((x @ a["q_proj"]["kernel"]).reshape(b, t, N, HD))
    k = _rope((x @ a["k_proj"]["kernel"]).reshape(b, t, K, HD))
    v = (x @ a["v_proj"]["kernel"]).reshape(b, t, K, HD)
    k, v = jnp.repeat(k, N // K, 2), jnp.repeat(v, N // K, 2)
    s = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(HD)
    s = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), -1)
    h = h + jnp.einsum("bnqk,bknh->bqnh", s, v).reshape(b, t, N * HD) @ a["o_proj"]["kernel"]
    x = _rms(h, w["post_attention_layernorm"]["scale"])
    up = jax.nn.silu(x @ m["gate_proj"]["kernel"]) * (x @ m["up_proj"]["kernel"])
    return h + up @ m["down_proj"]["kernel"], None

  h = jax.lax.scan(layer, h, p["layers"])[0]
  return _rms(h, p["norm"]["scale"]) @ table.T


@pytest.fixture(scope="module")
def torch_peft():
  torch, peft, transformers = optional("torch"), optional("peft"), optional("transformers")
  torch.set_num_threads(1)
  return torch, peft, transformers


@pytest.fixture(scope="module")
def model(torch_peft):
  """`(make_hf, params, tokens, logits)`: a fresh tied tiny HF Llama per call (same weights), its
  weights as the stacked JAX tree, and the base logits."""
  torch, _, transformers = torch_peft
  config = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F,
                                    num_hidden_layers=L, num_attention_heads=N,
                                    num_key_value_heads=K, head_dim=HD, rms_norm_eps=EPS,
                                    rope_theta=THETA, tie_word_embeddings=True,
                                    attn_implementation="eager")
  torch.manual_seed(0)
  state = {k: v.clone() for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
  for k, v in state.items():
    if "norm" in k:  # ones by default: make the norms count
      v.uniform_(0.5, 1.5)

  def make_hf():
    m = transformers.LlamaForCausalLM(config)
    m.load_state_dict(state)
    return m.eval()

  sd = {k: v.numpy() for k, v in state.items()}
  layers = lambda name: np.stack([sd[f"model.layers.{i}.{name}"] for i in range(L)])
  tree = {"embed_tokens": {"embedding": sd["model.embed_tokens.weight"]},
          "norm": {"scale": sd["model.norm.weight"]},
          "layers": {m: {p: {"kernel": layers(f"{m}.{p}.weight").transpose(0, 2, 1)} for p in ps}
                     for m, ps in PROJ.items()}}
  for norm in ("input_layernorm", "post_attention_layernorm"):
    tree["layers"][norm] = {"scale": layers(f"{norm}.weight")}
  params = jax.tree_util.tree_map(jnp.asarray, {"model": tree})
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, T)))
  with torch.no_grad():
    want = make_hf()(torch.from_numpy(np.array(tokens))).logits.numpy()
  base = np.asarray(jax.jit(llama)(params, tokens))
  np.testing.assert_allclose(base, want, rtol=1e-5, atol=1e-5)  # the forward is HF's
  return make_hf, params, tokens, base


def _logits(torch, module, tokens):
  with torch.no_grad():
    return module(torch.from_numpy(np.array(tokens))).logits.numpy()


def _random(tree, seed, keep=None):
  """Random factors (B too, so ΔW != 0); with `keep`, layers of stacked factors outside it zero."""
  adapters, base = lj.split(tree)
  rng = np.random.default_rng(seed)

  def draw(path, a):
    x = rng.standard_normal(a.shape) * 0.3
    if keep is not None and "layers" in jax.tree_util.keystr(path):
      x[[i for i in range(L) if i not in keep]] = 0
    return jnp.asarray(x, a.dtype)

  return lj.combine(base, jax.tree_util.tree_map_with_path(draw, adapters))


def _lj(params, tokens, **fields):
  plan = lj.plan(lj.LoraConfig(rank=2, alpha=3.0, **fields), params, llama, (tokens,))
  tree = lj.attach(plan, params, jax.random.key(1))
  return plan, tree, lambda t: np.asarray(jax.jit(lj.unmerged(llama, plan))(t, tokens))


def _close(got, want):
  """1e-5 relative to the logits' scale (float32 through 2 layers and a 32-way head)."""
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_tied_head_exports_as_peft_ensure_weight_tying(torch_peft, model, tmp_path):
  torch, peft, _ = torch_peft
  make_hf, params, tokens, base = model
  plan, tree, run = _lj(params, tokens, target_modules=["embed_tokens", "q_proj", "down_proj"])
  (emb,) = [s for s in plan.sites if "embed" in s.path]
  assert tuple(map(str, emb.use)) == ("gather", "dot_general")  # the lookup and the tied head
  tree = _random(tree, seed=2)
  want = run(tree)
  assert not np.allclose(want, base, atol=1e-2)
  lj.export_peft(tmp_path, plan, tree, key_map=KEY_MAP)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["ensure_weight_tying"] is True and "lm_head" not in config["target_modules"]
  tensors = st.load_file(str(tmp_path / "adapter_model.safetensors"))
  e = "base_model.model.model.embed_tokens."
  np.testing.assert_array_equal(tensors["base_model.model.lm_head.lora_A.weight"],
                                tensors[e + "lora_embedding_B"].T)
  peft_model = peft.PeftModel.from_pretrained(make_hf(), tmp_path)
  _close(_logits(torch, peft_model, tokens), want)
  # and back: the same adapter, the head's factors checked against the embedding's
  got, got_plan = lj.import_peft(tmp_path, params, key_map=KEY_MAP, apply_fn=llama, args=(tokens,))
  assert [s.path for s in got_plan.sites] == [s.path for s in plan.sites]
  for a, b in zip(jax.tree_util.tree_leaves(lj.split(got)[0]), jax.tree_util.tree_leaves(lj.split(tree)[0])):
    np.testing.assert_array_equal(a, b)
  tensors["base_model.model.lm_head.lora_B.weight"] = tensors["base_model.model.lm_head.lora_B.weight"] + 1
  st.save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"lm_head.lora_B.weight is not .*embed_tokens.lora_embedding_A "
                     r"transposed"):
    lj.import_peft(tmp_path, params, key_map=KEY_MAP, apply_fn=llama, args=(tokens,))


def test_peft_tied_head_adapter_imports(torch_peft, model, tmp_path):
  torch, peft, _ = torch_peft
  make_hf, params, tokens, base = model
  torch.manual_seed(1)
  config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["lm_head", "v_proj", "up_proj"],
                           ensure_weight_tying=True, init_lora_weights=False)
  peft_model = peft.get_peft_model(make_hf(), config)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name and "lm_head" not in name:  # the head's are views of the embedding's
        p.normal_(0, 0.3)
  peft_model.save_pretrained(tmp_path)
  tree, plan = lj.import_peft(tmp_path, params, key_map=KEY_MAP, apply_fn=llama, args=(tokens,))
  assert {s.path for s in plan.sites} == {"model/embed_tokens/embedding", *(
      f"model/layers/{m}/kernel" for m in ("self_attn/v_proj", "mlp/up_proj"))}
  got = np.asarray(jax.jit(lj.unmerged(llama, plan))(tree, tokens))
  _close(got, _logits(torch, peft_model.eval(), tokens))
  assert not np.allclose(got, base, atol=1e-2)
  # PEFT without ensure_weight_tying adapts the head alone: no lora_jax equivalent, said so
  with pytest.warns(UserWarning, match="`ensure_weight_tying` is not set to True"):
    untied = peft.get_peft_model(make_hf(), peft.LoraConfig(r=2, target_modules=["lm_head"]))
  with pytest.warns(UserWarning, match="Setting `save_embedding_layers` to `True`"):
    untied.save_pretrained(tmp_path / "untied")
  with pytest.raises(ValueError, match=r"adapted the output head 'lm_head' on its own.*"
                     r"ensure_weight_tying=True"):
    lj.import_peft(tmp_path / "untied", params, key_map=KEY_MAP, apply_fn=llama, args=(tokens,))


def test_layers_to_transform_of_a_scanned_stack_exports_and_imports(torch_peft, model, tmp_path):
  torch, peft, _ = torch_peft
  make_hf, params, tokens, base = model
  plan, tree, run = _lj(params, tokens, target_modules=["q_proj", "gate_proj"], layers_to_transform=[1])
  q = tree["model"]["layers"]["self_attn"]["q_proj"]
  assert not np.any(q["kernel_lora_a"][0]) and np.all(q["kernel_lora_a"][1] != 0)  # attach: A = 0 off layer 1
  with pytest.raises(ValueError, match=r"gate_proj/kernel: layer \(0,\) is outside LoraConfig."
                     r"layers_to_transform \[1\] but its factors are not zero"):
    lj.export_peft(tmp_path, plan, _random(tree, seed=4), key_map=KEY_MAP)
  tree = _random(tree, seed=4, keep={1})
  want = run(tree)
  lj.export_peft(tmp_path, plan, tree, key_map=KEY_MAP)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert (config["layers_to_transform"], config["layers_pattern"]) == ([1], "layers")
  assert not any(".0." in k for k in st.load_file(str(tmp_path / "adapter_model.safetensors")))
  peft_model = peft.PeftModel.from_pretrained(make_hf(), tmp_path)
  _close(_logits(torch, peft_model, tokens), want)
  got, got_plan = lj.import_peft(tmp_path, params, key_map=KEY_MAP, apply_fn=llama, args=(tokens,))
  assert got_plan.config.layers_to_transform == (1,)
  for a, b in zip(jax.tree_util.tree_leaves(lj.split(got)[0]), jax.tree_util.tree_leaves(lj.split(tree)[0])):
    np.testing.assert_array_equal(a, b)
  # PEFT's layers_to_transform also leaves out every module outside the layers: refused, not dropped
  plan, tree, _ = _lj(params, tokens, target_modules=["embed_tokens", "q_proj"], layers_to_transform=[1])
  with pytest.raises(ValueError, match=r"embed_tokens/embedding: exported as PEFT module "
                     r"'model.embed_tokens', which PEFT's layers_to_transform \[1\] would leave out"):
    lj.export_peft(tmp_path, plan, tree, key_map=KEY_MAP)
  with pytest.raises(ValueError, match=r"layers_to_transform \[5\] goes past its stack of 2 layers"):
    _lj(params, tokens, target_modules=["q_proj"], layers_to_transform=[5])


def maxtext(params, tokens):
  """The same Llama with MaxText's names and scanned layout (layer axis 1, einsum kernels)."""
  p = params["params"]
  table = p["token_embedder"]["embedding"]
  h = table[tokens]
  b, t = tokens.shape
  causal = jnp.tril(jnp.ones((t, t), bool))

  def layer(h, w):
    a, m = w["self_attention"], w["mlp"]
    x = _rms(h, w["pre_self_attention_layer_norm"]["scale"])
    q, k, v = (jnp.einsum("btd,dnh->btnh", x, a[n]["kernel"]) for n in ("query", "key", "value"))
    q, k = _rope(q), _rope(k)
    k, v = jnp.repeat(k, N // K, 2), jnp.repeat(v, N // K, 2)
    s = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(HD)
    s = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), -1)
    h = h + jnp.einsum("btnh,nhd->btd", jnp.einsum("bnqk,bknh->bqnh", s, v), a["out"]["kernel"])
    x = _rms(h, w["post_self_attention_layer_norm"]["scale"])
    up = jax.nn.silu(x @ m["wi_0"]["kernel"]) * (x @ m["wi_1"]["kernel"])
    return h + up @ m["wo"]["kernel"], None

  layers = jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 1, 0), p["decoder"]["layers"])
  h = jax.lax.scan(layer, h, layers)[0]
  return _rms(h, p["decoder"]["decoder_norm"]["scale"]) @ table.T


def _maxtext_params(params):
  """The HF-named stacked tree in MaxText's names and shapes: `query (D, L, N, H)`, ..."""
  p = params["model"]
  at, ml = p["layers"]["self_attn"], p["layers"]["mlp"]
  heads = lambda x, n: jnp.moveaxis(x.reshape(L, D, n, HD), 0, 1)
  layers = {"self_attention": {"query": {"kernel": heads(at["q_proj"]["kernel"], N)},
                               "key": {"kernel": heads(at["k_proj"]["kernel"], K)},
                               "value": {"kernel": heads(at["v_proj"]["kernel"], K)},
                               "out": {"kernel": jnp.moveaxis(
                                   at["o_proj"]["kernel"].reshape(L, N, HD, D), 0, 1)}},
            "mlp": {n: {"kernel": jnp.moveaxis(ml[hf]["kernel"], 0, 1)}
                    for n, hf in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj"))},
            **{mt: {"scale": p["layers"][hf]["scale"].T} for mt, hf in (
                ("pre_self_attention_layer_norm", "input_layernorm"),
                ("post_self_attention_layer_norm", "post_attention_layernorm"))}}
  return {"params": {"token_embedder": {"embedding": p["embed_tokens"]["embedding"]},
                     "decoder": {"layers": layers, "decoder_norm": p["norm"]}}}


def test_maxtext_map_exports_to_peft_llama_and_back(torch_peft, model, tmp_path):
  torch, peft, _ = torch_peft
  make_hf, params, tokens, base = model
  mt = _maxtext_params(params)
  forward = jax.jit(maxtext)
  _close(np.asarray(forward(mt, tokens)), base)
  key_map = lj.peft_key_map.maxtext()
  config = lj.LoraConfig(target_modules=["query", "value", "out", "wi_0", "wo"], rank=2, alpha=3.0,
                         layout_pattern=key_map.layout_pattern, scaling="rslora")
  plan = lj.plan(config, mt, maxtext, (tokens,))
  layouts = {s.path.split("/")[-2]: s.layout.to_text() for s in plan.sites}
  assert layouts["out"] == "stack=(1) in=(0,2) out=(3)"
  tree = _random(lj.attach(plan, mt, jax.random.key(1)), seed=5)
  want = np.asarray(jax.jit(lj.unmerged(maxtext, plan))(tree, tokens))
  assert not np.allclose(want, base, atol=1e-2)
  lj.export_peft(tmp_path, plan, tree, key_map=key_map)
  peft_model = peft.PeftModel.from_pretrained(make_hf(), tmp_path)
  _close(_logits(torch, peft_model, tokens), want)
  _close(_logits(torch, peft_model.merge_and_unload(), tokens),
         np.asarray(forward(lj.merge(plan, tree), tokens)))
  got, _ = lj.import_peft(tmp_path, mt, key_map=key_map)  # the map's layouts: no apply_fn needed
  for a, b in zip(jax.tree_util.tree_leaves(lj.split(got)[0]), jax.tree_util.tree_leaves(lj.split(tree)[0])):
    np.testing.assert_array_equal(a, b)


def test_gemma_map_names_hf_gemma_modules_and_flattens_exactly(torch_peft, tmp_path):
  """gemma linen names/shapes -> HF Gemma's PEFT modules: every module and factor shape PEFT
  makes on a tiny GemmaForCausalLM, and each module's `scale·B·A` equal to the slice of lj's
  `W + ΔW - W` in torch's `(out, in)` (gating_einsum (2, F, D) is already `(out, in)` per half)."""
  torch, peft, transformers = torch_peft
  G = 2  # layers
  shapes = {"attn/q_einsum/w": (N, D, HD), "attn/kv_einsum/w": (2, K, D, HD),
            "attn/attn_vec_einsum/w": (N, HD, D), "mlp/gating_einsum": (2, F, D), "mlp/linear": (F, D)}
  rng = np.random.default_rng(6)
  base = {"transformer": {f"layer_{i}": {} for i in range(G)}}
  for i in range(G):
    for name, shape in shapes.items():
      module, leaf = name.rsplit("/", 1)
      base["transformer"][f"layer_{i}"].setdefault(module.split("/")[0], {})
      node = base["transformer"][f"layer_{i}"][module.split("/")[0]]
      node = node.setdefault(module.split("/")[1], {}) if "/" in module else node
      node[leaf] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  key_map = lj.peft_key_map.gemma()
  plan = lj.plan(lj.LoraConfig(targets=r".*(einsum/w|gating_einsum|linear)", rank=2, alpha=3.0,
                               layout_pattern=key_map.layout_pattern), base)
  tree = _random(lj.attach(plan, base, jax.random.key(1)), seed=7)
  lj.export_peft(tmp_path, plan, tree, key_map=key_map)
  tensors = st.load_file(str(tmp_path / "adapter_model.safetensors"))
  hf = transformers.GemmaForCausalLM(transformers.GemmaConfig(
      vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=G, num_attention_heads=N,
      num_key_value_heads=K, head_dim=HD))
  made = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]))
  want = {k.replace(".default", ""): tuple(v.shape) for k, v in made.state_dict().items() if "lora_" in k}
  assert {k: v.shape for k, v in tensors.items()} == want
  merged = lj.merge(plan, tree)
  delta = lambda path: np.asarray(merged["transformer"][path[0]][path[1]][path[2]]) - np.asarray(
      base["transformer"][path[0]][path[1]][path[2]])
  scale = plan.sites[0].scale
  peft_delta = lambda m: scale * tensors[f"base_model.model.{m}.lora_B.weight"] @ tensors[
      f"base_model.model.{m}.lora_A.weight"]
  pre = "model.layers.1."
  d = delta(("layer_1", "mlp", "gating_einsum"))
  np.testing.assert_allclose(peft_delta(pre + "mlp.gate_proj"), d[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(peft_delta(pre + "mlp.up_proj"), d[1], rtol=1e-5, atol=1e-6)
  kv = np.asarray(merged["transformer"]["layer_1"]["attn"]["kv_einsum"]["w"]) - np.asarray(
      base["transformer"]["layer_1"]["attn"]["kv_einsum"]["w"])  # (2, K, D, HD)
  np.testing.assert_allclose(peft_delta(pre + "self_attn.v_proj"),
                             kv[1].transpose(0, 2, 1).reshape(K * HD, D), rtol=1e-5, atol=1e-6)
  o = np.asarray(merged["transformer"]["layer_1"]["attn"]["attn_vec_einsum"]["w"]) - np.asarray(
      base["transformer"]["layer_1"]["attn"]["attn_vec_einsum"]["w"])  # (N, HD, D)
  np.testing.assert_allclose(peft_delta(pre + "self_attn.o_proj"), o.reshape(N * HD, D).T, rtol=1e-5,
                             atol=1e-6)
  got, _ = lj.import_peft(tmp_path, base, key_map=key_map)
  for a, b in zip(jax.tree_util.tree_leaves(lj.split(got)[0]), jax.tree_util.tree_leaves(lj.split(tree)[0])):
    np.testing.assert_array_equal(a, b)


E, TOPK, FE = 4, 2, 8  # experts, experts per token, expert width
MOE_TARGETS = r"layers/\d+/mlp/(gate|up|down)_proj"


def moe_block(params, x):
  """tunix Qwen3-MoE's MoE MLP (dense over experts, as its non-megablox path), as transformers'
  `Qwen3MoeSparseMoeBlock` computes it: softmax router, top-k renormalised, SiLU-gated experts."""
  m = params["layers"]["0"]["mlp"]
  top, idx = jax.lax.top_k(jax.nn.softmax(x @ m["router"]["kernel"], -1), TOPK)
  weights = (jax.nn.one_hot(idx, E) * (top / top.sum(-1, keepdims=True))[..., None]).sum(-2)
  out = jnp.zeros_like(x)
  for e in range(E):
    h = jax.nn.silu(x @ m["gate_proj"][e]) * (x @ m["up_proj"][e])
    out = out + (h @ m["down_proj"][e]) * weights[..., e:e + 1]
  return out


@pytest.fixture(scope="module")
def moe(torch_peft):
  """`(make_hf, params, x, out)`: a tiny transformers Qwen3-MoE (per call, same weights), its layer
  0's MoE block weights in tunix's names and shapes (`gate_proj (E, D, F)`, `down_proj (E, F, D)`),
  an input and the block's base output."""
  torch, _, transformers = torch_peft
  config = transformers.Qwen3MoeConfig(vocab_size=V, hidden_size=D, intermediate_size=F,
                                       moe_intermediate_size=FE, num_hidden_layers=1,
                                       num_attention_heads=N, num_key_value_heads=K, head_dim=HD,
                                       num_experts=E, num_experts_per_tok=TOPK, norm_topk_prob=True)
  torch.manual_seed(2)
  state = {k: v.clone() for k, v in transformers.Qwen3MoeForCausalLM(config).state_dict().items()}
  state["model.layers.0.mlp.gate.weight"].normal_()  # zeros by default: route for real

  def make_hf():
    m = transformers.Qwen3MoeForCausalLM(config)
    m.load_state_dict(state)
    return m.eval()

  sd = {k.removeprefix("model.layers.0.mlp."): v.numpy() for k, v in state.items()}
  gate_up = sd["experts.gate_up_proj"]  # (E, 2F, D)
  params = {"layers": {"0": {"mlp": {"router": {"kernel": sd["gate.weight"].T},
                                     "gate_proj": gate_up[:, :FE].transpose(0, 2, 1),
                                     "up_proj": gate_up[:, FE:].transpose(0, 2, 1),
                                     "down_proj": sd["experts.down_proj"].transpose(0, 2, 1)}}}}
  params = jax.tree_util.tree_map(jnp.asarray, params)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, T, D)), jnp.float32)
  base = np.asarray(jax.jit(moe_block)(params, x))
  _close(base, _block(torch, make_hf(), x))  # the same block
  return make_hf, params, x, base


def _block(torch, model, x):
  layer = model.get_decoder().layers[0] if hasattr(model, "get_decoder") else model
  with torch.no_grad():
    return layer.mlp(torch.from_numpy(np.array(x))).numpy()


def test_qwen3_moe_experts_export_to_peft_target_parameters(torch_peft, moe, tmp_path):
  torch, peft, _ = torch_peft
  make_hf, params, x, base = moe
  key_map = lj.peft_key_map.tunix("qwen3_moe")
  config = lj.LoraConfig(targets=MOE_TARGETS, rank=2, alpha=3.0, layout_pattern=key_map.layout_pattern,
                         rank_pattern={".*up_proj": 3}, alpha_pattern={".*up_proj": 5.0})
  plan = lj.plan(config, params, moe_block, (x,))
  tree = _random(lj.attach(plan, params, jax.random.key(1)), seed=8)
  want = np.asarray(jax.jit(lj.unmerged(moe_block, plan))(tree, x))
  assert not np.allclose(want, base, atol=1e-2)
  lj.export_peft(tmp_path, plan, tree, key_map=key_map)
  written = json.loads((tmp_path / "adapter_config.json").read_text())
  assert written["target_parameters"] == [f"model.layers.0.mlp.experts.{p}"
                                         for p in ("down_proj", "gate_up_proj")]
  # PEFT 0.21 checks pattern keys against module names only, so it calls the per-parameter rank and
  # alpha entries "ignored" while it applies them (`get_pattern_key` on the parameter's name)
  with pytest.warns(RuntimeWarning, match=r"(rank|alpha)_pattern keys did not match any targeted module"):
    peft_model = peft.PeftModel.from_pretrained(make_hf(), tmp_path)
  assert peft_model.base_model.model.model.layers[0].mlp.experts.base_layer.r["default"] == 5
  _close(_block(torch, peft_model.base_model.model, x), want)
  # PEFT's merge of the fused tensors is lj's merge, fused: gate_up[e] = [gate[e]ᵀ; up[e]ᵀ]
  merged = peft_model.merge_and_unload().model.layers[0].mlp.experts
  ours = lj.merge(plan, tree)["layers"]["0"]["mlp"]
  np.testing.assert_allclose(merged.gate_up_proj.detach().numpy(), np.concatenate(
      [np.asarray(ours["gate_proj"]), np.asarray(ours["up_proj"])], -1).transpose(0, 2, 1),
      rtol=1e-5, atol=1e-6)
  # and back: gate and up share PEFT's A, so the import is the same ΔW (not the same factors)
  got, got_plan = lj.import_peft(tmp_path, params, key_map=key_map)
  assert {s.path.rpartition("/")[2]: s.rank for s in got_plan.sites} == {"gate_proj": 5, "up_proj": 5,
                                                                         "down_proj": 2}
  _close(np.asarray(jax.jit(lj.unmerged(moe_block, got_plan))(got, x)), want)
  with pytest.raises(ValueError, match=r"up_proj: part of PEFT's fused parameter "
                     r"'model.layers.0.mlp.experts.gate_up_proj', .*\['layers/0/mlp/gate_proj'\]"):
    up_only = lj.plan(lj.LoraConfig(targets=r".*up_proj", layout_pattern=key_map.layout_pattern), params)
    lj.export_peft(tmp_path, up_only, lj.attach(up_only, params, jax.random.key(0)), key_map=key_map)


def test_peft_target_parameters_adapter_imports_to_tunix_experts(torch_peft, moe, tmp_path):
  torch, peft, _ = torch_peft
  make_hf, params, x, base = moe
  torch.manual_seed(3)
  config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=[], use_rslora=True,
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
  peft_model = peft.get_peft_model(make_hf(), config)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.normal_(0, 0.3)
  peft_model.save_pretrained(tmp_path)
  tree, plan = lj.import_peft(tmp_path, params, key_map=lj.peft_key_map.tunix("qwen3_moe"))
  got = np.asarray(jax.jit(lj.unmerged(moe_block, plan))(tree, x))
  _close(got, _block(torch, peft_model.base_model.model, x))
  assert not np.allclose(got, base, atol=1e-2)
