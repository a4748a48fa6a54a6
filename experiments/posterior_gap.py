"""The posterior gap, exactly: log p(x) = ELBO(q) + KL(q(z|x) || p(z|x)), per example.

On the linear-Gaussian model of `vaekl.linear_gaussian` (p(z) = N(0, I),
p(x|z) = N(W z + b, s^2 I)) every term is known in closed form for a Gaussian
q(z|x) = N(m, S), S = L L^T:

  log p(x)                 `linear_gaussian.log_marginal` (x ~ N(b, W W^T + s^2 I))
  E_q log p(x|z)           -1/2 [|x - W m - b|^2 + tr(W S W^T)] / s^2 - d/2 log(2 pi s^2)
  KL(q || p(z))            `vaekl.kl.divergence` (`analytic` for a diagonal q, else
                           `analytic_full`)
  ELBO                     E_q log p(x|z) - KL(q || p(z))
  KL(q || p(z|x))          `vaekl.kl.analytic_full` against the exact posterior's Cholesky factor

so the identity is checked per example in float64 (and float32), for q families
that approach the posterior: its covariance scaled by c, an interpolation q_t
from the prior (t = 0) to the posterior (t = 1), the best mean-field q, and
amortised linear encoders trained by maximising the ELBO with the decoder fixed
at the true model (so log p(x) stays exact). A Monte Carlo ELBO from
`vaekl.elbo.elbo` (kl="analytic") checks the closed form within its error.
"""

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import linear_encoders, report
from vaekl.measure import Moments
from vaekl import elbo as elbo_lib
from vaekl import kl, linear_gaussian
from vaekl.distributions import STANDARD_NORMAL, DiagNormal, FullNormal, diag_matrix

COLUMNS = ("variant", "param", "mean_log_px", "mean_elbo", "mean_gap", "mean_kl_q_posterior",
           "mean_kl_q_prior", "max_abs_identity_error", "max_abs_identity_error_float32")
CHECK_COLUMNS = ("variant", "param", "closed_form_elbo", "mc_elbo", "z_score", "num_samples")

DERIVATION = """\
## Where the gap comes from

For any z, Bayes' rule gives log p(x) = log p(x, z) - log p(z|x). Add and subtract log q(z|x) and
take the expectation over z ~ q(z|x) (the left side does not depend on z):

    log p(x) = E_q[log p(x, z) - log q(z|x)] + E_q[log q(z|x) - log p(z|x)]
             =            ELBO(q)            +       KL(q(z|x) || p(z|x)).

The first term is the evidence lower bound; splitting log p(x, z) = log p(x|z) + log p(z)
gives its usual form ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)), the reconstruction term
minus the KL to the prior (the term a VAE computes analytically or by sampling). Because
KL >= 0, ELBO <= log p(x), and the gap log p(x) - ELBO is exactly the KL from q to the true
posterior: it is zero if and only if q(z|x) = p(z|x). Maximising the ELBO over q with the
model fixed therefore minimises KL(q || p(z|x)); a q family that cannot express p(z|x) (a
diagonal q for a correlated posterior) leaves a gap that no training removes.

For the linear-Gaussian model p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I) all three terms have
closed forms for q = N(m, S): log p(x) = log N(x; b, WW^T + s^2 I);
E_q log p(x|z) = -[|x - Wm - b|^2 + tr(W S W^T)] / (2 s^2) - (d/2) log(2 pi s^2); the two
KLs between Gaussians come from `vaekl.kl.analytic` / `vaekl.kl.analytic_full`, the second
against the exact posterior p(z|x) = N(M^-1 W^T (x - b) / s^2, M^-1), M = I + W^T W / s^2.
The table checks the identity per example (`max_abs_identity_error` = max over test
examples of |log p(x) - ELBO - KL(q || p(z|x))|). For a diagonal q with the exact mean the
best variances are 1/M_ii, and the gap that remains is (1/2)(sum_i log M_ii - log det M)
for every x (`mean_field_floor`).
"""


