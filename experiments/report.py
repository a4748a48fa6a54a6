"""Writing results: markdown tables, figures, and the JSON and workdir helpers of vaekl.workdir."""

import math
from pathlib import Path
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


def pm(mean: Any, se: Any) -> str:
    """A cell "mean ± se": se to two significant digits and the mean to the same decimals.

    pm(0.005412, 0.006324) == "0.0054 ± 0.0063". Magnitudes below 1e-3 or from 1e6 up
    share an exponent: pm(1.916e-32, 4.4e-34) == "(1.916 ± 0.044)e-32"; an se below the
    mean's sixth decimal is written apart: pm(-20.38356, 7.7e-17) == "-20.38356 ± 7.7e-17".
    A missing or non-finite se gives `fmt(mean)` alone, a zero se "mean ± 0".
    """
    if not (_is_real(mean) and _is_real(se) and math.isfinite(se) and math.isfinite(mean)):
        return fmt(mean)
    if se == 0:
        return f"{fmt(mean)} ± 0"
    exponent = math.floor(math.log10(max(abs(mean), abs(se))))
    if exponent < -3 or exponent >= 6:
        scale = 10.0**exponent
        return f"({pm(mean / scale, se / scale)})e{exponent}"
    decimals = max(0, 1 - math.floor(math.log10(abs(se))))
    if decimals > 6:
        return f"{fmt(mean, 7)} ± {se:.2g}"
    return f"{mean:.{decimals}f} ± {se:.{decimals}f}"


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def cell(row: dict, column: str, digits: int = 4) -> str:
    """`row[column]` as a table cell; with its standard error where the row holds a number
    `column + "_se"` beside a number (`pm`), else `fmt`."""
    value, se = row.get(column, ""), row.get(f"{column}_se")
    if _is_real(value) and _is_real(se):
        return pm(value, se)
    return fmt(value, digits)


def markdown_table(rows: Iterable[dict], columns: Sequence[str], digits: int = 4) -> str:
    """A GitHub markdown table of `rows` restricted to `columns` (cells by `cell`: a figure
    whose row holds `FIGURE_se` is written "value ± se")."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, c, digits) for c in columns) + " |")
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


def publish(workdir: Path, results: dict, markdown: str, *tables: str) -> None:
    """An experiment's results: `results.json` and `results.md` (`markdown`) in `workdir`,
    then `tables` (or, without any, `markdown`) printed. Plots come after, so that a
    failing plot loses no figure."""
    write_json(workdir / "results.json", results)
    (workdir / "results.md").write_text(markdown)
    print("\n".join(tables) if tables else markdown)



def code_version() -> str | None:
    """The repository's commit, `git describe --always --dirty`; None outside a checkout."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        # A file rewritten with the same content reads as changed until the index is refreshed.
        subprocess.run(["git", "update-index", "-q", "--refresh"], cwd=here,
                       capture_output=True, timeout=30, check=False)
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here,
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def provenance() -> str:
    """One line for the top of a results file: the command, the commit, the machine, the date."""
    import datetime
    import os
    import platform
    import shlex
    import sys

    import jax

    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("experiments", "main.py")):
        argv = ["python", "-m", "experiments.main", *argv[1:]]
    devices = jax.devices()
    return (f"Command: `{shlex.join(argv)}`; code {code_version()}; machine {platform.node()}"
            f" ({os.cpu_count()} CPU cores, {len(devices)} {devices[0].platform} device(s));"
            f" {datetime.date.today().isoformat()}.")
