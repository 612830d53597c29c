"""examples/multi_adapter.py, run in-process with tiny sizes: the mixed batch serves every example
with its own adapter (rows equal each adapter applied alone, base rows equal the base), every
adapter beats the base on its task, and hot swaps of other ranks and alphas do not recompile."""

import pathlib
import sys

import numpy as np

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def test_multi_adapter_example():
  sys.path.insert(0, str(EXAMPLES))
  try:
    import multi_adapter
  finally:
    sys.path.remove(str(EXAMPLES))
  # No plot: matplotlib's import would be a quarter of the test's time.
  out = multi_adapter.main([
      "--tasks", "rot90", "rot270", "--ranks", "2", "4", "--alphas", "4", "2",
      "--pretrain-steps", "200", "--steps", "150", "--hidden", "32", "32",
      "--alpha-factors", "2", "--combination-types", "cat", "--plot", ""])
  tasks = ["rot90", "rot270"]
  # The adapters learned their tasks: the base is near chance on rotated digits.
  for t in tasks:
    assert out["base_acc"][t] < 0.3 and out["alone_acc"][t] > out["base_acc"][t] + 0.4, out
  # The references (each adapter alone, unmerged) agree with the merged model W + s·A·B.
  assert out["merged_diff"] < 1e-4, out
  # One mixed call equals each adapter applied alone (different ranks, padded in the bank; the
  # rows shuffled), to float32 rounding; id -1 rows are the base (each row computed alone, so up
  # to the summation order of a one-row matmul).
  for t in tasks:
    assert out["mixed_diff"][t] < 1e-4 and out["mixed_acc"][t] == out["alone_acc"][t], out
  assert out["mixed_diff"]["upright"] < 1e-5 and out["mixed_acc"]["upright"] == out["base_acc"]["upright"]
  # Four swaps (ranks 2 and 4, two alphas each) through one compiled forward.
  assert out["swaps"] == 4 and out["swap_compiles"] == 0 and out["swap_diff"] < 1e-4, out
  accs = np.asarray(out["combined_acc"]["cat"])
  assert accs.shape == (2,) and np.all((0 <= accs) & (accs <= 1)), out
