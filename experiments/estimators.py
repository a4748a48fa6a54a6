"""Bias and standard deviation of the sampled KL estimators k1, k2, k3.

For each case (a q, a p, a dimension, samples per estimate) this draws many
independent estimates with `vaekl.kl.draws`, and reports their bias and std
relative to the analytic KL. Beside each measured figure it reports the exact
one, from Gauss-Hermite quadrature of the one-dimensional moments combined over
the (identical, independent) dimensions, so the table checks itself.

Each measured figure has its Monte Carlo standard error (`*_se`), from the
moments of the n = num_draws estimates: bias SE = s / sqrt(n); std SE =
SE(s^2) / (2 s) by the delta method, SE(s^2) from the sample fourth central
moment (`Moments.variance_se`; about s / sqrt(2 (n - 1)) for normal draws).
`*_z` = (measured - exact) / SE. An SE needs the draws' second (bias) or fourth
(std) moment to be finite; where it is not (k3 with var_p >= 2 var_q, or >= 4/3
var_q for the fourth) the SE is left empty: no finite sample measures that figure
to within a known error.
"""

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import report
from vaekl.measure import Moments
from vaekl import kl
from vaekl.progress import Progress

COLUMNS = ("estimator", "p_mean", "p_log_var", "dim", "num_samples", "true_kl",
           "bias_over_true", "exact_bias_over_true", "bias_z", "std_over_true",
           "exact_std_over_true", "std_z", "num_draws")


def exact_moments(q_mean, q_log_var, p_mean, p_log_var, dim, estimator, nodes=200):
    """Exact mean and variance of one single-draw estimate, by quadrature.

    With l = log p(z_j) - log q(z_j) for one dimension, L = sum_j l over `dim`
    independent dimensions and R = exp(L): k1 = -L, k2 = L^2/2, k3 = R - 1 - L.
    Their moments follow from the cumulants of l and from E[r^2], E[r l].

    Returns:
      (mean, variance) as Python floats; the variance of k3 is inf where
      E_q[r^2] diverges (var_p >= 2 var_q).
    """
    x, w = np.polynomial.hermite.hermgauss(nodes)
    w = w / math.sqrt(math.pi)
    z = q_mean + math.sqrt(2.0) * math.exp(0.5 * q_log_var) * x
    log_q = -0.5 * ((z - q_mean) ** 2 * math.exp(-q_log_var) + q_log_var)
    log_p = -0.5 * ((z - p_mean) ** 2 * math.exp(-p_log_var) + p_log_var)
    l = log_p - log_q
    m = [float(np.sum(w * l**k)) for k in range(5)]
    c1 = m[1]
    c2 = m[2] - m[1] ** 2
    c3 = m[3] - 3 * m[2] * m[1] + 2 * m[1] ** 3
    c4 = m[4] - 4 * m[3] * m[1] - 3 * m[2] ** 2 + 12 * m[2] * m[1] ** 2 - 6 * m[1] ** 4
    k1, k2, k3, k4 = (dim * c for c in (c1, c2, c3, c4))  # cumulants of L
    if estimator == "k1":
        return -k1, k2
    if estimator == "k2":
        e_l2 = k2 + k1**2
        e_l4 = k4 + 4 * k3 * k1 + 3 * k2**2 + 6 * k2 * k1**2 + k1**4
        return 0.5 * e_l2, 0.25 * (e_l4 - e_l2**2)
    if math.exp(p_log_var - q_log_var) >= 2.0:
        # E_q[r^2] = int p^2/q diverges when var_p >= 2 var_q: k3 has infinite variance.
        return -k1, math.inf
    r = np.exp(l)
    e_r2 = float(np.sum(w * r**2))
    e_rl = float(np.sum(w * r * l))
    var_r = math.expm1(dim * math.log(e_r2))
    cov_rl = dim * e_rl - dim * c1
    return -k1, var_r + k2 - 2 * cov_rl


@functools.partial(jax.jit, static_argnames=("estimator", "num_samples", "num_draws", "dim"))
def _chunk(key, q_mean, q_log_var, p_mean, p_log_var, *, estimator, num_samples, num_draws,
           dim):
    """num_draws estimates, each a mean over num_samples draws: shape [num_draws]."""
    shape = (num_draws, dim)
    per_draw = kl.draws(key, jnp.full(shape, q_mean), jnp.full(shape, q_log_var), p_mean,
                        p_log_var, num_samples=num_samples, estimator=estimator)
    return jnp.mean(per_draw, axis=0)


