"""Adapter-only orbax checkpoints that describe themselves (training checkpoints: `training.py`).

`save_adapter` writes the LoRA leaves (`*_lora_a: (*stack, *in, r)`, `*_lora_b: (*stack, r, *out)`)
and a JSON record of everything needed to put them back: the plan (paths, layouts, ranks, alphas,
scaling, dropout), the lora_jax version, a fingerprint of the base kernels they belong to
(path -> shape, dtype), per leaf its shape, dtype, byte count and a checksum of its bytes, and a
SHA-256 of the record itself. No base weight is ever written.

`load_adapter` trusts nothing it reads: it validates the record against itself (rank <=
min(fan_in, fan_out), scale = alpha/r or alpha/sqrt(r) per the config's scaling, finite numbers,
leaf shapes = the site's A/B shapes, float dtypes, byte counts) and its SHA-256 *before* anything
large is allocated, checks the fingerprint against the base it is given, restores the leaves
straight into their shardings, verifies each leaf's checksum, and only then builds the LoRA tree.
Any damage is a bit-identical load or `CheckpointError` naming the directory (and the record
field, leaf or file at fault); never another exception type, never a different adapter.

On disk, `directory` holds versioned orbax checkpoints, a pointer file naming the current one and
a lock file:

    directory/LATEST          "adapter-3"  (replaced atomically with os.replace)
    directory/adapter-3/      orbax composite checkpoint: lora/ (the arrays), lora_jax/ (the JSON)
    directory/.lock           empty; `fcntl.flock`ed by the one writer at a time

Concurrency: *writers are serialised by an exclusive `flock` on `directory/.lock`*, held for the
whole save (pick the next version number, write and fsync `adapter-<n>/`, switch `LATEST` with a
uniquely named temporary file + `os.replace`, delete the older versions and the leftovers of
crashed saves). A second writer waits for the first, then saves after it; nobody deletes a
version another writer is still writing or about to publish, and the last save to finish is the
one `LATEST` names. The kernel drops the lock when its holder dies, so a crashed writer never
blocks the others. Readers take no lock: a load that finds its version replaced under it by a
concurrent save re-reads `LATEST` and loads the new one. `flock` needs a local or
lock-supporting file system (on NFS, use one writer per directory).

Multi-process (`jax.distributed`): every process calls `save_adapter` / `load_adapter` with the
same arguments. Orbax's save is called by every process (each writes its shards); only process 0
takes the lock, picks the version number (broadcast to the others), writes the pointer and deletes
old versions, and the processes agree on success or failure at each step, so none is left waiting
in a barrier for a process that failed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.sharding import Sharding, SingleDeviceSharding

from .adapters import (
  LORA_A,
  LORA_B,
  LORA_FULL,
  factor_shardings,
  lora_paths,
  put_factors,
  saved_arrays,
  site_arrays,
)
from .config import SCALINGS, LoraConfig
from .layout import Layout
from .sites import Plan, Site
from .tree import flatten, unbox
from .version import __version__

PyTree = Any
FORMAT = "lora_jax.adapter/2"
LEGACY_FORMAT = "lora_jax.adapter/1"  # no record checksum, no version field; still readable
POINTER = "LATEST"
LOCK = ".lock"
MAX_RECORD_BYTES = 64 * 2**20  # a record is a few KiB per site; refuse to parse anything huge
# a version directory, or orbax's temporary one for it (orbax writes there, then renames)
_VERSION_DIR = re.compile(r"adapter-(\d+)(\.orbax-checkpoint-tmp.*)?")
_POINTER_TMP = re.compile(re.escape(POINTER) + r"\.tmp(-.*)?")
_RECORD_KEYS = {"format", "version", "lora_jax_version", "plan", "base_fingerprint", "leaves",
                "raw_bytes", "record_sha256"}
_LEGACY_KEYS = _RECORD_KEYS - {"version", "record_sha256"}
_READ_ATTEMPTS = 5  # loads that lose a race with a concurrent save retry on the new version


class CheckpointError(ValueError):
  """An adapter or training checkpoint that is missing, truncated, corrupted or inconsistent."""


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
  """Per array, a position-weighted sum of its bytes mod 2**32. Integer addition is associative,
  so the value does not depend on how the array is sharded; one scalar per leaf leaves the device."""

  def one(x):
    b = lax.bitcast_convert_type(x, jnp.uint8).reshape(-1).astype(jnp.uint32)
    weights = lax.iota(jnp.uint32, b.size) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(b * weights, dtype=jnp.uint32)

  return [one(x) for x in leaves]


def checksums(leaves: list[Any]) -> list[int]:
  """`_checksums` as Python ints (0 <= c < 2**32), one per leaf (bool leaves as uint8)."""
  leaves = [jnp.asarray(x) for x in leaves]
  leaves = [x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x for x in leaves]
  groups: dict[Any, list[int]] = {}  # one jit call per set of devices (they cannot be mixed)
  for i, x in enumerate(leaves):
    devices = frozenset(d.id for d in x.sharding.device_set) if isinstance(x, jax.Array) else None
    groups.setdefault(devices, []).append(i)
  out = [0] * len(leaves)
  for idx in groups.values():
    for i, c in zip(idx, _checksums([leaves[i] for i in idx])):
      out[i] = int(c)
  return out


def record_digest(record: Mapping[str, Any]) -> str:
  """SHA-256 (hex) of the canonical JSON of `record` without its `record_sha256` field."""
  body = {k: v for k, v in record.items() if k != "record_sha256"}
  text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
  return hashlib.sha256(text.encode("ascii")).hexdigest()


def read_json(path: pathlib.Path, where: str) -> Any:
  """The JSON document at `path`: strict UTF-8, no NaN/Infinity, at most `MAX_RECORD_BYTES`.

  Raises:
    CheckpointError: prefixed with `where`, for a missing, huge, non-UTF-8 or malformed file.
  """
  try:
    size = path.stat().st_size
    if size > MAX_RECORD_BYTES:
      raise CheckpointError(f"{where}: {path} is {size:,} bytes, more than any lora_jax record "
                            f"({MAX_RECORD_BYTES:,}); corrupted checkpoint")
    text = path.read_bytes().decode("utf-8")

    def no_constants(name: str) -> Any:
      raise ValueError(f"non-finite number {name}")

    return json.loads(text, parse_constant=no_constants)
  except CheckpointError:
    raise
  except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError are ValueErrors
    raise CheckpointError(f"{where}: cannot read the record {path} ({type(e).__name__}: {e}); "
                          "missing, truncated or corrupted checkpoint") from e


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


def _metadata(plan: Plan, kernels: dict[str, Any], leaves: dict[str, jax.Array], version: str,
              saved: dict[str, Any]) -> dict[str, Any]:
  sums = checksums(list(leaves.values()))
  record = {
      "format": FORMAT,
      "version": version,
      "lora_jax_version": __version__,
      "plan": plan.to_dict(),
      "base_fingerprint": [{"path": s.path, "shape": list(kernels[s.path][0].shape),
                            "dtype": jnp.dtype(kernels[s.path][0].dtype).name} for s in plan.sites]
                          + [{"path": p, "shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name}
                             for p, x in saved.items()],
      "leaves": [{"path": p, "shape": list(x.shape), "dtype": x.dtype.name, "nbytes": int(x.nbytes),
                  "checksum": c} for (p, x), c in zip(leaves.items(), sums)],
      "raw_bytes": int(sum(x.nbytes for x in leaves.values())),
  }
  record["record_sha256"] = record_digest(record)
  return record


# ---------------------------------------------------------------------------------------------
# Validation of a record read from disk: everything is checked before it is used.


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _Record:
  """Checks on a parsed record; each failure is a `CheckpointError` naming the directory and the
  record field (`plan.sites[1].rank`)."""

  def __init__(self, where: pathlib.Path):
    self.where = where

  def fail(self, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{self.where}: adapter record field {field}: {problem} (corrupted or "
                           "edited checkpoint; re-save it with lj.save_adapter)")

  def need(self, ok: bool, field: str, problem: str) -> None:
    if not ok:
      raise self.fail(field, problem)

  def keys(self, d: Any, field: str, keys: set[str]) -> dict:
    self.need(isinstance(d, dict), field, f"expected an object, got {type(d).__name__}")
    missing, extra = sorted(keys - set(d)), sorted(set(d) - keys)
    self.need(not missing, f"{field}.{missing[0]}" if missing else field, "missing")
    self.need(not extra, f"{field}.{extra[0]}" if extra else field, "unexpected field")
    return d

  def shape(self, x: Any, field: str) -> tuple[int, ...]:
    self.need(isinstance(x, list) and all(_is_int(n) and n >= 1 for n in x), field,
              f"expected a list of positive integers, got {x!r}")
    return tuple(x)

  def dtype(self, x: Any, field: str, floating: bool = False) -> np.dtype:
    try:
      dt = jnp.dtype(x) if isinstance(x, str) else None
    except (TypeError, ValueError, SyntaxError):  # numpy parses some strings as dtype specs
      dt = None
    self.need(dt is not None and dt.name == x, field, f"{x!r} is not a dtype name")
    assert dt is not None  # `need` raised otherwise
    if floating:
      self.need(jnp.issubdtype(dt, jnp.floating), field, f"{x!r} is not a floating dtype")
    return dt


def _check_site(r: _Record, d: Any, i: int, config: LoraConfig) -> Site:
  f = f"plan.sites[{i}]"
  r.keys(d, f, {"path", "shape", "dtype", "layout", "rank", "alpha", "scale", "use"})
  r.need(isinstance(d["path"], str) and d["path"] != "", f + ".path", f"{d['path']!r} is not a path")
  shape = r.shape(d["shape"], f + ".shape")
  r.dtype(d["dtype"], f + ".dtype")
  lay = r.keys(d["layout"], f + ".layout", {"stack_axes", "in_axes", "out_axes"})
  r.need(all(isinstance(v, list) and all(_is_int(j) for j in v) for v in lay.values()),
         f + ".layout", f"{lay!r} does not list axis numbers")
  layout = Layout.from_dict(lay)
  try:
    layout.check(shape, f + ".layout")
  except ValueError as e:
    raise r.fail(f + ".layout", str(e)) from None
  rank, alpha, scale = d["rank"], d["alpha"], d["scale"]
  fan_in, fan_out = layout.fan_in(shape), layout.fan_out(shape)
  r.need(_is_int(rank) and 1 <= rank <= min(fan_in, fan_out), f + ".rank",
         f"{rank!r} is not an integer in [1, min(fan_in={fan_in}, fan_out={fan_out})]")
  r.need(_is_number(alpha) and alpha > 0, f + ".alpha", f"{alpha!r} is not a finite number > 0")
  want = alpha / math.sqrt(rank) if config.scaling == "rslora" else alpha / rank
  formula = "alpha/sqrt(rank)" if config.scaling == "rslora" else "alpha/rank"
  r.need(_is_number(scale) and math.isclose(scale, want, rel_tol=1e-9), f + ".scale",
         f"{scale!r} is not {formula} = {want!r} (scaling={config.scaling!r}, alpha={alpha!r}, "
         f"rank={rank})")
  r.need(isinstance(d["use"], list), f + ".use", "expected a list")
  try:
    site = Site.from_dict(d)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise r.fail(f + ".use", f"{type(e).__name__}: {e}") from None
  r.need(site.to_dict() == d, f, "does not survive a round trip through lj.Site")
  return site


def validate_record(meta: Any, where: pathlib.Path, version: str) -> tuple[Plan, dict[str, dict]]:
  """Check an adapter record against itself (and `version`, the directory it was read from).

  Args:
    meta: the parsed JSON record.
    where: the checkpoint directory (for messages).
    version: the name of the version directory, e.g. `"adapter-3"`.

  Returns:
    `(plan, {leaf path: leaf entry})`, entries in the plan's order.

  Raises:
    CheckpointError: naming `where` and the first field that is missing, of the wrong type,
      out of range, inconsistent with another field, or not covered by the record's SHA-256.
  """
  r = _Record(where)
  r.need(isinstance(meta, dict), "(record)", f"expected a JSON object, got {type(meta).__name__}")
  fmt = meta.get("format")
  r.need(fmt in (FORMAT, LEGACY_FORMAT), "format",
         f"{fmt!r} is not a lora_jax adapter format ({FORMAT!r})")
  r.keys(meta, "(record)", _RECORD_KEYS if fmt == FORMAT else _LEGACY_KEYS)
  if fmt == FORMAT:
    r.need(meta["version"] == version, "version",
           f"{meta['version']!r}, but the record lies in {version!r}")
  r.need(isinstance(meta["lora_jax_version"], str), "lora_jax_version", "expected a string")
  plan_keys = {"config", "base_params", "sites"}
  plan_d = r.keys(meta["plan"], "plan",
                  plan_keys | ({"saved"} if isinstance(meta["plan"], dict) and "saved" in meta["plan"]
                               else set()))
  r.need(_is_int(plan_d["base_params"]) and plan_d["base_params"] >= 0, "plan.base_params",
         f"{plan_d['base_params']!r} is not a count")
  r.need(isinstance(plan_d["config"], dict), "plan.config", "expected an object")
  r.need(plan_d["config"].get("scaling") in SCALINGS, "plan.config.scaling",
         f"{plan_d['config'].get('scaling')!r} is not one of {SCALINGS}")
  try:
    config = LoraConfig.from_dict(plan_d["config"])
  except (TypeError, ValueError) as e:
    raise r.fail("plan.config", f"{type(e).__name__}: {e}") from None
  r.need(config.to_dict() == plan_d["config"], "plan.config",
         "does not survive a round trip through lj.LoraConfig")
  sites_d = plan_d["sites"]
  r.need(isinstance(sites_d, list) and len(sites_d) > 0, "plan.sites", "expected a non-empty list")
  sites = tuple(_check_site(r, d, i, config) for i, d in enumerate(sites_d))
  paths = [s.path for s in sites]
  r.need(len(set(paths)) == len(paths), "plan.sites", f"repeated paths in {paths}")
  saved = plan_d.get("saved", [])
  r.need(isinstance(saved, list) and all(isinstance(p, str) and config.saves(p) for p in saved)
         and len(set(saved)) == len(saved) and not set(saved) & set(paths), "plan.saved",
         f"{saved!r} is not a list of distinct leaf paths in the config's modules_to_save")
  plan = Plan(sites, config, plan_d["base_params"], tuple(saved))

  fp = meta["base_fingerprint"]
  r.need(isinstance(fp, list) and len(fp) == len(sites) + len(saved), "base_fingerprint",
         f"expected one entry per site and saved leaf ({len(sites) + len(saved)})")
  for i, (e, p) in enumerate(zip(fp[len(sites):], saved), start=len(sites)):
    f = f"base_fingerprint[{i}]"
    r.keys(e, f, {"path", "shape", "dtype"})
    r.need(e["path"] == p, f + ".path", f"{e['path']!r} is not the saved leaf {p!r}")
    r.shape(e["shape"], f + ".shape")
    r.dtype(e["dtype"], f + ".dtype")
  for i, (e, s) in enumerate(zip(fp, sites)):
    f = f"base_fingerprint[{i}]"
    r.keys(e, f, {"path", "shape", "dtype"})
    r.need(e["path"] == s.path, f + ".path", f"{e['path']!r} is not the site's {s.path!r}")
    r.need(e["shape"] == list(s.shape), f + ".shape", f"{e['shape']!r} is not the site's {list(s.shape)}")
    r.need(e["dtype"] == s.dtype, f + ".dtype", f"{e['dtype']!r} is not the site's {s.dtype!r}")

  leaves = meta["leaves"]
  expected = [(s.path + f, shape) for s in sites for f, shape in ((LORA_A, s.a_shape),
                                                                   (LORA_B, s.b_shape))]
  expected += [(e["path"] + LORA_FULL, tuple(e["shape"])) for e in fp[len(sites):]]
  r.need(isinstance(leaves, list) and len(leaves) == len(expected), "leaves",
         f"expected one entry per factor and saved leaf ({len(expected)})")
  entries = {}
  for i, (e, (path, shape)) in enumerate(zip(leaves, expected)):
    f = f"leaves[{i}]"
    r.keys(e, f, {"path", "shape", "dtype", "nbytes", "checksum"})
    r.need(e["path"] == path, f + ".path", f"{e['path']!r}, expected {path!r}")
    r.need(e["shape"] == list(shape), f + ".shape",
           f"{e['shape']!r} is not the site's factor shape {list(shape)} (from its layout and rank)")
    dt = r.dtype(e["dtype"], f + ".dtype", floating=True)
    r.need(_is_int(e["nbytes"]) and e["nbytes"] == math.prod(shape) * dt.itemsize, f + ".nbytes",
           f"{e['nbytes']!r} is not {math.prod(shape)} x {dt.itemsize} bytes")
    r.need(_is_int(e["checksum"]) and 0 <= e["checksum"] < 2**32, f + ".checksum",
           f"{e['checksum']!r} is not a 32-bit checksum")
    entries[path] = e
  r.need(meta["raw_bytes"] == sum(e["nbytes"] for e in entries.values()), "raw_bytes",
         f"{meta['raw_bytes']!r} is not the sum of the leaves' nbytes")
  if fmt == FORMAT:
    r.need(meta["record_sha256"] == record_digest(meta), "record_sha256",
           "does not match the record's content")
  r.need(plan.to_dict() == plan_d, "plan", "does not survive a round trip through lj.Plan")
  return plan, entries


# ---------------------------------------------------------------------------------------------
# Files, the lock, and agreement between processes.


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
  """Point `directory/LATEST` at `version`, atomically: write a uniquely named temporary file
  (pid + random token, so concurrent writers never share one), fsync, `os.replace`, fsync dir."""
  tmp = directory / f"{POINTER}.tmp-{os.getpid()}-{secrets.token_hex(6)}"
  try:
    with open(tmp, "w", encoding="ascii") as f:
      f.write(version)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, directory / POINTER)
  finally:
    tmp.unlink(missing_ok=True)
  _fsync(directory)


def _ours(name: str) -> bool:
  return bool(_VERSION_DIR.fullmatch(name) or _POINTER_TMP.fullmatch(name)
              or name in (POINTER, LOCK))


def _versions(directory: pathlib.Path) -> list[pathlib.Path]:
  """Our entries in `directory`: version dirs, orbax temp dirs of versions, pointer temp files
  (not the pointer and the lock themselves)."""
  return [p for p in directory.iterdir() if _ours(p.name) and p.name not in (POINTER, LOCK)]


@contextmanager
def _locked(directory: pathlib.Path) -> Iterator[None]:
  """Hold an exclusive `flock` on `directory/.lock` (blocking until the current holder is done;
  the kernel releases it if the holder dies)."""
  import fcntl  # POSIX only
  fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


def _multiprocess() -> bool:
  return jax.process_count() > 1


def _agree(value: int, what: str) -> int:
  """Process 0's `value`, on every process (a collective: every process must call it)."""
  if not _multiprocess():
    return value
  out = ocp.multihost.broadcast_one_to_all(np.int64(value))
  return int(out)


