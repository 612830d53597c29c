"""Adapter checkpoints (save_adapter / load_adapter) and training checkpoints (TrainingCheckpointer)."""

import gc
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax._src import tree as lj_tree
from lora_jax._src import adapters as lj_adapters
from lora_jax._src import checkpoint as ckpt_lib
import zoo

ROOT = pathlib.Path(__file__).parent.parent



@pytest.fixture
def orbax_leftovers():
  """After a restore of damaged data fails, orbax leaves coroutines whose exceptions only
  surface when they are garbage-collected, as pytest's unraisable-exception warnings in whatever
  test runs next. Collect them inside the test that caused them (where they are expected)."""
  yield
  gc.collect()

def _randomise_b(tree, key):
  """Nonzero B (attach gives B = 0), so outputs and checksums really depend on every factor."""
  paths = [p for p in lj_adapters.lora_paths(tree) if p.endswith("_lora_b")]
  values = {p: 0.1 * jax.random.normal(jax.random.fold_in(key, i), jnp.shape(lj_tree.unbox(x)))
            for i, (p, x) in enumerate(lj_tree.flatten(tree).items()) if p in paths}
  return lj_tree.map_leaves(lambda p, x: lj_tree.with_value(x, values[p]) if p in values else x, tree)


def _trained(name, **cfg):
  e = zoo.entries()[name]
  plan = lj.plan(lj.LoraConfig(**{"targets": e.targets, "rank": 2, **cfg}), e.variables,
                 apply_fn=e.fn, args=(e.x,))
  return e, plan, _randomise_b(lj.attach(plan, e.variables, jax.random.key(1)), jax.random.key(2))


def _leaves(tree):
  return {p: np.asarray(lj_tree.unbox(x)) for p, x in lj_tree.flatten(tree).items()}


def _assert_bit_identical(got, want):
  g, w = _leaves(got), _leaves(want)
  assert list(g) == list(w)
  for p in w:
    assert g[p].dtype == w[p].dtype and np.array_equal(g[p], w[p]), p


@pytest.mark.parametrize("name", ["attention_block", "nnx", "plain_transposed"])
def test_round_trip_bit_identical_adapters_and_outputs(tmp_path, name):
  e, plan, tree = _trained(name, alpha=3.0, dropout=0.1, scaling="rslora")
  lj.save_adapter(tmp_path / "a", plan, tree)
  loaded, plan2 = lj.load_adapter(tmp_path / "a", e.variables)
  assert plan2 == plan  # sites, layouts, ranks, alphas, scaling, dropout: all from the checkpoint
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(tree)
  _assert_bit_identical(loaded, tree)
  fn = jax.jit(lj.unmerged(e.fn, plan))
  assert np.array_equal(fn(loaded, e.x), fn(tree, e.x))
  # the adapter matters: the loaded outputs differ from the base's
  assert not np.allclose(fn(loaded, e.x), jax.jit(e.fn)(e.variables, e.x), atol=1e-4)


