"""The study's table: runs of the `burda_*` sweeps beside Burda et al.'s Table 1 and nbip's.

`launch.collect` calls `write` when the runs under a root were made from
`experiments/configs/burda.py`. Each row of the study (objective, K, KL term, gradient
estimator) may be spread over several runs (seed groups); its seeds' figures are read
from each run's results.json (`seeds` when a run trained several) and reported as
mean ± sample std (ddof 1) with n, beside the standard error over the test images.

Published figures stand beside a row only when the row was measured as they were: on
`mnist`, by the IWAE-5000 bound of all 10,000 test images. They are converged figures
(3,280 epochs); a `short` row (40 epochs) ranks the rows at equal budget and sits below
them, which the table says beside those columns.

The pairwise differences the study exists for (`PAIRS`: analytic - k1, IWAE - VAE, DReG -
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
from pathlib import Path

import numpy as np

from launch import sweeps
from vaekl import measure

STUDY_CONFIG = "experiments/configs/burda.py"

# Burda, Grosse & Salakhutdinov (2015), Table 1, MNIST, one stochastic layer, test NLL from
# the k = 5000 bound after 3,280 epochs (as quoted by the nbip/IWAE README; ../shared/
# REFERENCES.md). Keys: (objective, K).
BURDA = {("elbo", 1): 86.76, ("elbo", 5): 86.47, ("elbo", 50): 86.35,
         ("iwae", 5): 85.54, ("iwae", 50): 84.78}
# The nbip/IWAE TF2 reproduction (same net, batch and schedule): standard gradients and DReG.
NBIP = {("iwae", 1, "reparam"): 86.35, ("iwae", 5, "reparam"): 85.18,
        ("iwae", 50, "reparam"): 84.59, ("iwae", 1, "dreg"): 86.08,
        ("iwae", 5, "dreg"): 84.90, ("iwae", 50, "dreg"): 84.32}
PROTOCOLS = {
    "Burda": "Burda et al. 2015, Table 1: 3,280 epochs, 59,600 training images, IWAE-5000"
             " test bound, standard (reparameterised) gradients",
    "nbip": "the nbip/IWAE TF2 reproduction of Burda's protocol (3,280 epochs), with"
            " standard gradients and with DReG",
}
PUBLISHED_DATASET, PUBLISHED_EVAL_K, PUBLISHED_TEST_EXAMPLES = "mnist", 5000, 10000
# The fields a study run may override and stay in the table (its row and its seeds).
ROW_FIELDS = {"kl", "objective", "num_samples", "grad_estimator", "num_seeds", "seed"}
METRICS = ("test_log_likelihood", "test_elbo", "test_rate", "active_units")
CSV_COLUMNS = ("row", "objective", "num_samples", "kl", "grad_estimator", "protocol_epochs",
               "n", "test_log_likelihood_mean", "test_log_likelihood_std", "test_elbo_mean",
               "test_elbo_std", "test_rate_mean", "active_units_mean", "burda",
               "diff_burda", "nbip", "diff_nbip", "train_wall_s",
               # Added after the first table; the columns above keep their names.
               "dataset", "eval_k", "test_examples", "test_log_likelihood_se",
               "test_elbo_se", "test_rate_std", "active_units_std", "steps_per_s",
               "eval_wall_s", "code", "host")
VAE1 = ("elbo", 1)
# The differences the study is for: (label, row a, row b), a - b seed by seed.
PAIRS = (
    ("analytic − k1 (VAE k=1)", ("elbo", 1, "analytic", None), ("elbo", 1, "k1", None)),
    ("stl − k1 (VAE k=1)", ("elbo", 1, "stl", None), ("elbo", 1, "k1", None)),
    ("k3 − k1 (VAE k=1)", ("elbo", 1, "k3", None), ("elbo", 1, "k1", None)),
    ("IWAE − VAE (k=5)", ("iwae", 5, None, "reparam"), ("elbo", 5, "analytic", None)),
    ("DReG − reparam (IWAE k=5)", ("iwae", 5, None, "dreg"), ("iwae", 5, None, "reparam")),
    ("STL − reparam (IWAE k=5)", ("iwae", 5, None, "stl"), ("iwae", 5, None, "reparam")),
)


def is_study(run_dirs) -> bool:
    """True when every run was made from the study config."""
    configs = [_read(Path(p) / "launch.json").get("config", "") for p in run_dirs]
    return bool(configs) and all(c.split(":")[0] == STUDY_CONFIG for c in configs)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def row_key(config: dict) -> tuple:
    """(objective, K, KL term or None, gradient estimator or None) of a run's config."""
    if config["objective"] == "elbo":
        return ("elbo", config["num_samples"], config["kl"], None)
    return (config["objective"], config["num_samples"], None, config["grad_estimator"])


def label(key: tuple) -> str:
    objective, k, kl, estimator = key
    if objective == "elbo":
        return f"VAE k={k}, KL {kl}"
    return f"{objective.upper()} k={k}, {estimator}"


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