def measure(key, case, estimator, num_draws, chunk_elements, progress=None):
    """Runs one case; returns (`Moments` of the estimates, first chunk of estimates).

    `progress`, a `vaekl.progress.Progress` counting draws, advances after each chunk.
    """
    per_chunk = max(1, min(num_draws, chunk_elements // (case["num_samples"] * case["dim"])))
    moments, first = Moments(), None
    for i in range(math.ceil(num_draws / per_chunk)):
        size = min(per_chunk, num_draws - moments.n)
        x = np.asarray(_chunk(
            jax.random.fold_in(key, i), case["q_mean"], case["q_log_var"], case["p_mean"],
            case["p_log_var"], estimator=estimator, num_samples=case["num_samples"],
            num_draws=size, dim=case["dim"]), np.float64)
        if first is None:
            first = x
        moments.add(x)
        if progress is not None:
            progress.advance(size)
    return moments, first


def _finite_or_none(x):
    """JSON has no infinity: an infinite exact figure is written as null."""
    return x if math.isfinite(x) else None


def finite_moment(case, estimator, order: int) -> bool:
    """Whether E_q|estimate|^order is finite. k1 and k2 are polynomials in z (always);
    k3 holds r = p(z)/q(z), and E_q[r^m] = int p^m q^(1-m) is finite iff
    var_p / var_q < m / (m - 1)."""
    if estimator != "k3":
        return True
    return math.exp(case["p_log_var"] - case["q_log_var"]) < order / (order - 1)


def figures(moments: Moments, case, estimator, true_kl: float, exact_mean: float,
            exact_var: float) -> dict:
    """Bias and std over the analytic KL, measured and exact, with the measured ones' SE and
    z-scores (`None` where the moment an SE needs is infinite)."""
    std = math.sqrt(float(moments.variance()))
    out = {"bias_over_true": (float(moments.mean) - true_kl) / true_kl,
           "std_over_true": std / true_kl,
           "exact_bias_over_true": (exact_mean - true_kl) / true_kl,
           "exact_std_over_true": _finite_or_none(
               math.sqrt(exact_var / case["num_samples"]) / true_kl)}
    for name, se, order in (("bias", moments.mean_se(), 2), ("std", moments.std_se(), 4)):
        se = float(se) / true_kl if finite_moment(case, estimator, order) else None
        exact = out[f"exact_{name}_over_true"]
        out[f"{name}_over_true_se"] = se
        out[f"{name}_z"] = (round((out[f"{name}_over_true"] - exact) / se, 2)
                            if se and exact is not None else None)
    return out


def schulman_rows(rows) -> list:
    """The rows of Schulman's table: q = N(0, 1) against N(0.1, 1) and N(1, 1), one draw."""
    return [r for r in rows if r["dim"] == 1 and r["num_samples"] == 1
            and r["p_log_var"] == 0.0 and r["p_mean"] in (0.1, 1.0)]


def agreement(rows, limit: float = 3.0) -> str:
    """Whether the measured figures are noise about the exact ones: each of Schulman's rows'
    bias against its exact value, then every row whose |z| reaches `limit`."""
    lines = [f"- {r['estimator']}, p = N({r['p_mean']:g}, 1): bias/true"
             f" {report.pm(r['bias_over_true'], r['bias_over_true_se'])} against an exact"
             f" {report.fmt(r['exact_bias_over_true'])} (z = {report.fmt(r['bias_z'])})"
             for r in schulman_rows(rows) if r["bias_z"] is not None]
    far = [r for r in rows if any(r[f"{name}_z"] is not None and abs(r[f"{name}_z"]) >= limit
                                  for name in ("bias", "std"))]
    named = [f"{r['estimator']} (p_mean {r['p_mean']:g}, p_log_var {r['p_log_var']:g}, dim"
             f" {r['dim']}, num_samples {r['num_samples']}): bias_z {report.fmt(r['bias_z'])},"
             f" std_z {report.fmt(r['std_z'])}" for r in far]
    verdict = (f"Every measured bias and std is within {limit:g} standard errors of its exact"
               " value: the differences are Monte Carlo noise." if not far else
               f"Beyond {limit:g} standard errors of the exact value: " + "; ".join(named) + ".")
    if any(r["estimator"] == "k3" for r in far):
        verdict += (" k3 holds r = p(z)/q(z), lognormal and heavy-tailed where the means differ:"
                    " its sample std falls short of the exact one in most finite samples, and"
                    " the SE from the sample fourth moment understates the error.")
    return "\n".join(["Measured against exact (Schulman's rows):", "", *lines, "", verdict, ""])


def _true_kl(q_mean, q_log_var, p_mean, p_log_var, dim, num_samples):
    """The analytic KL in float64 (NumPy, independent of JAX's x64 switch)."""
    del num_samples
    d = q_log_var - p_log_var
    return 0.5 * dim * ((q_mean - p_mean) ** 2 * math.exp(-p_log_var) + math.expm1(d) - d)


def run(config, workdir: str) -> dict:
    """Measures every (case, estimator) pair; writes results.json, results.md, a plot."""
    workdir = report.prepare_workdir(workdir)
    base_key = jax.random.key(config.seed)
    rows, hists = [], {}
    draws = [config.schulman_draws if ci < 2 else config.num_draws
             for ci in range(len(config.cases))]
    progress = Progress("estimators: draws", sum(draws) * len(config.estimators),
                        unit="draws", quiet_s=5.0)
    for ci, case in enumerate(config.cases):
        case = dict(case)
        true_kl = _true_kl(**case)
        schulman = ci < 2
        num_draws = draws[ci]
        for ei, estimator in enumerate(config.estimators):
            key = jax.random.fold_in(jax.random.fold_in(base_key, ci), ei)
            moments, first = measure(key, case, estimator, num_draws, config.chunk_elements,
                                    progress)
            exact = exact_moments(case["q_mean"], case["q_log_var"], case["p_mean"],
                                  case["p_log_var"], case["dim"], estimator)
            rows.append(dict(case, estimator=estimator, true_kl=true_kl, num_draws=num_draws,
                             **figures(moments, case, estimator, true_kl, *exact)))
            if schulman:
                hists[(case["p_mean"], estimator)] = (first[: config.histogram_draws], true_kl)
    results = {"experiment": "estimators", "rows": rows}
    table = report.markdown_table(rows, COLUMNS)
    report.publish(workdir, results, (
        "# Sampled KL estimators against the analytic KL\n\n"
        "q = N(q_mean, e^q_log_var I), p = N(p_mean, e^p_log_var I); q_mean = q_log_var = 0 in"
        " every row. `exact_*` by Gauss-Hermite quadrature. Measured figures are"
        " `value ± Monte Carlo standard error` over the `num_draws` estimates; `*_z` ="
        " (measured - exact) / SE; an empty SE marks a figure whose draws have an infinite"
        " second (bias) or fourth (std) moment.\n\n" + table + "\n" + agreement(rows)), table)
    _plot(hists, workdir / "estimators.png")
    return results


def _plot(hists, path: Path):
    """Histograms of single-draw estimates: a row per p, a panel per estimator (k2 and k3
    nearly coincide where p is close to q, so they are not overlaid)."""
    plt = report.pyplot()

    p_means = sorted({p for p, _ in hists})
    estimators = list(dict.fromkeys(e for _, e in hists))
    fig, axes = plt.subplots(len(p_means), len(estimators), squeeze=False,
                             figsize=(4.6 * len(estimators), 3.6 * len(p_means)))
    for row, p_mean in zip(axes, p_means):
        for j, (ax, estimator) in enumerate(zip(row, estimators)):
            x, true_kl = hists[(p_mean, estimator)]
            lo, hi = np.quantile(x, [0.005, 0.995])
            ax.hist(x, bins=np.linspace(min(lo, 0.0), hi, 120), density=True, color=f"C{j}",
                    alpha=0.6, label=f"mean {x.mean():.4g}, std {x.std():.3g}")
            ax.axvline(true_kl, color="k", ls="--", lw=1, label=f"analytic KL {true_kl:.4g}")
            ax.set_title(f"{estimator}: q = N(0, 1), p = N({p_mean:g}, 1)", fontsize=10)
            ax.set_xlabel("single-draw estimate of KL(q || p)")
            ax.set_ylabel("density (log scale)")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
    draws = len(next(iter(hists.values()))[0])
    fig.suptitle(f"Sampled KL estimators, one panel each ({draws} estimates per panel;"
                 " 0.5-99.5% quantile range)")
    report.save_figure(fig, path)
