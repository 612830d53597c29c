"""Sharded `lj.attach` on 8 forced CPU devices: factor placement, direct creation, no base all-gather.

The checks run in one subprocess (`python tests/test_sharding.py`, the `_probe` half of this
file) because the device count is fixed when JAX starts; the probe prints one JSON report and the
test half compares it with expectations written out by hand below.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH, RANK = 6, 4
# Kernel sizes are chosen so that no activation, factor or optimizer-state array has a kernel's
# shape or as many elements as the smallest kernel (or one layer of a stack): an all-gather that
# big can only be a base kernel being gathered.
SHAPES = {"mlp/w1": (40, 72), "mlp/w2": (72, 40), "stack/up": (3, 40, 56),
          "stack/down": (3, 56, 40), "attn/q": (40, 8, 24), "attn/o": (8, 24, 40)}
N = None
# scenario -> (mesh shape, mesh axis names, {kernel: spec}). Specs are consistent along the model
# (each kernel's in axes sharded like the activation it gets), so the *base* model alone never
# gathers a kernel either; e.g. stack/up as (None, ("data", "model"), None) next to stack/down as
# (None, "data", "model") makes XLA all-gather a (40, 56) layer of stack/up with or without LoRA.
MESHES = {
    "fsdp": ((8,), ("fsdp",), {
        "mlp/w1": ("fsdp", N), "mlp/w2": ("fsdp", N), "stack/up": (N, "fsdp", N),
        "stack/down": (N, "fsdp", N), "attn/q": ("fsdp", N, N), "attn/o": (N, "fsdp", N)}),
    "tp": ((8,), ("tp",), {
        "mlp/w1": (N, "tp"), "mlp/w2": ("tp", N), "stack/up": (N, N, "tp"),
        "stack/down": (N, "tp", N), "attn/q": (N, "tp", N), "attn/o": ("tp", N, N)}),
    "2d": ((2, 4), ("data", "model"), {  # attn/q's spec is shorter than the kernel (padded)
        "mlp/w1": ("data", "model"), "mlp/w2": ("model", "data"),
        "stack/up": (N, "model", "data"), "stack/down": (N, "data", "model"),
        "attn/q": (N, ("data", "model")), "attn/o": (("data", "model"), N, N)}),
}
# Hand-derived factor specs: A (*stack, *in, r) takes the kernel's stack+in entries, B (*stack, r,
# *out) its stack+out entries, the rank axis is replicated. Layouts: mlp/* in=(0) out=(1);
# stack/* stack=(0) in=(1) out=(2); attn/q in=(0) out=(1,2); attn/o in=(0,1) out=(2).
EXPECTED = {
    "fsdp": {
        "mlp/w1": (("fsdp", N), (N, N)),
        "mlp/w2": (("fsdp", N), (N, N)),
        "stack/up": ((N, "fsdp", N), (N, N, N)),
        "stack/down": ((N, "fsdp", N), (N, N, N)),
        "attn/q": (("fsdp", N), (N, N, N)),
        "attn/o": ((N, "fsdp", N), (N, N)),
    },
    "tp": {
        "mlp/w1": ((N, N), (N, "tp")),
        "mlp/w2": (("tp", N), (N, N)),
        "stack/up": ((N, N, N), (N, N, "tp")),
        "stack/down": ((N, "tp", N), (N, N, N)),
        "attn/q": ((N, N), (N, "tp", N)),
        "attn/o": (("tp", N, N), (N, N)),
    },
    "2d": {
        "mlp/w1": (("data", N), (N, "model")),
        "mlp/w2": (("model", N), (N, "data")),
        "stack/up": ((N, "model", N), (N, N, "data")),
        "stack/down": ((N, "data", N), (N, N, "model")),
        "attn/q": ((N, N), (N, ("data", "model"), N)),
        "attn/o": ((("data", "model"), N, N), (N, N)),
    },
}
A_SHAPES = {"mlp/w1": (40, RANK), "mlp/w2": (72, RANK), "stack/up": (3, 40, RANK),
            "stack/down": (3, 56, RANK), "attn/q": (40, RANK), "attn/o": (8, 24, RANK)}
B_SHAPES = {"mlp/w1": (RANK, 72), "mlp/w2": (RANK, 40), "stack/up": (3, RANK, 56),
            "stack/down": (3, RANK, 40), "attn/q": (RANK, 8, 24), "attn/o": (RANK, 40)}
# The shard_map scenario: the MLP kernels column- / row-parallel over one 8-way "model" axis; the
# factors enter the body as x, then (W, A, B) per kernel: A takes W's in entries, B its out
# entries, rank replicated (W1 in=(0) out=(1), W2 likewise).
SHARD_MAP_SPECS = {"w1": (N, "model"), "w2": ("model", N)}
SHARD_MAP_IN_SPECS = [[], [N, "model"], [N, N], [N, "model"], ["model", N], ["model", N], [N, N]]
CONTROL_SCENARIO = "2d"  # where the HLO detector's negative control runs
CONTROL_SHAPE = (16, 24)  # the transfer-guard control array (a shape used nowhere else)


def _shard_shape(shape: tuple[int, ...], spec: tuple, mesh: dict[str, int]) -> tuple[int, ...]:
  """Per-device block of `shape` under `spec`, by hand (not via JAX)."""
  out = []
  for j, n in enumerate(shape):
    entry = spec[j] if j < len(spec) else None
    names = () if entry is None else (entry,) if isinstance(entry, str) else entry
    out.append(n // math.prod(mesh[a] for a in names))
  return tuple(out)


def _listify(x: Any) -> Any:
  return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


# ---------------------------------------------------------------------------------------------
# The probe (runs in the subprocess with 8 CPU devices).
# ---------------------------------------------------------------------------------------------

_COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+"
                         r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                         r"(?:-start)?\(")
_ARRAY_TYPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """`(op, result shape)` for every collective in compiled HLO text (each array of a tuple)."""
  found = []
  for line in hlo.splitlines():
    m = _COLLECTIVE.match(line)
    if m:
      for dims in _ARRAY_TYPE.findall(m[1]):
        found.append((m[2], tuple(int(d) for d in dims.split(",") if d)))
  return found


def kernel_sized(shape: tuple[int, ...]) -> bool:
  """Whether a collective's result is (a reshape of) a full base kernel or one layer of a stack."""
  full = set(SHAPES.values()) | {s[1:] for p, s in SHAPES.items() if p.startswith("stack/")}
  return shape in full or math.prod(shape) >= min(math.prod(s) for s in full)