def _pointer(directory: pathlib.Path) -> str:
  """The version `directory/LATEST` names (not checked to exist)."""
  pointer = directory / POINTER
  if not pointer.is_file():
    what = "does not exist" if not directory.exists() else f"has no {POINTER} file"
    raise CheckpointError(f"{directory}: not a lora_jax adapter checkpoint ({what})")
  try:
    raw = pointer.read_bytes()
    if len(raw) > 64:
      raise ValueError(f"{len(raw)} bytes")
    version = raw.decode("ascii")
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{directory}: unreadable {POINTER} file ({type(e).__name__}: {e}); "
                          "corrupted checkpoint") from e
  if not re.fullmatch(r"adapter-[1-9]\d*", version):
    raise CheckpointError(f"{directory}: {POINTER} holds {version!r}, not a version name like "
                          "'adapter-3' (corrupted checkpoint)")
  return version


def _current(directory: pathlib.Path) -> pathlib.Path:
  version = _pointer(directory)
  if not (directory / version).is_dir():
    raise CheckpointError(f"{directory}: {POINTER} names {version!r}, which is not a checkpoint "
                          "directory there (truncated or corrupted checkpoint)")
  return directory / version


def _retrying(directory: pathlib.Path, read: Any) -> Any:
  """`read(version_dir)`, again on the new version if a concurrent save replaced the one read
  (its files deleted under us). A failure on a version that is still current is raised."""
  for attempt in range(_READ_ATTEMPTS):
    version = _current(directory)
    try:
      return read(version)
    except CheckpointError:
      try:
        moved = _pointer(directory) != version.name
      except CheckpointError:
        moved = False
      if not moved or attempt == _READ_ATTEMPTS - 1:
        raise
  raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# save_adapter / read_metadata / load_adapter