def expected_log_likelihood(model, x, q_mean, q_scale_tril):
    """E_{z ~ N(q_mean, L L^T)} log N(x; W z + b, s^2 I), closed form, [N].

    q_scale_tril is [k, k] (shared) or [N, k, k].
    """
    w = jnp.asarray(model.w, x.dtype)
    b = jnp.asarray(model.b, x.dtype)
    var = jnp.asarray(model.noise_std**2, x.dtype)
    resid = x - q_mean @ w.T - b
    trace = jnp.sum(jnp.square(jnp.matmul(w, q_scale_tril)), axis=(-2, -1))
    d = x.shape[-1]
    return (-0.5 * (jnp.sum(jnp.square(resid), axis=-1) + trace) / var
            - 0.5 * d * jnp.log(2 * jnp.pi * var))


def scale_tril(q) -> jax.Array:
    """q's Cholesky factor, [N, k, k] (diagonal for a `DiagNormal`)."""
    if isinstance(q, DiagNormal):
        return diag_matrix(jnp.exp(0.5 * q.log_var))
    return jnp.broadcast_to(q.scale_tril, q.mean.shape + q.mean.shape[-1:])


@jax.jit
def terms(model, x, q):
    """Per-example log p(x), ELBO, KL(q || p(z)), KL(q || p(z|x)), all closed form.

    Args:
      model: a `LinearGaussian` (its arrays cast to x's dtype).
      x: [N, d].
      q: a `DiagNormal` (mean and log_var [N, k]) or a `FullNormal` (mean [N, k],
        scale_tril [N, k, k]); the KL to the prior is `kl.divergence`'s.

    Returns:
      dict of [N] arrays: log_px, elbo, kl_prior, kl_posterior, identity_error.
    """
    dtype = x.dtype
    model = linear_gaussian.LinearGaussian(jnp.asarray(model.w, dtype),
                                           jnp.asarray(model.b, dtype), model.noise_std)
    post = linear_gaussian.posterior(model, x)
    log_px = linear_gaussian.log_marginal(model, x)
    kl_prior = kl.divergence(q, STANDARD_NORMAL)
    q_tril = scale_tril(q)
    elbo = expected_log_likelihood(model, x, q.mean, q_tril) - kl_prior
    kl_post = kl.analytic_full(q.mean, q_tril, post.mean, post.scale_tril.astype(dtype))
    return {"log_px": log_px, "elbo": elbo, "kl_prior": kl_prior, "kl_posterior": kl_post,
            "identity_error": log_px - elbo - kl_post}


def _diag_q(mean, var):
    return DiagNormal(mean, jnp.broadcast_to(jnp.log(var), mean.shape))


def fixed_variants(model, x, config):
    """(variant, param, q) for the hand-made q's, each a `DiagNormal` or `FullNormal`."""
    post = linear_gaussian.posterior(model, x)
    cov = post.covariance()
    k = model.latent_dim
    out = [("exact_posterior", None, post)]
    precision = jnp.linalg.inv(cov)
    out.append(("mean_field_optimal", None, _diag_q(post.mean, 1.0 / jnp.diag(precision))))
    out.append(("mean_field_marginals", None, _diag_q(post.mean, jnp.diag(cov))))
    for c in config.shrink_factors:
        out.append(("shrink", float(c), FullNormal(post.mean, math.sqrt(c) * post.scale_tril)))
    eye = jnp.eye(k, dtype=cov.dtype)
    for t in config.interpolation_ts:
        # q_0 = p(z) = N(0, I) ignores x; q_1 = p(z|x). Mean and Cholesky factor
        # are interpolated linearly (a lower-triangular factor with a positive diagonal).
        out.append(("interpolate", float(t),
                    FullNormal(t * post.mean, t * post.scale_tril + (1 - t) * eye)))
    return out


