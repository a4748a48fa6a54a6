"""Training with each KL term: final test ELBO and log-likelihood, wall time, learning curves.

One model and data set (`config.vae`) trained once per (KL term, num_samples),
each with `config.vae.train.num_seeds` seeds vmapped in one program, by
`vaekl.train.train_and_evaluate(train_config, workdir/runs/<kl>_n<num_samples>)`.
A finished run (results.json written, same config) is read, not retrained, so a rerun
resumes where it stopped.

Fields of each row (`vaekl.measure.seed_figures`: the mean and the sample std, ddof 1,
over the `num_seeds` seeds):
  test_elbo_mean/std            test ELBO, analytic KL, `eval_elbo_samples` draws (nats/example)
  test_log_likelihood_mean/std  the IWAE bound with `eval_importance_samples` draws
  train_wall_s                  seconds in the training epochs (all seeds together)
and `FIELD_mean_se`, the standard error of each seed mean: the sample std
over sqrt(num_seeds), empty for one seed. It counts every source of noise that
differs between seeds (initialisation, data order, the draws of training and of
evaluation) on the one fixed test set; the evaluation's own Monte Carlo error is
part of it, not reported apart (`vaekl.evaluate` keeps only each seed's test-set
mean, not the per-example values an example-level SE would need).
"""

import json
from pathlib import Path

import numpy as np

from experiments import report
from vaekl import measure

COLUMNS = ("kl", "num_samples", "test_elbo_mean", "test_elbo_std", "test_log_likelihood_mean",
           "test_log_likelihood_std", "test_rate_mean", "active_units_mean", "train_wall_s",
           "num_seeds")



def run_name(kl: str, num_samples: int) -> str:
    return f"{kl}_n{num_samples}"


def train_config(config, kl: str, num_samples: int):
    cfg = config.vae.copy_and_resolve_references()
    cfg.loss.kl, cfg.loss.num_samples = kl, int(num_samples)
    return cfg


def read_curves(path: Path) -> dict:
    """Learning curves from metrics.jsonl: {"train": (steps, elbo [seeds, T]), "eval": ...}."""
    curves = {}
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    for split, field in (("train", "elbo"), ("eval", "test_elbo")):
        rows = [ln for ln in lines if ln["split"] == split and field in ln]
        if rows:
            steps = np.array([ln["step"] for ln in rows])
            values = np.array([np.atleast_1d(ln[field]) for ln in rows], np.float64).T
            curves[split] = (steps, values)
    return curves


def run(config, workdir: str) -> dict:
    """Trains (or reads) every run; writes results.json, results.md and learning_curves.png."""
    from vaekl import train

    workdir = report.prepare_workdir(workdir)
    rows, curves = [], {}
    for kl in config.kls:
        for n in config.num_samples:
            sub = workdir / "runs" / run_name(kl, n)
            cfg = train_config(config, kl, n)
            results = measure.finished_results(sub, cfg)
            if results is None:
                results = train.train_and_evaluate(cfg, str(sub))
            row = {"kl": kl, "num_samples": int(n), "num_seeds": results["num_seeds"],
                   "train_wall_s": results["train_wall_s"], "steps": results["steps"],
                   "run": str(sub.relative_to(workdir))}
            row.update(measure.seed_figures(results))
            rows.append(row)
            curves[(kl, int(n))] = read_curves(sub / "metrics.jsonl")
    cfg = config.vae
    results = {"experiment": "compare_training", "rows": rows, "dataset": cfg.data.dataset,
               "num_epochs": cfg.train.num_epochs, "num_seeds": cfg.train.num_seeds,
               "eval_importance_samples": cfg.eval.eval_importance_samples,
               "steps_per_epoch": (rows[0]["steps"] // max(cfg.train.num_epochs, 1) if rows
                                   else None)}
    report.publish(workdir, results, _markdown(results, config),
                   report.markdown_table(rows, COLUMNS))
    _plot(curves, results, workdir / "learning_curves.png")
    return results


