"""LoRA on handwritten digits: pretrain an MLP, then adapt it to rotated digits with LoRA.

The classic LoRA experiment, on data that ships with scikit-learn (no download):

1. pretrain a 3-layer linen MLP (64 -> 128 -> 256 -> 10) on the upright 8x8 digits;
2. the new task is the same digits rotated 90 degrees, where the pretrained model is near chance;
3. attach LoRA adapters (rank 4, alpha 8) to all three Dense kernels and train only them: the
   base is frozen with `lj.freeze_base`, so the optimizer holds state only for the adapters;
4. compare with full fine-tuning of every weight, check that the merged (W + s·A·B folded in)
   and unmerged (x·W + s·(x·A)·B) models agree, and plot the training curves.

    python examples/digits_mlp.py                       # ~1 min on 2 CPU cores
    python examples/digits_mlp.py --plot docs/digits_mlp.png   # regenerate the README's figure

Deterministic for a given --seed (same data split, init, minibatches and numbers).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import lora_jax as lj
from summary import print_table  # examples/summary.py: a fixed-width table


class MLP(nn.Module):
  """Three Dense layers; their kernels live at params/fc{1,2,3}/kernel."""
  hidden: tuple[int, int] = (128, 256)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):  # x: (batch, 64) -> logits (batch, 10)
    x = nn.relu(nn.Dense(self.hidden[0], name="fc1")(x))
    x = nn.relu(nn.Dense(self.hidden[1], name="fc2")(x))
    return nn.Dense(self.num_classes, name="fc3")(x)


def load_tasks(seed: int):
  """The digits split into train/test, as two tasks of (x_train, y_train, x_test, y_test):
  the original upright images and the same images rotated by 90 degrees. Pixels in [0, 1]."""
  digits = load_digits()
  images = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8), raw pixel values 0..16
  train, test = train_test_split(np.arange(len(images)), test_size=0.25, random_state=seed,
                                 stratify=digits.target)
  flat = lambda im: jnp.asarray(im.reshape(len(im), -1))
  rotate = lambda im: np.rot90(im, k=1, axes=(1, 2))
  y_train, y_test = jnp.asarray(digits.target[train]), jnp.asarray(digits.target[test])
  upright = (flat(images[train]), y_train, flat(images[test]), y_test)
  rotated = (flat(rotate(images[train])), y_train, flat(rotate(images[test])), y_test)
  return upright, rotated


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits, labels) -> float:
  return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def train(loss_fn, predict_fn, params, tx, task, steps: int, batch_size: int, key, desc: str):
  """Minibatch training of `params` with optimizer `tx`.

  `loss_fn(params, x, y)` is minimised; `predict_fn(params, x)` gives logits for the test-accuracy
  curve. Returns (params, curves, compile seconds, train seconds); curves are per-step numpy arrays
  `loss` (minibatch train loss) and `test_acc`. `params` is donated: do not reuse it afterwards.
  """
  x, y, x_test, y_test = task
  tx_state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, key):
    idx = jax.random.choice(key, len(x), (batch_size,), replace=False)
    loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    test_acc = jnp.mean(jnp.argmax(predict_fn(params, x_test), -1) == y_test)
    return params, opt_state, loss, test_acc

  keys = jax.random.split(key, steps)
  t0 = time.perf_counter()
  step = step.lower(params, tx_state, keys[0]).compile()  # compile once, outside the timed loop
  t_compile = time.perf_counter() - t0

  losses, accs = [], []  # device scalars: no host sync inside the loop
  t0 = time.perf_counter()
  for i in tqdm(range(steps), desc=desc, leave=False, mininterval=1.0):
    params, tx_state, loss, test_acc = step(params, tx_state, keys[i])
    losses.append(loss)
    accs.append(test_acc)
  params = jax.block_until_ready(params)
  t_train = time.perf_counter() - t0
  curves = {"loss": np.asarray(jnp.stack(losses)), "test_acc": np.asarray(jnp.stack(accs))}
  return params, curves, t_compile, t_train


def plot_curves(path: str, lora: dict, full: dict, base_acc: float, lora_label: str) -> None:
  """Two panels, LoRA vs full fine-tuning: train loss and rotated-task test accuracy per step."""
  import matplotlib
  matplotlib.use("Agg")  # no display needed
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
  steps = np.arange(1, len(lora["loss"]) + 1)
  for curves, label, color in ((lora, lora_label, "tab:blue"),
                               (full, "full fine-tuning (all params)", "tab:orange")):
    ax_loss.plot(steps, curves["loss"], label=label, color=color, lw=1)
    ax_acc.plot(steps, 100 * curves["test_acc"], label=label, color=color, lw=1.5)
  ax_acc.axhline(100 * base_acc, color="gray", ls="--", lw=1, label="pretrained base")
  ax_loss.set(yscale="log", xlabel="step", ylabel="train loss (minibatch)",
              title="training loss on rotated digits")
  ax_acc.set(xlabel="step", ylabel="test accuracy (%)", ylim=(0, 100),
             title="test accuracy on rotated digits")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Pretrain an MLP on sklearn's digits, adapt it to rotated digits with LoRA "
                  "(base frozen) and compare with full fine-tuning.")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed for the data split, initialisation, LoRA A init and minibatches")
  parser.add_argument("--pretrain-steps", type=int, default=600,
                      help="steps of pretraining on upright digits")
  parser.add_argument("--steps", type=int, default=600,
                      help="steps of LoRA training, and of full fine-tuning, on rotated digits")
  parser.add_argument("--batch-size", type=int, default=128, help="minibatch size for all training")
  parser.add_argument("--hidden", type=int, nargs=2, default=(128, 256), metavar=("H1", "H2"),
                      help="widths of the two hidden layers")
  parser.add_argument("--rank", type=int, default=4, help="LoRA rank r of every adapted kernel")
  parser.add_argument("--alpha", type=float, default=8.0,
                      help="LoRA alpha; the update is scaled by alpha / rank")
  parser.add_argument("--lora-lr", type=float, default=1e-2, help="AdamW learning rate for LoRA")
  parser.add_argument("--lr", type=float, default=1e-3,
                      help="AdamW learning rate for pretraining and for full fine-tuning")
  parser.add_argument("--plot", default="digits_mlp.png",
                      help="where to save the PNG of training curves ('' for no plot)")
  parser.add_argument("--save", default="", metavar="DIR",
                      help="if given, save the trained adapter (adapter-only checkpoint) to DIR")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  t_start = time.perf_counter()
  upright, rotated = load_tasks(args.seed)
  x_new_test, y_new_test = rotated[2], rotated[3]
  x_old_test, y_old_test = upright[2], upright[3]
  print(f"sklearn digits: {len(upright[0])} train / {len(x_old_test)} test images (8x8). "
        "Pretrain on upright digits, adapt to digits rotated 90 degrees.\n")
  init_key, lora_key, pre_key, lora_data_key, full_data_key = jax.random.split(
      jax.random.key(args.seed), 5)
  model = MLP(hidden=tuple(args.hidden))
  full_loss = lambda params, x, y: cross_entropy(model.apply(params, x), y)

  # 1. Pretrain every weight on the upright digits.
  variables = model.init(init_key, upright[0][:1])
  variables, _, c_pre, t_pre = train(full_loss, model.apply, variables, optax.adamw(args.lr),
                                     upright, args.pretrain_steps, args.batch_size, pre_key,
                                     "pretrain")
  pretrained = jax.tree.map(np.asarray, variables)  # a host copy, to check bit-exactness later
  base_acc_old = accuracy(model.apply(variables, x_old_test), y_old_test)
  base_acc_new = accuracy(model.apply(variables, x_new_test), y_new_test)
  print(f"pretrained base: {base_acc_old:.1%} test accuracy on upright digits, "
        f"{base_acc_new:.1%} on rotated digits\n")

  # 2. The LoRA plan: a dry run (abstract trace, no FLOPs) listing every adapted kernel.
  config = lj.LoraConfig(targets=r"params/fc\d/kernel", rank=args.rank, alpha=args.alpha)
  plan = lj.plan(config, variables, apply_fn=model.apply, args=(x_new_test,))
  print(f"{plan}\n")
  # attach adds fcN/kernel_lora_a (in, r) and fcN/kernel_lora_b (r, out) with B = 0, so the
  # model's output is unchanged until training moves B.
  tree = lj.attach(plan, variables, lora_key)

  # 3. Train only the adapters. `freeze_base` wraps AdamW: base leaves get a zero update and no
  # optimizer moments. (For big models, differentiate only the adapters instead:
  # `adapters, base = lj.split(tree)` and a loss of `lj.combine(base, adapters)`; see
  # examples/transformer_lm.py.)
  apply_lora = lj.unmerged(model.apply, plan)  # x·W + scale·(x·A)·B; never forms W + ΔW
  lora_loss = lambda tree, x, y: cross_entropy(apply_lora(tree, x), y)
  tx = lj.freeze_base(optax.adamw(args.lora_lr), tree)
  tree, lora_curves, c_lora, t_lora = train(lora_loss, apply_lora, tree, tx, rotated, args.steps,
                                            args.batch_size, lora_data_key, "LoRA")

  # 4. Evaluate both apply paths: unmerged (as trained) and merged (zero-overhead inference:
  # `lj.merge` returns plain variables with W' = W + scale·A·B for the model's own apply).
  logits_unmerged = jax.jit(apply_lora)(tree, x_new_test)
  merged_vars = lj.merge(plan, tree)
  logits_merged = jax.jit(model.apply)(merged_vars, x_new_test)
  lora_acc_unmerged = accuracy(logits_unmerged, y_new_test)
  lora_acc_merged = accuracy(logits_merged, y_new_test)
  lora_acc_old = accuracy(model.apply(merged_vars, x_old_test), y_old_test)
  max_diff = float(jnp.max(jnp.abs(logits_unmerged - logits_merged)))

  # The base was never touched: `strip` drops the LoRA leaves and returns it bit for bit.
  stripped = jax.tree.map(np.asarray, lj.strip(tree))
  base_intact = (jax.tree.structure(stripped) == jax.tree.structure(pretrained) and all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stripped), jax.tree.leaves(pretrained))))
  n_lora = sum(x.size for x in jax.tree.leaves(lj.split(tree)[0]))
  n_base = plan.base_params

  # 5. For comparison: full fine-tuning of every weight, from the same pretrained base.
  full = jax.tree.map(jnp.asarray, pretrained)
  full, full_curves, c_full, t_full = train(full_loss, model.apply, full, optax.adamw(args.lr),
                                            rotated, args.steps, args.batch_size, full_data_key,
                                            "full fine-tune")
  full_acc_new = accuracy(model.apply(full, x_new_test), y_new_test)
  full_acc_old = accuracy(model.apply(full, x_old_test), y_old_test)

  print(f"LoRA unmerged vs merged on the rotated test set: max |logits difference| = {max_diff:.2e}")
  print(f"lj.strip(tree) returns the pretrained base bit for bit: {'yes' if base_intact else 'NO'}")
  lora_params = f"{n_lora:,} ({100 * n_lora / n_base:.2f}%)"
  rows = [
      ("pretrained base (no training)", "0 (0%)", f"{base_acc_new:.1%}", f"{base_acc_old:.1%}",
       "-", "-"),
      (f"LoRA r={args.rank}, unmerged", lora_params, f"{lora_acc_unmerged:.1%}", f"{lora_acc_old:.1%}",
       f"{c_lora:.1f}s", f"{t_lora:.1f}s"),
      (f"LoRA r={args.rank}, merged", lora_params, f"{lora_acc_merged:.1%}", f"{lora_acc_old:.1%}",
       "", ""),
      ("full fine-tuning", f"{n_base:,} (100%)", f"{full_acc_new:.1%}", f"{full_acc_old:.1%}",
       f"{c_full:.1f}s", f"{t_full:.1f}s"),
  ]
  print(f"\nSummary ({args.steps} training steps each, batch {args.batch_size}, test set of "
        f"{len(y_new_test)} images):")
  print_table(("model", "trainable params", "rotated acc", "upright acc", "compile", "train"), rows)
  print(f"(pretraining: {args.pretrain_steps} steps, compile {c_pre:.1f}s, train {t_pre:.1f}s; the "
        "LoRA rows share one training run; `lj.strip` gives back the base with its upright accuracy)")

  if args.save:
    # An adapter-only checkpoint: the LoRA leaves plus the plan and a fingerprint of the base
    # (reload onto the same base with `lj.load_adapter`; see examples/save_and_load.py).
    lj.save_adapter(args.save, plan, tree)
    adapter_bytes = sum(f.stat().st_size for f in pathlib.Path(args.save).rglob("*") if f.is_file())
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(pretrained))
    print(f"adapter saved to {args.save}: {adapter_bytes / 1024:.1f} KiB on disk "
          f"(the model's weights: {model_bytes / 1024:.1f} KiB)")
  if args.plot:
    plot_curves(args.plot, lora_curves, full_curves, base_acc_new,
                f"LoRA r={args.rank} ({100 * n_lora / n_base:.1f}% of params)")
    print(f"training curves saved to {args.plot}")
  print(f"total wall time {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
  main()