def _probe() -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import lora_jax as lj
  from lora_jax._src.tree import flatten

  def fn(v, x):
    h = x + jnp.tanh(x @ v["mlp"]["w1"]) @ v["mlp"]["w2"]

    def layer(c, w):
      up, down = w
      return c + jnp.tanh(c @ up) @ down, None

    h, _ = jax.lax.scan(layer, h, (v["stack"]["up"], v["stack"]["down"]))
    q = jnp.einsum("bd,dhk->bhk", h, v["attn"]["q"])
    return h + jnp.einsum("bhk,hkd->bd", jnp.tanh(q), v["attn"]["o"])

  rng = np.random.default_rng(0)
  normal = lambda shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)
  host = {}
  for path, shape in SHAPES.items():
    group, name = path.split("/")
    fan_in = shape[1] if group == "stack" else shape[0]
    host.setdefault(group, {})[name] = normal(shape, fan_in ** -0.5)
  x, y = normal((BATCH, 40)), normal((BATCH, 40))
  plan = lj.plan(lj.LoraConfig(targets=r"(mlp|stack|attn)/.*", rank=RANK), host, apply_fn=fn,
                 args=(x,))
  tx = optax.sgd(0.1)
  apply = lj.unmerged(fn, plan)

  def loss(adapters, base, x, y):
    return jnp.mean((apply(lj.combine(base, adapters), x) - y) ** 2)

  def step(adapters, opt_state, base, x, y):
    value, grads = jax.value_and_grad(loss)(adapters, base, x, y)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, value, grads

  def run_step(tree, base, x, y):
    """One compiled training step from `tree` with B moved off zero (so A's gradient is non-zero
    too): `(the executable, its arguments, (loss, gradients, adapters after) as host arrays)`."""
    adapters, _ = lj.split(tree)
    adapters = jax.tree_util.tree_map_with_path(lambda p, v: v if "lora_a" in str(p[-1]) else (
        jax.device_put(np.asarray(v) + bump[v.shape], v.sharding)), adapters)
    args = (adapters, tx.init(adapters), base, x, y)
    compiled = jax.jit(step).lower(*args).compile()
    after, _, value, grads = compiled(*args)
    get = lambda t: {p: np.asarray(v) for p, v in flatten(t).items() if v is not None}
    return compiled, args, (float(value), get(grads), get(after))

  bump = {s: normal(s, 0.1) for s in B_SHAPES.values()}
  ref_tree = lj.attach(plan, host, jax.random.key(1))  # single device (host kernels)
  _, _, (ref_loss, ref_grads, ref_after) = run_step(ref_tree, host, x, y)
  ref = {p: np.asarray(v) for p, v in flatten(ref_tree).items() if "_lora_" in p}

  report: dict[str, Any] = {"lora_jax": lj.__file__, "layouts": {
      s.path: s.layout.to_text() for s in plan.sites}, "scenarios": {}}
  for name, (mesh_shape, axis_names, specs) in MESHES.items():
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), axis_names)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
    base = {g: {k: put(v, specs[f"{g}/{k}"]) for k, v in d.items()} for g, d in host.items()}
    key = put(jax.random.key(1), ())
    print(f"### attach {name}", file=sys.stderr, flush=True)
    with jax.transfer_guard("log"):  # every transfer attach makes is logged to stderr
      tree = lj.attach(plan, base, key)
      jax.block_until_ready(tree)
    print(f"### end attach {name}", file=sys.stderr, flush=True)

    factors = {}
    for path, v in flatten(tree).items():
      if "_lora_" not in path:
        continue
      kernel, ab = path.rsplit("_lora_", 1)
      want = NamedSharding(mesh, P(*EXPECTED[name][kernel][ab == "b"]))
      factors[path] = {
          "spec": _listify(tuple(v.sharding.spec)),
          "equals_expected": v.sharding == want,
          "shard_shapes": sorted({tuple(s.data.shape) for s in v.addressable_shards}),
          "devices": len(v.addressable_shards),
          "bit_identical": bool(np.array_equal(np.asarray(v), ref[path])
                                and np.asarray(v).dtype == ref[path].dtype),
      }

    rep = NamedSharding(mesh, P())
    xs, ys = jax.device_put(x, rep), jax.device_put(y, rep)
    compiled, args, (loss_value, grads, after) = run_step(tree, lj.split(tree)[1], xs, ys)

    def bad_step(adapters, opt_state, base, x, y):  # the negative control: gathers mlp/w1
      base = {**base, "mlp": {**base["mlp"], "w1": jax.lax.with_sharding_constraint(
          base["mlp"]["w1"], rep)}}
      return step(adapters, opt_state, base, x, y)

    control = []  # one compile of the control (in one scenario) keeps the test fast
    if name == CONTROL_SCENARIO:
      control = collectives(jax.jit(bad_step).lower(*args).compile().as_text())
    rel = lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
    report["scenarios"][name] = {
        "factors": factors,
        "collectives": collectives(compiled.as_text()),
        "control_collectives": control,
        "grad_rel_err": {p: rel(g, ref_grads[p]) for p, g in grads.items()},
        "grad_max_abs": {p: float(np.max(np.abs(g))) for p, g in grads.items()},
        "after_rel_err": max(rel(a, ref_after[p]) for p, a in after.items()),
        "loss_rel_err": abs(loss_value - ref_loss) / abs(ref_loss),
    }

  report["shard_map"] = _probe_shard_map(host["mlp"], x, y, bump)

  # Control for the transfer log: a factor drawn on one device, then moved onto the mesh.
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  print("### control", file=sys.stderr, flush=True)
  with jax.transfer_guard("log"):
    one = jax.random.uniform(jax.random.key(2), CONTROL_SHAPE)
    jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P("data", N)))(one).block_until_ready()
  print("### end control", file=sys.stderr, flush=True)
  print(json.dumps(report))


