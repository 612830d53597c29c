"""Training checkpoints: `(adapters, optimizer state, step)` every N steps, keep K, resume.

Each step is an orbax checkpoint (`CheckpointManager`) with three items: `adapters`, `opt_state`
and `lora_jax`, a JSON record of every leaf (key path, shape, dtype, checksum of its bytes) with a
SHA-256 of the record itself. `restore` verifies the restored leaves against it, so a flipped byte
anywhere is either a bit-identical restore or a `CheckpointError` naming the directory and step;
orbax's own exceptions for missing or garbled files are raised as `CheckpointError` too. Under
`jax.distributed` every process constructs the checkpointer and calls `save`/`restore`; orbax
writes each shard once and only the primary process writes the shared files.
"""

from __future__ import annotations

import numbers
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .adapters import combine, lora_paths, split, strip
from .checkpoint import CheckpointError, checksums, record_digest
from .tree import flatten

PyTree = Any
FORMAT = "lora_jax.training/1"
_ITEMS = ("adapters", "opt_state")


def _count(value: Any, name: str, *, allow_none: bool = False, minimum: int = 1) -> int | None:
  """`value` as an int >= `minimum` (or None if allowed).

  Raises:
    TypeError: naming `name` for a bool, float, string or other non-integer.
    ValueError: naming `name` for an integer below `minimum`.
  """
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"TrainingCheckpointer: {name} must be an int >= {minimum}"
                    f"{' or None' if allow_none else ''}, got {type(value).__name__} {value!r}")
  if value < minimum:
    raise ValueError(f"TrainingCheckpointer: {name} must be >= {minimum}"
                     f"{' or None (keep all)' if allow_none else ''}, got {value}")
  return int(value)


def _step(step: Any, what: str) -> int:
  """`step` as an int >= 0.

  Raises:
    ValueError: naming `step` for a negative or non-integer step (bools, floats, strings).
  """
  if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
    raise ValueError(f"TrainingCheckpointer.{what}: step must be an int >= 0, got "
                     f"{type(step).__name__} {step!r}")
  return int(step)