def mean_field_floor(model) -> float:
    """The gap of the best diagonal q: (1/2)(sum_i log M_ii - log det M), in nats."""
    w = np.asarray(model.w, np.float64)
    m = np.eye(model.latent_dim) + w.T @ w / model.noise_std**2
    return 0.5 * float(np.sum(np.log(np.diag(m))) - np.linalg.slogdet(m)[1])


def trained_variants(model, x_train, x_test, key, config):
    """(variant, param = Adam step, q) of amortised linear encoders (`linear_encoders`) trained
    with the decoder fixed at the true model, at the steps of `config.report_steps`."""
    out = []
    for i, family in enumerate(("mean_field", "full")):
        history = linear_encoders.train(
            model, x_train, jax.random.fold_in(key, i), family, steps=config.train_steps,
            learning_rate=config.learning_rate, batch_size=config.batch_size,
            num_samples=config.train_num_samples)
        steps = sorted({s for s in config.report_steps if s <= config.train_steps}
                       | {config.train_steps})
        for s in steps:
            params = jax.tree.map(lambda h, s=s: h[s], history)
            out.append((f"trained_{family}", int(s),
                        linear_encoders.apply(params, x_test, family)))
    return out


def _summarise(variant, param, t64, t32):
    return {"variant": variant, "param": param,
            "mean_log_px": float(np.mean(t64["log_px"])),
            "mean_elbo": float(np.mean(t64["elbo"])),
            "mean_gap": float(np.mean(t64["log_px"] - t64["elbo"])),
            "mean_kl_q_posterior": float(np.mean(t64["kl_posterior"])),
            "mean_kl_q_prior": float(np.mean(t64["kl_prior"])),
            "max_abs_identity_error": float(np.max(np.abs(t64["identity_error"]))),
            "max_abs_identity_error_float32": float(np.max(np.abs(t32["identity_error"])))}


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _mc_elbo(model, x, q, key, *, num_samples):
    """The test-set mean of `vaekl.elbo.elbo(kl='analytic')` with num_samples draws per example."""
    log_lik = linear_encoders.true_log_likelihood(model, x)
    return jnp.mean(elbo_lib.elbo(key, q, log_lik, kl="analytic", num_samples=num_samples).elbo)


def sampled_check(model, x, variant, param, q, key, config):
    """The Monte Carlo ELBO (vaekl.elbo.elbo, kl='analytic') against the closed form.

    `mc_repeats` independent estimates of the test-set mean ELBO, each with
    `mc_samples` draws of z per example; their mean and standard error.
    """
    estimates = np.array([float(_mc_elbo(model, x, q, jax.random.fold_in(key, r),
                                         num_samples=config.mc_samples))
                          for r in range(config.mc_repeats)])
    closed = float(np.mean(terms(model, x, q)["elbo"]))
    m = Moments.of(estimates)
    mc, se = float(m.mean), float(m.mean_se())
    return {"variant": variant, "param": param, "closed_form_elbo": closed, "mc_elbo": mc,
            "mc_elbo_se": se, "z_score": round((mc - closed) / se, 2),
            "num_samples": config.mc_samples * config.mc_repeats}