def _probe_shard_map(host: dict, x, y, bump: dict) -> dict[str, Any]:
  """A tensor-parallel MLP written with `jax.shard_map` (column-parallel W1, row-parallel W2,
  `psum`) on 8 devices: plan uses, the in-specs the factors enter the body with, collectives of
  the compiled step, and unmerged vs merged loss and A/B gradients (B moved off zero)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import lora_jax as lj
  from lora_jax._src.tree import flatten

  mesh = Mesh(np.array(jax.devices()), ("model",))

  def fn(v, x):
    body = lambda x, w1, w2: jax.lax.psum(jnp.tanh(x @ w1) @ w2, "model")
    return jax.shard_map(body, mesh=mesh, in_specs=(P(), *(P(*s) for s in SHARD_MAP_SPECS.values())),
                         out_specs=P())(x, v["w1"], v["w2"])

  plan = lj.plan(lj.LoraConfig(targets="w1|w2", rank=RANK), host, apply_fn=fn, args=(x,))
  base = {k: jax.device_put(v, NamedSharding(mesh, P(*SHARD_MAP_SPECS[k]))) for k, v in host.items()}
  adapters, base = lj.split(lj.attach(plan, base, jax.random.key(1)))
  adapters = jax.tree_util.tree_map_with_path(lambda p, v: v if "lora_a" in str(p[-1]) else (
      jax.device_put(np.asarray(v) + bump[v.shape], v.sharding)), adapters)

  def loss(apply):
    return lambda ad: jnp.mean((apply(fn, plan)(lj.combine(base, ad), x) - y) ** 2)

  step = jax.jit(jax.value_and_grad(loss(lj.unmerged))).lower(adapters).compile()
  value, grads = step(adapters)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(loss(lj.merged)))(adapters)
  inner = [e for e in jax.make_jaxpr(lambda ad: lj.unmerged(fn, plan)(lj.combine(base, ad), x))(
      adapters).jaxpr.eqns if e.primitive.name == "shard_map"]
  g, rg = flatten(grads), flatten(ref_grads)
  rel = lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
  return {
      "uses": {s.path: [str(u) for u in s.use] for s in plan.sites},
      "in_specs": [[_listify(tuple(spec)) for spec in e.params["in_specs"]] for e in inner],
      "collectives": collectives(step.as_text()),
      "loss_rel_err": abs(float(value) - float(ref_value)) / abs(float(ref_value)),
      "grad_rel_err": {p: rel(np.asarray(g[p]), np.asarray(rg[p])) for p in rg},
      "grad_max_abs": {p: float(np.max(np.abs(np.asarray(rg[p])))) for p in rg},
  }


# ---------------------------------------------------------------------------------------------
# The test.
# ---------------------------------------------------------------------------------------------

_TRANSFER = re.compile(r"(host-to-device|device-to-device) transfer: aval=ShapedArray\((\w+)\[([\d,]*)\]")


def _transfers(stderr: str) -> dict[str, list[tuple[str, str, tuple[int, ...]]]]:
  """Transfers logged by `jax.transfer_guard("log")`, per `### <section>` of the probe's stderr."""
  out: dict[str, list] = {}
  section = None
  for line in stderr.splitlines():
    if line.startswith("### end"):
      section = None
    elif line.startswith("### "):
      section = line[4:]
      out[section] = []
    elif section is not None and (m := _TRANSFER.search(line)):
      out[section].append((m[1], m[2], tuple(int(d) for d in m[3].split(",") if d)))
  return out