def test_partitioned_boxes_are_kept(tmp_path):
  class Sharded(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      return nn.Dense(16, kernel_init=init)(x)

  x = jnp.ones((2, 8))
  variables = Sharded().init(jax.random.key(0), x)
  plan = lj.plan(lj.LoraConfig(targets=".*/kernel", rank=2), variables)
  tree = _randomise_b(lj.attach(plan, variables, jax.random.key(1)), jax.random.key(2))
  lj.save_adapter(tmp_path, plan, tree)
  loaded, _ = lj.load_adapter(tmp_path, variables)
  a, b = loaded["params"]["Dense_0"]["kernel_lora_a"], loaded["params"]["Dense_0"]["kernel_lora_b"]
  assert isinstance(a, nn.Partitioned) and a.names == ("embed", None)
  assert isinstance(b, nn.Partitioned) and b.names == (None, "mlp")
  _assert_bit_identical(loaded, tree)


def test_nnx_state_gets_params_back(tmp_path):
  e, plan, tree = _trained("nnx")
  lj.save_adapter(tmp_path, plan, tree)
  loaded, _ = lj.load_adapter(tmp_path, e.variables)
  assert isinstance(loaded["l1"]["kernel_lora_a"], nnx.Param)
  assert isinstance(loaded, type(e.variables))


def test_metadata_describes_the_adapter_and_no_base_weight_is_written(tmp_path):
  e, plan, tree = _trained("attention_block")
  lj.save_adapter(tmp_path, plan, tree)
  meta = ckpt_lib.read_metadata(tmp_path)
  assert meta["lora_jax_version"] == lj.__version__
  assert lj.Plan.from_dict(meta["plan"]) == plan
  kernels = lj_tree.flatten(e.variables)
  assert meta["base_fingerprint"] == [{"path": s.path, "shape": list(kernels[s.path].shape),
                                       "dtype": "float32"} for s in plan.sites]
  want = {p: x for p, x in _leaves(tree).items() if p.endswith(("_lora_a", "_lora_b"))}
  assert [l["path"] for l in meta["leaves"]] == list(want)
  assert meta["raw_bytes"] == sum(x.nbytes for x in want.values())
  # the orbax item holds exactly the LoRA leaves
  import orbax.checkpoint as ocp
  version = tmp_path / (tmp_path / "LATEST").read_text()
  stored = ocp.StandardCheckpointer().restore(version / "lora")
  assert sorted(lj_tree.flatten(stored)) == sorted(want)


def test_size_on_disk_is_the_raw_adapter_bytes(tmp_path):
  # base 2 x (1024 x 2048) f32 = 16 MiB; rank-64 adapters ~ 2.4 MiB of random (incompressible) f32
  k = jax.random.split(jax.random.key(0), 2)
  base = {"l1": {"kernel": jax.random.normal(k[0], (1024, 2048))},
          "l2": {"kernel": jax.random.normal(k[1], (2048, 1024))}}
  plan = lj.plan(lj.LoraConfig(targets=".*/kernel", rank=64), base)
  tree = _randomise_b(lj.attach(plan, base, jax.random.key(1)), jax.random.key(2))
  lj.save_adapter(tmp_path, plan, tree)
  raw = sum(x.nbytes for p, x in _leaves(tree).items() if "_lora_" in p)
  disk = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
  assert raw > 2**20
  assert disk <= 1.02 * raw + 64 * 1024, (disk, raw)
  assert disk >= 0.9 * raw  # random data does not compress: the leaves really are on disk


def _base_fingerprint_snapshot(tree):
  return jax.tree_util.tree_structure(tree), [id(x) for x in jax.tree_util.tree_leaves(tree)]


def test_wrong_base_names_path_and_both_shapes_and_leaves_base_untouched(tmp_path):
  e, plan, tree = _trained("mlp")
  lj.save_adapter(tmp_path, plan, tree)
  wrong = {"params": {**e.variables["params"], "Dense_1": {"kernel": jnp.zeros((48, 40)),
                                                           "bias": jnp.zeros(40)}}}
  before = _base_fingerprint_snapshot(wrong)
  with pytest.raises(ValueError, match=r"params/Dense_1/kernel: .*shape \(48, 48\).*has shape \(48, 40\)"):
    lj.load_adapter(tmp_path, wrong)
  assert _base_fingerprint_snapshot(wrong) == before
  missing = {"params": {k: v for k, v in e.variables["params"].items() if k != "Dense_2"}}
  with pytest.raises(ValueError, match=r"params/Dense_2/kernel: .*no leaf at this path"):
    lj.load_adapter(tmp_path, missing)
  with pytest.raises(ValueError, match="already carries LoRA leaves"):
    lj.load_adapter(tmp_path, tree)


def test_bad_shardings_argument_is_named(tmp_path):
  e, plan, tree = _trained("mlp")
  lj.save_adapter(tmp_path, plan, tree)
  spec = jax.sharding.PartitionSpec()
  with pytest.raises(ValueError, match=r"shardings\['params/Dense_0/kernel_lora_a'\] = P\(\) is not a"):
    lj.load_adapter(tmp_path, e.variables, shardings={"params/Dense_0/kernel_lora_a": spec})
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(ValueError, match=r"'params/Dense_0/kernel', which is not a LoRA leaf"):
    lj.load_adapter(tmp_path, e.variables, shardings={"params/Dense_0/kernel": one})


def test_loading_onto_a_bfloat16_base_keeps_factors_and_reports_base_dtype(tmp_path):
  e, plan, tree = _trained("mlp")
  lj.save_adapter(tmp_path, plan, tree)
  bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), e.variables)
  loaded, plan2 = lj.load_adapter(tmp_path, bf16)
  assert {s.dtype for s in plan2.sites} == {"bfloat16"}
  assert loaded["params"]["Dense_0"]["kernel_lora_a"].dtype == jnp.float32
  assert np.array_equal(loaded["params"]["Dense_0"]["kernel_lora_b"],
                        tree["params"]["Dense_0"]["kernel_lora_b"])


