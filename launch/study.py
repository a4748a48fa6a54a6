"""The study's table: runs of the `burda_*` sweeps beside Burda et al.'s Table 1 and nbip's.

`launch.collect` calls `write(root, run_dirs)` when the runs under a root were made from
`experiments/configs/burda.py`. Each row of the study (objective, K, KL term, gradient
estimator) may be spread over several runs (seed groups); its seeds' figures are read
from each run's results.json (`seeds` when a run trained several) and reported as
mean ± sample std with n, beside the published test log-likelihoods (negated NLLs) and
the difference in nats.
"""

import csv
import json
import math
import statistics
from pathlib import Path

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
    "Burda": "Burda et al. 2015: 3,280 epochs, 59,600 train images, IWAE-5000 test bound",
    "nbip": "nbip/IWAE TF2 reproduction of Burda's protocol (3,280 epochs)",
}
METRICS = ("test_log_likelihood", "test_elbo", "test_rate", "active_units")
CSV_COLUMNS = ("row", "objective", "num_samples", "kl", "grad_estimator", "protocol_epochs",
               "n", "test_log_likelihood_mean", "test_log_likelihood_std", "test_elbo_mean",
               "test_elbo_std", "test_rate_mean", "active_units_mean", "burda",
               "diff_burda", "nbip", "diff_nbip", "train_wall_s")


def is_study(run_dirs) -> bool:
    """True when every run was made from the study config."""
    configs = [_record(p).get("config", "") for p in run_dirs]
    return bool(configs) and all(c.split(":")[0] == STUDY_CONFIG for c in configs)


def _record(path: Path) -> dict:
    f = Path(path) / "launch.json"
    return json.loads(f.read_text()) if f.exists() else {}


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


def _seed_values(results: dict, metric: str) -> list[float]:
    seeds = results.get("seeds")
    values = [s.get(metric) for s in seeds] if seeds else [results.get(metric)]
    return [float(v) for v in values if v is not None]


def rows(run_dirs) -> list[dict]:
    """One dict per study row, sorted as the sweep lists them (VAE first, by K)."""
    by_key: dict[tuple, dict] = {}
    for path in run_dirs:
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        results = json.loads((path / "results.json").read_text())
        entry = by_key.setdefault(row_key(config), {m: [] for m in METRICS} | {
            "epochs": config["num_epochs"], "wall": 0.0, "dataset": config["dataset"],
            "eval_k": config["eval_importance_samples"]})
        for m in METRICS:
            entry[m] += _seed_values(results, m)
        entry["wall"] += float(results.get("train_wall_s", 0.0))
    out = []
    order = sorted(by_key, key=lambda k: (k[0] != "elbo", k[1], k[0], str(k[2]), str(k[3])))
    for key in order:
        e = by_key[key]
        ll = e["test_log_likelihood"]
        row = {"row": label(key), "objective": key[0], "num_samples": key[1], "kl": key[2],
               "grad_estimator": key[3], "protocol_epochs": e["epochs"], "n": len(ll),
               "dataset": e["dataset"], "eval_k": e["eval_k"],
               "train_wall_s": e["wall"]}
        for m in METRICS:
            mean, std = _mean_std(e[m])
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
        burda = BURDA.get(key[:2]) if key[2] in (None, "analytic") and key[3] != "stl" else None
        nbip = NBIP.get((key[0], key[1], key[3])) if key[0] == "iwae" else None
        if key[0] == "elbo" and key[1] == 1 and key[2] == "analytic":
            nbip = NBIP[("iwae", 1, "reparam")]  # IWAE k = 1 is the VAE.
        row["burda"] = -burda if burda is not None else None
        row["nbip"] = -nbip if nbip is not None else None
        for name in ("burda", "nbip"):
            ref = row[name]
            row[f"diff_{name}"] = (row["test_log_likelihood_mean"] - ref) if ref else None
        out.append(row)
    return out


def _mean_std(values):
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _f(x, digits=2):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(study_rows) -> str:
    epochs = sorted({r["protocol_epochs"] for r in study_rows})
    lines = [
        "## The study beside Burda et al.'s Table 1 (MNIST, one stochastic layer)", "",
        f"Measured here: {', '.join(map(str, epochs))} epochs of Burda's schedule on"
        f" {', '.join(sorted({r['dataset'] for r in study_rows}))}, test log-likelihood ="
        f" the IWAE-{'/'.join(sorted({str(r['eval_k']) for r in study_rows}))} bound on the"
        " whole test set (higher is better), mean ± sample std over n seeds. Published"
        " columns: test log-likelihoods after 3,280 epochs with the standard gradients"
        " (nbip's DReG figures beside the DReG rows); Δ = measured − published. "
        + " ".join(f"{k}: {v}." for k, v in PROTOCOLS.items()), "",
        "| row | n | test log-lik. | test ELBO | rate | active units | Burda | Δ Burda |"
        " nbip | Δ nbip |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in study_rows:
        pm = lambda m: (_f(r[f"{m}_mean"]) + (f" ± {_f(r[f'{m}_std'])}"  # noqa: E731
                                               if r[f"{m}_std"] is not None else ""))
        lines.append(
            f"| {r['row']} | {r['n']} | {pm('test_log_likelihood')} | {pm('test_elbo')} |"
            f" {_f(r['test_rate_mean'])} | {_f(r['active_units_mean'], 1)} | {_f(r['burda'])} |"
            f" {_f(r['diff_burda'])} | {_f(r['nbip'])} | {_f(r['diff_nbip'])} |")
    return "\n".join(lines) + "\n"


def plot(study_rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(study_rows) + 1.6))
    y = list(range(len(study_rows)))
    ax.errorbar([r["test_log_likelihood_mean"] for r in study_rows], y,
                xerr=[r["test_log_likelihood_std"] or 0 for r in study_rows], fmt="o",
                capsize=3, label="measured here (mean ± std over seeds)")
    for name, marker in (("burda", "x"), ("nbip", "+")):
        pts = [(r[name], i) for i, r in enumerate(study_rows) if r[name] is not None]
        if pts:
            ax.plot(*zip(*pts), marker, ms=9, ls="none", label=f"{name} (3,280 epochs)")
    ax.set_yticks(y, [f"{r['row']} (n={r['n']})" for r in study_rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test log-likelihood, IWAE-5000 (nats, higher is better)")
    ax.set_title(f"MNIST, Burda et al.'s net, {study_rows[0]['protocol_epochs']} epochs")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(root: Path, run_dirs) -> tuple[dict[str, Path], str]:
    """Writes ROOT/study.csv and ROOT/study.png; returns their paths and the markdown table."""
    study_rows = rows(run_dirs)
    paths = {"study_csv": root / "study.csv", "study_plot": root / "study.png"}
    with open(paths["study_csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for r in study_rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in CSV_COLUMNS})
    plot(study_rows, paths["study_plot"])
    return paths, markdown(study_rows)
