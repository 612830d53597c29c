"""Checkpoints across processes: a 2-process `jax.distributed` run killed mid-way and resumed, and
independent processes saving to (and loading from) one adapter directory at the same time."""

import hashlib
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np

ROOT = pathlib.Path(__file__).parent.parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
ENV.pop("XLA_FLAGS", None)  # one CPU device per process

DISTRIBUTED = textwrap.dedent("""
  import hashlib, os, sys
  import jax, jax.numpy as jnp, numpy as np, optax
  pid, port, mode, d = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  import lora_jax as lj
  from lora_jax._src import tree as lj_tree
  assert jax.process_count() == 2 and len(jax.devices()) == 2
  rep = NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P())
  glob = lambda a: jax.make_array_from_callback(a.shape, rep, lambda idx: a[idx])
  rng = np.random.default_rng(0)  # the same base on both processes
  base = {"l1": {"kernel": glob(rng.standard_normal((8, 16), np.float32))},
          "l2": {"kernel": glob(rng.standard_normal((16, 4), np.float32))}}
  x = glob(rng.standard_normal((5, 8), np.float32))
  target = glob(np.sin(np.arange(20, dtype=np.float32)).reshape(5, 4))
  fn = lambda v, x: jnp.tanh(x @ v["l1"]["kernel"]) @ v["l2"]["kernel"]
  plan = lj.plan(lj.LoraConfig(targets=".*/kernel", rank=2, alpha=4.0), base)
  adapters0, _ = lj.split(lj.attach(plan, base, jax.random.key(1)))
  tx = optax.adamw(3e-2)
  init = jax.jit(tx.init, out_shardings=rep)  # the step count too on both processes' devices
  apply = lj.unmerged(fn, plan)

  @jax.jit
  def step(a, s):
    g = jax.grad(lambda a: jnp.mean((apply(lj.combine(base, a), x) - target) ** 2))(a)
    u, s = tx.update(g, s, a)
    return optax.apply_updates(a, u), s

  def digest(tree):
    h = hashlib.sha256()
    for p, v in sorted(lj_tree.flatten(tree).items()):
      h.update(p.encode() + np.asarray(jax.device_get(v)).tobytes())
    return h.hexdigest()[:16]

  STEPS, KILL_AT = 6, 3
  ckpt = lj.TrainingCheckpointer(os.path.join(d, "run"), save_every=1, keep=2)
  a, s, start = adapters0, init(adapters0), 0
  if mode == "resume":
    start, a, s = ckpt.restore_latest(adapters0, init(adapters0))
    print(pid, "resumed at", start, flush=True)
  for i in range(start, STEPS):
    a, s = step(a, s)
    ckpt.save(i + 1, a, s)
    lj.save_adapter(os.path.join(d, "adapter"), plan, lj.combine(base, a))
    if mode == "kill" and i + 1 == KILL_AT:
      print(pid, "killed after step", i + 1, flush=True)
      os._exit(0)  # no close, no cleanup: as if the job died here
  ckpt.close()
  u, su = adapters0, init(adapters0)
  for i in range(STEPS):
    u, su = step(u, su)
  loaded, plan2 = lj.load_adapter(os.path.join(d, "adapter"), base)
  print(pid, "resumed", digest(a), "uninterrupted", digest(u), "loaded", digest(lj.split(loaded)[0]),
        "plan", plan2 == plan, "opt_state", digest(s) == digest(su), flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_pair(mode, d):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", DISTRIBUTED, str(i), str(port), mode, str(d)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for rc, out, err in outs:
    assert rc == 0, (mode, out, err[-4000:].replace("\\n", "\n"))
  # our lines only (gloo prints its own to stdout)
  return ["\n".join(l for l in out.splitlines() if l[:2] in ("0 ", "1 ")) for _, out, _ in outs]


def test_distributed_training_killed_and_resumed_is_bit_identical(tmp_path):
  killed = _run_pair("kill", tmp_path)
  assert [o.strip() for o in killed] == ["0 killed after step 3", "1 killed after step 3"]
  assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == ["2", "3"]
  assert (tmp_path / "adapter" / "LATEST").read_text() == "adapter-3"
  resumed = _run_pair("resume", tmp_path)
  lines = [o.strip().splitlines() for o in resumed]
  assert [l[0] for l in lines] == ["0 resumed at 3", "1 resumed at 3"]
  finals = [l[-1].split() for l in lines]
  for pid, f in enumerate(finals):
    assert f[0] == str(pid) and f[1::2][:5] == ["resumed", "uninterrupted", "loaded", "plan",
                                                "opt_state"], f
    assert f[2] == f[4] == f[6], f  # resumed == uninterrupted == loaded from save_adapter
    assert f[8] == "True" and f[10] == "True", f
  assert finals[0][2] == finals[1][2]  # both processes hold the same adapters
  # one current version, written once (process 0 wrote pointer and record)
  assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [".lock", "LATEST", "adapter-6"]
  assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == ["5", "6"]


WRITER = textwrap.dedent("""
  import os, sys, time
  import jax, jax.numpy as jnp, numpy as np
  import lora_jax as lj
  from lora_jax._src import tree as lj_tree
  role, who, n, d, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
  base = {"l1": {"kernel": np.ones((16, 32), np.float32)}, "l2": {"kernel": np.ones((32, 8), np.float32)}}
  plan = lj.plan(lj.LoraConfig(targets=".*/kernel", rank=4), base)

  def adapter(w, i):  # every (writer, save) pair has its own factors
    rng = np.random.default_rng(1000 * w + i)
    return {p: rng.standard_normal(s, np.float32) for p, s in
            (("l1/kernel_lora_a", (16, 4)), ("l1/kernel_lora_b", (4, 32)),
             ("l2/kernel_lora_a", (32, 4)), ("l2/kernel_lora_b", (4, 8)))}

  def which(tree, writers, saves):
    got = {p: np.asarray(x) for p, x in lj_tree.flatten(tree).items() if "_lora_" in p}
    for w in range(writers):
      for i in range(saves):
        want = adapter(w, i)
        if all(got[p].dtype == want[p].dtype and np.array_equal(got[p], want[p]) for p in want):
          return f"{w}.{i}"
    return "none"

  while not os.path.exists(go):
    time.sleep(0.005)
  if role == "write":
    for i in range(n):
      f = adapter(who, i)
      tree = {"l1": {"kernel": base["l1"]["kernel"], "kernel_lora_a": f["l1/kernel_lora_a"],
                     "kernel_lora_b": f["l1/kernel_lora_b"]},
              "l2": {"kernel": base["l2"]["kernel"], "kernel_lora_a": f["l2/kernel_lora_a"],
                     "kernel_lora_b": f["l2/kernel_lora_b"]}}
      lj.save_adapter(d, plan, tree)
    print("wrote", n, flush=True)
  else:  # read while the writers write: every load is one of the saved adapters, bit for bit
    seen = []
    deadline = time.time() + 120
    for i in range(n):
      while not os.path.exists(os.path.join(d, "LATEST")):
        assert time.time() < deadline, "no save was ever published"
        time.sleep(0.005)
      seen.append(which(lj.load_adapter(d, base)[0], 2, int(sys.argv[6])))
    print("read", " ".join(seen), flush=True)
""")


def test_concurrent_writers_and_a_reader_on_one_directory(tmp_path):
  d, go, saves, loads = tmp_path / "adapter", tmp_path / "go", 16, 12
  cmd = lambda *a: [sys.executable, "-c", WRITER, *map(str, a)]
  procs = [subprocess.Popen(cmd("write", w, saves, d, go), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for w in range(2)]
  procs.append(subprocess.Popen(cmd("read", 0, loads, d, go, saves), env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  time.sleep(1.0)
  go.touch()  # all three start together (as soon as each has imported jax)
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=400)  # a hang fails the test instead of blocking CI
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for rc, out, err in outs:
    assert rc == 0, (out, err[-4000:])
  assert [o.strip() for _, o, _ in outs[:2]] == [f"wrote {saves}"] * 2
  seen = outs[2][1].split()[1:]
  assert len(seen) == loads and "none" not in seen, seen
  # the end state: one version, loadable, equal bit for bit to one writer's last save
  assert sorted(p.name for p in d.iterdir()) == [".lock", "LATEST", f"adapter-{2 * saves}"]
  check = subprocess.run(cmd("read", 0, 1, d, d / "LATEST", saves), env=ENV, capture_output=True,
                         text=True, timeout=300)
  assert check.returncode == 0, check.stderr[-3000:]
  assert check.stdout.split()[1:] in ([f"0.{saves - 1}"], [f"1.{saves - 1}"]), check.stdout