def run(config, workdir: str) -> dict:
    """Computes every variant's terms; writes results.json, results.md and two plots."""
    from vaekl import data

    workdir = report.prepare_workdir(workdir)
    options = dict(config.data_options)
    train = data.load("linear_gaussian", "train", seed=config.data_seed, **options)
    test = data.load("linear_gaussian", "test", seed=config.data_seed, **options)
    model = test.model  # The generating model (float64 W, b): its posterior has full covariance.
    key = jax.random.key(config.seed)
    with jax.enable_x64(True):
        x = jnp.asarray(test.x, jnp.float64)[: config.num_examples]
        x_train = jnp.asarray(train.x, jnp.float64)
        variants = fixed_variants(model, x, config)
        variants += trained_variants(model, x_train, x, jax.random.fold_in(key, 0), config)
        rows, per_example = [], {}
        for variant, param, q in variants:
            t64 = jax.tree.map(np.asarray, terms(model, x, q))
            t32 = jax.tree.map(np.asarray, terms(
                model, x.astype(jnp.float32), jax.tree.map(lambda a: a.astype(jnp.float32), q)))
            assert t64["elbo"].dtype == np.float64 and t32["elbo"].dtype == np.float32
            rows.append(_summarise(variant, param, t64, t32))
            per_example[(variant, param)] = (t64["log_px"], t64["elbo"], t64["kl_posterior"])
        checks = []
        final = max(config.train_steps, 0)
        for i, (variant, param, q) in enumerate(variants):
            if variant in ("mean_field_optimal", "mean_field_marginals") or (
                    variant == "trained_mean_field" and param == final):
                checks.append(sampled_check(model, x, variant, param, q,
                                            jax.random.fold_in(key, 100 + i), config))
    floor = mean_field_floor(model)
    results = {
        "experiment": "posterior_gap", "rows": rows, "sampled_check": checks,
        "max_abs_identity_error": max(r["max_abs_identity_error"] for r in rows),
        "max_abs_identity_error_float32": max(r["max_abs_identity_error_float32"]
                                              for r in rows),
        "mean_field_floor": floor, "num_examples": int(x.shape[0]),
        "model": {"obs_dim": model.obs_dim, "latent_dim": model.latent_dim,
                  "noise_std": model.noise_std},
        "trained": "linear encoders, decoder fixed at the true model (W, b, s)",
    }
    report.publish(workdir, results, _markdown(results, config),
                   report.markdown_table(rows, COLUMNS))
    _plot_gap(rows, floor, model.latent_dim, workdir / "posterior_gap.png")
    _plot_scatter(per_example, workdir / "elbo_vs_log_px.png")
    return results


def _markdown(results, config) -> str:
    m = results["model"]
    return (
        "# The posterior gap on the linear-Gaussian model, exactly\n\n"
        f"Model: d = {m['obs_dim']}, k = {m['latent_dim']}, s = {m['noise_std']} (the"
        f" `linear_gaussian` data set's generating model); {results['num_examples']} test"
        " examples; all terms in closed form, float64 (the float32 column repeats them in"
        " float32). `mean_gap` = mean of log p(x) - ELBO; `mean_kl_q_posterior` = mean of"
        " KL(q(z|x) || p(z|x)). Variants: `shrink` (param c) is N(posterior mean, c *"
        " posterior covariance); `interpolate` (param t) moves mean and Cholesky factor"
        " linearly from the prior N(0, I) (t = 0) to the posterior (t = 1); `trained_*`"
        " (param = Adam step) are linear amortised encoders trained on the train split by"
        " maximising the Monte Carlo ELBO with the decoder fixed at the true model"
        f" (`mean_field`: diagonal q; `full`: a shared full Cholesky factor)."
        f" Best diagonal q's gap (`mean_field_floor`): {results['mean_field_floor']:.6g} nats."
        f" Max identity error: {results['max_abs_identity_error']:.3g} (float64),"
        f" {results['max_abs_identity_error_float32']:.3g} (float32).\n\n"
        + report.markdown_table(results["rows"], COLUMNS, digits=6)
        + "\n## Sampled check\n\nThe Monte Carlo ELBO of `vaekl.elbo.elbo(kl='analytic')` (mean"
        f" over {config.mc_repeats} independent estimates of {config.mc_samples} draws per"
        " example) ± its standard error (the estimates' std / sqrt(repeats)) against the"
        " closed form; `z_score` = (mc - closed) / SE. Every figure of the table above is a"
        " closed form on the fixed test examples, with no Monte Carlo error.\n\n"
        + report.markdown_table(results["sampled_check"], CHECK_COLUMNS, digits=6)
        + "\n" + DERIVATION)


