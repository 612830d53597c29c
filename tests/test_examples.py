"""The examples really adapt: each runs in a subprocess with small settings and its printed numbers
are checked against the task (base vs LoRA), against each other (merged vs unmerged) and against
parameter counts computed here from the layer shapes."""

import importlib
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, *flags: str) -> str:
  result = subprocess.run([sys.executable, str(EXAMPLES / name), *flags], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
  return result.stdout


def number(pattern: str, text: str) -> float:
  match = re.search(pattern, text)
  assert match, f"{pattern!r} not found in:\n{text}"
  return float(match.group(1).replace(",", ""))


@pytest.mark.parametrize("name", ["digits_mlp.py", "transformer_lm.py", "nnx_model.py",
                                  "any_function.py"])
def test_help_lists_every_flag(name, monkeypatch, capsys):
  text = (EXAMPLES / name).read_text()
  flags = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", text))
  # The script's own parser, imported here: a subprocess per script would import JAX again (3-6 s
  # of CPU each); the tests below run every script as `python examples/<name> ...` anyway.
  monkeypatch.syspath_prepend(str(EXAMPLES))
  with pytest.raises(SystemExit) as done:
    importlib.import_module(name.removesuffix(".py")).parse_args(["--help"])
  assert done.value.code == 0
  out = capsys.readouterr().out
  assert flags and flags <= set(re.findall(r"--[\w-]+", out)), (flags, out)
  # every flag carries a help string
  assert text.count("add_argument(") == text.count("help=")


def test_digits_mlp_lora_beats_base_on_rotated_digits(tmp_path):
  hidden, rank = (32, 64), 4
  plot, adapter_dir = tmp_path / "curves.png", tmp_path / "adapter"
  out = run_example("digits_mlp.py", "--pretrain-steps", "300", "--steps", "300",
                    "--hidden", *map(str, hidden), "--rank", str(rank), "--plot", str(plot),
                    "--save", str(adapter_dir))
  base = number(r"pretrained base: [\d.]+% test accuracy on upright digits, ([\d.]+)% on rotated", out)
  row = r"LoRA r=4, {}\s+([\d,]+) \(([\d.]+)%\)\s+([\d.]+)%"
  unmerged = re.search(row.format("unmerged"), out)
  merged = re.search(row.format("merged"), out)
  assert unmerged and merged, out
  full = number(r"full fine-tuning\s+[\d,]+ \(100%\)\s+([\d.]+)%", out)

  # The gain is real: the base is near chance on rotated digits, LoRA and full FT are not.
  assert base < 40.0 and float(unmerged.group(3)) > 80.0 and full > 80.0, out
  assert abs(float(unmerged.group(3)) - float(merged.group(3))) < 1.0, out
  assert number(r"max \|logits difference\| = (\S+)", out) < 1e-3, out
  assert "returns the pretrained base bit for bit: yes" in out, out

  # Trainable parameters, from the layer shapes: A (in, r) + B (r, out) per Dense kernel.
  dims = (64, *hidden, 10)
  n_lora = sum((i + o) * rank for i, o in zip(dims[:-1], dims[1:]))
  n_base = sum(i * o + o for i, o in zip(dims[:-1], dims[1:]))  # kernels + biases
  assert int(unmerged.group(1).replace(",", "")) == n_lora, out
  assert abs(float(unmerged.group(2)) - 100 * n_lora / n_base) < 0.01, out
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The saved adapter holds the factors' raw bytes (4 per float32 parameter) plus metadata whose
  # size orbax varies from run to run: the README's rule, <= 1.02 x raw + 64 KiB, cannot flake.
  adapter_kib = number(r"([\d.]+) KiB on disk", out)
  assert number(r"the model's weights: ([\d.]+) KiB", out) == pytest.approx(4 * n_base / 1024, abs=0.05)
  assert adapter_kib <= 1.02 * 4 * n_lora / 1024 + 64 and (adapter_dir / "LATEST").exists(), out


def test_transformer_lm_lora_learns_the_new_rule():
  d_model, layers, rank = 32, 2, 8
  out = run_example("transformer_lm.py", "--pretrain-steps", "150", "--steps", "100",
                    "--d-model", str(d_model), "--layers", str(layers), "--rank", str(rank),
                    "--batch-size", "32", "--eval-size", "128")
  base_old = number(r"original rule loss ([\d.]+)", out)
  base_new = number(r"new rule loss ([\d.]+)", out)
  row = r"LoRA r=8, {}\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)%"
  unmerged = re.search(row.format("unmerged"), out)
  merged = re.search(row.format("merged"), out)
  assert unmerged and merged, out

  # Pretraining learned the original rule; the new rule is out of reach for the base; LoRA
  # (B = 0 at step 0, so it starts from the base's loss) learns it.
  assert base_old < 0.1 and base_new > 3.0, out
  lora_loss, lora_acc = float(unmerged.group(2)), float(unmerged.group(3))
  assert lora_loss < 0.25 * base_new and lora_acc > 70.0, out
  assert abs(lora_loss - float(merged.group(2))) < 1e-3, out
  assert number(r"max \|logits difference\| = (\S+)", out) < 1e-3, out

  # query and value kernels: (layers, d, heads, head_dim), A (layers, d, r) + B (layers, r, d).
  n_adapter = 2 * layers * (d_model + d_model) * rank
  assert int(unmerged.group(1).replace(",", "")) == n_adapter, out
  assert number(r"adapter: [\d,]+ params, ([\d.]+) KiB", out) == pytest.approx(4 * n_adapter / 1024, abs=0.05)
  assert number(r"LoRA ([\d,]+) tokens/s", out) > 0 and number(r"full fine-tuning ([\d,]+) tokens/s", out) > 0


def test_nnx_model_lora_fits_and_merges_back_into_the_model():
  out = run_example("nnx_model.py", "--steps", "200")
  before = number(r"before LoRA ([\d.e+-]+)", out)
  after = number(r"after 200 steps ([\d.e+-]+)", out)
  merged = number(r"with nnx.update: MSE ([\d.e+-]+)", out)
  assert after < 0.05 * before, out
  assert merged == pytest.approx(after, rel=1e-3, abs=1e-6), out
  assert number(r"max \|model\(x\) - unmerged\(x\)\| = (\S+)", out) < 1e-4, out
  assert "still the untouched base model: yes" in out, out
  # l1 (16, 64) and l2 (64, 8) at rank 2: (16 + 64) * 2 + (64 + 8) * 2 LoRA params.
  assert f"{(16 + 64) * 2 + (64 + 8) * 2} LoRA params" in out, out


def test_any_function_plain_and_apply_only_models():
  out = run_example("any_function.py", "--steps", "200")
  befores = [float(v) for v in re.findall(r"MSE to the teacher: before ([\d.e+-]+)", out)]
  afters = [float(v) for v in re.findall(r"after 200 steps ([\d.e+-]+)", out)]
  diffs = [float(v) for v in re.findall(r"merged vs unmerged: max \|difference\| = (\S+)", out)]
  assert len(befores) == len(afters) == len(diffs) == 2, out
  assert all(a < 0.1 * b for a, b in zip(afters, befores)), out
  assert max(diffs) < 1e-4, out
  # The (out, in) kernel used as x @ W.T: the plan puts A on the input side.
  assert re.search(r"w1\s+\(64,16\)\s+in=\(16\) out=\(64\)\s+4\s+8\s+2\s+\(16,4\)\s+\(4,64\)", out), out