def _markdown(results, config) -> str:
    cfg = config.vae
    return (
        "# Training with each KL term\n\n"
        f"`{cfg.data.dataset}`, {cfg.model.latents} latents, hidden {tuple(cfg.model.hidden)}"
        f" {cfg.model.activation}, batch {cfg.train.batch_size}, Adam {cfg.optim.learning_rate},"
        f" {cfg.train.num_epochs} epochs, {cfg.train.num_seeds} seeds (seed {cfg.train.seed},"
        " ...). `kl` is the KL term trained with and"
        " `num_samples` the draws of z per example; evaluation is the same for every run: test"
        f" ELBO with the analytic KL, and the IWAE bound with {cfg.eval.eval_importance_samples}"
        " samples as `test_log_likelihood` (nats per example, over the n ="
        f" {cfg.train.num_seeds} seeds: `*_mean` is the mean ± its standard error, std / sqrt(n),"
        " and `*_std` the sample std, ddof 1)."
        " `train_wall_s` is the time in training epochs, all seeds together.\n\n"
        + report.markdown_table(results["rows"], COLUMNS))


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    """A trailing moving average over the last axis (shorter at the start)."""
    if width <= 1:
        return values
    csum = np.cumsum(values, axis=-1)
    out = np.empty_like(values)
    for i in range(values.shape[-1]):
        lo = max(0, i - width + 1)
        out[..., i] = (csum[..., i] - (csum[..., lo - 1] if lo else 0)) / (i - lo + 1)
    return out


def y_range(curves: list, quantile: float = 0.05) -> tuple:
    """(bottom, top, note) of an axis that shows `curves` [(x [T], y [T]), ...] from their
    `quantile` (over every point) to their maximum, with a margin. The note names what lies
    below the axis (the first epochs' plunge): the lowest value and the last x it reaches."""
    ys = np.concatenate([y for _, y in curves])
    low, top = np.quantile(ys, quantile), ys.max()
    margin = 0.08 * (top - low) or 1.0
    bottom, top = low - margin, top + margin / 2
    below = [x[y < bottom] for x, y in curves if np.any(y < bottom)]
    note = (f"below the axis: values down to {ys.min():.4g}, until epoch"
            f" {max(b.max() for b in below):.2g}" if below else "")
    return bottom, top, note


def _plot(curves, results, path: Path):
    plt = report.pyplot()

    kls = list(dict.fromkeys(k for k, _ in curves))
    colours = {k: f"C{i}" for i, k in enumerate(kls)}
    styles = ["-", "--", ":", "-."]
    ns = sorted({n for _, n in curves})
    steps_per_epoch = results["steps_per_epoch"] or 1
    fig, axes = plt.subplots(1, 2, figsize=(15, 5))
    shown = {"train": [], "eval": []}
    for (kl, n), c in curves.items():
        label = f"{kl}, n={n}"
        style = {"color": colours[kl], "ls": styles[ns.index(n) % len(styles)], "lw": 1.4}
        if "train" in c:
            steps, values = c["train"]
            mean = _smooth(values, 5).mean(0)
            axes[0].plot(steps / steps_per_epoch, mean, label=label, **style)
            shown["train"].append((steps / steps_per_epoch, mean))
        if "eval" in c:
            steps, values = c["eval"]
            # Per evaluation, over the seeds [seeds, T]: the one seed summary.
            summaries = [measure.seed_summary(seeds) for seeds in values.T]
            mean = np.array([s.mean for s in summaries])
            std = np.array([s.std or 0.0 for s in summaries])
            epochs = steps / steps_per_epoch
            axes[1].plot(epochs, mean, marker="o", ms=3, label=label, **style)
            if values.shape[0] > 1:
                axes[1].fill_between(epochs, mean - std, mean + std, color=colours[kl], alpha=0.12)
            shown["eval"].append((epochs, mean))
    titles = ((axes[0], "train", "Training ELBO (each run's own estimate, smoothed)"),
              (axes[1], "eval", "Test ELBO (analytic KL), mean ± sample std (ddof 1) over"
                                " the seeds"))
    for ax, split, title in titles:
        ax.set_xlabel("epoch")
        ax.set_ylabel("ELBO  [nats per example]; higher is better")
        ax.set_title(f"{results['dataset']}: {title}", fontsize=10)
        if shown[split]:
            bottom, top, note = y_range(shown[split])
            ax.set_ylim(bottom, top)
            if note:
                ax.annotate(note, (0.01, 0.01), xycoords="axes fraction", fontsize=8,
                            color="0.3", va="bottom")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2, title="KL term, samples")
    fig.suptitle(f"Learning curves by KL term ({results['num_seeds']} seeds; y axis from the"
                 " 5th percentile of the curves' values to their maximum)")
    report.save_figure(fig, path)
