"""A study's table: the runs of a study sweep, row by row, seeds summarised and paired.

`launch.collect` calls `write` when every run under a root belongs to one study of
`launch.studies.STUDIES` (`study_of`): the Burda study (`burda_*` sweeps, beside Burda et
al.'s Table 1 and nbip's) or the categorical one (`categorical_vae`, Jang et al.'s VAE).
Each row of a study (e.g. objective, K, KL term, gradient estimator) may be spread over
several runs (seed groups); its seeds' figures are read from each run's results.json
(`seeds` when a run trained several) and reported as mean ± sample std (ddof 1) with n,
beside the standard error over the test images.

Published figures stand beside a row only when the row was measured as they were (for
Burda's: on `mnist`, by the IWAE-5000 bound of all 10,000 test images); the table says
why where none does. Burda's are converged figures (3,280 epochs); a `short` row (40
epochs) ranks the rows at equal budget and sits below them, which the table says beside
those columns.

The pairwise differences a study exists for (its `pairs`: analytic - k1, IWAE - VAE, DReG -
reparam, ...) are taken seed by seed (the same seed is the same initialisation and data
order in both rows): their mean, their spread over seeds (sample std, n - 1 degrees of
freedom), and the paired standard error over the test images, from each run's
per_example.npz.

A run whose overrides go beyond the row's fields (e.g. `eval_examples=100`, a trial on a
subset) is listed apart and never enters the table.
"""

import csv
import json
import math
import textwrap
from pathlib import Path

import numpy as np

from launch import sweeps
from launch.studies import STUDIES, Study
from vaekl import measure

# Each seed's standard error over the test images, averaged over the seeds of a row.
SE_METRICS = ("test_log_likelihood", "test_elbo")


def study_of(run_dirs) -> Study | None:
    """The study every run was made from (by launch.json's `config`), or None."""
    configs = [_read(Path(p) / "launch.json").get("config", "") for p in run_dirs]
    for study in STUDIES:
        if configs and all(study.matches(c) for c in configs):
            return study
    return None


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def load_run(path) -> dict:
    """A finished run: its config, results, launch record, seeds and per-example figures."""
    path = Path(path)
    # By leaf names: config.json is nested, or flat (runs from before the nesting).
    config = sweeps.leaves(_read(path / "config.json"))
    results = _read(path / "results.json")
    seeds = results.get("seeds") or [results]
    per_example = {}
    if (path / "per_example.npz").exists():
        with np.load(path / "per_example.npz") as f:
            per_example = {k: np.atleast_2d(f[k]).astype(np.float64) for k in f.files}
    return {"path": path, "config": config, "results": results, "record":
            _read(path / "launch.json"), "seeds": [s.get("seed", config.get("seed")) for s in
                                                    seeds], "per_seed": seeds,
            "per_example": per_example}


def left_out(study: Study, run: dict) -> str | None:
    """Why a run stays out of the table (overrides beyond its row), or None."""
    extra = sorted(set(sweeps.leaves(run["record"].get("overrides", {}))) - study.row_fields)
    if extra:
        return f"overriding {', '.join(extra)} (not the study's protocol)"
    if run["config"].get("eval_examples"):
        return f"evaluated on the first {run['config']['eval_examples']} test images only"
    return None


def rows(study: Study, runs) -> list[dict]:
    """One dict per study row (runs from `load_run`, those `left_out` excluded), sorted by
    the study's `order` (the Burda study's: VAE first, by K)."""
    by_key: dict[tuple, list[dict]] = {}
    for run in runs:
        by_key.setdefault(study.row_key(run["config"]), []).append(run)
    out = []
    for key in sorted(by_key, key=study.order):
        group = by_key[key]
        c, r = group[0]["config"], group[0]["results"]
        seeds = [s for run in group for s in run["per_seed"]]
        steps = sum(run["results"]["steps"] * len(run["per_seed"]) for run in group)
        train_wall = sum(float(run["results"].get("train_wall_s", 0.0)) for run in group)
        row = {"row": study.label(key), **dict(zip(study.key_fields, key)),
               "protocol_epochs": c["num_epochs"], "n": len(seeds),
               "dataset": c["dataset"], "eval_k": c["eval_importance_samples"],
               "test_examples": r.get("test_examples"), "train_wall_s": train_wall,
               "eval_wall_s": sum(float(run["results"].get("total_wall_s", 0.0)) -
                                  float(run["results"].get("train_wall_s", 0.0))
                                  for run in group),
               # Seed-steps per second: a run of S seeds in one program counts S a step.
               "steps_per_s": steps / train_wall if train_wall else None,
               "code": " ".join(sorted({str(run["record"].get("code")) for run in group})),
               "host": " ".join(sorted({str(run["record"].get("host")) for run in group})),
               "platform": r.get("platform", "?"),
               "start": min(str(run["record"].get("start_time")) for run in group),
               "end": max(str(run["record"].get("end_time")) for run in group)}
        for m in study.metrics:
            row[f"{m}_mean"], row[f"{m}_std"], _ = measure.seed_summary(s.get(m) for s in seeds)
        for m in SE_METRICS:
            row[f"{m}_se"] = measure.seed_summary(s.get(f"{m}_se") for s in seeds).mean
        figures = study.published(key) if study.measured_as_published(row) else {}
        for ref in study.references:
            nll = figures.get(ref.column)
            row[ref.column] = -nll if nll is not None else None
            row[f"diff_{ref.column}"] = row["test_log_likelihood_mean"] - row[ref.column] \
                if nll is not None and row["test_log_likelihood_mean"] is not None else None
        out.append(row)
    return out


