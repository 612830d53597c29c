"""Ready PEFT key maps for the JAX LLM zoos, and the template engine they are written in.

A zoo model's kernels are named by its own code (google-tunix: `layers/3/attn/q_proj/w`); the
PyTorch model PEFT adapts names them as Hugging Face transformers does
(`model.layers.3.self_attn.q_proj`). `templates({...})` turns a table of such name pairs into a
`KeyMap` that works both ways:

- `{i}` (any `{name}`) in a path template is a per-layer index in the *path* (an unstacked list of
  layers, as tunix's `layers/0/...`, `layers/1/...`); the module template holds the same `{i}`.
- `{}` in a module template is an index of a *stack axis* of the kernel (a scanned layer axis, as
  `peft_key_map.from_dict` has it), in stack-axis order.
- A tuple of module templates is a fused kernel: its first stack axis indexes the tuple (gemma's
  `kv_einsum (2, K, D, H)` -> `(k_proj, v_proj)`). PEFT has one `Linear` per projection, each with
  its own `lora_A`/`lora_B`, so the fused axis must be a stack axis of the plan: the map's
  `layout_pattern` says so (`stack=(0) in=(2) out=(1,3)`), to be given to `LoraConfig` for export
  (`lj.import_peft` applies it by itself).

The flattening of multi-axis kernels is C order over the layout's in and out axes (peft.py), which
is exactly how transformers reshapes a projection's output (`view(..., heads, head_dim)`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .peft import KeyMap, peft_key_map

_FIELD = re.compile(r"\{(\w*)\}")


def _regex(template: str) -> re.Pattern[str]:
  """`template` as a regex: `{name}` a named group of digits, `{}` an unnamed one (in order)."""
  parts, last = [], 0
  for m in _FIELD.finditer(template):
    parts.append(re.escape(template[last:m.start()]))
    parts.append(rf"(?P<{m[1]}>\d+)" if m[1] else r"(\d+)")
    last = m.end()
  return re.compile("".join(parts) + re.escape(template[last:]))


def _fill(template: str, named: Mapping[str, str], stack: Sequence[int]) -> str:
  """`template` with `{name}` from `named` (as ints: no leading zeros) and `{}` from `stack`."""
  rest = iter(stack)
  return _FIELD.sub(lambda m: str(int(named[m[1]]) if m[1] else next(rest)), template)


def _stack_slots(template: str) -> int:
  return sum(1 for m in _FIELD.finditer(template) if not m[1])


def templates(mapping: Mapping[str, str | Sequence[str]], *,
              layout_pattern: Mapping[str, str] | None = None,
              untransposed: Sequence[str] = (),
              experts: Mapping[str, tuple[str, int, int]] | None = None,
              expert_params: Sequence[str] = ()) -> KeyMap:
  """A `KeyMap` from name templates.

  Args:
    mapping: `{path template: module template}`. `{i}` (any `{name}`) stands for digits in both
      (a layer of an unstacked list: `"layers/{i}/attn/q_proj/w": "model.layers.{i}.self_attn.
      q_proj"`); `{}` in the module stands for the kernel's stack indices in order (a stacked
      kernel `(L, ...)`: `"model.layers.{}.mlp.fc1"`). A tuple of module templates is a fused
      kernel whose first stack axis picks the module (`("...k_proj", "...v_proj")`).
    layout_pattern: `{regex: "stack=(..) in=(..) out=(..)"}` layouts the map needs (the fused
      kernels'), as `LoraConfig.layout_pattern`; kept on the map as `key_map.layout_pattern`.
    untransposed: regexes (fullmatch) of 2-D leaves stored as torch stores them (an embedding
      table `(V, D)`); every other 2-D leaf is `(in, out)`, torch's weight transposed. Used for
      `modules_to_save` leaves.
    experts: `{path template: (parameter template, part, parts)}`: MoE expert kernels
      `(E, in, out)` that are part `part` of `parts` fused along the out axis of a PEFT
      `target_parameters` tensor (`"layers/{i}/mlp/gate_proj": ("model.layers.{i}.mlp.experts.
      gate_up_proj", 0, 2)`).
    expert_params: the expert module's parameter names in torch's registration order
      (`("gate_up_proj", "down_proj")`), which PEFT's wrapper nesting follows.

  Returns:
    The `KeyMap`.

  Raises:
    ValueError: naming the template, for a module template whose `{name}` fields differ from its
      path template's.
  """
  entries = []
  for path, modules in mapping.items():
    fused = not isinstance(modules, str)
    names = tuple(modules) if fused else (modules,)
    fields = {m[1] for m in _FIELD.finditer(path)}
    if "" in fields:
      raise ValueError(f"peft_key_map.templates: {path!r}: a path template takes named fields "
                       f"({{i}}) only; '{{}}' (a stack index) belongs in the module template")
    for name in names:
      if {m[1] for m in _FIELD.finditer(name)} - {""} != fields:
        raise ValueError(f"peft_key_map.templates: {path!r} -> {name!r}: the module template must "
                         f"hold the same named fields {sorted(fields)}")
    entries.append((path, _regex(path), names, fused, [_regex(n) for n in names]))
  keep = [re.compile(p) for p in untransposed]

  def to_peft(path: str, index: tuple[int, ...]) -> str | None:
    for template, pattern, names, fused, _ in entries:
      found = pattern.fullmatch(path)
      if found is None:
        continue
      if fused and not index:
        raise ValueError(f"{path}: a fused kernel of the PEFT modules {list(names)}; plan it with "
                         f"its fused axis as a stack axis (LoraConfig(layout_pattern=key_map."
                         f"layout_pattern)) so each module gets its own factors")
      rest = index[1:] if fused else index
      name = names[index[0]] if fused and index[0] < len(names) else names[0]
      if fused and index[0] >= len(names) or _stack_slots(name) != len(rest):
        raise ValueError(f"{path}: layer index {index} does not fit the module template(s) "
                         f"{list(names)} of {template!r} (one '{{}}' per stack axis"
                         f"{', after the fused one' if fused else ''})")
      return _fill(name, found.groupdict(), rest)
    return None

  def from_peft(module: str) -> tuple[str, tuple[int, ...]] | None:
    for template, _, _, fused, patterns in entries:
      for k, pattern in enumerate(patterns):
        found = pattern.fullmatch(module)
        if found is None:
          continue
        named = found.groupdict()
        stack = tuple(int(g) for j, g in enumerate(found.groups(), 1)
                      if j not in pattern.groupindex.values())
        path = _fill(template, named, ())
        return path, ((k,) if fused else ()) + stack
    return None

  def transposed(path: str) -> bool:
    return not any(p.fullmatch(path) for p in keep)

  expert_entries = [(_regex(p), param, part, parts) for p, (param, part, parts) in (experts or {}).items()]

  def to_expert(path: str) -> tuple[str, int, int] | None:
    for pattern, param, part, parts in expert_entries:
      found = pattern.fullmatch(path)
      if found:
        return _fill(param, found.groupdict(), ()), part, parts
    return None

  def from_expert(param: str) -> list[str] | None:
    paths: dict[int, str] = {}
    for (template, _), (_, name, part, _) in zip((experts or {}).items(), expert_entries):
      found = _regex(name).fullmatch(param)
      if found:
        paths[part] = _fill(template, found.groupdict(), ())
    return [paths[k] for k in sorted(paths)] or None

  leaves = {p.rpartition("/")[2] for p in mapping}
  return KeyMap(to_peft, from_peft, leaves.pop() if len(leaves) == 1 else "kernel",
                layout_pattern=dict(layout_pattern or {}), transposed=transposed,
                experts=to_expert if experts else None, from_experts=from_expert if experts else None,
                expert_params=tuple(expert_params))


_ATTN = "model.layers.{i}.self_attn."
_MLP = {f"layers/{{i}}/mlp/{p}/kernel": f"model.layers.{{i}}.mlp.{p}"
        for p in ("gate_proj", "up_proj", "down_proj")}
_EMBED = {"embedder/input_embedding": "model.embed_tokens"}
_TUNIX = {
    "llama3": {**_EMBED, **{f"layers/{{i}}/attn/{p}/w": _ATTN + p
                            for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
               **_MLP, "lm_head/w": "lm_head"},
    "gemma3": {**_EMBED, "layers/{i}/attn/q_einsum/w": _ATTN + "q_proj",
               "layers/{i}/attn/kv_einsum/w": (_ATTN + "k_proj", _ATTN + "v_proj"),
               "layers/{i}/attn/attn_vec_einsum/w": _ATTN + "o_proj", **_MLP},
}
# Gemma 3 with as many KV heads as query heads: one fused q/k/v kernel instead of q and kv.
_GEMMA3_QKV = {**{k: v for k, v in _TUNIX["gemma3"].items() if "_einsum" not in k or "vec" in k},
               "layers/{i}/attn/qkv_einsum/w": (_ATTN + "q_proj", _ATTN + "k_proj", _ATTN + "v_proj")}
_TUNIX["qwen3"] = _TUNIX["llama3"]  # the dense Qwen 3: Llama 3's names (q_norm/k_norm are not kernels)
# Qwen 3 MoE: Qwen 3's attention; the experts are fused tensors in transformers 5.x
# (`Qwen3MoeExperts`: gate_up_proj (E, 2F, D), down_proj (E, D, F)), adapted by PEFT's
# `target_parameters`; the router (`mlp.gate`, a `Qwen3MoeTopKRouter`) is no module PEFT adapts
_TUNIX["qwen3_moe"] = {k: v for k, v in _TUNIX["llama3"].items() if "/mlp/" not in k}
_EXPERTS = "model.layers.{i}.mlp.experts."
_QWEN3_MOE_EXPERTS = {"layers/{i}/mlp/gate_proj": (_EXPERTS + "gate_up_proj", 0, 2),
                      "layers/{i}/mlp/up_proj": (_EXPERTS + "gate_up_proj", 1, 2),
                      "layers/{i}/mlp/down_proj": (_EXPERTS + "down_proj", 0, 1)}
# kv_einsum (2, K, D, H): 'BSD,CKDH->CBSKH'; qkv_einsum (3, N, D, H): 'BTD,SNDH->SBTNH'
_FUSED = {r"layers/\d+/attn/(kv|qkv)_einsum/w": "stack=(0) in=(2) out=(1,3)"}


def tunix(model: str, *, qkv_einsum: bool = False) -> KeyMap:
  """google-tunix (0.1.x) NNX models <-> Hugging Face transformers module names.

  Per layer `i` (tunix keeps its layers in a list: `layers/{i}/...`):

  | tunix path                                   | transformers module                     |
  |----------------------------------------------|-----------------------------------------|
  | `layers/{i}/attn/{q,k,v}_proj/w (D, N, H)`   | `model.layers.{i}.self_attn.{q,k,v}_proj` |
  | `layers/{i}/attn/o_proj/w (N, H, D)`         | `model.layers.{i}.self_attn.o_proj`     |
  | `layers/{i}/attn/q_einsum/w (N, D, H)`       | `...self_attn.q_proj` (Gemma 3)         |
  | `layers/{i}/attn/kv_einsum/w (2, K, D, H)`   | `...self_attn.k_proj`, `...v_proj`      |
  | `layers/{i}/attn/qkv_einsum/w (3, N, D, H)`  | `...q_proj`, `...k_proj`, `...v_proj`   |
  | `layers/{i}/attn/attn_vec_einsum/w (N, H, D)`| `...self_attn.o_proj` (Gemma 3)         |
  | `layers/{i}/mlp/{gate,up,down}_proj/kernel`  | `model.layers.{i}.mlp.{gate,up,down}_proj` |
  | `embedder/input_embedding (V, D)`            | `model.embed_tokens`                    |
  | `lm_head/w (D, V)` (Llama 3, Qwen 3 untied)  | `lm_head`                               |

  An einsum kernel is the `Linear` whose weight is the kernel with its in axes and its out axes
  each flattened in C order (`(D, N, H)` is `Linear(D, N·H)`, as transformers' `view(..., N, H)`),
  which is how `export_peft` flattens it. The fused Gemma 3 kernels need their fused axis as a
  stack axis: plan with `LoraConfig(..., layout_pattern=key_map.layout_pattern)`.

  Args:
    model: `"llama3"`, `"qwen3"` (dense), `"qwen3_moe"` or `"gemma3"` (text). Qwen 3 MoE's expert
      kernels `layers/{i}/mlp/{gate,up}_proj (E, D, F)` are the two halves of transformers'
      `model.layers.{i}.mlp.experts.gate_up_proj (E, 2F, D)` and `down_proj (E, F, D)` its
      `experts.down_proj (E, D, F)`: PEFT `target_parameters`, one rank-`r` pair per expert (gate
      and up export as one adapter of rank `r_gate + r_up`; see `peft.py`).
    qkv_einsum: Gemma 3 with as many KV heads as query heads, whose attention has one fused
      `qkv_einsum` instead of `q_einsum` and `kv_einsum` (tunix picks it by the head counts).

  Returns:
    The `KeyMap`, with `layout_pattern` set for Gemma 3's fused kernels.

  Raises:
    ValueError: an unknown `model`.
  """
  if model not in _TUNIX:
    raise ValueError(f"peft_key_map.tunix: model must be one of {sorted(_TUNIX)}, got {model!r}")
  if qkv_einsum and model != "gemma3":
    raise ValueError(f"peft_key_map.tunix: qkv_einsum is a Gemma 3 layout, not {model!r}'s")
  names = _GEMMA3_QKV if qkv_einsum else _TUNIX[model]
  layouts = {"gemma3": _FUSED,
             "qwen3_moe": {r"layers/\d+/mlp/(gate|up|down)_proj": "stack=(0) in=(1) out=(2)"}}
  moe = model == "qwen3_moe"
  return templates(names, layout_pattern=layouts.get(model), untransposed=(r"embedder/input_embedding",),
                   experts=_QWEN3_MOE_EXPERTS if moe else None,
                   expert_params=("gate_up_proj", "down_proj") if moe else ())


peft_key_map.templates = templates
peft_key_map.tunix = tunix


_MAXTEXT = {"self_attention/query": "self_attn.q_proj", "self_attention/key": "self_attn.k_proj",
            "self_attention/value": "self_attn.v_proj", "self_attention/out": "self_attn.o_proj",
            "mlp/wi_0": "mlp.gate_proj", "mlp/wi_1": "mlp.up_proj", "mlp/wo": "mlp.down_proj"}


def maxtext(*, scanned: bool = True, prefix: str = "params") -> KeyMap:
  """MaxText decoder (Llama-style `decoders.py`) params <-> Hugging Face Llama module names.

  | MaxText path (`scan_layers=True`, layer axis 1)     | transformers module                   |
  |-----------------------------------------------------|---------------------------------------|
  | `decoder/layers/self_attention/query/kernel (D, L, N, H)`, `key`, `value` | `...q_proj`, ... |
  | `decoder/layers/self_attention/out/kernel (N, L, H, D)` | `model.layers.{l}.self_attn.o_proj` |
  | `decoder/layers/mlp/wi_0/kernel (D, L, F)`, `wi_1`  | `model.layers.{l}.mlp.gate_proj`, `up_proj`|
  | `decoder/layers/mlp/wo/kernel (F, L, D)`            | `model.layers.{l}.mlp.down_proj`      |
  | `token_embedder/embedding (V, D)`                   | `model.embed_tokens`                  |
  | `decoder/logits_dense/kernel (D, V)`                | `lm_head`                             |

  With `scan_layers=False` the layers are `decoder/layers_{l}/...` without the layer axis. A
  scanned kernel's layer axis 1 is a stack axis; the map's `layout_pattern` states every layout
  (plan with `LoraConfig(..., layout_pattern=key_map.layout_pattern)`), so the layer index is
  PEFT's `model.layers.{l}` and the in/out axes flatten in C order (`(D, N, H)` is
  `Linear(D, N·H)`). Logits through the embedding (`logits_via_embedding=True`) are a tied head.

  Args:
    scanned: MaxText's `scan_layers`.
    prefix: the variables' collection (`"params"`; `""` for a bare params tree).

  Returns:
    The `KeyMap`, with `layout_pattern` set.
  """
  head = f"{prefix}/" if prefix else ""
  layers = "decoder/layers" if scanned else "decoder/layers_{l}"
  index = "{}" if scanned else "{l}"
  mapping = {f"{head}{layers}/{p}/kernel": f"model.layers.{index}.{m}" for p, m in _MAXTEXT.items()}
  mapping[f"{head}token_embedder/embedding"] = "model.embed_tokens"
  mapping[f"{head}decoder/logits_dense/kernel"] = "lm_head"
  layer_re = re.escape(head) + (r"decoder/layers" if scanned else r"decoder/layers_\d+")
  if scanned:
    layouts = {rf"{layer_re}/self_attention/(query|key|value)/kernel": "stack=(1) in=(0) out=(2,3)",
               rf"{layer_re}/self_attention/out/kernel": "stack=(1) in=(0,2) out=(3)",
               rf"{layer_re}/mlp/(wi_0|wi_1|wo)/kernel": "stack=(1) in=(0) out=(2)"}
  else:
    layouts = {rf"{layer_re}/self_attention/(query|key|value)/kernel": "in=(0) out=(1,2)",
               rf"{layer_re}/self_attention/out/kernel": "in=(0,1) out=(2)",
               rf"{layer_re}/mlp/(wi_0|wi_1|wo)/kernel": "in=(0) out=(1)"}
  return templates(mapping, layout_pattern=layouts,
                   untransposed=(rf"{re.escape(head)}token_embedder/embedding",))


def gemma(*, prefix: str = "transformer") -> KeyMap:
  """DeepMind `gemma` (linen) params <-> Hugging Face Gemma module names, per layer `i`:

  | gemma path                               | transformers module                        |
  |------------------------------------------|--------------------------------------------|
  | `layer_{i}/attn/q_einsum/w (N, D, H)`    | `model.layers.{i}.self_attn.q_proj`        |
  | `layer_{i}/attn/kv_einsum/w (2, K, D, H)`| `...self_attn.k_proj`, `...self_attn.v_proj` |
  | `layer_{i}/attn/qkv_einsum/w (3, N, D, H)`| `...q_proj`, `...k_proj`, `...v_proj`     |
  | `layer_{i}/attn/attn_vec_einsum/w (N, H, D)` | `...self_attn.o_proj`                  |
  | `layer_{i}/mlp/gating_einsum (2, F, D)`  | `model.layers.{i}.mlp.gate_proj`, `up_proj` |
  | `layer_{i}/mlp/linear (F, D)`            | `model.layers.{i}.mlp.down_proj`           |
  | `embedder/input_embedding (V, D)`        | `model.embed_tokens` (the tied head too)   |

  The fused kernels are one PEFT module per projection: their fused axis is a stack axis, as the
  map's `layout_pattern` says (`kv_einsum`: `stack=(0) in=(2) out=(1,3)`; `gating_einsum`, used as
  `'btd,cfd->cbtf'`: `stack=(0) in=(2) out=(1)`); plan with
  `LoraConfig(..., layout_pattern=key_map.layout_pattern)`.

  Args:
    prefix: the path above the layers (`"transformer"` in gemma's checkpoints, `"params"` for
      `model.init`'s variables, `""` for none).

  Returns:
    The `KeyMap`, with `layout_pattern` set.
  """
  head = f"{prefix}/" if prefix else ""
  attn, mlp = f"{head}layer_{{i}}/attn/", f"{head}layer_{{i}}/mlp/"
  mapping = {attn + "q_einsum/w": _ATTN + "q_proj",
             attn + "kv_einsum/w": (_ATTN + "k_proj", _ATTN + "v_proj"),
             attn + "qkv_einsum/w": (_ATTN + "q_proj", _ATTN + "k_proj", _ATTN + "v_proj"),
             attn + "attn_vec_einsum/w": _ATTN + "o_proj",
             mlp + "gating_einsum": ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"),
             mlp + "linear": "model.layers.{i}.mlp.down_proj",
             f"{head}embedder/input_embedding": "model.embed_tokens"}
  layer = re.escape(head) + r"layer_\d+/"
  layouts = {rf"{layer}attn/(kv|qkv)_einsum/w": "stack=(0) in=(2) out=(1,3)",
             rf"{layer}attn/q_einsum/w": "in=(1) out=(0,2)",
             rf"{layer}attn/attn_vec_einsum/w": "in=(0,1) out=(2)",
             rf"{layer}mlp/gating_einsum": "stack=(0) in=(2) out=(1)",
             rf"{layer}mlp/linear": "in=(0) out=(1)"}
  return templates(mapping, layout_pattern=layouts,
                   untransposed=(rf"{re.escape(head)}embedder/input_embedding",))


peft_key_map.maxtext = maxtext
peft_key_map.gemma = gemma
