"""Training checkpoints: `(adapters, optimizer state, step)` every N steps, keep K, resume."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .adapters import combine, lora_paths, split, strip
from .checkpoint import CheckpointError
from .tree import flatten

PyTree = Any


def _abstract(tree: PyTree) -> PyTree:
  """`ShapeDtypeStruct`s (with the leaves' shardings) for a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x),
                                                     sharding=getattr(x, "sharding", None)), tree)


class TrainingCheckpointer:
  """Training checkpoints of `(adapters, optimizer state, step)` over `orbax.checkpoint.CheckpointManager`.

  Saves every `save_every` steps, keeps the latest `keep`, resumes the latest. Only the LoRA leaves
  are written: pass the full LoRA tree (e.g. trained with `lj.freeze_base`) or the adapters from
  `lj.split`, and the frozen base never reaches the disk. The optimizer state is saved with its
  structure (e.g. adamw's `count`, `mu`, `nu`); it should hold state for the adapters only (as
  `tx.init(adapters)` or `lj.freeze_base` do), else it would carry base-sized moments.

      ckpt = lj.TrainingCheckpointer(directory, save_every=100, keep=3)
      if (restored := ckpt.restore_latest(adapters, opt_state)) is not None:
        start, adapters, opt_state = restored
      for step in range(start, steps):
        adapters, opt_state = train_step(adapters, opt_state)
        ckpt.save(step + 1, adapters, opt_state)
      ckpt.close()

  Saves are synchronous (they finish before `save` returns), so the arrays may be donated to the
  next step right after.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int = 1, keep: int | None = 3):
    if save_every < 1:
      raise ValueError(f"TrainingCheckpointer: save_every must be >= 1, got {save_every}")
    if keep is not None and keep < 1:
      raise ValueError(f"TrainingCheckpointer: keep must be >= 1 or None (keep all), got {keep}")
    self.directory = pathlib.Path(directory).absolute()
    preservation = (ocp.checkpoint_managers.PreserveAll() if keep is None
                    else ocp.checkpoint_managers.LatestN(n=keep))
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, preservation_policy=preservation, create=True,
        enable_async_checkpointing=False))

  @staticmethod
  def _adapters(params: PyTree, what: str) -> PyTree:
    adapters, _ = split(params)
    if not lora_paths(adapters):
      raise ValueError(f"TrainingCheckpointer.{what}: `params` has no LoRA leaves "
                       "(*_lora_a/*_lora_b); pass the LoRA tree or the adapters of lj.split")
    return adapters

  def save(self, step: int, params: PyTree, opt_state: PyTree, *, force: bool = False) -> bool:
    """Save the LoRA leaves of `params` and `opt_state` as `step` if `step` is due (a multiple of
    `save_every`, or the first save) or `force`. Returns whether it saved."""
    adapters = self._adapters(params, "save")
    return self._manager.save(int(step), force=force, args=ocp.args.Composite(
        adapters=ocp.args.StandardSave(adapters), opt_state=ocp.args.StandardSave(opt_state)))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, step: int, params_like: PyTree, opt_state_like: PyTree
              ) -> tuple[int, PyTree, PyTree]:
    """`(step, params, opt_state)` of checkpoint `step`, with the structure, dtypes and shardings
    of the templates (real arrays, or `jax.eval_shape` output). If `params_like` is a full LoRA
    tree, its base leaves are reused as they are and the restored adapters put next to them."""
    if step not in self._manager.all_steps():
      raise CheckpointError(f"{self.directory}: no training checkpoint for step {step} "
                            f"(have {self.all_steps()})")
    adapters_like = self._adapters(params_like, "restore")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        adapters=ocp.args.StandardRestore(_abstract(adapters_like)),
        opt_state=ocp.args.StandardRestore(_abstract(opt_state_like))))
    adapters = restored["adapters"]
    if len(flatten(adapters_like)) != len(flatten(params_like)):
      adapters = combine(strip(params_like), adapters)
    return step, adapters, restored["opt_state"]

  def restore_latest(self, params_like: PyTree, opt_state_like: PyTree
                     ) -> tuple[int, PyTree, PyTree] | None:
    """`restore(latest_step(), ...)`, or None when there is no checkpoint yet."""
    step = self._manager.latest_step()
    return None if step is None else self.restore(step, params_like, opt_state_like)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "TrainingCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