def _data_files(directory):
  version = directory / (directory / "LATEST").read_text()
  return sorted((f for f in (version / "lora").rglob("*") if f.is_file() and "/d/" in str(f)),
                key=lambda f: f.stat().st_size)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's event loop
@pytest.mark.parametrize("damage", ["no_pointer", "bad_pointer", "no_metadata", "garbled_metadata",
                                    "truncated_arrays", "garbled_arrays", "deleted_arrays",
                                    "checksum_mismatch"])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoint_fails_clearly(tmp_path, damage, orbax_leftovers):
  e, plan, tree = _trained("mlp")
  d = tmp_path / "ckpt"
  lj.save_adapter(d, plan, tree)
  version = d / (d / "LATEST").read_text()
  biggest = _data_files(d)[-1]
  if damage == "no_pointer":
    (d / "LATEST").unlink()
  elif damage == "bad_pointer":
    (d / "LATEST").write_text("adapter-99")
  elif damage == "no_metadata":
    (version / "lora_jax" / "metadata").unlink()
  elif damage == "garbled_metadata":
    (version / "lora_jax" / "metadata").write_text('{"format": "lora_jax.adapter/1", "plan"')
  elif damage == "truncated_arrays":
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
  elif damage == "garbled_arrays":
    raw = bytearray(biggest.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
      raw[i] ^= 0x5A
    biggest.write_bytes(bytes(raw))
  elif damage == "checksum_mismatch":  # arrays that read fine but are not what was saved
    meta = json.loads((version / "lora_jax" / "metadata").read_text())
    meta["leaves"][3]["checksum"] ^= 1
    (version / "lora_jax" / "metadata").write_text(json.dumps(meta))
  elif damage == "deleted_arrays":
    for f in _data_files(d):
      f.unlink()
  before = _base_fingerprint_snapshot(e.variables)
  with pytest.raises(lj.CheckpointError, match=re.escape(str(d))):
    lj.load_adapter(d, e.variables)
  assert _base_fingerprint_snapshot(e.variables) == before


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")  # the crash
def test_crash_mid_save_leaves_previous_checkpoint_readable(tmp_path, monkeypatch):
  e, plan, old = _trained("mlp")
  new = _randomise_b(old, jax.random.key(7))
  lj.save_adapter(tmp_path, plan, old)

  def crash(*args, **kwargs):
    raise KeyboardInterrupt("simulated crash")

  # 1. crash after the new arrays are written, before the pointer swap
  monkeypatch.setattr(ckpt_lib, "_replace_pointer", crash)
  with pytest.raises(KeyboardInterrupt):
    lj.save_adapter(tmp_path, plan, new)
  monkeypatch.undo()
  _assert_bit_identical(lj.load_adapter(tmp_path, e.variables)[0], old)
  # 2. crash inside orbax's save, with its temporary directory already on disk
  import orbax.checkpoint as ocp
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", crash)
  with pytest.raises(KeyboardInterrupt):
    lj.save_adapter(tmp_path, plan, new)
  monkeypatch.undo()
  assert any("tmp" in p.name for p in tmp_path.iterdir())  # the half-written checkpoint
  _assert_bit_identical(lj.load_adapter(tmp_path, e.variables)[0], old)
  # 3. the next save succeeds and clears the leftovers of the crashed ones
  lj.save_adapter(tmp_path, plan, new)
  _assert_bit_identical(lj.load_adapter(tmp_path, e.variables)[0], new)
  assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "LATEST",
                                                        (tmp_path / "LATEST").read_text()]