def differences(study: Study, runs) -> list[dict]:
    """The study's `pairs` present, each a - b over the seeds both rows have, in its
    `pair_metric`.

    Returns dicts with `pair`, `n` (seeds paired), `mean` (of the per-seed differences of
    the test-set means), `std` (their sample std, `n` - 1 degrees of freedom) and `se`
    (the paired standard error over the test images: each seed's per-image differences'
    std / sqrt(N), combined over the seeds as the SE of their mean; None without
    per_example.npz).
    """
    metric = study.pair_metric
    per_seed: dict[tuple, dict] = {}  # row key -> seed -> (test-set mean, per-image values)
    for run in runs:
        images = run["per_example"].get(metric)
        for i, (seed, figures) in enumerate(zip(run["seeds"], run["per_seed"])):
            per_seed.setdefault(study.row_key(run["config"]), {})[seed] = (
                figures.get(f"test_{metric}"), None if images is None else images[i])
    out = []
    for name, a, b in study.pairs:
        if a not in per_seed or b not in per_seed:
            continue
        seeds = sorted(set(per_seed[a]) & set(per_seed[b]))
        diffs = [per_seed[a][s][0] - per_seed[b][s][0] for s in seeds]
        mean, std, _ = measure.seed_summary(diffs)
        images = [(per_seed[a][s][1], per_seed[b][s][1]) for s in seeds]
        se = None
        if seeds and all(x is not None and y is not None and x.shape == y.shape
                         for x, y in images):
            variances = [np.var(x - y, ddof=1) / len(x) for x, y in images]
            se = math.sqrt(sum(variances)) / len(seeds)
        out.append({"pair": name, "n": len(seeds), "mean": mean, "std": std, "se": se})
    return out


def _f(x, digits=2):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(row, metric, digits=2):
    std = row[f"{metric}_std"]
    return _f(row[f"{metric}_mean"], digits) + (f" ± {_f(std, digits)}" if std is not None
                                                 else "")


def _cell(row, field, digits=2):
    """A headline cell: mean ± std where the field has a seed summary, else the figure."""
    return _pm(row, field, digits) if f"{field}_mean" in row else _f(row[field], digits)


def _eval_ks(study_rows) -> str:
    return "/".join(sorted({str(r["eval_k"]) for r in study_rows}))


def describe(study: Study, study_rows) -> str:
    """One line of what was run: epochs, data set, evaluation."""
    epochs = ", ".join(sorted({str(r["protocol_epochs"]) for r in study_rows}))
    return study.describe.format(
        epochs=epochs, s="" if epochs == "1" else "s",
        data=", ".join(sorted({r["dataset"] for r in study_rows})), ks=_eval_ks(study_rows),
        images=", ".join(sorted({str(r["test_examples"]) for r in study_rows})))


def sweep_rows(study: Study, runs) -> list[tuple[str, list[str], list[str]]]:
    """(sweep, labels of its rows measured in `runs`, labels of those not) for each
    registered sweep of the runs' config (burda.py:short: burda_short and burda_short_k50)."""
    configs = {r["record"].get("config") for r in runs}
    done = {study.row_key(r["config"]) for r in runs}
    out = []
    for name, sweep in sweeps.SWEEPS.items():
        if sweep.config in configs:
            keys = list(dict.fromkeys(study.row_key(sweeps.leaves(o)) for o in sweep.runs))
            out.append((name, [study.label(k) for k in keys if k in done],
                        [study.label(k) for k in keys if k not in done]))
    return out