def _entries(tree: PyTree) -> list[dict[str, Any]]:
  """Per leaf of `tree`: key path, shape, dtype and checksum (what `restore` verifies)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  sums = checksums([x for _, x in flat])
  return [{"path": jax.tree_util.keystr(k), "shape": list(np.shape(x)),
           "dtype": jnp.result_type(x).name, "checksum": c} for (k, x), c in zip(flat, sums)]


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
    """Args:
      directory: where the step checkpoints go (created if missing).
      save_every: save steps that are multiples of it (and the first save); an int >= 1.
      keep: how many of the latest steps to keep; an int >= 1, or None to keep all.

    Raises:
      TypeError: `save_every` or `keep` is not an int (bools, floats, strings are refused).
      ValueError: `save_every` < 1 or `keep` < 1.
    """
    save_every = int(_count(save_every, "save_every") or 1)  # never None: allow_none is off
    kept = _count(keep, "keep", allow_none=True)
    self.directory = pathlib.Path(directory).absolute()
    preservation = ocp.checkpoint_managers.LatestN(n=kept)  # n=None keeps all
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
    `save_every`, or the first save) or `force`.

    Returns:
      Whether it saved.

    Raises:
      ValueError: `step` is negative or not an int, or `params` has no LoRA leaves.
    """
    step = _step(step, "save")
    adapters = self._adapters(params, "save")
    if not (force or self._manager.should_save(step)):
      return False
    record: dict[str, Any] = {"format": FORMAT, "step": step, "adapters": _entries(adapters),
                              "opt_state": _entries(opt_state)}
    record["record_sha256"] = record_digest(record)
    return self._manager.save(step, force=force, args=ocp.args.Composite(
        adapters=ocp.args.StandardSave(adapters), opt_state=ocp.args.StandardSave(opt_state),
        lora_jax=ocp.args.JsonSave(record)))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, step: int, params_like: PyTree, opt_state_like: PyTree
              ) -> tuple[int, PyTree, PyTree]:
    """`(step, params, opt_state)` of checkpoint `step`, with the structure, dtypes and shardings
    of the templates (real arrays, or `jax.eval_shape` output). If `params_like` is a full LoRA
    tree, its base leaves are reused as they are and the restored adapters put next to them.

    Raises:
      ValueError: `step` is negative or not an int, or `params_like` has no LoRA leaves.
      CheckpointError: naming the directory and step, when there is no such step, its files are
        missing or damaged, or what is restored is not what was saved (key paths, shapes, dtypes,
        checksums) or does not fit the templates.
    """
    step = _step(step, "restore")
    adapters_like = self._adapters(params_like, "restore")
    where = f"{self.directory}: training checkpoint step {step}"
    try:
      steps = self.all_steps()
    except Exception as e:  # orbax reading a damaged directory
      raise CheckpointError(f"{where}: cannot list the steps: {type(e).__name__}: {e}") from e
    if step not in steps:
      raise CheckpointError(f"{self.directory}: no training checkpoint for step {step} "
                            f"(have {steps})")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          adapters=ocp.args.StandardRestore(_abstract(adapters_like)),
          opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)),
          lora_jax=ocp.args.JsonRestore()))
      got = {k: restored[k] for k in (*_ITEMS, "lora_jax")}
    except Exception as e:  # orbax/tensorstore raise many types for missing or garbled files
      raise CheckpointError(f"{where}: cannot restore it (missing, truncated or corrupted files, "
                            f"or templates that do not fit it): {type(e).__name__}: {e}") from e
    self._verify(where, step, got)
    adapters = got["adapters"]
    if len(flatten(adapters_like)) != len(flatten(params_like)):
      adapters = combine(strip(params_like), adapters)
    return step, adapters, got["opt_state"]

  @staticmethod
  def _verify(where: str, step: int, got: dict[str, Any]) -> None:
    """Check the restored items against the step's record (itself checked by its SHA-256)."""
    record = got["lora_jax"]
    if not isinstance(record, dict) or record.get("format") != FORMAT:
      raise CheckpointError(f"{where}: record field format: "
                            f"{record.get('format') if isinstance(record, dict) else record!r} is "
                            f"not {FORMAT!r} (corrupted, or written by another program)")
    keys = {"format", "step", *_ITEMS, "record_sha256"}
    if set(record) != keys:
      field = sorted(set(record) ^ keys)[0]
      raise CheckpointError(f"{where}: record field {field}: missing or unexpected")
    if record["record_sha256"] != record_digest(record):
      raise CheckpointError(f"{where}: record field record_sha256: does not match the record's "
                            "content (corrupted checkpoint)")
    if record["step"] != step:
      raise CheckpointError(f"{where}: record field step: {record['step']!r} (corrupted checkpoint)")
    for item in _ITEMS:
      try:
        have = _entries(got[item])
      except Exception as e:  # e.g. a non-array leaf orbax made out of a garbled file
        raise CheckpointError(f"{where}: {item}: restored leaves are not arrays: "
                              f"{type(e).__name__}: {e}") from e
      want = record[item]
      if not isinstance(want, list) or len(want) != len(have):
        raise CheckpointError(f"{where}: {item}: {len(have)} leaves restored, but the record "
                              f"lists {len(want) if isinstance(want, list) else want!r} "
                              "(templates of another structure, or a corrupted checkpoint)")
      for h, w in zip(have, want):
        if h != w:
          field = next((k for k in h if not isinstance(w, dict) or h[k] != w.get(k)), "path")
          raise CheckpointError(f"{where}: {item}{h['path']}: restored {field} "
                                f"{h[field]!r} but the record says "
                                f"{w.get(field) if isinstance(w, dict) else w!r} (corrupted "
                                "checkpoint, or templates of another dtype/structure)")

  def restore_latest(self, params_like: PyTree, opt_state_like: PyTree
                     ) -> tuple[int, PyTree, PyTree] | None:
    """`restore(latest_step(), ...)`, or None when there is no checkpoint yet."""
    try:
      step = self._manager.latest_step()
    except Exception as e:  # orbax reading a damaged directory
      raise CheckpointError(f"{self.directory}: cannot find the latest training checkpoint: "
                            f"{type(e).__name__}: {e}") from e
    return None if step is None else self.restore(step, params_like, opt_state_like)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> TrainingCheckpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
