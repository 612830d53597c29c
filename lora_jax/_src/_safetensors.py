"""A small numpy-only reader/writer for the safetensors format (so lora_jax needs no extra
dependency to exchange adapters with PEFT).

File layout: 8 bytes little-endian `uint64` header length `n`; `n` bytes of JSON
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}`
(padded with spaces to a multiple of 8); then the raw little-endian, C-order tensor bytes, with
offsets relative to the end of the header. The tensors cover the data buffer exactly.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors package's own limit


def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
         metadata: Mapping[str, str] | None = None) -> None:
  """Write `tensors` to `path` atomically (a temporary file in the same directory, then rename)."""
  header: dict = {"__metadata__": dict(metadata)} if metadata else {}
  blobs, offset = [], 0
  for name, x in tensors.items():
    x = np.asarray(x)
    if x.dtype not in _NAMES:
      raise ValueError(f"safetensors: {name}: dtype {x.dtype} is not supported ({sorted(DTYPES)})")
    data = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": _NAMES[x.dtype], "shape": list(x.shape),
                    "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(struct.pack("<Q", len(head)) + head)
      for b in blobs:
        f.write(b)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """`(tensors, metadata)` from a safetensors file; raises `ValueError` naming the file on any
  inconsistency (truncation, overlapping or uncovered bytes, unknown dtype, size mismatch)."""
  with open(path, "rb") as f:
    raw = f.read()

  def bad(why: str) -> ValueError:
    return ValueError(f"{os.fspath(path)}: not a valid safetensors file: {why}")

  if len(raw) < 8:
    raise bad(f"{len(raw)} bytes, shorter than the 8-byte header length")
  (n,) = struct.unpack("<Q", raw[:8])
  if n > min(_MAX_HEADER, len(raw) - 8):
    raise bad(f"header length {n} exceeds the file ({len(raw)} bytes)")
  try:
    header = json.loads(raw[8:8 + n])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise bad(f"header is not JSON ({e})") from None
  if not isinstance(header, dict):
    raise bad("header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  data = memoryview(raw)[8 + n:]
  tensors, spans = {}, []
  for name, info in header.items():
    try:
      dtype, shape, (begin, end) = np.dtype(DTYPES[info["dtype"]]), tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise bad(f"{name}: entry {info!r} needs a known dtype, a shape and two data_offsets") from None
    if not 0 <= begin <= end <= len(data) or (end - begin) != dtype.itemsize * int(np.prod(shape)):
      raise bad(f"{name}: data_offsets {[begin, end]} do not fit dtype {info['dtype']}, shape "
                f"{list(shape)} and a data buffer of {len(data)} bytes")
    spans.append((begin, end, name))
    tensors[name] = np.frombuffer(data[begin:end], dtype.newbyteorder("<")).astype(dtype).reshape(shape)
  covered = 0
  for begin, end, name in sorted(spans):
    if begin != covered:
      raise bad(f"{name}: data starts at {begin}, expected {covered} (gap or overlap)")
    covered = end
  if covered != len(data):
    raise bad(f"tensors cover {covered} of {len(data)} data bytes")
  return tensors, metadata