def save_adapter(directory: str | os.PathLike, plan: Plan, tree: PyTree) -> None:
  """Write the LoRA leaves of `tree` (only those: no base weight) and their record to `directory`.

  `tree` is a LoRA tree (`lj.attach`) matching `plan`; boxes (`nn.Partitioned`, NNX `Variable`)
  are unwrapped, sharded leaves are written by orbax from their shards. Size on disk is about the
  raw bytes of the factors, `sum(|A| + |B|) · itemsize`, plus a few KiB of metadata (orbax
  compresses, so zero `B`s take almost nothing).

  Atomic: the new checkpoint is written and fsynced next to the old one and `directory/LATEST` is
  then swapped to it with `os.replace`; a crash before the swap leaves the previous checkpoint
  readable. Safe for concurrent writers (serialised by a lock on `directory/.lock`; the last one
  to finish wins) and under `jax.distributed` (every process calls it; process 0 writes the
  shared files). See the module docstring.

  Args:
    directory: where to save; created if missing.
    plan: the plan `tree` was attached with.
    tree: the LoRA tree.

  Returns:
    None; `directory/LATEST` names the new version once it is complete.

  Raises:
    ValueError: `tree` does not match `plan`, or `directory` holds anything but lora_jax adapter
      checkpoints (it never deletes foreign files).
    CheckpointError: under `jax.distributed`, another process failed its part of the save.
  """
  directory = pathlib.Path(directory).absolute()
  arrays = site_arrays(plan, tree)  # {path: (W, A, B)}, unboxed; raises if tree != plan
  leaves = {s.path + f: jnp.asarray(arrays[s.path][i]) for s in plan.sites
            for i, f in ((1, LORA_A), (2, LORA_B))}
  saved = saved_arrays(plan, tree)
  leaves |= {p + LORA_FULL: jnp.asarray(x) for p, x in saved.items()}
  if directory.exists():
    foreign = sorted(p for p in directory.iterdir() if not _ours(p.name))
    if foreign:
      raise ValueError(f"save_adapter: {directory} exists and holds files that are not lora_jax "
                       f"adapter checkpoints (e.g. {foreign[0].name!r}); pick another directory")
  primary = jax.process_index() == 0
  if primary:
    directory.mkdir(parents=True, exist_ok=True)
  with (_locked(directory) if primary else _no_lock()):
    number, error = 0, None
    if primary:
      try:
        number = _next_number(directory)
      except BaseException as e:
        number, error = -1, e
    number = _agree(number, "version")
    if error is not None:
      raise error
    if number < 1:
      raise CheckpointError(f"save_adapter: {directory}: process 0 failed to prepare the save; "
                            "see its log")
    version = f"adapter-{number}"
    meta = _metadata(plan, arrays, leaves, version, saved)
    failed = 0
    try:
      with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(directory / version, args=ocp.args.Composite(
            lora=ocp.args.StandardSave(_nest(leaves)), lora_jax=ocp.args.JsonSave(meta)))
      if primary:
        _fsync_tree(directory / version)
        _fsync(directory)
        _replace_pointer(directory, version)
        for p in _versions(directory):  # the older versions: we published the newest
          if p.name != version:
            _remove(p)
    except BaseException as e:
      failed, error = 1, e
    if _agree(failed, "saved") and error is None:
      raise CheckpointError(f"save_adapter: {directory}: process 0 failed to save {version}; "
                            "see its log")
    if error is not None:
      raise error


