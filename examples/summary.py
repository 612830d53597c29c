"""A fixed-width table for the examples' end-of-run summaries (shared by the example scripts)."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
  """Print `head` and `rows` (strings) as columns: first column left-aligned, the others
  right-aligned, a dashed rule under the header."""
  widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
  fmt = lambda r: "  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                            for j, (c, w) in enumerate(zip(r, widths))).rstrip()
  print("\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]))
