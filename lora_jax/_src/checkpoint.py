"""Adapter-only orbax checkpoints that describe themselves, and training checkpoints.

`save_adapter` writes the LoRA leaves (`*_lora_a: (*stack, *in, r)`, `*_lora_b: (*stack, r, *out)`)
and a JSON record of everything needed to put them back: the plan (paths, layouts, ranks, alphas,
scaling, dropout), the lora_jax version, a fingerprint of the base kernels they belong to
(path -> shape, dtype), and per leaf its shape, dtype, byte count and a checksum. No base weight is
ever written. `load_adapter` checks the fingerprint against the base it is given, restores the
leaves straight into their shardings, verifies them, and only then builds the LoRA tree.

On disk, `directory` holds versioned orbax checkpoints and a pointer file naming the current one:

    directory/LATEST          "adapter-3"  (replaced atomically with os.replace)
    directory/adapter-3/      orbax composite checkpoint: lora/ (the arrays), lora_jax/ (the JSON)

A new save goes to `adapter-<n+1>`, is fsynced, and only then does `LATEST` move to it; a crash at
any point leaves the previous checkpoint readable. Older versions are deleted after the swap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.sharding import Sharding, SingleDeviceSharding

from .adapters import LORA_A, LORA_B, factor_shardings, lora_paths, put_factors, site_arrays
from .plan import Plan, Site
from .tree import flatten, unbox
from .version import __version__

PyTree = Any
FORMAT = "lora_jax.adapter/1"
POINTER = "LATEST"
# a version directory, or orbax's temporary one for it (orbax writes there, then renames)
_VERSION_DIR = re.compile(r"adapter-(\d+)(\.orbax-checkpoint-tmp.*)?")


class CheckpointError(ValueError):
  """An adapter checkpoint directory that is missing, truncated or corrupted."""


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
  """Per array, a position-weighted sum of its bytes mod 2**32. Integer addition is associative,
  so the value does not depend on how the array is sharded; one scalar per leaf leaves the device."""

  def one(x):
    b = lax.bitcast_convert_type(x, jnp.uint8).reshape(-1).astype(jnp.uint32)
    weights = lax.iota(jnp.uint32, b.size) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(b * weights, dtype=jnp.uint32)

  return [one(x) for x in leaves]


def _nest(flat: Mapping[str, Any]) -> dict:
  """`{"a/b/c": x}` -> `{"a": {"b": {"c": x}}}` (the layout orbax writes)."""
  out: dict = {}
  for path, x in flat.items():
    *parents, name = path.split("/")
    node = out
    for key in parents:
      node = node.setdefault(key, {})
    node[name] = x
  return out


def _pick(nested: Mapping, path: str) -> Any:
  for key in path.split("/"):
    nested = nested[key]
  return nested


def _metadata(plan: Plan, kernels: dict[str, Any], leaves: dict[str, jax.Array]) -> dict[str, Any]:
  sums = _checksums(list(leaves.values()))
  return {
      "format": FORMAT,
      "lora_jax_version": __version__,
      "plan": plan.to_dict(),
      "base_fingerprint": [{"path": s.path, "shape": list(kernels[s.path][0].shape),
                            "dtype": jnp.dtype(kernels[s.path][0].dtype).name} for s in plan.sites],
      "leaves": [{"path": p, "shape": list(x.shape), "dtype": x.dtype.name, "nbytes": int(x.nbytes),
                  "checksum": int(c)} for (p, x), c in zip(leaves.items(), sums)],
      "raw_bytes": int(sum(x.nbytes for x in leaves.values())),
  }


def _fsync(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_tree(root: pathlib.Path) -> None:
  for dirpath, _, files in os.walk(root):
    for name in files:
      _fsync(pathlib.Path(dirpath, name))
    _fsync(pathlib.Path(dirpath))


def _replace_pointer(directory: pathlib.Path, version: str) -> None:
  """Point `directory/LATEST` at `version`, atomically (write, fsync, os.replace, fsync dir)."""
  tmp = directory / (POINTER + ".tmp")
  with open(tmp, "w") as f:
    f.write(version)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, directory / POINTER)
  _fsync(directory)


def _versions(directory: pathlib.Path) -> list[pathlib.Path]:
  """Our entries in `directory`: version dirs, orbax temp dirs of versions, the pointer files."""
  return [p for p in directory.iterdir()
          if _VERSION_DIR.fullmatch(p.name) or p.name in (POINTER, POINTER + ".tmp")]


def save_adapter(directory: str | os.PathLike, plan: Plan, tree: PyTree) -> None:
  """Write the LoRA leaves of `tree` (only those: no base weight) and their metadata to `directory`.

  `tree` is a LoRA tree (`lj.attach`) matching `plan`; boxes (`nn.Partitioned`, NNX `Variable`)
  are unwrapped, sharded leaves are written by orbax from their shards. Size on disk is about the
  raw bytes of the factors, `sum(|A| + |B|) · itemsize`, plus a few KiB of metadata (orbax
  compresses, so zero `B`s take almost nothing).

  Atomic: the new checkpoint is written and fsynced next to the old one and `directory/LATEST` is
  then swapped to it with `os.replace`; a crash before the swap leaves the previous checkpoint
  readable. Raises `ValueError` if `tree` does not match `plan`, or if `directory` exists and
  holds anything but lora_jax adapter checkpoints (it never deletes foreign files).
  """
  directory = pathlib.Path(directory).absolute()
  arrays = site_arrays(plan, tree)  # {path: (W, A, B)}, unboxed; raises if tree != plan
  leaves = {s.path + f: jnp.asarray(arrays[s.path][i]) for s in plan.sites
            for i, f in ((1, LORA_A), (2, LORA_B))}
  meta = _metadata(plan, arrays, leaves)
  if directory.exists():
    foreign = sorted(set(directory.iterdir()) - set(_versions(directory)))
    if foreign:
      raise ValueError(f"save_adapter: {directory} exists and holds files that are not lora_jax "
                       f"adapter checkpoints (e.g. {foreign[0].name!r}); pick another directory")
  directory.mkdir(parents=True, exist_ok=True)
  numbers = [int(m.group(1)) for p in directory.iterdir() if (m := _VERSION_DIR.fullmatch(p.name))]
  version = f"adapter-{max(numbers, default=0) + 1}"
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(directory / version, args=ocp.args.Composite(
        lora=ocp.args.StandardSave(_nest(leaves)), lora_jax=ocp.args.JsonSave(meta)))
  _fsync_tree(directory / version)
  _fsync(directory)
  _replace_pointer(directory, version)
  for p in _versions(directory):  # older versions and leftovers of crashed saves
    if p.is_dir() and p.name != version:
      shutil.rmtree(p, ignore_errors=True)


def _current(directory: pathlib.Path) -> pathlib.Path:
  pointer = directory / POINTER
  if not pointer.is_file():
    what = "does not exist" if not directory.exists() else f"has no {POINTER} file"
    raise CheckpointError(f"{directory}: not a lora_jax adapter checkpoint ({what})")
  version = pointer.read_text().strip()
  if not re.fullmatch(r"adapter-\d+", version) or not (directory / version).is_dir():
    raise CheckpointError(f"{directory}: {POINTER} names {version!r}, which is not a checkpoint "
                          "directory there (truncated or corrupted checkpoint)")
  return directory / version


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """The JSON record of the adapter checkpoint in `directory` (plan, fingerprint, leaves, version),
  without touching any array. Raises `CheckpointError` if it is missing or malformed."""
  directory = pathlib.Path(directory).absolute()
  path = _current(directory) / "lora_jax" / "metadata"
  try:
    meta = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{directory}: cannot read the adapter metadata {path}: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CheckpointError(f"{directory}: {path} is not lora_jax adapter metadata "
                          f"(format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                          f"expected {FORMAT!r})")
  return meta


def _check_base(meta: dict[str, Any], base: PyTree, where: pathlib.Path) -> dict[str, Any]:
  """Base leaves `{path: boxed leaf}`, after checking the fingerprint (paths, shapes) in order."""
  existing = lora_paths(base)
  if existing:
    raise ValueError(f"load_adapter: `base` already carries LoRA leaves (e.g. {existing[0]!r}); "
                     "pass the base variables (`lj.strip(tree)`)")
  leaves = flatten(base)
  for entry in meta["base_fingerprint"]:
    path, want = entry["path"], tuple(entry["shape"])
    if path not in leaves:
      raise ValueError(f"load_adapter: {path}: the adapter in {where} was trained on a base with a "
                       f"kernel of shape {want} here, but `base` has no leaf at this path")
    got = tuple(np.shape(unbox(leaves[path])))
    if got != want:
      raise ValueError(f"load_adapter: {path}: the adapter in {where} expects a kernel of shape "
                       f"{want}, but `base` has shape {got}")
  return leaves


def _adapter_sharding(site: Site, kernel: Any, factor: str) -> Sharding | None:
  """Where a factor goes by default: like its kernel's `NamedSharding` (`factor_shardings`), or
  on a single-device kernel's device."""
  a_sharding, b_sharding = factor_shardings(site.layout, kernel)
  if a_sharding is not None:
    return a_sharding if factor == LORA_A else b_sharding
  sharding = getattr(kernel, "sharding", None)
  return sharding if isinstance(sharding, SingleDeviceSharding) else None


