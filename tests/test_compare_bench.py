"""The comparison benchmark compares like with like: every alternative's model (qwix, Flax NNX,
PyTorch + PEFT), loaded from a lora_jax LoRA tree, computes the same function as lora_jax's
unmerged path on the linen reference model, with as many trainable parameters, and (qwix, PEFT:
same scale) the same adapter gradients."""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import optional

import lora_jax as lj
from lora_jax._src import tree as lj_tree

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import common  # noqa: E402

ARGS = argparse.Namespace(layers=2, d_model=32, heads=4, vocab=64, batch=2, seq=8, rank=4,
                          alpha=16.0, lr=1e-4, quick=False)
ATOL = 2e-5


@pytest.fixture(scope="module")
def setup():
  with jax.default_matmul_precision("highest"):
    s = common.build(ARGS, verbose=False)
    s.tree = common.nonzero_b(s.tree, 0.05)  # large enough that a missing LoRA term shows
    loss = lambda t: common.xent(lj.unmerged(s.model.apply, s.plan)(t, s.tokens), s.tokens)
    ref_loss, ref_grads = jax.value_and_grad(loss)(s.tree)
    ref = lj.unmerged(s.model.apply, s.plan)(s.tree, s.tokens)
    base = s.model.apply(s.variables, s.tokens)
  # the LoRA terms must matter, or "same output" would prove nothing
  assert float(jnp.max(jnp.abs(ref - base))) > 100 * ATOL
  return s, np.asarray(ref), float(ref_loss), lj_tree.flatten(lj.split(ref_grads)[0])


def _a_b(flat, prefix):
  """lora_jax factors of one site flattened to 2-D: A (in, r), B (r, out)."""
  a, b = np.asarray(flat[prefix + "_lora_a"]), np.asarray(flat[prefix + "_lora_b"])
  return a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)


def test_qwix_same_function_and_gradients(setup):
  optional("qwix")
  import qwix_lm
  s, ref, ref_loss, ref_grads = setup
  qmodel = qwix_lm.lora_model(s.model, ARGS.rank, ARGS.alpha)
  qtree = qwix_lm.tree_from_lora_jax(s.tree)
  # qwix creates its own adapters at init: same names, same (flattened) shapes as ours
  created = jax.eval_shape(qmodel.init, jax.random.key(0), s.tokens)
  assert jax.tree.map(lambda x: x.shape, created) == jax.tree.map(lambda x: x.shape, qtree)
  with jax.default_matmul_precision("highest"):
    y = qwix_lm.forward(qmodel)(qtree, s.tokens)
    ad, base = qwix_lm.split(qtree)
    loss, grads = jax.value_and_grad(
        lambda a: common.xent(qmodel.apply(qwix_lm.combine(base, a), s.tokens), s.tokens))(ad)
  np.testing.assert_allclose(np.asarray(y), ref, atol=ATOL)
  assert abs(float(loss) - ref_loss) < ATOL
  flat = lj_tree.flatten(grads)
  assert sum(x.size for x in flat.values()) == s.plan.num_params
  for path in s.plan.paths:
    for suffix in ("_lora_a", "_lora_b"):
      want = np.asarray(ref_grads[path + suffix])
      np.testing.assert_allclose(np.asarray(flat[path + suffix]).reshape(want.shape), want,
                                 atol=ATOL, err_msg=path + suffix)


def test_nnx_same_function_with_scale_folded_into_b(setup):
  import nnx_lm
  s, ref, _, _ = setup
  graphdef, lora, rest = nnx_lm.from_lora_jax(ARGS, s.plan, s.tree)
  assert sum(x.size for x in jax.tree.leaves(lora)) == s.plan.num_params
  with jax.default_matmul_precision("highest"):
    y = nnx_lm.forward(graphdef)(lora, rest, s.tokens)
  np.testing.assert_allclose(np.asarray(y), ref, atol=ATOL)


def test_peft_same_function_gradients_and_merge(setup):
  torch = optional("torch")
  optional("peft")
  import torch_lm
  s, ref, ref_loss, ref_grads = setup
  host = jax.tree.map(lambda x: np.asarray(x, np.float32), s.tree)
  pmodel = torch_lm.peft_model(torch_lm.from_flax(ARGS, host), ARGS.rank, ARGS.alpha)
  torch_lm.load_adapters(pmodel, host, ARGS.layers)
  trainable = {n: p for n, p in pmodel.named_parameters() if p.requires_grad}
  assert sum(p.numel() for p in trainable.values()) == s.plan.num_params
  tokens = torch.tensor(np.asarray(s.tokens), dtype=torch.long)
  y = torch_lm.forward(pmodel)(tokens).numpy()
  np.testing.assert_allclose(y, ref, atol=ATOL)
  np.testing.assert_allclose(torch_lm.forward(torch_lm.merged_copy(pmodel))(tokens).numpy(), ref,
                             atol=ATOL)
  loss = torch_lm.loss_fn(pmodel(tokens), tokens)
  loss.backward()
  assert abs(loss.item() - ref_loss) < ATOL
  for i in range(ARGS.layers):  # dL/dlora_A = (dL/dA)ᵀ, dL/dlora_B = (dL/dB)ᵀ
    for kind in torch_lm.KINDS:
      attn = kind in torch_lm.KINDS[:4]
      path = f"params/block_{i}/{'attn/' if attn else ''}{kind}/kernel"
      ga, gb = _a_b(ref_grads, path)
      prefix = f"base_model.model.blocks.{i}.{'attn.' if attn else ''}{kind}"
      np.testing.assert_allclose(trainable[prefix + ".lora_A.default.weight"].grad.numpy().T, ga,
                                 atol=ATOL, err_msg=path)
      np.testing.assert_allclose(trainable[prefix + ".lora_B.default.weight"].grad.numpy().T, gb,
                                 atol=ATOL, err_msg=path)
