"""LoRA on any JAX function: a plain `jnp` function, and a model you only have as `apply`.

lora_jax never needs a model's source. It traces `fn(params, x)` abstractly, reads each
selected kernel's layout off how the function uses it, and `lj.unmerged(fn, plan)` re-runs
the traced function with `x·W + scale·(x·A)·B` at every use of an adapted kernel.

Part 1 is a hand-written function whose weights are stored PyTorch-style, `(out, in)`, and used
as `x @ W.T`: the plan sees the transpose and gives A the input side. Part 2 is a Flax layer
stack used only through its `apply` (imagine it came from a library you cannot edit).

In both, the task is to match a "teacher": the same function with a low-rank change to every
kernel. The script prints the plan, the loss before/after training the adapters, and the
agreement of the merged and unmerged paths.

    python examples/any_function.py [--steps 300] [--rank 4]
"""

from __future__ import annotations

import argparse
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj


def mlp(params: dict, x: jax.Array) -> jax.Array:
  """A plain function: weights stored (out, in) and applied as x @ W.T. x (batch, 16) -> (batch, 4)."""
  h = jnp.tanh(x @ params["w1"].T + params["b1"])
  return h @ params["w2"].T + params["b2"]


def init_mlp(key) -> dict:
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (64, 16)) / 4.0, "b1": jnp.zeros(64),
          "w2": jax.random.normal(k2, (4, 64)) / 8.0, "b2": jnp.zeros(4)}


def with_low_rank_change(params, kernel_paths: set[str], key, rank: int = 2):
  """A teacher: `params` with W += U·V (rank `rank`, unit-scale) on the kernels at `kernel_paths`."""

  def change(path, w):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name not in kernel_paths:
      return w
    u_key, v_key = jax.random.split(jax.random.fold_in(key, zlib.crc32(name.encode())))
    u = jax.random.normal(u_key, (w.shape[0], rank)) / jnp.sqrt(w.shape[0])
    return w + u @ jax.random.normal(v_key, (rank, w.shape[1])) / jnp.sqrt(rank)

  return jax.tree_util.tree_map_with_path(change, params)


def fit_adapters(fn, plan, tree, x, y, steps: int, lr: float):
  """Train only the adapters of `tree` to make `fn(tree, x)` match `y` (mean squared error).
  Returns (trained tree, loss before, loss after)."""
  adapters, base = lj.split(tree)
  apply_lora = lj.unmerged(fn, plan)  # fn's own computation, plus scale·(x·A)·B at each kernel
  loss_fn = jax.jit(lambda adapters: jnp.mean((apply_lora(lj.combine(base, adapters), x) - y) ** 2))
  tx = optax.adam(lr)

  @jax.jit
  def step(adapters, opt_state):
    grads = jax.grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state

  loss_before = float(loss_fn(adapters))
  opt_state = tx.init(adapters)
  for _ in range(steps):
    adapters, opt_state = step(adapters, opt_state)
  return lj.combine(base, adapters), loss_before, float(loss_fn(adapters))


def demo(title: str, fn, params, targets: str, x, args) -> None:
  """Plan, attach, train against a low-rank-changed teacher, and compare merged vs unmerged."""
  print(f"== {title}")
  config = lj.LoraConfig(targets=targets, rank=args.rank, alpha=2.0 * args.rank)
  plan = lj.plan(config, params, apply_fn=fn, args=(x,))  # abstract trace: layouts from use
  print(plan)
  teacher = with_low_rank_change(params, set(plan.paths), jax.random.key(args.seed + 1))
  y = fn(teacher, x)
  tree = lj.attach(plan, params, jax.random.key(args.seed + 2))
  tree, before, after = fit_adapters(fn, plan, tree, x, y, args.steps, args.lr)
  unmerged_out = lj.unmerged(fn, plan)(tree, x)
  merged_out = fn(lj.merge(plan, tree), x)  # plain params with W + ΔW: the function as it was
  print(f"MSE to the teacher: before {before:.4g}, after {args.steps} steps {after:.4g} "
        f"({before / after:.0f}x lower)")
  print(f"merged vs unmerged: max |difference| = "
        f"{float(jnp.max(jnp.abs(merged_out - unmerged_out))):.2e}\n")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description="LoRA on a plain jnp function and on a Flax layer "
                                               "stack used only through its apply.")
  parser.add_argument("--seed", type=int, default=0, help="seed for weights, data, teacher and A")
  parser.add_argument("--steps", type=int, default=300, help="Adam steps on the adapters")
  parser.add_argument("--rank", type=int, default=4, help="LoRA rank (the teacher's change is rank 2)")
  parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  x = jax.random.normal(jax.random.key(args.seed), (256, 16))

  # 1. A plain function over a dict of arrays. The kernels are (out, in) and used as x @ W.T;
  # the plan reads that off the trace: w1 (64, 16) gets in=(16) out=(64), so A is (16, r).
  params = init_mlp(jax.random.key(args.seed + 3))
  demo("a plain jnp function, weights stored (out, in), used as x @ W.T", mlp, params,
       r"w\d", x, args)

  # 2. A model used only through its `apply` (here a flax.linen Sequential, standing in for any
  # module imported from elsewhere): the variables and `apply` are all lora_jax needs.
  model = nn.Sequential([nn.Dense(64), nn.LayerNorm(), nn.gelu, nn.Dense(64), nn.gelu, nn.Dense(4)])
  variables = model.init(jax.random.key(args.seed + 4), x)
  demo("flax.linen.Sequential, used only through model.apply", model.apply, variables,
       r"params/layers_\d+/kernel", x, args)


if __name__ == "__main__":
  main()