def _target_shardings(plan: Plan, base_leaves: dict[str, Any], shardings: Any) -> dict[str, Sharding]:
  given: dict[str, Any]
  if shardings is None:
    given = {}
  elif isinstance(shardings, Sharding):
    given = {s.path + f: shardings for s in plan.sites for f in (LORA_A, LORA_B)}
  else:  # nested or flat mappings; anything that is not a mapping is a leaf
    given = {}

    def walk(node, prefix):
      for k, v in node.items():
        walk(v, f"{prefix}{k}/") if isinstance(v, Mapping) else given.__setitem__(f"{prefix}{k}", v)

    walk(shardings, "")
  expected = {s.path + f for s in plan.sites for f in (LORA_A, LORA_B)}
  wrong = [(p, v) for p, v in given.items() if not isinstance(v, Sharding)]
  if wrong:
    raise ValueError(f"load_adapter: shardings[{wrong[0][0]!r}] = {wrong[0][1]!r} is not a "
                     "jax.sharding.Sharding (e.g. NamedSharding(mesh, PartitionSpec(...)))")
  stray = sorted(set(given) - expected)
  if stray:
    raise ValueError(f"load_adapter: shardings given for {stray[0]!r}, which is not a LoRA leaf of "
                     f"this adapter (expected paths like {sorted(expected)[0]!r})")
  default = SingleDeviceSharding(jax.devices()[0])
  out = {}
  for s in plan.sites:
    kernel = unbox(base_leaves[s.path])
    for f in (LORA_A, LORA_B):
      out[s.path + f] = given.get(s.path + f) or _adapter_sharding(s, kernel, f) or default
  return out