def _next_number(directory: pathlib.Path) -> int:
  """Under the lock: delete the leftovers of crashed saves (anything unpublished: no other writer
  can be mid-save) and return the next version number."""
  try:
    keep = _pointer(directory) if (directory / POINTER).exists() else None
  except CheckpointError:
    keep = None
  for p in _versions(directory):
    if p.name != keep:
      _remove(p)
  numbers = [int(m.group(1)) for p in directory.iterdir() if (m := _VERSION_DIR.fullmatch(p.name))]
  if keep is not None:
    numbers.append(int(keep.split("-")[1]))
  return max(numbers, default=0) + 1


@contextmanager
def _no_lock() -> Iterator[None]:
  yield


def _remove(p: pathlib.Path) -> None:
  if p.is_dir():
    shutil.rmtree(p, ignore_errors=True)
  else:
    p.unlink(missing_ok=True)


def _read_record(version_dir: pathlib.Path) -> tuple[dict[str, Any], Plan, dict[str, dict]]:
  directory = version_dir.parent
  meta = read_json(version_dir / "lora_jax" / "metadata", str(directory))
  plan, entries = validate_record(meta, directory, version_dir.name)
  return meta, plan, entries


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """The validated JSON record of the adapter checkpoint in `directory` (plan, fingerprint,
  leaves, version), without touching any array.

  Raises:
    CheckpointError: naming `directory` (and the field) if it is missing, malformed, edited or
      inconsistent.
  """
  directory = pathlib.Path(directory).absolute()
  return _retrying(directory, lambda v: _read_record(v)[0])


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


