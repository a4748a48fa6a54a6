"""Writing results: JSON, markdown tables, and the workdir checks every experiment shares."""

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence


def prepare_workdir(workdir: str) -> Path:
    """Creates `workdir` (and parents) and checks that it is writable.

    Raises:
      ValueError: naming `workdir` when it is empty, a file, or not writable.
    """
    if not workdir:
        raise ValueError("--workdir: expected a directory path, got an empty string.")
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--workdir: {workdir!r} exists and is not a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--workdir: cannot create {workdir!r}: {e.strerror}.") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"--workdir: {workdir!r} is not writable.")
    return path


def write_json(path: Path, obj: Any) -> None:
    """Writes `obj` as JSON atomically (a temp file renamed over `path`)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "to_dict"):
        return x.to_dict()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def fmt(x: Any, digits: int = 4) -> str:
    """Formats a table cell: floats to `digits` significant digits."""
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.{digits}g}"
    return str(x)


def markdown_table(rows: Iterable[dict], columns: Sequence[str], digits: int = 4) -> str:
    """A GitHub markdown table of `rows` restricted to `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, ""), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"
