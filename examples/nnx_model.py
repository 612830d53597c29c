"""LoRA on a Flax NNX model: the same lora_jax calls, on the model's state.

NNX models are objects, lora_jax works on pytrees: `nnx.split` gives a (graphdef, state) pair,
the state is the pytree to plan on and attach to, and `nnx.merge(graphdef, state)` rebuilds a
model from any state, which makes the function to trace. After training, `lj.merge` folds the
adapters into the kernels and `nnx.update` writes them back into the model object.

The task: a "teacher" that is the student's own base model with a rank-2 change to every kernel.
LoRA with rank >= 2 can represent that change exactly, so the loss falls by orders of magnitude.

    python examples/nnx_model.py [--steps 300] [--rank 2]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lora_jax as lj


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, d_in: int = 16, d_hidden: int = 64, d_out: int = 8):
    self.l1 = nnx.Linear(d_in, d_hidden, rngs=rngs)  # state paths: l1/kernel, l1/bias
    self.l2 = nnx.Linear(d_hidden, d_out, rngs=rngs)

  def __call__(self, x):  # (batch, d_in) -> (batch, d_out)
    return self.l2(nnx.relu(self.l1(x)))


def make_teacher(seed: int, change_rank: int) -> MLP:
  """The base model (same seed) with W += U·V, U (in, change_rank), V (change_rank, out), per kernel."""
  teacher = MLP(nnx.Rngs(seed))
  for i, layer in enumerate((teacher.l1, teacher.l2)):
    d_in, d_out = layer.kernel.shape
    u_key, v_key = jax.random.split(jax.random.fold_in(jax.random.key(seed + 1), i))
    u = jax.random.normal(u_key, (d_in, change_rank)) / jnp.sqrt(d_in)
    v = jax.random.normal(v_key, (change_rank, d_out))
    layer.kernel[...] = layer.kernel[...] + u @ v
  return teacher


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description="LoRA on a Flax NNX MLP via nnx.split / nnx.update.")
  parser.add_argument("--seed", type=int, default=0, help="seed for the model, teacher, data and A")
  parser.add_argument("--steps", type=int, default=300, help="Adam steps on the adapters")
  parser.add_argument("--rank", type=int, default=2, help="LoRA rank (the teacher's change is rank 2)")
  parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  model = MLP(nnx.Rngs(args.seed))
  teacher = make_teacher(args.seed, change_rank=2)
  x = jax.random.normal(jax.random.key(args.seed + 2), (256, 16))
  y = teacher(x)

  # NNX -> pytree: the state is what lora_jax plans on; `apply` rebuilds the model from a state.
  graphdef, state = nnx.split(model)
  # (`state` holds the model's own Variables; the trees lora_jax returns get fresh ones, so the
  # `nnx.update(model, ...)` below changes the model and `state`, never the LoRA tree.)
  apply = lambda state, x: nnx.merge(graphdef, state)(x)
  config = lj.LoraConfig(targets=r".*/kernel", rank=args.rank, alpha=2.0 * args.rank)
  plan = lj.plan(config, state, apply_fn=apply, args=(x,))
  print(f"{plan}\n")
  tree = lj.attach(plan, state, jax.random.key(args.seed + 3))  # an nnx.State with *_lora_a/b

  # Train only the adapters (B = 0 at init: the loss starts at the base model's).
  adapters, base = lj.split(tree)
  apply_lora = lj.unmerged(apply, plan)
  loss_fn = lambda adapters: jnp.mean((apply_lora(lj.combine(base, adapters), x) - y) ** 2)
  tx = optax.adam(args.lr)
  opt_state = tx.init(adapters)

  @jax.jit
  def step(adapters, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  loss_before = float(jax.jit(loss_fn)(adapters))
  for _ in range(args.steps):
    adapters, opt_state, _ = step(adapters, opt_state)
  loss_after = float(jax.jit(loss_fn)(adapters))
  tree = lj.combine(base, adapters)

  # Back to an NNX model: fold W + scale·A·B into the kernels and write them into `model`
  # (or build a new model: `nnx.merge(graphdef, lj.merge(plan, tree))`).
  nnx.update(model, lj.merge(plan, tree))
  loss_merged = float(jnp.mean((model(x) - y) ** 2))
  max_diff = float(jnp.max(jnp.abs(model(x) - apply_lora(tree, x))))
  fresh_base = nnx.state(MLP(nnx.Rngs(args.seed)))  # the same seed rebuilds the base model
  base_intact = all(bool(jnp.array_equal(a, b))
                    for a, b in zip(jax.tree.leaves(lj.strip(tree)), jax.tree.leaves(fresh_base)))
  print(f"MSE to the teacher: before LoRA {loss_before:.4g}, after {args.steps} steps "
        f"{loss_after:.4g} ({loss_before / loss_after:.0f}x lower)")
  print(f"merged into the NNX model with nnx.update: MSE {loss_merged:.4g}; "
        f"max |model(x) - unmerged(x)| = {max_diff:.2e}")
  print(f"lj.strip(tree) is still the untouched base model: {'yes' if base_intact else 'NO'}")


if __name__ == "__main__":
  main()