def test_attach_places_factors_like_sharded_kernels_and_no_step_gathers_a_kernel():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                 [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
  out = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert pathlib.Path(report["lora_jax"]).is_relative_to(ROOT), report["lora_jax"]
  assert report["layouts"] == {
      "mlp/w1": "stack=() in=(0) out=(1)", "mlp/w2": "stack=() in=(0) out=(1)",
      "stack/up": "stack=(0) in=(1) out=(2)", "stack/down": "stack=(0) in=(1) out=(2)",
      "attn/q": "stack=() in=(0) out=(1,2)", "attn/o": "stack=() in=(0,1) out=(2)"}
  transfers = _transfers(out.stderr)
  assert set(transfers) == {*(f"attach {n}" for n in MESHES), "control"}, transfers.keys()

  for name, (mesh_shape, axis_names, _) in MESHES.items():
    got = report["scenarios"][name]
    mesh = dict(zip(axis_names, mesh_shape))
    # (1) placement: each factor's NamedSharding is the hand-derived one.
    for kernel, (a_spec, b_spec) in EXPECTED[name].items():
      for ab, spec, shape in (("a", a_spec, A_SHAPES[kernel]), ("b", b_spec, B_SHAPES[kernel])):
        f = got["factors"][f"{kernel}_lora_{ab}"]
        where = f"{name}: {kernel}_lora_{ab}"
        assert f["spec"] == _listify(spec) and f["equals_expected"], (where, f["spec"], spec)
        # (2) created sharded: every device holds only its block, the values are those of an
        # unsharded attach with the same key, and no factor-sized array was ever moved between
        # devices (only the folded PRNG keys, uint32 scalars, are).
        assert f["devices"] == 8 and f["shard_shapes"] == [list(_shard_shape(shape, spec, mesh))], \
            (where, f["shard_shapes"])
        assert f["bit_identical"], where
    assert transfers[f"attach {name}"], "the transfer log is empty: is the guard logging?"
    assert all(shape == () for _, _, shape in transfers[f"attach {name}"]), \
        (name, transfers[f"attach {name}"])
    # (3) the jitted LoRA step never gathers (or otherwise collects) a full base kernel.
    big = [c for c in got["collectives"] if kernel_sized(tuple(c[1]))]
    assert not big, (name, big, got["collectives"])
    # (4) gradients (with B moved off zero, so A's are non-zero too) match the single-device ones.
    assert min(got["grad_max_abs"].values()) > 1e-4, got["grad_max_abs"]
    assert max(got["grad_rel_err"].values()) < 1e-5, (name, got["grad_rel_err"])
    assert got["after_rel_err"] < 1e-5 and got["loss_rel_err"] < 1e-5, got
  # The HLO detector does flag the gather that a replicated-kernel constraint forces in the step.
  control = report["scenarios"][CONTROL_SCENARIO]["control_collectives"]
  assert ["all-gather", [40, 72]] in control and kernel_sized((40, 72)), control
  # shard_map: the kernels stay low-rank inside the body, their factors enter it sharded like
  # them, no kernel is gathered, and loss and A/B gradients match the merged path.
  sm = report["shard_map"]
  assert sm["uses"] == {"w1": ["dot_general"], "w2": ["dot_general"]}, sm["uses"]
  assert sm["in_specs"] == [SHARD_MAP_IN_SPECS], sm["in_specs"]
  assert not [c for c in sm["collectives"] if kernel_sized(tuple(c[1]))], sm["collectives"]
  assert min(sm["grad_max_abs"].values()) > 1e-4 and len(sm["grad_max_abs"]) == 4, sm["grad_max_abs"]
  assert sm["loss_rel_err"] < 1e-5 and max(sm["grad_rel_err"].values()) < 1e-5, sm
  # The transfer log does catch a factor created on one device and then moved onto the mesh.
  assert ("device-to-device", "float32", CONTROL_SHAPE) in transfers["control"], transfers["control"]


if __name__ == "__main__":
  _probe()