def load_adapter(directory: str | os.PathLike, base: PyTree, *,
                 shardings: Sharding | Mapping[str, Sharding] | PyTree | None = None
                 ) -> tuple[PyTree, Plan]:
  """Attach the adapter saved in `directory` to `base`; returns `(tree, plan)`.

  `base`: the base variables (linen dict, NNX `State`, nested dict; boxes such as `nn.Partitioned`
  are kept, and the LoRA leaves come boxed like their kernel, as from `lj.attach`). No config is
  needed: the plan comes from the checkpoint. Site dtypes in the returned plan are the base's
  (an adapter trained on a float32 base can be loaded onto a bfloat16 one); shapes must match.

  `shardings`: where to put each factor, as one `Sharding` for all, `{leaf path: Sharding}`, or a
  pytree shaped like the adapters (`lj.split(tree)[0]`). Leaves not given are placed like their
  kernel (see `_adapter_sharding`: A sharded like the kernel's stack+in axes, B like its stack+out
  axes, rank axis replicated), else on the default device. Orbax restores each shard directly on
  its device; nothing is gathered on one device first.

  Raises `ValueError` naming the first path whose kernel is missing from `base` or differs in
  shape (both shapes given), and `CheckpointError` naming the directory for a missing, truncated
  or corrupted checkpoint. Either way nothing is returned half-loaded and `base` is not modified.
  """
  directory = pathlib.Path(directory).absolute()
  meta = read_metadata(directory)
  try:
    plan = Plan.from_dict(meta["plan"])
    entries = {e["path"]: e for e in meta["leaves"]}
    expected = [s.path + f for s in plan.sites for f in (LORA_A, LORA_B)]
    if sorted(entries) != sorted(expected):
      raise ValueError(f"leaves {sorted(entries)} do not match the plan's {sorted(expected)}")
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{directory}: malformed adapter metadata: {e}") from e
  base_leaves = _check_base(meta, base, directory)
  target_shardings = _target_shardings(plan, base_leaves, shardings)
  abstract = {p: jax.ShapeDtypeStruct(tuple(e["shape"]), jnp.dtype(e["dtype"]),
                                      sharding=target_shardings[p]) for p, e in entries.items()}
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      restored = ckptr.restore(_current(directory), args=ocp.args.Composite(
          lora=ocp.args.StandardRestore(_nest(abstract))))["lora"]
    arrays = {p: _pick(restored, p) for p in expected}
  except CheckpointError:
    raise
  except Exception as e:  # orbax/tensorstore raise many types for truncated or garbled files
    raise CheckpointError(f"{directory}: cannot restore the adapter arrays "
                          f"(truncated or corrupted checkpoint): {type(e).__name__}: {e}") from e
  for (p, x), c in zip(arrays.items(), _checksums(list(arrays.values()))):
    e = entries[p]
    if tuple(x.shape) != tuple(e["shape"]) or x.dtype.name != e["dtype"] or int(c) != e["checksum"]:
      raise CheckpointError(f"{directory}: {p}: restored array ({x.dtype.name}{list(x.shape)}) does "
                            f"not match its record ({e['dtype']}{e['shape']}, checksum "
                            f"{e['checksum']}, got {int(c)}): corrupted checkpoint")

  tree = put_factors(base, {s.path: (s.layout, arrays[s.path + LORA_A], arrays[s.path + LORA_B])
                            for s in plan.sites}, "load_adapter")
  dtypes = {s.path: jnp.dtype(unbox(base_leaves[s.path]).dtype).name for s in plan.sites}
  plan = dataclasses.replace(plan, sites=tuple(dataclasses.replace(s, dtype=dtypes[s.path])
                                               for s in plan.sites))
  return tree, plan
