"""The main job: a short end-to-end tour of analytic against sampled KL, on embedded data.

Runs, each in its own subdirectory of the workdir (and with its own results.json,
results.md and plots there), the experiments that `config.parts` names:

  estimators         bias and std of k1, k2, k3 against the analytic KL (Schulman's table)
  gradient_variance  ELBO gradient variance under analytic, k1, k3, stl (VAE and exact posterior)
  compare_training   a VAE on `digits` trained with each KL term
  posterior_gap      log p(x) = ELBO + KL(q || p(z|x)) on the linear-Gaussian model

then prints a summary of the key figures and writes it to results.md / results.json.
Every part runs again on a rerun, except the training runs of compare_training that
finished with the same config (read from their results.json).
"""

import contextlib
import importlib
import time

from experiments import estimators, posterior_gap, report


def _run_part(name, config, workdir):
    """Runs experiments.<name> with its stdout sent to <workdir>/<name>/stdout.txt."""
    sub = report.prepare_workdir(str(workdir / name))
    module = importlib.import_module(f"experiments.{name}")
    start = time.time()
    with open(sub / "stdout.txt", "w") as out, contextlib.redirect_stdout(out):
        results = module.run(config, str(sub))
    return results, time.time() - start


def _estimators_table(results):
    rows = [dict(r, p=f"N({r['p_mean']:g}, 1)")
            for r in estimators.schulman_rows(results["rows"])]
    return ("Sampled KL estimators, q = N(0, 1) (Schulman's table; exact = quadrature; measured"
            " figures ± their Monte Carlo standard error, z = (measured - exact) / SE)\n\n"
            + report.markdown_table(rows, ("estimator", "p", "true_kl", "bias_over_true",
                                           "exact_bias_over_true", "bias_z", "std_over_true",
                                           "exact_std_over_true", "std_z", "num_draws"))
            + "\n" + estimators.agreement(results["rows"]))


def _gradient_table(results):
    text = ("ELBO gradient variance (mean per-parameter variance over draws) by KL term,"
            " ± jackknife standard errors\n\n"
            + report.markdown_table(results["rows"], ("model", "checkpoint", "estimator",
                                           "encoder_grad_variance", "decoder_grad_variance",
                                           "encoder_snr")))
    text += ("\nEncoder gradient variance relative to k1 (< 1: lower variance than k1)\n\n"
             + report.markdown_table(results["ratios"], ("model", "checkpoint",
                                                         "analytic_over_k1", "k3_over_k1",
                                                         "stl_over_k1")))
    return text


def _training_table(results):
    return (f"Training on {results['dataset']}, {results['num_epochs']} epochs,"
            f" n = {results['num_seeds']} seeds (nats per example; `*_mean` is the mean over the"
            " seeds ± its standard error, `*_std` the seeds' sample std, ddof 1)\n\n"
            + report.markdown_table(results["rows"], ("kl", "num_samples", "test_elbo_mean",
                                                      "test_elbo_std", "test_log_likelihood_mean",
                                                      "test_log_likelihood_std", "train_wall_s")))


def _gap_table(results):
    last = {}
    for r in results["rows"]:
        if r["variant"].startswith("trained_"):
            last[r["variant"]] = r  # Rows are in step order: keep the final one.
    keep = [r for r in results["rows"]
            if r["variant"] in ("exact_posterior", "mean_field_optimal")
            or (r["variant"] == "shrink" and r["param"] in (0.25, 0.5, 2.0))
            or (r["variant"] == "interpolate" and r["param"] in (0.0, 0.5, 0.9))]
    keep += list(last.values())
    return ("Posterior gap on the linear-Gaussian model (closed form, float64; mean over test"
            " examples)\n\n"
            + report.markdown_table(keep, ("variant", "param", "mean_log_px", "mean_elbo",
                                           "mean_gap", "mean_kl_q_posterior",
                                           "max_abs_identity_error"))
            + f"\nmax |log p(x) - ELBO - KL(q || p(z|x))| over all rows and examples:"
              f" {results['max_abs_identity_error']:.3g} (float64),"
              f" {results['max_abs_identity_error_float32']:.3g} (float32); best diagonal q's"
              f" gap {results['mean_field_floor']:.4g} nats.\n"
            + "\nThe Monte Carlo ELBO (± its standard error) against the closed form\n\n"
            + report.markdown_table(results["sampled_check"], posterior_gap.CHECK_COLUMNS,
                                    digits=6))


TABLES = {"estimators": _estimators_table, "gradient_variance": _gradient_table,
          "compare_training": _training_table, "posterior_gap": _gap_table}


def run(config, workdir: str) -> dict:
    """Runs every part of `config.parts`; prints and writes the summary."""
    workdir = report.prepare_workdir(workdir)
    start = time.time()
    sections, timings = [], {}
    for name in config.parts:
        print(f"[main] {name} ...", flush=True)
        results, seconds = _run_part(name, config[name], workdir)
        timings[name] = seconds
        note = f"{seconds:.0f} s"
        print(f"[main] {name}: {note}; tables and plots in {workdir / name}", flush=True)
        sections.append(f"## {name} ({note}; `{name}/`)\n\n" + TABLES[name](results))
    total = time.time() - start
    text = ("# vaekl main job: analytic against sampled KL\n\n"
            f"Total {total:.0f} s. Each part's full table, plots and results.json are in its"
            " subdirectory.\n\n" + "\n".join(sections))
    results = {"experiment": "main_job", "parts": list(config.parts), "wall_s": timings,
               "total_wall_s": total,
               "results": {name: f"{name}/results.json" for name in config.parts}}
    report.publish(workdir, results, text, "\n" + text)
    return results