def _plot_gap(rows, floor, k, path: Path):
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    ax = axes[0]
    shrink = sorted((r["param"], r["mean_gap"]) for r in rows if r["variant"] == "shrink")
    c = np.array([s[0] for s in shrink])
    ax.plot(c, [s[1] for s in shrink], "o", ms=7, label="mean gap log p(x) - ELBO (measured)")
    grid = np.geomspace(c.min(), c.max(), 200)
    ax.plot(grid, 0.5 * k * (grid - 1 - np.log(grid)), "-", lw=1,
            label=r"$\frac{k}{2}(c - 1 - \log c)$")
    ax.set_xscale("log")
    ax.set_xlabel("covariance scale c  (q = N(posterior mean, c Σ_post))")
    ax.set_ylabel("gap = log p(x) - ELBO  [nats]")
    ax.set_title("Scaled posterior covariance: gap is 0 only at c = 1")
    ax.legend(fontsize=8)
    ax = axes[1]
    interp = sorted((r["param"], r["mean_gap"]) for r in rows if r["variant"] == "interpolate")
    ax.plot([s[0] for s in interp], [s[1] for s in interp], "o-")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("t  (q_0 = prior N(0, I) → q_1 = p(z|x))")
    ax.set_ylabel("gap = log p(x) - ELBO  [nats]")
    ax.set_title("Interpolating q toward the posterior")
    ax = axes[2]
    for variant, marker in (("trained_mean_field", "o-"), ("trained_full", "s-")):
        pts = sorted((r["param"], r["mean_gap"]) for r in rows if r["variant"] == variant)
        ax.plot([max(p[0], 1) for p in pts], [p[1] for p in pts], marker,
                label=variant.replace("trained_", "trained q: ").replace("_", "-"))
    ax.axhline(floor, color="k", ls="--", lw=1, label=f"best diagonal q: {floor:.3g} nats")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Adam step (step 0 plotted at 1)")
    ax.set_ylabel("gap = KL(q(z|x) || p(z|x))  [nats]")
    ax.set_title("Amortised linear encoders, decoder fixed")
    ax.legend(fontsize=8)
    report.save_figure(fig, path)


def _plot_scatter(per_example, path: Path):
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    ax = axes[0]
    chosen = [(("exact_posterior", None), "q = p(z|x)"),
              (("mean_field_optimal", None), "best diagonal q"),
              (("shrink", 2.0), "posterior covariance × 2"),
              (("shrink", 0.25), "posterior covariance × 0.25"),
              (("interpolate", 0.9), "q_t, t = 0.9 (from the prior)")]
    lo, hi = np.inf, -np.inf
    for key, label in chosen:
        if key not in per_example:
            continue
        log_px, elbo, _ = per_example[key]
        ax.scatter(log_px, elbo, s=5, alpha=0.5,
                   label=f"{label}: mean gap {np.mean(log_px - elbo):.3g}")
        lo, hi = min(lo, log_px.min()), max(hi, log_px.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="ELBO = log p(x)")
    ax.set_xlabel("exact log p(x)  [nats]")
    ax.set_ylabel("closed-form ELBO  [nats]")
    ax.set_title("ELBO vs log p(x), one point per test example")
    ax.legend(fontsize=8, markerscale=3)
    ax = axes[1]
    gaps, kls = [], []
    for log_px, elbo, kl_post in per_example.values():
        if np.mean(kl_post) > 1e-8:  # Leaves out q = p(z|x) (also shrink c = 1, t = 1).
            gaps.append(log_px - elbo)
            kls.append(kl_post)
    gaps, kls = np.concatenate(gaps), np.concatenate(kls)
    keep = (gaps > 0) & (kls > 0)
    ax.scatter(kls[keep], gaps[keep], s=3, alpha=0.3, label="one point per (q variant, example)")
    lo, hi = kls[keep].min(), kls[keep].max()
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="gap = KL")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("KL(q(z|x) || p(z|x))  [nats], closed form")
    ax.set_ylabel("log p(x) - ELBO  [nats]")
    ax.set_title("The gap is the KL to the true posterior, example by example\n(every q variant"
                 " except q = p(z|x) itself, whose gap is 0)", fontsize=10)
    ax.legend(fontsize=8, markerscale=3)
    report.save_figure(fig, path)
