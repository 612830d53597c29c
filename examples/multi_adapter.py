"""Many adapters on one base: train one LoRA adapter per task, serve them all in one batch,
hot-swap them without recompiling, and combine two with `lj.weighted_adapter`.

The tasks are the digits demo's (examples/digits_mlp.py, data ships with scikit-learn): a linen
MLP is pretrained on upright 8x8 digits, then one adapter per transformation of the images —
rotated by 90, 180 and 270 degrees, and mirrored — each with its own rank and alpha:

1. train the adapters one after another on the frozen base (gradients for the adapters only,
   `lj.split` / `lj.combine`);
2. stack them into a bank (`lj.stack_adapters`, zero-padded to the largest rank) and serve a
   shuffled batch holding the test images of every task, each with its adapter's id, plus
   upright images with id -1 (the base alone), in ONE jitted call
   (`lj.unmerged(fn, bank.plan, adapter_ids=ids, scale=bank.scale)`); compare every row with
   its adapter applied alone;
3. hot-swap: one jitted forward, ten adapters of different ranks (<= r_max) and alphas, each
   padded by `lj.pad_adapter` and swapped in as data; count the compilations (0 after the first);
4. combine two adapters with `lj.weighted_adapter` (`cat`, `svd`, `ties_svd`) and measure the
   combined adapter on both tasks.

    python examples/multi_adapter.py          # ~50 s of CPU time (4 min on our loaded 2-core VM)
    python examples/multi_adapter.py --plot docs/multi_adapter.png

Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits_mlp import MLP, cross_entropy, load_tasks  # examples/digits_mlp.py
from summary import print_table  # examples/summary.py: a fixed-width table

import lora_jax as lj

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rot90": lambda im: np.rot90(im, k=1, axes=(1, 2)),
    "rot180": lambda im: np.rot90(im, k=2, axes=(1, 2)),
    "rot270": lambda im: np.rot90(im, k=3, axes=(1, 2)),
    "mirror": lambda im: im[:, :, ::-1],
}
TARGETS = r"params/fc\d/kernel"
Adapter = tuple[Any, lj.Plan]  # (LoRA leaves, plan), as lj.load_adapter returns it


@dataclasses.dataclass
class Task:
  name: str
  x_train: jax.Array  # (n_train, 64)
  y_train: jax.Array  # (n_train,)
  x_test: jax.Array  # (n_test, 64)
  y_test: jax.Array  # (n_test,)


def make_tasks(seed: int, names: list[str]) -> tuple[Task, list[Task]]:
  """The upright digits (the base's task) and one task per transformation in `names`, on the
  same train/test split."""
  x_train, y_train, x_test, y_test = load_tasks(seed)[0]
  as_images = lambda x: np.asarray(x).reshape(len(x), 8, 8)
  flat = lambda im: jnp.asarray(np.ascontiguousarray(im).reshape(len(im), -1))
  upright = Task("upright", x_train, y_train, x_test, y_test)
  tasks = [Task(n, flat(TRANSFORMS[n](as_images(x_train))), y_train,
                flat(TRANSFORMS[n](as_images(x_test))), y_test) for n in names]
  return upright, tasks


def accuracy(logits: Any, labels: Any) -> float:
  return float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(labels)))


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Train one LoRA adapter per task on one base MLP, serve them in one mixed batch, "
                  "hot-swap them in a jitted forward and combine two of them.")
  parser.add_argument("--seed", type=int, default=0, help="seed for the split, inits and minibatches")
  parser.add_argument("--tasks", nargs="+", default=list(TRANSFORMS), choices=list(TRANSFORMS),
                      help="the tasks, one adapter each (default: all four)")
  parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 2, 6],
                      help="LoRA rank of each task's adapter (cycled if shorter than --tasks)")
  parser.add_argument("--alphas", type=float, nargs="+", default=[8.0, 8.0, 8.0, 12.0],
                      help="LoRA alpha of each task's adapter (cycled if shorter than --tasks)")
  parser.add_argument("--pretrain-steps", type=int, default=400, help="steps of pretraining")
  parser.add_argument("--steps", type=int, default=300, help="LoRA training steps per adapter")
  parser.add_argument("--batch-size", type=int, default=128, help="minibatch size for all training")
  parser.add_argument("--hidden", type=int, nargs=2, default=(128, 256), metavar=("H1", "H2"),
                      help="widths of the two hidden layers")
  parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate for pretraining")
  parser.add_argument("--lora-lr", type=float, default=1e-2, help="AdamW learning rate for LoRA")
  parser.add_argument("--combine", nargs=2, default=None, metavar=("TASK1", "TASK2"),
                      help="the two tasks whose adapters weighted_adapter combines (default: the "
                           "first two of --tasks)")
  parser.add_argument("--alpha-factors", type=float, nargs="*", default=[0.5, 2.0],
                      help="hot swap also each trained adapter with its alpha times each factor "
                           "(at most 10 swaps in all)")
  parser.add_argument("--combination-types", nargs="*", default=["cat", "svd", "ties_svd"],
                      help="lj.weighted_adapter combination types to try (PEFT's names; the "
                           "ties, dare and magnitude_prune types with density 0.5; linear and "
                           "the other factor types need equal ranks)")
  parser.add_argument("--plot", default="multi_adapter.png",
                      help="where to save a PNG of the per-task accuracies ('' for no plot)")
  args = parser.parse_args(argv)
  if len(args.tasks) < 2 or len(set(args.tasks)) != len(args.tasks):
    parser.error(f"--tasks needs at least two distinct tasks, got {args.tasks}")
  args.combine = args.combine or args.tasks[:2]
  if not set(args.combine) <= set(args.tasks) or args.combine[0] == args.combine[1]:
    parser.error(f"--combine needs two distinct tasks of --tasks, got {args.combine}")
  return args


def fit(loss_fn: Callable, params: Any, tx: optax.GradientTransformation, task: Task, steps: int,
        batch_size: int, key: jax.Array) -> tuple[Any, float]:
  """`steps` minibatch steps of `tx` on `loss_fn(params, x, y)`, as one `lax.scan` in one jitted
  call (one compile, no per-step dispatch). Returns the trained params and the wall seconds."""
  x, y = task.x_train, task.y_train

  @jax.jit
  def run(params, key):
    def step(carry, key):
      params, opt_state = carry
      idx = jax.random.randint(key, (batch_size,), 0, len(x))
      grads = jax.grad(loss_fn)(params, x[idx], y[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
    return params

  t0 = time.perf_counter()
  params = jax.block_until_ready(run(params, key))
  return params, time.perf_counter() - t0


def train_adapter(model: MLP, variables: Any, task: Task, rank: int, alpha: float, key: jax.Array,
                  args: argparse.Namespace) -> tuple[Adapter, float]:
  """One adapter (rank `rank`, alpha `alpha`) on every Dense kernel, trained on `task` with the
  base frozen. Returns `((LoRA leaves, plan), train seconds)`."""
  config = lj.LoraConfig(targets=TARGETS, rank=rank, alpha=alpha)
  plan = lj.plan(config, variables, apply_fn=model.apply, args=(task.x_test,))
  init_key, data_key = jax.random.split(key)
  # Differentiate only the adapters: `lj.split` them off the base, `lj.combine` in the loss.
  adapters, base = lj.split(lj.attach(plan, variables, init_key))
  apply = lj.unmerged(model.apply, plan)
  loss = lambda adapters, x, y: cross_entropy(apply(lj.combine(base, adapters), x), y)
  adapters, seconds = fit(loss, adapters, optax.adamw(args.lora_lr), task, args.steps,
                          args.batch_size, data_key)
  return (adapters, plan), seconds


def alone_forward(model: MLP, variables: Any) -> Callable[[Adapter, jax.Array], jax.Array]:
  """`alone(adapter, x)`: logits of `adapter` applied on its own (its own plan, `lj.unmerged`),
  the reference every mixed-batch row and every swapped-in adapter is compared with. The plan is
  static: one compile per plan."""
  @functools.partial(jax.jit, static_argnums=1)
  def run(tree: Any, plan: lj.Plan, x: jax.Array) -> jax.Array:
    return lj.unmerged(model.apply, plan)(lj.combine(variables, tree), x)
  return lambda adapter, x: run(adapter[0], adapter[1], x)


def with_alpha(adapter: Adapter, factor: float) -> Adapter:
  """The same factors under a plan whose alphas (hence scales) are `factor` times the original's."""
  tree, plan = adapter
  sites = tuple(dataclasses.replace(s, alpha=s.alpha * factor, scale=s.scale * factor)
                for s in plan.sites)
  config = dataclasses.replace(plan.config, alpha=plan.config.alpha * factor)
  return tree, dataclasses.replace(plan, sites=sites, config=config)


def mixed_forward(model: MLP, variables: Any) -> Callable[[lj.AdapterBank, jax.Array, jax.Array],
                                                             jax.Array]:
  """`serve(bank, ids, x)`, jitted: logits `(batch, 10)` of `x: (batch, 64)` where row `b` uses
  adapter `ids[b]` of `bank` at every adapted kernel (`-1`: the base alone)."""

  @jax.jit
  def serve(bank: lj.AdapterBank, ids: jax.Array, x: jax.Array) -> jax.Array:
    # The bank's factors carry a leading adapter axis (`lj.bank_tree`); its per-adapter scales
    # go in as data, so another bank of the same shapes (other alphas, ranks <= r_max) reuses
    # this program.
    run = lj.unmerged(model.apply, bank.plan, adapter_ids=ids, scale=bank.scale)
    return run(lj.combine(variables, lj.bank_tree(bank)), x)
  return serve


def count_compiles() -> tuple[list[str], Callable[[], None]]:
  """A list that collects one entry per XLA backend compile from now on, and the function that
  stops collecting."""
  events: list[str] = []

  def listener(event: str, duration: float, **kwargs: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  return events, lambda: jax.monitoring.unregister_event_duration_listener(listener)


def plot_accuracies(path: str, names: list[str], rows: dict[str, list[float]]) -> None:
  """Grouped bars: per task, the accuracy of each row of `rows` (label -> one value per task)."""
  import matplotlib
  matplotlib.use("Agg")  # no display needed
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(10.5, 3.8))
  width = 0.8 / len(rows)
  for j, (label, values) in enumerate(rows.items()):
    xs = np.arange(len(names)) + (j - (len(rows) - 1) / 2) * width
    ax.bar(xs, [100 * v if v == v else 0 for v in values], width, label=label)
  ax.set(xticks=np.arange(len(names)), xticklabels=names, ylabel="test accuracy (%)", ylim=(0, 105),
         title="one base, one adapter per task: alone, in one mixed batch, combined")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict[str, Any]:
  """Run the example; returns its measurements (for tests): per-task accuracies, the mixed batch's
  largest difference from the adapters applied alone, and the hot-swap compile counts."""
  args = parse_args(argv)
  t_start = time.perf_counter()
  names = list(args.tasks)
  ranks = [args.ranks[k % len(args.ranks)] for k in range(len(names))]
  alphas = [args.alphas[k % len(args.alphas)] for k in range(len(names))]
  upright, tasks = make_tasks(args.seed, names)
  keys = jax.random.split(jax.random.key(args.seed), 3 + len(names))
  model = MLP(hidden=tuple(args.hidden))

  # 1. Pretrain on upright digits, then one adapter per task on the frozen base.
  variables = model.init(keys[0], upright.x_train[:1])
  full_loss = lambda params, x, y: cross_entropy(model.apply(params, x), y)
  variables, t_pre = fit(full_loss, variables, optax.adamw(args.lr), upright, args.pretrain_steps,
                         args.batch_size, keys[1])
  base = jax.jit(model.apply)
  base_acc = {t.name: accuracy(base(variables, t.x_test), t.y_test) for t in [upright, *tasks]}
  print(f"pretrained base ({args.pretrain_steps} steps, {t_pre:.1f}s): "
        + ", ".join(f"{n} {a:.1%}" for n, a in base_acc.items()))
  adapters, train_s = [], []
  for k, task in enumerate(tasks):
    adapter, seconds = train_adapter(model, variables, task, ranks[k], alphas[k], keys[3 + k], args)
    adapters.append(adapter)
    train_s.append(seconds)
    print(f"adapter {task.name!r}: rank {ranks[k]}, alpha {alphas[k]:g}, {args.steps} steps in "
          f"{seconds:.1f}s")
  alone = alone_forward(model, variables)
  alone_logits = [alone(a, t.x_test) for a, t in zip(adapters, tasks)]
  alone_acc = {t.name: accuracy(lg, t.y_test) for t, lg in zip(tasks, alone_logits)}
  # The unmerged references against the merged model `W + s·A·B` (a different computation).
  merged_diff = max(float(np.max(np.abs(np.asarray(lg) - np.asarray(
      base(lj.merge(plan, lj.combine(variables, tree)), t.x_test)))))
      for (tree, plan), t, lg in zip(adapters, tasks, alone_logits))
  print(f"each adapter alone (unmerged) vs merged into the base: max |logits difference| = "
        f"{merged_diff:.1e}")

  # 2. One bank, one mixed batch: every task's test images with their adapter's id, and the
  # upright images with -1 (base only), shuffled, through one jitted call.
  r_max = max(ranks)
  bank = lj.stack_adapters(adapters, names=names, pad_to=r_max)
  x_mixed = jnp.concatenate([t.x_test for t in tasks] + [upright.x_test])
  ids = np.concatenate([np.full(len(t.x_test), k, np.int32) for k, t in enumerate(tasks)]
                       + [np.full(len(upright.x_test), -1, np.int32)])
  order = np.random.default_rng(args.seed).permutation(len(ids))
  x_mixed, ids = x_mixed[order], jnp.asarray(ids[order])

  serve_mixed = mixed_forward(model, variables)

  mixed = np.empty((len(ids), 10), np.float32)
  mixed[order] = np.asarray(serve_mixed(bank, ids, x_mixed))  # back to task order
  mixed_acc, mixed_diff, start = {}, {}, 0
  for k, task in enumerate([*tasks, upright]):
    rows = mixed[start:start + len(task.x_test)]
    start += len(task.x_test)
    ref = alone_logits[k] if k < len(tasks) else base(variables, upright.x_test)
    mixed_acc[task.name] = accuracy(rows, task.y_test)
    mixed_diff[task.name] = float(np.max(np.abs(rows - np.asarray(ref))))
  print(f"\nmixed batch: {len(ids)} images of {len(tasks) + 1} tasks (ids -1..{len(tasks) - 1}, "
        "shuffled) in one jitted call of lj.unmerged(model.apply, bank.plan, adapter_ids=ids, "
        "scale=bank.scale) on lj.combine(params, lj.bank_tree(bank))")

  # 3. Hot swap: one jitted forward whose adapter is data. Ten adapters of ranks <= r_max and
  # various alphas, each padded to r_max by `lj.pad_adapter` (same plan and shapes for all, the
  # scales as arrays), go through it; only the first call compiles.
  trained = list(zip(names, ranks, alphas, adapters, tasks))
  swaps = [(f"{n} (r={r}, alpha={a:g})", ad, t) for n, r, a, ad, t in trained]
  swaps += [(f"{n} (r={r}, alpha={a * f:g})", with_alpha(ad, f), t)
            for n, r, a, ad, t in trained for f in args.alpha_factors]
  swaps = swaps[:10]
  padded = [lj.pad_adapter(ad, r_max) for _, ad, _ in swaps]
  slot_plan = padded[0][1]
  # One plan for every adapter of rank <= r_max: nothing static changes between swaps.
  assert all(plan == slot_plan for _, plan, _ in padded)
  references = [alone(ad, t.x_test) for _, ad, t in swaps]  # compiled here, outside the count

  @jax.jit
  def serve_one(tree: Any, scale: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return lj.unmerged(model.apply, slot_plan, scale=scale)(lj.combine(variables, tree), x)

  jax.block_until_ready(serve_one(padded[0][0], padded[0][2], tasks[0].x_test))  # the one compile
  cache_before = serve_one._cache_size()
  events, stop = count_compiles()
  try:
    swapped = [jax.block_until_ready(serve_one(tree, scale, t.x_test))
               for (tree, _, scale), (_, _, t) in zip(padded, swaps)]
  finally:
    stop()
  swap_compiles = max(len(events), serve_one._cache_size() - cache_before)
  swap_rows, swap_diff = [], 0.0
  for (label, _, task), logits, ref in zip(swaps, swapped, references):
    diff = float(np.max(np.abs(np.asarray(logits) - np.asarray(ref))))
    swap_diff = max(swap_diff, diff)
    swap_rows.append((label, f"{accuracy(logits, task.y_test):.1%}", f"{diff:.1e}"))
  print(f"\nhot swap: {len(swaps)} adapters through one jitted forward, padded to r_max={r_max} by "
        f"lj.pad_adapter: {swap_compiles} recompiles ({len(events)} XLA compiles, jit cache "
        f"{cache_before} -> {serve_one._cache_size()})")
  print_table(("swapped-in adapter", "accuracy", "max |diff| vs alone"), swap_rows)

  # 4. Adapter algebra: the two --combine adapters summed with weights (1, 1).
  pair = [names.index(n) for n in args.combine]
  combined_acc = {}
  for kind in args.combination_types:
    kw: dict[str, Any] = {}
    if any(word in kind for word in ("ties", "dare", "magnitude_prune")):
      kw["density"] = 0.5
    if kind.startswith("dare"):
      kw["key"] = keys[2]
    combo = lj.weighted_adapter([adapters[k] for k in pair], [1.0, 1.0], kind, **kw)
    combined_acc[kind] = [accuracy(alone(combo, tasks[k].x_test), tasks[k].y_test)
                          for k in pair]
  if combined_acc:
    print(f"\ncombined adapters {args.combine[0]} + {args.combine[1]} (weights 1, 1), accuracy on each "
          "task (alone: " + ", ".join(f"{alone_acc[names[k]]:.1%}" for k in pair) + "):")
    print_table(("combination_type", *args.combine),
                [(kind, *(f"{a:.1%}" for a in accs)) for kind, accs in combined_acc.items()])
    print("(one set of weights serves both tasks only as far as their updates agree; the mixed batch "
          "serves each example its own adapter)")

  every = [*names, "upright"]
  head = ("task (adapter id)", "base", "adapter alone", "mixed batch", "max |diff|")
  rows = [(f"{n} ({k if n != 'upright' else -1})", f"{base_acc[n]:.1%}",
           f"{alone_acc.get(n, base_acc[n]):.1%}", f"{mixed_acc[n]:.1%}", f"{mixed_diff[n]:.1e}")
          for k, n in enumerate(every)]
  print(f"\nSummary: {len(tasks)} adapters on one base ({len(bank.plan.sites)} adapted kernels), "
        f"test sets of {len(upright.y_test)} images:")
  print_table(head, rows)
  print(f"mixed batch vs each adapter alone: max |logits difference| = {max(mixed_diff.values()):.1e}")
  print(f"hot swap: {swap_compiles} recompiles over {len(swaps)} swaps; "
        f"max |logits difference| vs alone = {swap_diff:.1e}")
  if args.plot:
    bars = {"base": [base_acc[n] for n in every],
            "adapter alone": [alone_acc.get(n, base_acc[n]) for n in every],
            "mixed batch (one call)": [mixed_acc[n] for n in every]}
    if combined_acc:  # the first combination type, on its two tasks (NaN: no bar elsewhere)
      kind, accs = next(iter(combined_acc.items()))
      bars[f"{kind}({args.combine[0]}, {args.combine[1]})"] = [
          accs[pair.index(k)] if k in pair else float("nan") for k in range(len(every))]
    plot_accuracies(args.plot, every, bars)
    print(f"plot saved to {args.plot}")
  print(f"total wall time {time.perf_counter() - t_start:.1f}s")
  return {"base_acc": base_acc, "alone_acc": alone_acc, "merged_diff": merged_diff,
          "mixed_acc": mixed_acc, "mixed_diff": mixed_diff, "swaps": len(swaps),
          "swap_compiles": swap_compiles, "swap_diff": swap_diff, "combined_acc": combined_acc,
          "train_s": train_s}


if __name__ == "__main__":
  main()
