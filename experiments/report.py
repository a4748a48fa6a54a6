"""Writing results: markdown tables, figures, and the JSON and workdir helpers of vaekl.workdir."""

import math
from typing import Any, Iterable, Sequence

from vaekl.workdir import prepare_workdir, write_json  # noqa: F401  (re-exported)


def fmt(x: Any, digits: int = 4) -> str:
    """A table cell: finite floats to `digits` significant digits, None as an empty cell.

    The one cell format: the experiments' results.md and launch.collect's summary.md.
    """
    if x is None:
        return ""
    if isinstance(x, float) and math.isfinite(x):
        return f"{x:.{digits}g}"
    return str(x)


def markdown_table(rows: Iterable[dict], columns: Sequence[str], digits: int = 4) -> str:
    """A GitHub markdown table of `rows` restricted to `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, ""), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed; imported lazily)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Lays out `fig`, writes it to `path` (PNG, 110 dpi) and frees it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
