"""The reference LM in PyTorch, with PEFT's LoRA (`peft.LoraConfig` + `get_peft_model`).

Same architecture, shapes and math as `common.LM`: pre-LN blocks (LayerNorm eps 1e-6), causal
softmax attention with `1/sqrt(hd)` scaling, tanh-GELU MLP 4x, learned positions, untied head.
`nn.Linear` stores `(out, in)`, so `from_flax` loads the linen kernels transposed (attention
kernels flattened to `(D, H·hd)` / `(H·hd, D)` first). PEFT's `lora_A` is `(r, in)` and `lora_B`
is `(out, r)` with scale `lora_alpha / r`, the same scale as lora_jax; `load_adapters` copies a
lora_jax tree's factors in, so both compute the same function.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import numpy as np

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError:  # the benchmark prints "n/a (not installed)"
  torch = None
try:
  import peft
except ImportError:
  peft = None

KINDS = ("query", "key", "value", "out", "fc1", "fc2")


def missing() -> str | None:
  """Why this alternative cannot run here, or None."""
  if torch is None or peft is None:
    return "n/a (not installed)"
  return None


if torch is not None:
  class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
      super().__init__()
      self.heads = heads
      self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      b, s, d = x.shape
      heads = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
      h = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)),
                                         heads(self.value(x)), is_causal=True)
      return self.out(h.transpose(1, 2).reshape(b, s, d))

  class Block(nn.Module):
    def __init__(self, d: int, heads: int):
      super().__init__()
      self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
      self.attn = Attention(d, heads)
      self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      x = x + self.attn(self.ln1(x))
      return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

  class LM(nn.Module):
    """`tokens (B, S) long -> logits (B, S, vocab)`."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, max_len: int):
      super().__init__()
      self.embed = nn.Embedding(vocab, d)
      self.pos_embed = nn.Parameter(torch.zeros(max_len, d))
      self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
      self.ln_f = nn.LayerNorm(d, eps=1e-6)
      self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
      x = self.embed(tokens) + self.pos_embed[: tokens.shape[1]]
      for block in self.blocks:
        x = block(x)
      return self.lm_head(self.ln_f(x))


def _t(x: Any) -> "torch.Tensor":
  return torch.from_numpy(np.array(x, dtype=np.float32))


def _linear(layer: "nn.Linear", kernel: Any, bias: Any | None, n_in: int) -> None:
  k = np.asarray(kernel, np.float32)
  layer.weight.copy_(_t(k.reshape(math.prod(k.shape[:n_in]), -1).T))
  if bias is not None:
    layer.bias.copy_(_t(np.asarray(bias).reshape(-1)))


def from_flax(args: Any, variables: Any) -> "nn.Module":
  """A float32 `LM` holding the base weights of the linen variables (`common.LM` layout)."""
  model = LM(args.vocab, args.d_model, args.heads, args.layers, args.seq)
  p = variables["params"]
  with torch.no_grad():
    model.embed.weight.copy_(_t(p["embed"]["embedding"]))
    model.pos_embed.copy_(_t(p["pos_embed"]))
    for ln, src in [(model.ln_f, p["ln_f"])] + [
        (getattr(model.blocks[i], n), p[f"block_{i}"][n])
        for i in range(args.layers) for n in ("ln1", "ln2")]:
      ln.weight.copy_(_t(src["scale"]))
      ln.bias.copy_(_t(src["bias"]))
    _linear(model.lm_head, p["lm_head"]["kernel"], None, 1)
    for i, block in enumerate(model.blocks):
      for kind in KINDS:
        src = p[f"block_{i}"]["attn"][kind] if kind in KINDS[:4] else p[f"block_{i}"][kind]
        dst = getattr(block.attn, kind) if kind in KINDS[:4] else getattr(block, kind)
        _linear(dst, src["kernel"], src["bias"], 2 if kind == "out" else 1)
  return model


def peft_model(model: "nn.Module", rank: int, alpha: float) -> "nn.Module":
  """`get_peft_model` with `LoraConfig(r=rank, lora_alpha=alpha, target_modules=[query, key,
  value, out, fc1, fc2])` (no dropout): base frozen, only `lora_A` / `lora_B` trainable."""
  config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(KINDS))
  return peft.get_peft_model(model, config)


def load_adapters(pmodel: "nn.Module", tree: Any, layers: int, name: str = "default") -> None:
  """Copy a lora_jax tree's factors into the PEFT model's adapter `name`: `lora_A = Aᵀ` `(r, in)`,
  `lora_B = Bᵀ` `(out, r)` (A `(*in, r)` and B `(r, *out)` flattened to 2-D first)."""
  p = tree["params"]
  base = pmodel.base_model.model
  with torch.no_grad():
    for i in range(layers):
      for kind in KINDS:
        src = p[f"block_{i}"]["attn"][kind] if kind in KINDS[:4] else p[f"block_{i}"][kind]
        dst = (getattr(base.blocks[i].attn, kind) if kind in KINDS[:4]
               else getattr(base.blocks[i], kind))
        a = np.asarray(src["kernel_lora_a"], np.float32)
        b = np.asarray(src["kernel_lora_b"], np.float32)
        a = a.reshape(-1, a.shape[-1])
        b = b.reshape(b.shape[0], -1)
        dst.lora_A[name].weight.copy_(_t(a.T))
        dst.lora_B[name].weight.copy_(_t(b.T))


def merged_copy(pmodel: "nn.Module") -> "nn.Module":
  """A deep copy of the PEFT model with the adapters merged in (`merge_and_unload`)."""
  return copy.deepcopy(pmodel).merge_and_unload()


def loss_fn(logits: "torch.Tensor", tokens: "torch.Tensor") -> "torch.Tensor":
  """Next-token cross-entropy, as `common.xent`."""
  return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train_step(model: "nn.Module", lr: float) -> Callable[["torch.Tensor"], "torch.Tensor"]:
  """`tokens -> loss`: forward, backward, `torch.optim.AdamW` on the trainable (LoRA) parameters
  only, with optax.adamw's defaults (betas 0.9/0.999, eps 1e-8, weight decay 1e-4)."""
  params = [q for q in model.parameters() if q.requires_grad]
  opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)

  def step(tokens):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(tokens), tokens)
    loss.backward()
    opt.step()
    return loss.detach()
  return step


def forward(model: "nn.Module") -> Callable[["torch.Tensor"], "torch.Tensor"]:
  """`tokens -> logits` under `torch.inference_mode()`."""
  def fwd(tokens):
    with torch.inference_mode():
      return model(tokens)
  return fwd