def test_save_refuses_foreign_directory_and_mismatched_tree(tmp_path):
  e, plan, tree = _trained("mlp")
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="notes.txt"):
    lj.save_adapter(tmp_path, plan, tree)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
  bad = jax.tree_util.tree_map(lambda x: x, tree)
  bad["params"]["Dense_1"]["kernel_lora_b"] = jnp.zeros((3, 48))
  with pytest.raises(ValueError, match=r"params/Dense_1/kernel_lora_b: shape \(3, 48\)"):
    lj.save_adapter(tmp_path / "x", plan, bad)
  assert not (tmp_path / "x").exists()


SHARDING_SCRIPT = textwrap.dedent("""
  import sys, jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  import lora_jax as lj
  from lora_jax._src import tree as lj_tree
  d = sys.argv[1]
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
  k = jax.random.split(jax.random.key(0), 3)
  base = {"dense": {"kernel": put(jax.random.normal(k[0], (8, 12)), "data", "model")},
          "stack": {"kernel": put(jax.random.normal(k[1], (2, 8, 4, 6)), "data", None, "model")}}
  fn = lambda v, x: jnp.einsum("lbd,ldhk->lbhk", jnp.stack([(x @ v["dense"]["kernel"])[:, :8]] * 2),
                               v["stack"]["kernel"])
  x = jnp.ones((3, 8))
  plan = lj.plan(lj.LoraConfig(targets=".*/kernel", rank=2), base, apply_fn=fn, args=(x,))
  assert plan.site("stack/kernel").layout == lj.Layout((0,), (1,), (2, 3)), plan
  host = {p: jax.device_get(v) for p, v in lj_tree.flatten(base).items()}
  tree = lj.attach(plan, {"dense": {"kernel": host["dense/kernel"]},
                          "stack": {"kernel": host["stack/kernel"]}}, jax.random.key(1))
  tree["dense"]["kernel_lora_b"] = jnp.full((2, 12), 0.5)
  lj.save_adapter(d, plan, tree)
  loaded, _ = lj.load_adapter(d, base)
  for p, x in lj_tree.flatten(loaded).items():
    if "_lora_" in p:
      print(p, tuple(x.sharding.spec), x.addressable_shards[0].data.shape,
            np.array_equal(x, lj_tree.flatten(tree)[p]))
  rep = NamedSharding(mesh, P())
  loaded, _ = lj.load_adapter(d, base, shardings={"dense/kernel_lora_a": rep})
  print("given", tuple(loaded["dense"]["kernel_lora_a"].sharding.spec),
        tuple(loaded["dense"]["kernel_lora_b"].sharding.spec))
""")


def test_restore_places_factors_like_their_kernels(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT, str(tmp_path / "a")], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  # A: kernel's specs on stack+in axes, rank replicated; B: stack + rank (replicated) + out axes
  assert lines == [
      "dense/kernel_lora_a ('data', None) (4, 2) True",
      "dense/kernel_lora_b (None, 'model') (2, 6) True",
      "stack/kernel_lora_a ('data', None, None) (1, 8, 2) True",
      "stack/kernel_lora_b ('data', None, 'model', None) (1, 2, 2, 6) True",
      "given () (None, 'model')",
  ], out.stdout


