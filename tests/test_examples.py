"""The demo (`make demo`) must really adapt: LoRA beats the base on the shifted task."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def test_quickstart_lora_beats_base_on_rotated_digits():
  out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"),
                        "--pretrain-steps", "300", "--lora-steps", "200"],
                       capture_output=True, text=True, check=True, timeout=300).stdout
  base = float(re.search(r"([\d.]+)% on the rotated task", out).group(1))
  unmerged, merged = map(float, re.search(
      r"rotated-task test accuracy: unmerged ([\d.]+)%, merged ([\d.]+)%", out).groups())
  assert base < 40.0 and unmerged > 80.0, out
  assert abs(unmerged - merged) < 1.0, out
