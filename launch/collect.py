"""Collects the results of a sweep into a CSV, a markdown summary and a plot.

  python -m launch.collect --root=runs/smoke
  python -m launch.collect --root=runs/compare --group_by=kl,num_samples --metric=test_elbo

Every run under --root with a results.json becomes one row of ROOT/results.csv: its
name (`run`), its swept fields (from launch.json; their values from config.json when
the run wrote one), its scalar results, and the other scalar fields of config.json as
`config.FIELD`. A results.json with a `rows` list (the estimators experiment) gives
one CSV row per element, numbered in `row`.

ROOT/summary.md groups the rows by --group_by (default: every swept field but `seed`,
and `row` where there are rows) and gives each result column as mean ± std (the sample
std, ddof 1, `vaekl.measure.seed_summary`) over the n runs of a group (its `runs` column),
or the one value where they all agree.
ROOT/summary.png plots --metric (default `test_elbo` where present, else the first
numeric result column) per group, with the std as error bars.
"""

import csv
import datetime
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags

# The experiments' one cell format and table, so that summary.md reads like their results.md
# (launch otherwise meets the runs only through command lines and files; this import brings
# JAX, which a collection made once after the sweep can afford).
from experiments.report import fmt, markdown_table
from launch import study, sweeps
from vaekl import measure

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The flags of the command line (defined by it only, so the module imports freely)."""
    flags.DEFINE_string("root", None, "The sweep's root directory (as given to launch.sweep).")
    flags.DEFINE_list("group_by", None, "Columns to group by (default: swept fields but seed).")
    flags.DEFINE_string("metric", None, "The column to plot (default: test_elbo where present).")
    flags.DEFINE_string("report", None, "Write PREFIX.md, PREFIX.csv and PREFIX.png (e.g."
                        " results/burda_short) instead of the files in ROOT.")
    flags.mark_flags_as_required(["root"])


SEED = "seed"
DEFAULT_METRIC = "test_elbo"


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts to dotted keys; lists to tuples (hashable, and printed like the flags)."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return flat


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def find_runs(root: Path) -> tuple[list[Path], list[Path]]:
    """(finished, unfinished) run directories under `root`, sorted by name.

    A run directory is a non-hidden subdirectory with results.json (finished), or with
    launch.json or config.json but no results.json yet (unfinished).
    """
    finished, unfinished = [], []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (path / "results.json").exists():
            finished.append(path)
        elif (path / "launch.json").exists() or (path / "config.json").exists():
            unfinished.append(path)
    return finished, unfinished


def run_rows(path: Path, swept: Sequence[str]) -> list[dict]:
    """The CSV rows of one finished run (one, or one per element of results' `rows`)."""
    record = _read(path / "launch.json") or {}
    # Columns by leaf name (`config.kl`), nested config.json or flat (from before the nesting).
    config = sweeps.leaves(_flatten(_read(path / "config.json") or {}))
    overrides = sweeps.leaves(_flatten(record.get("overrides", {})))
    base = {"run": path.name}
    for field in swept:
        base[field] = config.get(field, overrides.get(field))
    results = _read(path / "results.json")
    scalars = {k: v for k, v in results.items() if k != "rows"}
    config_cols = {f"config.{k}": v for k, v in config.items() if k not in swept}
    if isinstance(results.get("rows"), list):
        return [{**base, "row": i, **_results(scalars, base), **_results(r, base), **config_cols}
                for i, r in enumerate(results["rows"])]
    return [{**base, **_results(scalars, base), **config_cols}]


def _results(values: dict, base: dict) -> dict:
    """Scalar results. One that repeats a run column is left out where it has the same value,
    and kept as `result.KEY` where it differs."""
    return {(f"result.{k}" if k in base else k): v for k, v in values.items()
            if _is_scalar(v) and not (k in base and base[k] == v)}


def _columns(rows: Sequence[dict]) -> list[str]:
    columns = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    ordered = [c for c in columns if not c.startswith("config.")]
    return ordered + [c for c in columns if c.startswith("config.")]


def write_csv(rows: Sequence[dict], columns: Sequence[str], path: Path) -> None:
    """Writes `rows` as CSV; tuples as Python literals, None as an empty cell."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def _sort_key(value: Any):
    return (0, value, "") if _is_number(value) else (1, 0, str(value))


def group(rows: Sequence[dict], by: Sequence[str]) -> list[tuple[tuple, list[dict]]]:
    """Rows grouped by the values of the columns `by`, groups sorted by those values."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(c) for c in by), []).append(row)
    return sorted(groups.items(), key=lambda kv: [_sort_key(v) for v in kv[0]])


def aggregate(values: Sequence[Any]) -> str:
    """One summary cell: the value where all agree, mean ± std of numbers, else `(varies)`."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if all(v == values[0] for v in values):
        return fmt(values[0])
    if all(_is_number(v) for v in values):
        summary = measure.seed_summary(values)  # Not all equal: at least two values.
        return f"{fmt(summary.mean)} ± {fmt(summary.std)}"
    return "(varies)"


def summary_markdown(groups, by: Sequence[str], result_columns: Sequence[str],
                     seeds: Sequence[Any]) -> str:
    """The summary: what was averaged, the results common to all runs, a row per group."""
    rows = [r for _, group_rows in groups for r in group_rows]
    common = {c: rows[0].get(c) for c in result_columns
              if all(r.get(c) == rows[0].get(c) for r in rows)}
    over = f"seeds {', '.join(fmt(s) for s in seeds)}" if seeds else "runs"
    intro = (f"Grouped by {', '.join(f'`{c}`' for c in by) or 'nothing'}; each cell is mean ±"
             f" std (sample std, ddof 1) over the `runs` of its group ({over}), or the value"
             " where they all agree.")
    lines = [intro, ""]
    if common:
        lines += ["The same in every run: " + ", ".join(f"{c} = {fmt(v)}"
                                                         for c, v in common.items()) + ".", ""]
    columns = [*by, "runs", *(c for c in result_columns if c not in common)]
    table = []
    for key, group_rows in groups:
        cells = [fmt(v) for v in key] + [str(len({r["run"] for r in group_rows}))]
        cells += [aggregate([r.get(c) for r in group_rows]) for c in columns[len(by) + 1:]]
        table.append(dict(zip(columns, cells)))
    return "\n".join(lines) + "\n" + markdown_table(table, columns)


HIGHER_IS_BETTER = ("elbo", "log_likelihood", "snr")
LOWER_IS_BETTER = ("nll", "loss", "distortion", "variance", "std", "wall_s")


def direction(metric: str) -> str:
    """"higher is better", "lower is better" or "" (a rate, a bias, or a name with both),
    from the words in `metric`'s name."""
    higher = any(word in metric for word in HIGHER_IS_BETTER)
    lower = any(word in metric for word in LOWER_IS_BETTER)
    if higher == lower:
        return ""
    return "higher is better" if higher else "lower is better"


def plot_labels(groups, by: Sequence[str]) -> list[str]:
    """A label per group: its values of the `by` columns and its number of runs."""
    labels = []
    for key, rows in groups:
        values = ", ".join(f"{c}={fmt(v)}" for c, v in zip(by, key)) or "all"
        labels.append(f"{values}  (n={len({r['run'] for r in rows})})")
    return labels


def plot(groups, by: Sequence[str], metric: str, path: Path, root: Path) -> None:
    """A point per group with ± std error bars of `metric`, titled with the sweep and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = [measure.seed_summary([v for v in (r.get(metric) for r in rows) if _is_number(v)])
             for _, rows in groups]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.35 * len(groups) + 1.3)))
    ax.errorbar([math.nan if s.mean is None else s.mean for s in stats], range(len(groups)),
                xerr=[s.std or 0.0 for s in stats], fmt="o", capsize=3)
    ax.set_yticks(range(len(groups)), plot_labels(groups, by), fontsize=8)
    ax.invert_yaxis()
    better = direction(metric)
    ax.set_xlabel(f"{metric}: mean ± sample std (ddof 1) over the n runs of a group")
    ax.set_title(f"{Path(root).resolve().name}: {metric}" + (f" by {', '.join(by)}" if by else "")
                 + (f" ({better})" if better else ""), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _swept_fields(paths: Sequence[Path]) -> list[str]:
    fields = {}
    for path in paths:
        overrides = (_read(path / "launch.json") or {}).get("overrides", {})
        fields.update(dict.fromkeys(sorted(sweeps.leaves(overrides))))
    return list(fields)


def _check_columns(flag: str, names: Sequence[str], columns: Sequence[str]) -> None:
    unknown = [n for n in names if n not in columns]
    if unknown:
        raise ValueError(f"--{flag}: unknown column(s) {unknown}; expected one of"
                         f" {', '.join(c for c in columns if c != 'run')}.")


def collect(root: Path, group_by: Sequence[str] | None = None,
            metric: str | None = None, report: Path | None = None) -> dict[str, Path]:
    """Writes ROOT/results.csv, ROOT/summary.md and ROOT/summary.png.

    The runs of a study sweep (one of `launch.studies.STUDIES`: the burda_* sweeps,
    categorical_vae) get the study's table (`launch.study`) instead: ROOT/summary.md,
    ROOT/study.csv and ROOT/study.png.

    Args:
      root: the sweep's root directory.
      group_by: columns to group by; None: the swept fields but `seed`, and `row` where
        results have rows.
      metric: the column to plot; None: `test_elbo` where present, else the first numeric
        result column.
      report: a path prefix: the same files as PREFIX.md, PREFIX.csv and PREFIX.png.

    Returns:
      {"summary": path, "csv": path, "plot": path}.

    Raises:
      ValueError: naming --root when it has no finished run, or --group_by / --metric
        when they name no column.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--root: {str(root)!r} is not a directory.")
    finished, unfinished = find_runs(root)
    if not finished:
        raise ValueError(f"--root: no run under {str(root)!r} has a results.json yet.")
    header = _header(root, report, len(finished), unfinished)
    found = study.study_of(finished)  # burda_* (beside Burda's Table 1), categorical_vae.
    if found:
        paths, table = study.write(found, Path(report) if report else root / "study", finished)
        summary = Path(report).with_suffix(".md") if report else root / "summary.md"
        summary.write_text(header + table)
        return {"summary": summary, "csv": paths["study_csv"], "plot": paths["study_plot"]}
    swept = _swept_fields(finished)
    rows = [row for path in finished for row in run_rows(path, swept)]
    columns = _columns(rows)
    if group_by is None:
        group_by = [c for c in swept if c != SEED] + (["row"] if "row" in columns else [])
    _check_columns("group_by", group_by, columns)
    identity = {"run", "row", *swept, *group_by}
    result_columns = [c for c in columns if c not in identity and not c.startswith("config.")]
    numeric = [c for c in result_columns if any(_is_number(r.get(c)) for r in rows)]
    metric = metric or (DEFAULT_METRIC if DEFAULT_METRIC in numeric else
                        (numeric[0] if numeric else None))
    if metric is None:
        raise ValueError(f"--metric: the results under {str(root)!r} have no numeric column.")
    _check_columns("metric", [metric], numeric)
    groups = group(rows, group_by)
    seeds = sorted({r[SEED] for r in rows if r.get(SEED) is not None and SEED not in group_by},
                   key=_sort_key)
    if report:
        paths = {k: Path(report).with_suffix(ext) for k, ext in
                 (("summary", ".md"), ("csv", ".csv"), ("plot", ".png"))}
    else:
        paths = {"summary": root / "summary.md", "csv": root / "results.csv",
                 "plot": root / "summary.png"}
    write_csv(rows, columns, paths["csv"])
    paths["summary"].write_text(header + summary_markdown(
        groups, group_by, result_columns, seeds))
    plot(groups, group_by, metric, paths["plot"], root)
    return paths


def _header(root: Path, report, num_finished: int, unfinished: Sequence[Path]) -> str:
    """The title, the command that regenerates the file, and the runs not yet finished."""
    command = f"python -m launch.collect --root={root}" + (f" --report={report}" if report
                                                            else "")
    lines = [f"# {root}", "", f"`{command}` on {datetime.date.today().isoformat()}:"
             f" {num_finished} finished runs ({len(unfinished)} not finished)."]
    if unfinished:
        lines[-1] += (" Not finished, so not in the tables: "
                      + ", ".join(f"`{p.name}`" for p in unfinished) + ".")
    return "\n".join(lines) + "\n\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        paths = collect(Path(FLAGS.root), FLAGS.group_by, FLAGS.metric, FLAGS.report)
    except ValueError as e:
        raise SystemExit(f"launch.collect: {e}") from None
    print(paths["summary"].read_text())
    print("\n".join(f"wrote {p}" for p in paths.values()))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