def _given_shardings(shardings: Any) -> dict[str, Any]:
  """`shardings` as `{leaf path: value}` (values checked later).

  Raises:
    TypeError: naming `shardings` when it is neither None, a `Sharding` nor a mapping.
  """
  if shardings is None:
    return {}
  if isinstance(shardings, Sharding):
    return {"*": shardings}
  if not isinstance(shardings, Mapping):
    raise TypeError(f"load_adapter: shardings must be None, a jax.sharding.Sharding, "
                    f"{{leaf path: Sharding}} or a pytree of Shardings shaped like the adapters "
                    f"(lj.split(tree)[0]); got {type(shardings).__name__} {shardings!r:.80}")
  given: dict[str, Any] = {}

  def walk(node, prefix):
    for k, v in node.items():
      walk(v, f"{prefix}{k}/") if isinstance(v, Mapping) else given.__setitem__(f"{prefix}{k}", v)

  walk(shardings, "")
  return given


def _target_shardings(plan: Plan, base_leaves: dict[str, Any], given: dict[str, Any]
                      ) -> dict[str, Sharding]:
  expected = {s.path + f for s in plan.sites for f in (LORA_A, LORA_B)}
  expected |= {p + LORA_FULL for p in plan.saved}
  if set(given) == {"*"} and isinstance(given["*"], Sharding):
    given = dict.fromkeys(expected, given["*"])
  wrong = [(p, v) for p, v in given.items() if not isinstance(v, Sharding)]
  if wrong:
    raise ValueError(f"load_adapter: shardings[{wrong[0][0]!r}] = {wrong[0][1]!r} is not a "
                     "jax.sharding.Sharding (e.g. NamedSharding(mesh, PartitionSpec(...)))")
  stray = sorted(set(given) - expected)
  if stray:
    raise ValueError(f"load_adapter: shardings given for {stray[0]!r}, which is not a LoRA leaf of "
                     f"this adapter (expected paths like {sorted(expected)[0]!r})")
  default = SingleDeviceSharding(jax.local_devices()[0])  # this process's; jax.devices()[0] is not
  out = {}
  for s in plan.sites:
    kernel = unbox(base_leaves[s.path])
    for f in (LORA_A, LORA_B):
      out[s.path + f] = given.get(s.path + f) or _adapter_sharding(s, kernel, f) or default
  for p in plan.saved:  # a full copy goes where its leaf is
    own = getattr(unbox(base_leaves[p]), "sharding", None)
    out[p + LORA_FULL] = given.get(p + LORA_FULL) or (own if isinstance(own, Sharding) else default)
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
  axes, rank axis replicated), else on this process's first device. Orbax restores each shard
  directly on its device; nothing is gathered on one device first.

  The record is validated (against itself and its SHA-256) before any array is allocated, and
  each restored factor against its checksum. A load racing a concurrent `save_adapter` loads the
  version that save published. Under `jax.distributed` every process calls it.

  Args:
    directory: a directory written by `lj.save_adapter`.
    base: the base variables (any pytree, no LoRA leaves).
    shardings: optional placement of the factors (see above).

  Returns:
    `(tree, plan)`: the LoRA tree (factors `A: (*stack, *in, r)`, `B: (*stack, r, *out)` beside
    their kernels) and the plan stored with the adapter.

  Raises:
    TypeError: `shardings` is not None, a `Sharding` or a mapping.
    ValueError: naming the first path whose kernel is missing from `base` or differs in shape
      (both shapes given), or a `shardings` entry that is not a `Sharding` or not a LoRA leaf.
    CheckpointError: naming the directory (and the record field or leaf) for a missing,
      truncated, corrupted or edited checkpoint. Either way nothing is returned half-loaded and
      `base` is not modified.
  """
  directory = pathlib.Path(directory).absolute()
  given = _given_shardings(shardings)
  return _retrying(directory, lambda v: _load_version(v, base, given))


def _load_version(version_dir: pathlib.Path, base: PyTree, given: dict[str, Any]
                  ) -> tuple[PyTree, Plan]:
  directory = version_dir.parent
  meta, plan, entries = _read_record(version_dir)
  base_leaves = _check_base(meta, base, directory)
  target_shardings = _target_shardings(plan, base_leaves, given)
  expected = list(entries)
  abstract = {p: jax.ShapeDtypeStruct(tuple(e["shape"]), jnp.dtype(e["dtype"]),
                                      sharding=target_shardings[p]) for p, e in entries.items()}
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      restored = ckptr.restore(version_dir, args=ocp.args.Composite(
          lora=ocp.args.StandardRestore(_nest(abstract))))["lora"]
    arrays = {p: _pick(restored, p) for p in expected}
  except Exception as e:  # orbax/tensorstore raise many types for truncated or garbled files
    raise CheckpointError(f"{directory}: cannot restore the adapter arrays of {version_dir.name} "
                          f"(truncated or corrupted checkpoint): {type(e).__name__}: {e}") from e
  bad = [p for p, x in arrays.items() if not isinstance(x, jax.Array)
         or tuple(x.shape) != tuple(entries[p]["shape"]) or x.dtype.name != entries[p]["dtype"]]
  if bad:
    x = arrays[bad[0]]
    raise CheckpointError(f"{directory}: {bad[0]}: restored {type(x).__name__} "
                          f"{getattr(x, 'dtype', '?')}{list(getattr(x, 'shape', ()))} does not match "
                          f"its record: corrupted checkpoint")
  for (p, x), c in zip(arrays.items(), checksums(list(arrays.values()))):
    e = entries[p]
    if c != e["checksum"]:
      raise CheckpointError(f"{directory}: {p}: restored array ({x.dtype.name}{list(x.shape)}) does "
                            f"not match its record (checksum {e['checksum']}, got {c}): corrupted "
                            "checkpoint")

  tree = put_factors(base, {s.path: (s.layout, arrays[s.path + LORA_A], arrays[s.path + LORA_B])
                            for s in plan.sites}, "load_adapter",
                     {p: arrays[p + LORA_FULL] for p in plan.saved})
  dtypes = {s.path: jnp.dtype(unbox(base_leaves[s.path]).dtype).name for s in plan.sites}
  plan = dataclasses.replace(plan, sites=tuple(dataclasses.replace(s, dtype=dtypes[s.path])
                                               for s in plan.sites))
  return tree, plan
