"""A quantized frozen base (QLoRA, Dettmers et al. 2023): kernels stored as `QuantizedArray`
leaves (codes + scales), dequantized where they are used.

Formats, all over the kernel arranged as PyTorch's `(out, in)` weight per stack index (storage
`(*stack, prod(out), prod(in))`, stack axes leading, so one layer or expert is one leading index):

- `"nf4"`: 4-bit NormalFloat exactly as bitsandbytes 0.50 defines it. Per block of `block_size`
  consecutive weights along the input axes, `absmax = max|w|`; each weight is scaled by
  `1/absmax` (a float32 reciprocal, then a product, clipped to [-1, 1]) and coded as the nearest of
  the 16 NF4 values (bucketing by midpoints, a tie to the lower value); two codes per byte, the first
  in the high nibble. Dequantized: `NF4[code] · absmax` in float32.
  With `double_quant` (bitsandbytes' `compress_statistics`), the block maxima of each stack index
  are stored as `absmax - mean` coded blockwise (blocks of 256) in bitsandbytes' signed 8-bit
  dynamic map, plus one float32 absmax per 256 and the float32 mean. We match bitsandbytes' **CPU**
  path bit for bit: its mean is torch's CPU float32 sum (8-lane cascade summation, split over
  threads past 32768 values) divided by the count, and it codes `v / absmax2` (a true division) as
  the lower neighbour in the map unless the upper one is strictly nearer (its CUDA path codes by
  midpoints; the two can differ in the last code on a tie).
- `"int8"`: symmetric per-output-channel absmax: `code = round(w / s)`, `s = max|w| / 127`.
- `"fp8"`: `float8_e4m3fn` with a per-output-channel scale `s = max|w| / 448`.

Bytes per weight: NF4 0.5 + 4/block_size (0.5 + 1/block_size + 4/(256·block_size) with
double quantization); int8 1 + 4/prod(in); fp8 the same.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .adapters import is_lora_name
from .layout import Layout, Role
from .sites import Plan
from .tree import PyTree, flatten, map_leaves, unbox, with_value

FORMATS = ("nf4", "int8", "fp8")

# The 16 NormalFloat values (quantiles of N(0, 1) scaled to [-1, 1], QLoRA appendix E) as
# bitsandbytes lists them, rounded to float32.
NF4_VALUES = np.array([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
  0.7229568362236023, 1.0], np.float32)
_NF4_BOUNDS = (NF4_VALUES[:-1] + NF4_VALUES[1:]) / np.float32(2)

# bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`: a dynamic exponent and a
# shrinking fraction, Dettmers 2015; it runs from -0.99297 to 1), as float32 bits. Kept as data:
# torch's float32 `linspace`, from which it is built, rounds differently from numpy's.
_DYNAMIC_HEX = (
  "bf7e3333bf7a999abf770000bf736666bf6fcccdbf6c3333bf68999abf650000bf616666bf5dcccdbf5a3333bf56999a"
  "bf530000bf4f6666bf4bcccdbf483333bf44999abf410000bf3d6666bf39cccdbf363334bf32999abf2f0000bf2b6666"
  "bf27cccdbf243334bf20999abf1d0000bf196666bf15cccdbf123334bf0e999abf0b0000bf076666bf03ccccbf003333"
  "bef93332bef20000beeaccccbee3999abedc6666bed53333bece0000bec6ccccbebf999abeb86666beb13333beaa0000"
  "bea2ccccbe9b999abe946666be8d3334be860000be7d9999be6f3333be60cccdbe526666be440000be35999abe273333"
  "be18cccdbe0a6666bdf80000bddb3334bdc9eb85bdc428f7bdbe6667bdb8a3d7bdb2e148bdad1eb8bda75c2abda1999a"
  "bd9bd70abd96147bbd9051ebbd8a8f5dbd84cccdbd7e147bbd728f5dbd670a3dbd5b851fbd500000bd447ae1bd38f5c3"
  "bd2d70a3bd21eb85bd166667bd0ae148bcfeb852bce7ae15bcd0a3d7bcb9999abca28f5dbc8b851fbc68f5c3bc3ae148"
  "bc1f3b64bc160418bc0ccccdbc039581bbf4bc6abbe24dd3bbcfdf3bbbbd70a4bbab020dbb989374bb8624ddbb676c8a"
  "bb428f5cbb1db22dbaf1a9fcbaa7ef9dba7765ffba59e83eba3c6a80ba1eecc1ba016f01b9c7e283b98ce705b923d70b"
  "b8ba1f4bb88aefb3b8378034b7b24206b70205ffb65a1a94b513a3b7000000003513a3b7365a1a94370205ff37b24206"
  "38378034388aefb338ba1f4b3923d70b398ce70539c7e2833a016f013a1eecc13a3c6a803a59e83e3a7765ff3aa7ef9d"
  "3af1a9fc3b1db22d3b428f5c3b676c8a3b8624dd3b9893743bab020d3bbd70a43bcfdf3b3be24dd33bf4bc6a3c039581"
  "3c0ccccd3c1604183c1f3b643c3ae1483c68f5c33c8b851f3ca28f5d3cb9999a3cd0a3d73ce7ae153cfeb8523d0ae148"
  "3d1666673d21eb853d2d70a33d38f5c33d447ae13d5000003d5b851f3d670a3d3d728f5d3d7e147b3d84cccd3d8a8f5d"
  "3d9051eb3d96147b3d9bd70a3da1999a3da75c2a3dad1eb83db2e1483db8a3d73dbe66673dc428f73dc9eb853ddb3334"
  "3df800003e0a66663e18cccd3e2733333e35999a3e4400003e5266663e60cccd3e6f33333e7d99993e8600003e8d3334"
  "3e9466663e9b999a3ea2cccc3eaa00003eb133333eb866663ebf999a3ec6cccc3ece00003ed533333edc66663ee3999a"
  "3eeacccc3ef200003ef933323f0033333f03cccc3f0766663f0b00003f0e999a3f1233343f15cccd3f1966663f1d0000"
  "3f20999a3f2433343f27cccd3f2b66663f2f00003f32999a3f3633343f39cccd3f3d66663f4100003f44999a3f483333"
  "3f4bcccd3f4f66663f5300003f56999a3f5a33333f5dcccd3f6166663f6500003f68999a3f6c33333f6fcccd3f736666"
  "3f7700003f7a999a3f7e33333f800000"
)
DYNAMIC_MAP = np.frombuffer(bytes.fromhex(_DYNAMIC_HEX), ">f4").astype(np.float32)

_STATS_BLOCK = 256  # bitsandbytes' block size for the double-quantized block maxima
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INV_TINY = np.float32(1) / np.float32(1e-38)


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray:
  """A quantized kernel: a pytree node (children `codes`, `scales` and, with double
  quantization, `scale_absmax`, `scale_offset`) that lora_jax's tree functions treat as one leaf
  standing for a kernel of `shape` and `dtype`.

  Storage (`S` = the layout's stack sizes, `O = prod(out)`, `I = prod(in)`, `n = O·I/block_size`):

  - nf4: `codes: uint8 (*S, O, I/2)`; `scales: float32 (*S, n)` block maxima, or with double
    quantization `uint8 (*S, n)` with `scale_absmax: float32 (*S, ceil(n/256))` and
    `scale_offset: float32 (*S,)`.
  - int8 / fp8: `codes: int8 / float8_e4m3fn (*S, O, I)`, `scales: float32 (*S, O)`.

  Static metadata: `shape`, `dtype` (of the original kernel), `layout`, `format`, `block_size`.
  Indexing the leading `len(S)` axes of every child selects stack entries (layers, experts)
  without touching the others (`take`).
  """

  __lora_jax_leaf__ = True  # lora_jax.tree: one leaf, named like the kernel it replaces

  def __init__(self, codes: Any, scales: Any, scale_absmax: Any, scale_offset: Any, *,
               shape: Sequence[int], dtype: Any, layout: Layout, format: str, block_size: int):
    self.codes, self.scales = codes, scales
    self.scale_absmax, self.scale_offset = scale_absmax, scale_offset
    self.shape = tuple(int(d) for d in shape)
    self.dtype = jnp.dtype(dtype)
    self.layout, self.format, self.block_size = layout, format, int(block_size)

  def _aux(self) -> tuple:
    return (self.shape, self.dtype.name, self.layout, self.format, self.block_size)

  def tree_flatten_with_keys(self):
    key = jax.tree_util.GetAttrKey
    kids = ((key("codes"), self.codes), (key("scales"), self.scales),
            (key("scale_absmax"), self.scale_absmax), (key("scale_offset"), self.scale_offset))
    return kids, self._aux()

  @classmethod
  def tree_unflatten(cls, aux, kids):
    shape, dtype, layout, fmt, block_size = aux
    ndim = getattr(kids[0], "ndim", None)
    if layout.stack_axes and ndim == len(layout.stack_axes) + 1:
      # Children that lost their leading axis (`lax.scan` slices them per step): one entry of the
      # first stack axis, the per-layer kernel of a scanned stack.
      first = layout.stack_axes[0]
      shape, layout = shape[:first] + shape[first + 1:], _drop_axis(layout, first)
    return cls(*kids, shape=shape, dtype=dtype, layout=layout, format=fmt, block_size=block_size)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def double_quant(self) -> bool:
    return self.scale_absmax is not None

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return self.layout.sizes(self.shape, Role.STACK)

  @property
  def nbytes(self) -> int:
    """Bytes held by the codes and statistics."""
    return sum(int(np.prod(jnp.shape(x))) * jnp.dtype(x.dtype).itemsize
               for x in (self.codes, self.scales, self.scale_absmax, self.scale_offset)
               if x is not None)

  def __repr__(self) -> str:
    dq = ", double_quant" if self.double_quant else ""
    return (f"QuantizedArray({self.format}, shape={self.shape}, dtype={self.dtype.name}, "
            f"layout={self.layout.to_text()}, block_size={self.block_size}{dq})")

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The kernel, `shape`, in `dtype` (default: the original kernel's); see `storage_values`."""
    return _dequantized(self, jnp.dtype(self.dtype if dtype is None else dtype).name)

  def storage_values(self, dtype: Any = None) -> jax.Array:
    """The dequantized weights in storage order `(*S, O, I)`, computed in float32 and cast once
    to `dtype` (default: the original kernel's)."""
    dtype = self.dtype if dtype is None else jnp.dtype(dtype)
    s = len(self.stack_shape)
    o, i = self.codes.shape[s], (self.codes.shape[s + 1] * (2 if self.format == "nf4" else 1))
    if self.format != "nf4":
      return (self.codes.astype(jnp.float32) * self.scales[..., None]).astype(dtype)
    absmax = self.block_maxima()
    pairs = jnp.stack([self.codes >> 4, self.codes & 15], axis=-1)
    values = jnp.asarray(NF4_VALUES)[pairs.reshape(*pairs.shape[:-2], i).astype(jnp.int32)]
    blocks = values.reshape(*values.shape[:-1], i // self.block_size, self.block_size)
    scaled = blocks * absmax.reshape(*absmax.shape[:-1], o, i // self.block_size)[..., None]
    return scaled.reshape(*scaled.shape[:-2], i).astype(dtype)

  def block_maxima(self) -> jax.Array:
    """NF4's per-block maxima `(*S, n)` in float32 (decoded: `DYN[code]·absmax2 + offset`)."""
    if not self.double_quant:
      return self.scales
    n = self.scales.shape[-1]
    groups = self.scale_absmax.shape[-1]
    codes = jnp.pad(self.scales, [(0, 0)] * (self.scales.ndim - 1) + [(0, groups * _STATS_BLOCK - n)])
    codes = codes.reshape(*codes.shape[:-1], groups, _STATS_BLOCK).astype(jnp.int32)
    # bitsandbytes rounds `DYN[code]·absmax2`, then adds the mean. Under `jit`, XLA's CPU backend
    # would fuse a product feeding that sum into one FMA (one rounding: other bits) and drops
    # optimization barriers and bit casts; reading each product from a per-group table of the
    # 256 possible ones keeps it rounded on its own (tested bit for bit).
    table = jnp.asarray(DYNAMIC_MAP) * self.scale_absmax[..., None]
    values = jnp.take_along_axis(table, codes, axis=-1)
    return values.reshape(*values.shape[:-2], -1)[..., :n] + self.scale_offset[..., None]

  def slice_leading(self, start: Any, size: int) -> QuantizedArray:
    """Entries `start:start+size` (`start` may be traced) of the first stack axis, kept as an axis."""
    first = self.layout.stack_axes[0]
    cut = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, 0)
    return QuantizedArray(cut(self.codes), cut(self.scales), cut(self.scale_absmax),
                          cut(self.scale_offset),
                          shape=self.shape[:first] + (size,) + self.shape[first + 1:], dtype=self.dtype,
                          layout=self.layout, format=self.format, block_size=self.block_size)

  def take(self, index: Any) -> QuantizedArray:
    """Entry `index` (an int or an integer scalar array, possibly traced) of the first stack axis
    (a layer, an expert): a `QuantizedArray` with that axis dropped, reading only that entry's
    codes and statistics.

    Raises:
      ValueError: the kernel has no stack axis.
    """
    if not self.layout.stack_axes:
      raise ValueError(f"{self!r}: no stack axis to index")
    first = self.layout.stack_axes[0]
    pick = lambda x: None if x is None else x[index]
    return QuantizedArray(pick(self.codes), pick(self.scales), pick(self.scale_absmax),
                          pick(self.scale_offset), shape=self.shape[:first] + self.shape[first + 1:],
                          dtype=self.dtype, layout=_drop_axis(self.layout, first),
                          format=self.format, block_size=self.block_size)


@functools.partial(jax.jit, static_argnums=1)
def _dequantized(q: QuantizedArray, dtype: str) -> jax.Array:
  return from_storage(q.storage_values(dtype), q.shape, q.layout)


def _drop_axis(layout: Layout, axis: int) -> Layout:
  shift = lambda axes: tuple(j - (j > axis) for j in axes if j != axis)
  return Layout(shift(layout.stack_axes), shift(layout.in_axes), shift(layout.out_axes))


def _storage_perm(layout: Layout) -> list[int]:
  return [*layout.stack_axes, *layout.out_axes, *layout.in_axes]


def to_storage(w: Any, layout: Layout) -> jax.Array:
  """`w` arranged as `(*S, O, I)`: per stack index, PyTorch's `(out, in)` weight, flattened in C
  order over the out and in axes."""
  w = jnp.transpose(jnp.asarray(w), _storage_perm(layout))
  ns, no = len(layout.stack_axes), len(layout.out_axes)
  return w.reshape(*w.shape[:ns], math.prod(w.shape[ns:ns + no]), -1)


_to_storage = jax.jit(to_storage, static_argnums=1)


def from_storage(x: jax.Array, shape: Sequence[int], layout: Layout) -> jax.Array:
  """Inverse of `to_storage`: `(*S, O, I)` back to the kernel's `shape` and axis order."""
  perm = _storage_perm(layout)
  x = x.reshape([shape[j] for j in perm])
  return jnp.transpose(x, np.argsort(perm).tolist())


def _cascade_rows(rows: np.ndarray) -> np.ndarray:
  """torch's `multi_row_sum`: sum `rows (b, size, *lanes)` over `size` in float32, in chunks of
  `2^p` accumulated through 4 levels (`p = max(4, ceil_log2(size) // 4)`)."""
  size = rows.shape[1]
  power = max(4, (1 if size <= 2 else (size - 1).bit_length()) // 4)
  step, mask = 1 << power, (1 << power) - 1
  acc = np.zeros((4, rows.shape[0], *rows.shape[2:]), np.float32)
  i = 0
  while i + step <= size:
    for _ in range(step):
      acc[0] += rows[:, i]
      i += 1
    for j in range(1, 4):
      acc[j] += acc[j - 1]
      acc[j - 1] = 0
      if i & (mask << (j * power)):
        break
  for k in range(i, size):
    acc[0] += rows[:, k]
  for j in range(1, 4):
    acc[0] += acc[j]
  return acc[0]


def _row_sum(x: np.ndarray) -> np.ndarray:
  """torch's `row_sum` over the last-but-lanes axis: 4 interleaved partial sums, then the tail."""
  b, n = x.shape[:2]
  whole = n // 4
  partial = _cascade_rows(x[:, :whole * 4].reshape(b, whole, 4, *x.shape[2:]))
  for i in range(whole * 4, n):
    partial[:, 0] += x[:, i]
  for k in range(1, 4):
    partial[:, 0] += partial[:, k]
  return partial[:, 0]


def _torch_chunk_sum(x: np.ndarray, lanes: int = 8) -> np.ndarray:
  """torch's CPU float32 `sum` of each row of `x (b, n)` in one thread (`cascade_sum`: 8-lane
  vectors summed by `row_sum`, then the scalar tail, then the lanes in order)."""
  b, n = x.shape
  if n < lanes:
    return _row_sum(x)
  nvec = n // lanes
  acc = _row_sum(x[:, :nvec * lanes].reshape(b, nvec, lanes))
  out = np.zeros(b, np.float32)
  for k in range(nvec * lanes, n):
    out += x[:, k]
  for k in range(lanes):
    out += acc[:, k]
  return out


def torch_cpu_mean(x: np.ndarray, threads: int = 1) -> np.ndarray:
  """`torch.mean(row)` for each row of a float32 `x (b, n)` as torch 2.x computes it on CPU, bit
  for bit: past 32768 values the sum is split into `min(threads, ceil(n/32768))` equal chunks
  whose sums are added in order; then one float32 division by `n`."""
  x = np.asarray(x, np.float32)
  b, n = x.shape
  parts = 1 if n < 32768 else min(threads, -(-n // 32768))
  chunk = -(-n // parts)
  total = np.zeros(b, np.float32)
  for s in range(0, n, chunk):
    total += _torch_chunk_sum(x[:, s:s + chunk])
  return total / np.float32(n)


def _stats_lut() -> np.ndarray:
  """bitsandbytes' CPU coding table for the dynamic map: for each of 65536 points
  `-1 + 2i/65535` of [-1, 1] (float32), the index of the first map value whose upper midpoint
  is not below it."""
  mids = np.float32(0.5) * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])
  points = np.float32(-1) + (np.float32(2) * np.arange(65536, dtype=np.float32)) / np.float32(65535)
  return np.searchsorted(mids, points, side="left").astype(np.uint8)


_STATS_LUT = _stats_lut()


def _code_stats(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """bitsandbytes' CPU `quantize_blockwise` of `v (b, n)` float32 in blocks of 256 with the
  dynamic map: `(codes uint8 (b, n), absmax float32 (b, ceil(n/256)))`. Each value is scaled by
  the float32 reciprocal of its block's absmax, moved to the nearest of 65536 grid points
  (`trunc(((x + 1)·0.5)·65535 + 0.5)`, float32 steps) and coded through `_STATS_LUT`; an all-zero
  block codes as 0."""
  b, n = v.shape
  groups = -(-n // _STATS_BLOCK)
  padded = np.zeros((b, groups * _STATS_BLOCK), np.float32)
  padded[:, :n] = v
  blocks = padded.reshape(b, groups, _STATS_BLOCK)
  absmax = np.abs(blocks).max(-1)
  inv = np.float32(1) / np.where(absmax == 0, np.float32(1), absmax)
  x = np.clip(blocks * inv[..., None], np.float32(-1), np.float32(1))
  grid = ((x + np.float32(1)) * np.float32(0.5)) * np.float32(65535) + np.float32(0.5)
  codes = np.where(absmax[..., None] == 0, 0, _STATS_LUT[grid.astype(np.uint16)])
  return codes.reshape(b, -1)[:, :n].astype(np.uint8), absmax


@jax.jit
def _nf4_codes(x: jax.Array, block_size_probe: jax.Array) -> tuple[jax.Array, jax.Array]:
  blocks = x.reshape(*x.shape[:-1], -1, block_size_probe.shape[0]).astype(jnp.float32)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  # bitsandbytes divides by max(absmax, 1e-38); 1e-38 is subnormal and XLA flushes it to 0, so
  # an all-zero block takes the reciprocal as a constant (its values code as NF4's 0 either way).
  inv = jnp.where(absmax == 0, _INV_TINY, 1.0 / absmax)
  scaled = jnp.clip(blocks * inv[..., None], -1.0, 1.0)
  # The nearest NF4 value's index is the count of midpoints strictly below (a tie goes to the
  # lower value, as `searchsorted(side="left")`): 15 fused compares, ~10x faster than a search.
  q = jnp.zeros(scaled.shape, jnp.uint8)
  for b in _NF4_BOUNDS.tolist():
    q = q + (scaled > b).astype(jnp.uint8)
  q = q.reshape(*x.shape[:-1], -1, 2)
  return (q[..., 0] << 4) | q[..., 1], absmax.reshape(*x.shape[:-2], -1)


def _channel_codes(x: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array]:
  x = x.astype(jnp.float32)
  top = 127.0 if fmt == "int8" else _FP8_MAX
  scale = jnp.max(jnp.abs(x), axis=-1) / top
  safe = jnp.where(scale == 0, 1.0, scale)[..., None]
  if fmt == "int8":
    return jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8), scale
  return jnp.clip(x / safe, -_FP8_MAX, _FP8_MAX).astype(jnp.float8_e4m3fn), scale


def quantize_kernel(w: Any, layout: Layout, format: str = "nf4", *, block_size: int = 64,
                    double_quant: bool = True, torch_threads: int = 1, where: str = "kernel"
                    ) -> QuantizedArray:
  """Quantize one kernel whose `layout` names its stack / in / out axes (see the module doc).

  Args:
    w: the kernel, any float dtype, shape `(...)` matching `layout`.
    layout: its layout.
    format: `"nf4"`, `"int8"` or `"fp8"`.
    block_size: NF4 block length along the input axes (must divide `prod(in)`; even).
    double_quant: NF4 only: code the block maxima too (bitsandbytes' `compress_statistics`).
    torch_threads: torch's thread count to reproduce for the mean of more than 32768 block
      maxima (see `torch_cpu_mean`).
    where: the kernel's path, for messages.

  Returns:
    A `QuantizedArray`.

  Raises:
    ValueError: unknown format, a layout that does not fit, a non-float kernel, or a block size
      that does not divide the input size; each naming `where`.
  """
  if format not in FORMATS:
    raise ValueError(f"lj.quantize: {where}: unsupported format {format!r}; use one of {FORMATS}")
  shape, dtype = tuple(jnp.shape(w)), jnp.dtype(w.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"lj.quantize: {where}: cannot quantize a {dtype.name} kernel (float kernels only)")
  layout.check(shape, f"lj.quantize: {where}")
  x = _to_storage(w, layout)
  n_in = x.shape[-1]
  if format != "nf4":
    codes, scales = _channel_codes(x, format)
    return QuantizedArray(codes, scales, None, None, shape=shape, dtype=dtype, layout=layout,
                          format=format, block_size=n_in)
  if block_size <= 0 or block_size % 2 or n_in % block_size:
    raise ValueError(f"lj.quantize: {where}: NF4 block size {block_size} does not divide the input "
                     f"size {n_in} (= prod of the in axes {layout.sizes(shape, Role.IN)}) into "
                     "even blocks; pick a divisor such as 64")
  codes, absmax = _nf4_codes(x, jnp.zeros(block_size, jnp.uint8))
  if not double_quant:
    return QuantizedArray(codes, absmax, None, None, shape=shape, dtype=dtype, layout=layout,
                          format=format, block_size=block_size)
  stack = absmax.shape[:-1]
  flat = np.asarray(absmax, np.float32).reshape(-1, absmax.shape[-1])
  offset = torch_cpu_mean(flat, torch_threads)
  stat_codes, stat_absmax = _code_stats(flat - offset[:, None])
  return QuantizedArray(codes, jnp.asarray(stat_codes.reshape(*stack, -1)),
                        jnp.asarray(stat_absmax.reshape(*stack, -1)), jnp.asarray(offset.reshape(stack)),
                        shape=shape, dtype=dtype, layout=layout, format=format, block_size=block_size)


def _layout_for(plan: Plan, path: str, shape: tuple[int, ...]) -> Layout | None:
  """A non-site kernel's layout for `everything=True`: the config's `layout_pattern` override,
  else `in=(0) out=(1)` for a 2-D kernel (Flax's `(in, out)`), else None."""
  override = plan.config.layout_for(path)
  if override is not None:
    return override
  return Layout((), (0,), (1,)) if len(shape) == 2 else None


def quantize(plan: Plan, tree: PyTree, format: str = "nf4", *, block_size: int = 64,
             double_quant: bool = True, everything: bool = False, torch_threads: int = 1) -> PyTree:
  """Replace the adapted kernels of `plan` (with `everything`, all other float kernels of 2 or
  more axes too) by `QuantizedArray` leaves, frozen; LoRA factors and other leaves unchanged.

  Works on the base variables or on a LoRA tree (`lj.attach` before or after). NF4 blocks run
  along each kernel's input axes per output index: bitsandbytes' row-major blocks of the PyTorch
  `(out, in)` weight, so `dequantize` equals `bitsandbytes.functional.dequantize_4bit` of that
  weight bit for bit (see the module doc for what is matched). Runs eagerly (the double
  quantization's statistics are computed on the host); not for use under `jit`.

  Args:
    plan: from `lj.plan`.
    tree: the variables or a LoRA tree.
    format: `"nf4"`, `"int8"` (symmetric per output channel) or `"fp8"` (`float8_e4m3fn`, per
      output channel scale).
    block_size: NF4 block length along the input axes; must divide `prod(in)` and be even.
    double_quant: NF4: also quantize the block maxima (bitsandbytes' `compress_statistics`).
    everything: also quantize every other float leaf with 2 or more axes (not LoRA factors); a
      2-D one is taken as `(in, out)`, others need a `layout_pattern` in the config.
    torch_threads: for more than 32768 blocks in one kernel, the torch thread count whose
      summation order the double quantization's mean reproduces (see `torch_cpu_mean`).

  Returns:
    `tree` with those kernels replaced (boxes kept).

  Raises:
    ValueError: unsupported format, a block size that does not divide a kernel's input size, a
      kernel with no layout (with `everything`), a non-float kernel, or a plan kernel missing or
      of another shape; naming the path.
  """
  if format not in FORMATS:
    raise ValueError(f"lj.quantize: unsupported format {format!r}; use one of {FORMATS}")
  leaves = flatten(tree)
  sites = {s.path: s for s in plan.sites}
  for s in plan.sites:
    if s.path not in leaves:
      raise ValueError(f"lj.quantize: {s.path}: in the plan but not in the tree")
    got = tuple(jnp.shape(unbox(leaves[s.path])))
    if got != s.shape:
      raise ValueError(f"lj.quantize: {s.path}: kernel shape {got} != plan's {s.shape}")

  def quantized(leaf: Any, layout: Layout, path: str) -> Any:
    return with_value(leaf, quantize_kernel(unbox(leaf), layout, format, where=path, block_size=block_size,
                                            double_quant=double_quant, torch_threads=torch_threads))

  def convert(path: str, leaf: Any) -> Any:
    w = unbox(leaf)
    if isinstance(w, QuantizedArray) or is_lora_name(path) or w is None:
      return leaf
    if path in sites:
      return quantized(leaf, sites[path].layout, path)
    if not everything or jnp.ndim(w) < 2 or not jnp.issubdtype(jnp.result_type(w), jnp.floating):
      return leaf
    layout = _layout_for(plan, path, tuple(jnp.shape(w)))
    if layout is None:
      raise ValueError(f"lj.quantize: {path}: a {jnp.ndim(w)}-D kernel with no layout (everything="
                       "True only assumes (in, out) for 2-D kernels); give it one in LoraConfig("
                       "layout_pattern={regex: 'in=(..) out=(..)'})")
    return quantized(leaf, layout, path)

  return map_leaves(convert, tree)


def dequantize(tree: PyTree, dtype: Any = None) -> PyTree:
  """`tree` with every `QuantizedArray` leaf replaced by its dequantized kernel (its original
  shape, in `dtype`, default the original dtype); LoRA factors and other leaves unchanged.

  Args:
    tree: a tree from `lj.quantize` (with or without adapters).
    dtype: the kernels' dtype; default each kernel's original one.

  Returns:
    Plain variables (and the adapters, if any), boxes kept.
  """
  return map_leaves(lambda p, x: with_value(x, unbox(x).dequantize(dtype))
                    if isinstance(unbox(x), QuantizedArray) else x, tree)
