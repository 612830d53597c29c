"""Save a LoRA adapter, then load it onto the base in a fresh process.

1. pretrain an MLP (64 -> 512 -> 512 -> 10) on sklearn's upright 8x8 digits and save it with
   orbax: this stands in for the pretrained model you download;
2. train LoRA adapters for the digits rotated 90 degrees and save only them with
   `lj.save_adapter` (the LoRA leaves plus the plan and a fingerprint of the base; no base weight);
3. start a fresh Python process (this script with `--load DIR`), which restores the base, attaches
   the adapter with `lj.load_adapter` (no config needed: the plan is in the checkpoint) and checks
   that its outputs are bit-identical to the ones the training process computed;
4. print the adapter's size on disk next to the full model's size.

    python examples/save_and_load.py                  # ~20 s on 2 CPU cores
    python examples/save_and_load.py --dir /tmp/run   # keep the checkpoints in /tmp/run
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

import lora_jax as lj
from digits_mlp import MLP, accuracy, cross_entropy, load_tasks, train  # examples/digits_mlp.py


def disk_bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Fine-tune an MLP on rotated digits with LoRA, save the adapter, reload it in a "
                  "fresh process, check the outputs match, and compare adapter and model sizes.")
  parser.add_argument("--dir", default="", metavar="DIR",
                      help="where to write the base and adapter checkpoints (default: a temp dir, "
                           "deleted at the end)")
  parser.add_argument("--hidden", type=int, nargs=2, default=(512, 512), metavar=("H1", "H2"),
                      help="widths of the two hidden layers")
  parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every Dense kernel")
  parser.add_argument("--pretrain-steps", type=int, default=300, help="pretraining steps")
  parser.add_argument("--steps", type=int, default=300, help="LoRA training steps")
  parser.add_argument("--seed", type=int, default=0, help="data split, init and minibatch seed")
  parser.add_argument("--load", default="", metavar="DIR",
                      help="(the fresh process) load the base and adapter from DIR and check them")
  return parser.parse_args(argv)


def load(args: argparse.Namespace) -> None:
  """The fresh process: base from its own checkpoint, adapter from lj.load_adapter."""
  root = pathlib.Path(args.load)
  _, (_, _, x_test, y_test) = load_tasks(args.seed)
  model = MLP(hidden=tuple(args.hidden))
  abstract = jax.eval_shape(model.init, jax.random.key(0), x_test[:1])
  base = ocp.StandardCheckpointer().restore(root / "base", abstract)
  tree, plan = lj.load_adapter(root / "adapter", base)  # plan, ranks, alphas: from the checkpoint
  logits = np.asarray(jax.jit(lj.unmerged(model.apply, plan))(tree, x_test))
  expected = np.load(root / "expected_logits.npy")
  same = np.array_equal(logits, expected)
  print(f"fresh process: loaded {len(plan.sites)} adapted kernels onto the base; rotated-digit "
        f"accuracy {accuracy(logits, y_test):.1%}; outputs bit-identical to the training process: "
        f"{'yes' if same else 'NO'} (max |diff| = {np.max(np.abs(logits - expected)):.2e})")
  sys.exit(0 if same else 1)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.load:
    return load(args)
  t_start = time.perf_counter()
  tmp = None if args.dir else tempfile.TemporaryDirectory()
  root = pathlib.Path(args.dir or tmp.name).absolute()
  root.mkdir(parents=True, exist_ok=True)
  upright, rotated = load_tasks(args.seed)
  init_key, lora_key, pre_key, data_key = jax.random.split(jax.random.key(args.seed), 4)
  model = MLP(hidden=tuple(args.hidden))

  # 1. The pretrained base, saved whole (as a model hub would hold it).
  variables = model.init(init_key, upright[0][:1])
  full_loss = lambda params, x, y: cross_entropy(model.apply(params, x), y)
  variables, *_ = train(full_loss, model.apply, variables, optax.adamw(1e-3), upright,
                        args.pretrain_steps, 128, pre_key, "pretrain")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(root / "base", variables, force=True)

  # 2. LoRA on the rotated digits, training only the adapters; save only them.
  config = lj.LoraConfig(targets=r"params/fc\d/kernel", rank=args.rank, alpha=2.0 * args.rank)
  plan = lj.plan(config, variables, apply_fn=model.apply, args=(upright[0][:1],))
  adapters, base = lj.split(lj.attach(plan, variables, lora_key))
  apply_lora = lj.unmerged(model.apply, plan)
  lora_loss = lambda adapters, x, y: cross_entropy(apply_lora(lj.combine(base, adapters), x), y)
  predict = lambda adapters, x: apply_lora(lj.combine(base, adapters), x)
  adapters, *_ = train(lora_loss, predict, adapters, optax.adamw(1e-2), rotated, args.steps, 128,
                       data_key, "LoRA")
  tree = lj.combine(base, adapters)
  lj.save_adapter(root / "adapter", plan, tree)
  x_test, y_test = rotated[2], rotated[3]
  logits = np.asarray(jax.jit(apply_lora)(tree, x_test))
  np.save(root / "expected_logits.npy", logits)
  print(f"{plan}\n\ntraining process: rotated-digit accuracy {accuracy(logits, y_test):.1%} "
        f"(base: {accuracy(model.apply(variables, x_test), y_test):.1%})")

  # 3. A fresh process loads base + adapter and must reproduce the outputs exactly.
  child = subprocess.run([sys.executable, __file__, "--load", str(root), "--seed", str(args.seed),
                          "--hidden", *map(str, args.hidden)], capture_output=True, text=True)
  print(child.stdout.strip())
  if child.returncode != 0:
    sys.exit(f"the fresh process failed:\n{child.stderr[-3000:]}")

  # 4. Sizes: the adapter on disk vs the full model.
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(variables))
  lora_bytes = sum(x.nbytes for x in jax.tree.leaves(adapters))
  adapter_disk = disk_bytes(root / "adapter")
  print(f"\nfull model (all base params): {model_bytes:,} bytes "
        f"({disk_bytes(root / 'base'):,} on disk as an orbax checkpoint)")
  print(f"adapter on disk: {adapter_disk:,} bytes (LoRA factors: {lora_bytes:,} raw bytes; the rest "
        f"is metadata) = {adapter_disk / model_bytes:.2%} of the full model")
  print(f"total wall time {time.perf_counter() - t_start:.1f}s")
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()