def markdown(study: Study, study_rows, diffs=(), excluded=(), by_sweep=(), root=None) -> str:
    with_published = bool(study.references) and any(
        study.measured_as_published(r) for r in study_rows)
    lines = [
        study.title, "",
        f"Measured here: {describe(study, study_rows)}. Each cell is the mean ± sample std"
        " (ddof 1) over the n seeds; `SE` is the standard error over the test images (the"
        " mean of the seeds'); log-likelihoods in nats, higher is better." + study.notes]
    if with_published:
        epochs = sorted({r["protocol_epochs"] for r in study_rows})
        lines[-1] += study.published_note.format(
            protocols=" ".join(f"{ref.name}: {ref.protocol}." for ref in study.references),
            epochs=", ".join(map(str, epochs)))
    else:
        lines[-1] += " No published figure stands beside these rows: " + study.no_published
    headers = ["row", "n", *(c[0].format(k=_eval_ks(study_rows)) for c in study.columns)]
    if with_published:
        headers += [h for ref in study.references for h in (ref.header, f"Δ {ref.name}")]
    headers += ["seed-steps/s", "train", "eval"]
    lines += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in study_rows:
        cells = [r["row"], str(r["n"]), *(_cell(r, *c[1:]) for c in study.columns)]
        if with_published:
            cells += [_f(r[k]) for ref in study.references
                      for k in (ref.column, f"diff_{ref.column}")]
        cells += [_f(r["steps_per_s"], 0), _duration(r["train_wall_s"]),
                  _duration(r["eval_wall_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    if diffs:
        lines += ["", "### Differences, seed by seed", "",
                  f"a − b in {study.pair_text} (nats), over the seeds both rows have: the"
                  " mean, the sample std over those seeds (n − 1 degrees of freedom; with 2"
                  " seeds, 1) and the paired standard error over the test images (each seed's"
                  " per-image differences, combined as the SE of the seeds' mean).", "",
                  "| a − b | n seeds | mean | std over seeds (df) | paired SE over images |",
                  "|---|---|---|---|---|"]
        for d in diffs:
            std = "–" if d["std"] is None else f"{_f(d['std'])} ({d['n'] - 1})"
            lines.append(f"| {d['pair']} | {d['n']} | {_f(d['mean'])} | {std} |"
                         f" {_f(d['se'], 3)} |")
    codes = " ".join(sorted({c for r in study_rows for c in r["code"].split()}))
    hosts = " ".join(sorted({h for r in study_rows for h in r["host"].split()}))
    platforms = ", ".join(sorted({r["platform"] for r in study_rows}))
    lines += ["", f"Runs: code {codes}; host {hosts} ({platforms}); from"
              f" {min(r['start'] for r in study_rows)} to {max(r['end'] for r in study_rows)};"
              " `seed-steps/s` is training steps × seeds over the training wall time."]
    reasons: dict[str, list[str]] = {}
    for name, why in excluded:
        reasons.setdefault(why, []).append(f"`{name}`")
    for why, names in reasons.items():
        lines += ["", f"Left out of the table, {why}: {len(names)} run(s), {', '.join(names)}."]
    for name, done, missing in by_sweep:
        command = (f"`python -m launch.sweep --sweep={name} --root={root or 'ROOT'}"
                   " --data_dir=DATA_DIR --commit`")
        if done:
            lines += ["", f"Trained by {command}: {len(done)} row(s) of the sweep `{name}`."]
        if missing:
            lines += ["", f"Not run yet, rows of the sweep `{name}`: {'; '.join(missing)}. To"
                      f" run them: {command}, then this collect again."]
    return "\n".join(lines) + "\n"


def _duration(seconds) -> str:
    if not seconds:
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def plot(study: Study, study_rows, path: Path) -> None:
    from experiments.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(study_rows) + 1.8))
    y = list(range(len(study_rows)))
    m = study.plot_metric
    ax.errorbar([r[f"{m}_mean"] for r in study_rows], y,
                xerr=[r[f"{m}_std"] or 0 for r in study_rows], fmt="o",
                capsize=3, label="measured here (mean ± sample std over seeds)")
    for ref, marker in zip(study.references, ("x", "+", "*", "^")):
        pts = [(r[ref.column], i) for i, r in enumerate(study_rows)
               if r[ref.column] is not None]
        if pts:
            ax.plot(*zip(*pts), marker, ms=9, ls="none", label=ref.legend)
    ax.set_yticks(y, [f"{r['row']} (n={r['n']})" for r in study_rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(study.plot_label.format(ks=_eval_ks(study_rows)))
    # Wrapped: the axes sit right of the row labels, so a one-line title ran off the figure.
    ax.set_title(textwrap.fill(describe(study, study_rows).replace("`", ""), 70), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def write(study: Study, prefix: Path, run_dirs) -> tuple[dict[str, Path], str]:
    """Writes PREFIX.csv and PREFIX.png of `study`'s table; returns their paths and the
    markdown table.

    Raises:
      ValueError: when no run belongs in the table (every one is left out).
    """
    runs = [(r, left_out(study, r)) for r in map(load_run, run_dirs)]
    excluded = [(r["path"].name, why) for r, why in runs if why]
    kept = [r for r, why in runs if not why]
    if not kept:
        raise ValueError("--root: every finished study run is left out of the table: "
                         + "; ".join(f"{n} ({why})" for n, why in excluded))
    study_rows = rows(study, kept)
    prefix = Path(prefix)
    paths = {"study_csv": prefix.with_suffix(".csv"), "study_plot": prefix.with_suffix(".png")}
    with open(paths["study_csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(study.csv_columns), extrasaction="ignore")
        writer.writeheader()
        for r in study_rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in study.csv_columns})
    plot(study, study_rows, paths["study_plot"])
    root = Path(run_dirs[0]).parent
    return paths, markdown(study, study_rows, differences(study, kept), excluded,
                           sweep_rows(study, kept), root)
