"""The benchmarks' output (jobs/bench_engine.py, jobs/bench_serve.py): one header line, then the rows as CSV in
`out`, and the same header over a Markdown table in `out` with the suffix .md (floats to 3 significant digits)."""

from __future__ import annotations

import os


def markdown(rows: list[dict]) -> str:
    """A Markdown table of `rows` (the columns of the first row, in order)."""
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[k]) for k in cols) + " |" for r in rows])


def write_tables(out: str, head: str, rows: list[dict]) -> str:
    """`head` and the rows as CSV to `out`, `head` and their Markdown table to `out`'s .md; returns the latter."""
    import pandas as pd

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(head + "\n")
        pd.DataFrame(rows).to_csv(f, index=False)
    text = head + "\n\n" + markdown(rows)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(text + "\n")
    return text