def left_out(run: dict) -> str | None:
    """Why a run stays out of the table (overrides beyond its row), or None."""
    extra = sorted(set(sweeps.leaves(run["record"].get("overrides", {}))) - ROW_FIELDS)
    if extra:
        return f"overriding {', '.join(extra)} (not the study's protocol)"
    if run["config"].get("eval_examples"):
        return f"evaluated on the first {run['config']['eval_examples']} test images only"
    return None


def published(row: dict) -> bool:
    """Whether the row was measured as the published figures were (data, K, test set)."""
    return (row["dataset"] == PUBLISHED_DATASET and row["eval_k"] == PUBLISHED_EVAL_K
            and row["test_examples"] == PUBLISHED_TEST_EXAMPLES)


def rows(runs) -> list[dict]:
    """One dict per study row (runs from `load_run`, those `left_out` excluded), sorted as
    the sweep lists them (VAE first, by K)."""
    by_key: dict[tuple, list[dict]] = {}
    for run in runs:
        by_key.setdefault(row_key(run["config"]), []).append(run)
    out = []
    for key in sorted(by_key, key=lambda k: (k[0] != "elbo", k[1], k[0], str(k[2]), str(k[3]))):
        group = by_key[key]
        c, r = group[0]["config"], group[0]["results"]
        seeds = [s for run in group for s in run["per_seed"]]
        steps = sum(run["results"]["steps"] * len(run["per_seed"]) for run in group)
        train_wall = sum(float(run["results"].get("train_wall_s", 0.0)) for run in group)
        row = {"row": label(key), "objective": key[0], "num_samples": key[1], "kl": key[2],
               "grad_estimator": key[3], "protocol_epochs": c["num_epochs"], "n": len(seeds),
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
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"], _ = measure.seed_summary(s.get(m) for s in seeds)
        for m in ("test_log_likelihood", "test_elbo"):  # Each seed's SE over the images.
            row[f"{m}_se"] = measure.seed_summary(s.get(f"{m}_se") for s in seeds).mean
        burda = BURDA.get(key[:2]) if key[2] in (None, "analytic") and key[3] != "stl" else None
        nbip = NBIP.get((key[0], key[1], key[3])) if key[0] == "iwae" else None
        if key[:3] == (*VAE1, "analytic"):
            nbip = NBIP[("iwae", 1, "reparam")]  # IWAE k = 1 is the VAE.
        if not published(row):
            burda = nbip = None
        for name, ref in (("burda", burda), ("nbip", nbip)):
            row[name] = -ref if ref is not None else None
            row[f"diff_{name}"] = row["test_log_likelihood_mean"] - row[name] \
                if ref is not None and row["test_log_likelihood_mean"] is not None else None
        out.append(row)
    return out


def differences(runs, metric: str = "log_likelihood") -> list[dict]:
    """The `PAIRS` present, each a - b over the seeds both rows have.

    Returns dicts with `pair`, `n` (seeds paired), `mean` (of the per-seed differences of
    the test-set means), `std` (their sample std, `n` - 1 degrees of freedom) and `se`
    (the paired standard error over the test images: each seed's per-image differences'
    std / sqrt(N), combined over the seeds as the SE of their mean; None without
    per_example.npz).
    """
    per_seed: dict[tuple, dict] = {}  # row key -> seed -> (test-set mean, per-image values)
    for run in runs:
        images = run["per_example"].get(metric)
        for i, (seed, figures) in enumerate(zip(run["seeds"], run["per_seed"])):
            per_seed.setdefault(row_key(run["config"]), {})[seed] = (
                figures.get(f"test_{metric}"), None if images is None else images[i])
    out = []
    for name, a, b in PAIRS:
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


def describe(study_rows) -> str:
    """One line of what was run: epochs, data set, evaluation."""
    epochs = ", ".join(sorted({str(r["protocol_epochs"]) for r in study_rows}))
    data = ", ".join(sorted({r["dataset"] for r in study_rows}))
    ks = "/".join(sorted({str(r["eval_k"]) for r in study_rows}))
    images = ", ".join(sorted({str(r["test_examples"]) for r in study_rows}))
    plural = "" if epochs == "1" else "s"
    return (f"{epochs} epoch{plural} of Burda's schedule on `{data}`, scored by the IWAE-{ks} bound"
            f" of {images} test images")


def not_run(runs) -> list[tuple[str, list[str]]]:
    """(sweep, labels of its rows that no run in `runs` measured) for each registered sweep
    of the runs' study config (burda.py:short: burda_short and burda_short_k50)."""
    configs = {r["record"].get("config") for r in runs}
    done = {row_key(r["config"]) for r in runs}
    out = []
    for name, sweep in sweeps.SWEEPS.items():
        if sweep.config in configs:
            keys = [row_key(sweeps.leaves(o)) for o in sweep.runs]
            missing = [label(k) for k in dict.fromkeys(keys) if k not in done]
            if missing:
                out.append((name, missing))
    return out


def markdown(study_rows, diffs=(), excluded=(), missing=(), root=None) -> str:
    with_published = any(published(r) for r in study_rows)
    lines = [
        "## The study: analytic vs sampled KL, IWAE vs VAE, DReG vs reparam", "",
        f"Measured here: {describe(study_rows)}. Each cell is the mean ± sample std (ddof 1)"
        " over the n seeds; `SE` is the standard error over the test images (the mean of"
        " the seeds'); log-likelihoods in nats, higher is better."]
    if with_published:
        epochs = sorted({r["protocol_epochs"] for r in study_rows})
        lines[-1] += (
            " Published columns (negated NLLs): " + " ".join(f"{k}: {v}." for k, v in
                                                           PROTOCOLS.items()) +
            f" Δ = measured − published. **They are converged figures after 3,280 epochs;"
            f" these rows trained {', '.join(map(str, epochs))}**, so Δ measures the"
            " budget as much as the method: the rows rank the methods at equal budget and"
            " do not reproduce the published numbers.")
    else:
        lines[-1] += (" No published figure stands beside these rows: theirs are on mnist"
                      " by IWAE-5000 on all 10,000 test images.")
    head = "| row | n | test log-lik. | SE | test ELBO | rate | active units |"
    rule = "|---|---|---|---|---|---|---|"
    if with_published:
        head += " Burda (3,280 ep.) | Δ Burda | nbip (3,280 ep.) | Δ nbip |"
        rule += "---|---|---|---|"
    head += " seed-steps/s | train | eval |"
    rule += "---|---|---|"
    lines += ["", head, rule]
    for r in study_rows:
        line = (f"| {r['row']} | {r['n']} | {_pm(r, 'test_log_likelihood')} |"
                f" {_f(r['test_log_likelihood_se'])} | {_pm(r, 'test_elbo')} |"
                f" {_pm(r, 'test_rate')} | {_pm(r, 'active_units', 1)} |")
        if with_published:
            line += (f" {_f(r['burda'])} | {_f(r['diff_burda'])} | {_f(r['nbip'])} |"
                     f" {_f(r['diff_nbip'])} |")
        line += (f" {_f(r['steps_per_s'], 0)} | {_duration(r['train_wall_s'])} |"
                 f" {_duration(r['eval_wall_s'])} |")
        lines.append(line)
    if diffs:
        lines += ["", "### Differences, seed by seed", "",
                  "a − b in test log-likelihood (nats), over the seeds both rows have: the"
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
    for name, labels in missing:
        lines += ["", f"Not run yet, rows of the sweep `{name}`: {'; '.join(labels)}. To run"
                  f" them: `python -m launch.sweep --sweep={name} --root={root or 'ROOT'}"
                  " --data_dir=DATA_DIR --commit`, then this collect again."]
    return "\n".join(lines) + "\n"


def _duration(seconds) -> str:
    if not seconds:
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def plot(study_rows, path: Path) -> None:
    from experiments.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(study_rows) + 1.8))
    y = list(range(len(study_rows)))
    ax.errorbar([r["test_log_likelihood_mean"] for r in study_rows], y,
                xerr=[r["test_log_likelihood_std"] or 0 for r in study_rows], fmt="o",
                capsize=3, label="measured here (mean ± sample std over seeds)")
    for name, marker in (("burda", "x"), ("nbip", "+")):
        pts = [(r[name], i) for i, r in enumerate(study_rows) if r[name] is not None]
        if pts:
            ax.plot(*zip(*pts), marker, ms=9, ls="none",
                    label=f"{name}, converged (3,280 epochs)")
    ax.set_yticks(y, [f"{r['row']} (n={r['n']})" for r in study_rows], fontsize=8)
    ax.invert_yaxis()
    ks = "/".join(sorted({str(r["eval_k"]) for r in study_rows}))
    ax.set_xlabel(f"test log-likelihood, IWAE-{ks} (nats, higher is better)")
    ax.set_title(describe(study_rows).replace("`", ""), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def write(prefix: Path, run_dirs) -> tuple[dict[str, Path], str]:
    """Writes PREFIX.csv and PREFIX.png; returns their paths and the markdown table.

    Raises:
      ValueError: when no run belongs in the table (every one is left out).
    """
    runs = [(r, left_out(r)) for r in map(load_run, run_dirs)]
    excluded = [(r["path"].name, why) for r, why in runs if why]
    kept = [r for r, why in runs if not why]
    if not kept:
        raise ValueError("--root: every finished study run is left out of the table: "
                         + "; ".join(f"{n} ({why})" for n, why in excluded))
    study_rows = rows(kept)
    prefix = Path(prefix)
    paths = {"study_csv": prefix.with_suffix(".csv"), "study_plot": prefix.with_suffix(".png")}
    with open(paths["study_csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for r in study_rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in CSV_COLUMNS})
    plot(study_rows, paths["study_plot"])
    root = Path(run_dirs[0]).parent
    return paths, markdown(study_rows, differences(kept), excluded, not_run(kept), root)
