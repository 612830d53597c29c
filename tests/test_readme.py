"""The README's quickstart must run as written."""

import pathlib
import re


def test_readme_quickstart_runs():
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  section = text.split("## Quickstart", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace = {}
  exec(compile(code, "README.md:quickstart", "exec"), namespace)
  assert namespace["y_merged"].shape == (8, 16, 64)
  assert float(abs(namespace["y_unmerged"] - namespace["y_merged"]).max()) < 1e-5