def _train_setup():
  e = zoo.entries()["mlp"]
  plan = lj.plan(lj.LoraConfig(targets=e.targets, rank=2), e.variables)
  tree = lj.attach(plan, e.variables, jax.random.key(1))
  adapters, base = lj.split(tree)
  tx = optax.adamw(1e-2)
  target = jnp.sin(jnp.arange(4 * 16, dtype=jnp.float32).reshape(4, 16))
  apply = lj.unmerged(e.fn, plan)

  @jax.jit
  def step(adapters, opt_state):
    grads = jax.grad(lambda a: jnp.mean((apply(lj.combine(base, a), e.x) - target) ** 2))(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state

  return adapters, base, tx, step


def test_training_checkpointer_resume_is_bit_identical(tmp_path):
  adapters0, base, tx, step = _train_setup()
  a, s = adapters0, tx.init(adapters0)
  for _ in range(6):
    a, s = step(a, s)
  uninterrupted = a

  with lj.TrainingCheckpointer(tmp_path, save_every=2, keep=2) as ckpt:
    a, s = adapters0, tx.init(adapters0)
    for i in range(1, 5):  # "crash" after step 4; the step-3 state is never saved
      a, s = step(a, s)
      ckpt.save(i, a, s)
    assert ckpt.all_steps() == [2, 4]
  del a, s

  # A fresh process would have only templates: abstract shapes, no values.
  a_like = jax.eval_shape(lambda: adapters0)
  s_like = jax.eval_shape(tx.init, adapters0)
  with lj.TrainingCheckpointer(tmp_path, save_every=2, keep=2) as ckpt:
    start, a, s = ckpt.restore_latest(a_like, s_like)
  assert start == 4
  assert jax.tree_util.tree_structure(s) == jax.tree_util.tree_structure(tx.init(adapters0))
  assert int(s[0].count) == 4 and isinstance(s[0], optax.ScaleByAdamState)
  for _ in range(start, 6):
    a, s = step(a, s)
  for p, x in _leaves(uninterrupted).items():
    assert np.array_equal(_leaves(a)[p], x), p


def test_training_checkpointer_keeps_last_k_and_never_stores_the_base(tmp_path):
  e = zoo.entries()["mlp"]
  big = {"params": {**e.variables["params"], "Dense_1": {  # a 4 MiB base kernel
      "kernel": jnp.ones((1024, 1024)), "bias": jnp.zeros(1024)},
      "Dense_2": {"kernel": jnp.ones((1024, 16)), "bias": jnp.zeros(16)}}}
  plan = lj.plan(lj.LoraConfig(targets=r".*/kernel", rank=2), big)
  tree = lj.attach(plan, big, jax.random.key(0))
  tx = lj.freeze_base(optax.adamw(1e-3), tree)  # the full-tree flow: state for adapters only
  opt_state = tx.init(tree)
  with lj.TrainingCheckpointer(tmp_path, save_every=3, keep=2) as ckpt:
    saved = [ckpt.save(i, tree, opt_state) for i in range(10)]
    assert saved == [i % 3 == 0 for i in range(10)]
    assert ckpt.all_steps() == [6, 9]
    step, back, state = ckpt.restore_latest(tree, opt_state)
  assert step == 9
  disk = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
  assert disk < 256 * 1024, disk  # two checkpoints; the base alone is > 4 MiB
  # the base leaves are the template's own (never read from disk), adapters restored bit-exactly
  flat_back, flat_tree = lj_tree.flatten(back), lj_tree.flatten(tree)
  assert list(flat_back) == list(flat_tree)
  for p, x in flat_tree.items():
    assert (flat_back[p] is x) if "_lora_" not in p else np.array_equal(flat_back[p], x), p
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(opt_state)
  with pytest.raises(ValueError, match="no LoRA leaves"):
    lj.TrainingCheckpointer(tmp_path / "x").save(0, big, opt_state)
  with pytest.raises(lj.CheckpointError, match="no training checkpoint for step 5"):
    lj.TrainingCheckpointer(tmp_path).restore(5, tree, opt_state)


def test_example_reloads_in_fresh_process_and_reports_sizes(tmp_path):
  out = subprocess.run([sys.executable, str(ROOT / "examples" / "save_and_load.py"), "--dir",
                        str(tmp_path), "--hidden", "64", "64", "--rank", "4",
                        "--pretrain-steps", "20", "--steps", "20"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert "outputs bit-identical to the training process: yes" in out.stdout, out.stdout
  model = int(re.search(r"full model \(all base params\): ([\d,]+) bytes", out.stdout)[1].replace(",", ""))
  disk, raw = (int(g.replace(",", "")) for g in re.search(
      r"adapter on disk: ([\d,]+) bytes \(LoRA factors: ([\d,]+) raw bytes", out.stdout).groups())
  assert model == 4 * (64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10)  # f32 params of 64-64-64-10
  assert raw == 4 * 4 * (64 + 64 + 64 + 64 + 64 + 10)  # rank 4: A (in, 4) + B (4, out) per kernel
  assert disk <= 1.02 * raw + 64 * 1024 and disk == sum(
      f.stat().st_size for f in (tmp_path / "adapter").rglob("*") if f.is_file())


# --- integrity: every damaged checkpoint is a bit-identical load or a CheckpointError ----------


def _all_files(d):
  return sorted(f for f in d.rglob("*") if f.is_file())


def _positions(files, n, seed):
  """`n` (file, offset) pairs, deterministic: every file's first and last byte, the rest spread
  uniformly over all bytes of all files."""
  sizes = [f.stat().st_size for f in files]
  picks = [(f, o) for f, s in zip(files, sizes) if s for o in {0, s - 1}]
  total = sum(sizes)
  rng = np.random.default_rng(seed)
  for g in sorted(rng.choice(total, size=max(n - len(picks), 0), replace=False)):
    for f, s in zip(files, sizes):
      if g < s:
        picks.append((f, int(g)))
        break
      g -= s
  return picks[:n] if len(picks) > n else picks


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def _flipped_copy(clean, d, f, offset, rng):
  """A fresh copy `d` of checkpoint dir `clean` (no cache can hide the damage) with one byte of
  file `f` XOR-ed with a random non-zero value; returns `(d, the damaged file)`."""
  shutil.copytree(clean, d)
  target = d / pathlib.Path(f).relative_to(clean)
  raw = bytearray(target.read_bytes())
  raw[offset] ^= int(rng.integers(1, 256))
  target.write_bytes(bytes(raw))
  return d, target


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_single_byte_flips_load_identically_or_raise_checkpoint_error(tmp_path, orbax_leftovers):
  e, plan, tree = _trained("mlp")
  clean = tmp_path / "clean"
  lj.save_adapter(clean, plan, tree)
  files = [f.relative_to(clean) for f in _all_files(clean)]
  picks = _positions([clean / f for f in files], 200, seed=0)
  assert len(picks) == 200 and len({f for f, _ in picks}) == sum(
      1 for f in files if (clean / f).stat().st_size)  # every non-empty file is hit
  rng = np.random.default_rng(1)
  identical, refused = 0, []
  for k, (f, offset) in enumerate(picks):
    d, target = _flipped_copy(clean, tmp_path / f"flip{k}", f, offset, rng)
    try:
      loaded, plan2 = lj.load_adapter(d, e.variables)
    except lj.CheckpointError as err:
      assert str(d) in str(err), err
      refused.append(f)
    else:  # anything else that is raised fails the test
      _assert_bit_identical(loaded, tree)
      assert plan2 == plan
      identical += 1
    shutil.rmtree(d)
  assert identical + len(refused) == 200
  # The checks bite on every kind of file: flips in the record, the pointer and the arrays'
  # data chunks (lora/d/...) are refused. (How many of the 200 land where a flip is harmless,
  # e.g. in orbax metadata that varies in size from run to run, is not fixed: no count here.)
  names = {p.name for p in refused}
  assert {"metadata", "LATEST"} <= names, sorted(names)
  assert any(p.parent.name == "d" and p.parent.parent.name == "lora" for p in refused), sorted(
      map(str, refused))


def _record(d):
  return d / (d / "LATEST").read_text() / "lora_jax" / "metadata"


def _edit(d, change, resign=True):
  """Edit the record of the checkpoint in `d` and (by default) recompute its SHA-256, as a
  deliberate edit would: only the field checks stand in the way."""
  meta = json.loads(_record(d).read_text())
  change(meta)
  if resign and "record_sha256" in meta:
    meta["record_sha256"] = ckpt_lib.record_digest(meta)
  _record(d).write_text(json.dumps(meta))


@pytest.mark.parametrize("resign", [False, True])
def test_edited_scale_is_refused_naming_the_field(tmp_path, resign):
  e, plan, tree = _trained("mlp", alpha=4.0)
  assert plan.sites[0].scale == 2.0
  lj.save_adapter(tmp_path, plan, tree)

  def change(meta):
    meta["plan"]["sites"][0]["scale"] = 3.0

  _edit(tmp_path, change, resign)
  with pytest.raises(lj.CheckpointError, match=re.escape(str(tmp_path)) + r".*plan\.sites\[0\]\.scale: "
                     r"3\.0 is not alpha/rank = 2\.0"):
    lj.load_adapter(tmp_path, e.variables)
  with pytest.raises(lj.CheckpointError, match=r"plan\.sites\[0\]\.scale"):
    ckpt_lib.read_metadata(tmp_path)


def test_unchanged_content_with_a_wrong_checksum_is_refused(tmp_path):
  e, plan, tree = _trained("mlp")
  lj.save_adapter(tmp_path, plan, tree)
  _edit(tmp_path, lambda m: m.__setitem__("record_sha256", "0" * 64), resign=False)
  with pytest.raises(lj.CheckpointError, match=r"record_sha256: does not match"):
    lj.load_adapter(tmp_path, e.variables)
  # a consistent record with a different alpha (and scale) passes the field checks: the
  # SHA-256 is what refuses it
  def change(m):
    m["plan"]["sites"][1]["alpha"] = 32.0
    m["plan"]["sites"][1]["scale"] = 16.0
  lj.save_adapter(tmp_path, plan, tree)
  _edit(tmp_path, change, resign=False)
  with pytest.raises(lj.CheckpointError, match=r"record_sha256: does not match"):
    lj.load_adapter(tmp_path, e.variables)


def test_huge_rank_is_refused_before_any_array_is_allocated(tmp_path, monkeypatch):
  e, plan, tree = _trained("mlp")
  lj.save_adapter(tmp_path, plan, tree)

  def change(meta):  # a self-consistent record of a rank-10**7 adapter (~0.5 GB of factors)
    site, (a, b) = meta["plan"]["sites"][0], meta["leaves"][:2]
    site["rank"], site["scale"] = 10**7, site["alpha"] / 10**7
    a["shape"][-1], b["shape"][0] = 10**7, 10**7
    a["nbytes"], b["nbytes"] = 4 * math.prod(a["shape"]), 4 * math.prod(b["shape"])
    meta["raw_bytes"] = sum(l["nbytes"] for l in meta["leaves"])

  _edit(tmp_path, change)
  restores = []
  monkeypatch.setattr(ckpt_lib.ocp.Checkpointer, "restore", lambda *a, **k: restores.append(a))
  with pytest.raises(lj.CheckpointError, match=r"plan\.sites\[0\]\.rank: 10000000 is not an integer "
                     r"in \[1, min\(fan_in=24, fan_out=48\)\]"):
    lj.load_adapter(tmp_path, e.variables)
  assert restores == []  # refused from the record alone: orbax never asked to allocate anything


@pytest.mark.parametrize("field", ["base_fingerprint", "record_sha256", "plan", "leaves",
                                   "plan.sites.0.alpha", "leaves.2.checksum", "plan.config"])
def test_missing_record_keys_are_named(tmp_path, field):
  e, plan, tree = _trained("mlp")
  lj.save_adapter(tmp_path, plan, tree)
  *parents, last = [int(k) if k.isdigit() else k for k in field.split(".")]

  def change(meta):
    node = meta
    for k in parents:
      node = node[k]
    del node[last]

  _edit(tmp_path, change)
  name = re.escape(".".join(f"[{k}]" if isinstance(k, int) else k for k in (*parents, last))
                   ).replace(r"\.\[", r"\[")
  with pytest.raises(lj.CheckpointError, match=re.escape(str(tmp_path)) + f".*{name}: missing"):
    lj.load_adapter(tmp_path, e.variables)


@pytest.mark.parametrize("content", [b"\xff\xfeadapter-1", b"adapter-1\x00", b"", b"adapter-01",
                                     b"adapter-1" * 20])
def test_garbled_pointer_is_a_checkpoint_error(tmp_path, content):
  e, plan, tree = _trained("mlp")
  lj.save_adapter(tmp_path, plan, tree)
  (tmp_path / "LATEST").write_bytes(content)
  with pytest.raises(lj.CheckpointError, match=re.escape(str(tmp_path)) + ".*LATEST"):
    lj.load_adapter(tmp_path, e.variables)


def test_legacy_record_without_checksum_still_loads(tmp_path):
  e, plan, tree = _trained("mlp")
  lj.save_adapter(tmp_path, plan, tree)

  def legacy(meta):
    del meta["version"], meta["record_sha256"]
    meta["format"] = "lora_jax.adapter/1"

  _edit(tmp_path, legacy, resign=False)
  loaded, plan2 = lj.load_adapter(tmp_path, e.variables)
  _assert_bit_identical(loaded, tree)
  assert plan2 == plan


def test_strict_argument_types(tmp_path):
  e, plan, tree = _trained("mlp")
  for bad in (1.5, True, "2", None):
    with pytest.raises(TypeError, match="save_every"):
      lj.TrainingCheckpointer(tmp_path / "t", save_every=bad)
  with pytest.raises(ValueError, match="save_every must be >= 1, got 0"):
    lj.TrainingCheckpointer(tmp_path / "t", save_every=0)
  for bad in (1.5, True, "2"):
    with pytest.raises(TypeError, match="keep"):
      lj.TrainingCheckpointer(tmp_path / "t", keep=bad)
  with pytest.raises(ValueError, match="keep must be >= 1"):
    lj.TrainingCheckpointer(tmp_path / "t", keep=0)
  assert not (tmp_path / "t").exists()  # refused before anything was created
  adapters, _ = lj.split(tree)
  state = {"n": jnp.zeros((), jnp.int32)}
  with lj.TrainingCheckpointer(tmp_path / "t", save_every=2) as ckpt:
    for bad in (-5, 1.0, True, "3", None):
      with pytest.raises(ValueError, match=r"step must be an int >= 0"):
        ckpt.save(bad, adapters, state)
    assert ckpt.save(np.int64(0), adapters, state) and not ckpt.save(1, adapters, state)
    assert ckpt.all_steps() == [0]
  lj.save_adapter(tmp_path / "a", plan, tree)
  for bad in ("x", 3, [jax.sharding.SingleDeviceSharding(jax.devices()[0])]):
    with pytest.raises(TypeError, match="shardings must be None, a jax.sharding.Sharding"):
      lj.load_adapter(tmp_path / "a", e.variables, shardings=bad)


def test_save_every_counts_steps_exactly(tmp_path):
  adapters, _ = lj.split(_trained("mlp")[2])
  with lj.TrainingCheckpointer(tmp_path, save_every=2, keep=None) as ckpt:
    saved = [i for i in range(1, 9) if ckpt.save(i, adapters, {"n": jnp.zeros((), jnp.int32)})]
  assert saved == [1, 2, 4, 6, 8]  # the first save, then every multiple of 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_training_checkpoint_damage_restores_identically_or_names_the_step(tmp_path, orbax_leftovers):
  adapters0, base, tx, step = _train_setup()
  a, s = step(adapters0, tx.init(adapters0))
  clean = tmp_path / "clean"
  with lj.TrainingCheckpointer(clean) as ckpt:
    ckpt.save(7, a, s)
  files = [f for f in _all_files(clean)]
  picks = _positions(files, 80, seed=2)
  rng = np.random.default_rng(3)
  identical, refused = 0, 0
  for k, (f, offset) in enumerate(picks):
    d, target = _flipped_copy(clean, tmp_path / f"flip{k}", f, offset, rng)
    try:
      with lj.TrainingCheckpointer(d) as ckpt:
        got_step, got_a, got_s = ckpt.restore(7, adapters0, tx.init(adapters0))
    except lj.CheckpointError as err:
      assert str(d) in str(err) and ("step 7" in str(err) or "7" in str(err)), err
      refused += 1
    else:
      assert got_step == 7
      _assert_bit_identical(got_a, a)
      for x, y in zip(jax.tree_util.tree_leaves(got_s), jax.tree_util.tree_leaves(s)):
        assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
      identical += 1
    shutil.rmtree(d)
  assert identical + refused == len(picks) == 80
  assert refused >= 20, (identical, refused)
  # an edited record (even re-signed) and a template of another dtype are refused, naming the step
  version = clean / "7" / "lora_jax" / "metadata"
  meta = json.loads(version.read_text())
  meta["adapters"][0]["checksum"] ^= 1
  meta["record_sha256"] = ckpt_lib.record_digest(meta)
  version.write_text(json.dumps(meta))
  with pytest.raises(lj.CheckpointError, match=r"step 7: adapters\['params'\]\['Dense_0'\]\['kernel_lora_a'\]"
                     r": restored checksum"):
    lj.TrainingCheckpointer(clean).restore(7, adapters0, tx.init(adapters0))
