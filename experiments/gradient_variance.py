"""Variance and signal-to-noise ratio of ELBO gradients under each KL term.

For a fixed batch x and fixed parameters, the gradient of the negative ELBO
(`vaekl.steps.make_loss_fn`, or the same bound for the linear-Gaussian model) is a
random vector through the draws z ~ q(z|x). This draws it `num_draws` times
(`jax.vmap(jax.grad(loss))(keys)`) under each KL term (analytic, k1, k3, stl), with
the same keys for every term, and reports per parameter group (encoder, decoder):

  grad_variance  (1/P) sum_p Var_i[g_p^(i)]: the per-parameter variance across
                 draws (ddof 1), averaged over the group's P parameters
                 (the trace of the gradient covariance divided by P).
  snr            |E_i g^(i)|_2 / sqrt(sum_p Var_i[g_p^(i)]) (`vaekl.measure.snr`): the
                 norm of the mean gradient over the root of the total variance (the
                 expected norm of the noise of one draw).

Standard errors (`*_se`): a delete-a-group jackknife. The draws are cut into
`NUM_GROUPS` consecutive groups; each figure is computed again from the moments
of all draws but one group's (`vaekl.measure.leave_one_out`, `jackknife_se`).
It needs no formula for the variance of an average of P correlated per-parameter
variances, covers the SNR (a ratio) and the ratios between KL terms (computed
from the same keys, so their errors are correlated: each replicate's ratio uses
the same left-out group for both terms).
`batch_elbo_se` is the std of the draws' losses over sqrt(num_draws).

Models and checkpoints:
  vae / init, early, converged    a VAE on `digits` (`config.vae`) after 0,
      `early_epochs` and `converged_epochs` epochs of training with train.py's own
      initialisation and jitted epoch.
  linear_gaussian / exact_posterior    p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I)
      with W = Q diag(c), Q with orthonormal columns, so that the posterior
      covariance M^-1 = (I + W^T W / s^2)^-1 = diag(1 / (1 + c^2 / s^2)) is
      diagonal and a linear encoder q(z|x) = N(A x + a, diag v) equals p(z|x)
      exactly; the decoder is the true W, b, s.
  linear_gaussian / perturbed_posterior    the same with the encoder moved off the
      posterior (mean weights x 0.9, log-variances + 0.5).

At the exact posterior the STL encoder gradient is zero for every draw
(log p(x, z) - log q(z|x) = log p(x) does not depend on z), so its variance is
zero up to rounding; the linear-Gaussian part runs in float64 to show that. The
decoder gradient does not involve the KL term (the prior is fixed), so it is the
same under every KL term and is not zero-variance.
"""

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import linear_encoders, report
from vaekl import elbo as elbo_lib
from vaekl import linear_gaussian, measure
from vaekl.progress import Progress

COLUMNS = ("model", "checkpoint", "estimator", "encoder_grad_variance", "decoder_grad_variance",
           "encoder_snr", "decoder_snr", "encoder_grad_mean_norm", "batch_elbo", "num_draws")
RATIOS = (("analytic_over_k1", "analytic", "encoder"), ("k3_over_k1", "k3", "encoder"),
          ("stl_over_k1", "stl", "encoder"), ("decoder_analytic_over_k1", "analytic", "decoder"))
RATIO_COLUMNS = ("model", "checkpoint", *(name for name, _, _ in RATIOS))
NUM_GROUPS = 20  # Groups of draws of the jackknife standard errors.


def measure_gradients(grad_fn, params, key, *, num_draws: int, chunk: int,
                      progress=None) -> dict:
    """Gradient figures of `grad_fn` (a `measure.gradient_draws` with parts "encoder" and
    "decoder") at `params` over `num_draws` draws, `chunk` per device call
    (`measure.draw_moments`: draw i uses fold_in(key, i)); `progress` (a
    `vaekl.progress.Progress` counting draws, or None) advances after each call.

    Returns the `measure.gradient_figures` of the encoder and decoder gradients with their
    jackknife SEs (`*_se`); `batch_elbo`: minus the loss averaged over the draws (the
    batch-mean ELBO as that KL term estimates it) and its SE; and `jackknife`: each figure's
    leave-one-group-out replicates [G] (for `ratio_rows`; not written).
    """
    groups = min(NUM_GROUPS, num_draws)
    m = measure.draw_moments(functools.partial(grad_fn, params), key, num_draws=num_draws,
                             chunk=chunk, groups=groups, progress=progress)

    def figures(e, d):
        return {**measure.gradient_figures(e, "encoder"), **measure.gradient_figures(d, "decoder")}

    full = figures(measure.merge_all(m["encoder"]), measure.merge_all(m["decoder"]))
    replicates = [figures(e, d) for e, d in zip(measure.leave_one_out(m["encoder"]),
                                                measure.leave_one_out(m["decoder"]))]
    jackknife = {k: np.array([r[k] for r in replicates], np.float64) for k, v in full.items()
                 if isinstance(v, float) and all(r[k] is not None for r in replicates)}
    losses = measure.merge_all(m["loss"])
    return {**full, **{f"{k}_se": measure.jackknife_se(v) for k, v in jackknife.items()},
            "num_draws": num_draws, "batch_elbo": -float(losses.mean),
            "batch_elbo_se": float(losses.mean_se()), "jackknife": jackknife}


# --- The VAE on digits at its checkpoints. ---

def checkpoint_epochs(config) -> dict:
    """The checkpoints' names and epochs of training."""
    return {"init": 0, "early": int(config.early_epochs), "converged": int(config.converged_epochs)}


def vae_rows(config, key) -> list:
    """A row per (checkpoint, KL term) of the VAE, on a fixed batch x [batch_size, D]."""
    from vaekl import steps as steps_lib
    from vaekl import train

    _, test = train.load_data(config.vae)
    x = jnp.asarray(test.x[: config.batch_size])  # The first test images (binarised at load).
    model, cfg, checkpoints = measure.vae_checkpoints(config.vae, checkpoint_epochs(config),
                                                      "gradient variance: training the VAE")
    grad_fns = {}
    for estimator in config.estimators:
        cfg_e = cfg.copy_and_resolve_references()
        cfg_e.loss.kl, cfg_e.loss.num_samples = estimator, config.num_samples
        loss_fn = steps_lib.make_loss_fn(model, cfg_e)
        grad_fns[estimator] = measure.gradient_draws(
            lambda p, k, loss_fn=loss_fn: loss_fn(p, x, k, 0)[0])
    rows = []
    progress = Progress("gradient variance: VAE draws",
                        len(checkpoints) * len(config.estimators) * config.num_draws,
                        unit="draws", quiet_s=5.0)
    for ci, (name, params) in enumerate(checkpoints.items()):
        for estimator in config.estimators:
            figures = measure_gradients(grad_fns[estimator], params,
                                        jax.random.fold_in(key, ci), num_draws=config.num_draws,
                                        chunk=config.chunk, progress=progress)
            rows.append({"model": "vae", "checkpoint": name, "estimator": estimator,
                         "epochs": checkpoint_epochs(config)[name], **figures})
    return rows


# --- The linear-Gaussian model with a diagonal exact posterior. ---

def orthogonal_model(config) -> linear_gaussian.LinearGaussian:
    """W = Q diag(c) with Q's columns orthonormal: W^T W = diag(c^2), a diagonal posterior."""
    rng = np.random.default_rng(config.lg_seed)
    q, _ = np.linalg.qr(rng.standard_normal((config.lg_obs_dim, len(config.lg_scales))))
    w = q * np.asarray(config.lg_scales, np.float64)
    b = rng.standard_normal(config.lg_obs_dim)
    return linear_gaussian.LinearGaussian(w=w, b=b, noise_std=float(config.lg_noise_std))


def _lg_loss(estimator, num_samples, x):
    def loss(params, key):
        q = linear_encoders.apply(params["encoder"], x, "mean_field")
        log_lik = linear_encoders.decoder_log_likelihood(x, **params["decoder"])
        bound = elbo_lib.elbo(key, q, log_lik, kl=estimator, num_samples=num_samples)
        return -jnp.mean(bound.elbo)

    return loss


def linear_gaussian_rows(config, key) -> list:
    model = orthogonal_model(config)
    x_np, _ = linear_gaussian.sample(model, config.batch_size,
                                     np.random.default_rng(config.lg_seed + 1))
    exact = linear_encoders.exact(model)
    perturbed = dict(exact, mean_kernel=0.9 * exact["mean_kernel"],
                     mean_bias=0.9 * exact["mean_bias"], log_var_bias=exact["log_var_bias"] + 0.5)
    dtype = jnp.float64 if config.lg_float64 else jnp.float32
    posteriors = (("exact_posterior", exact), ("perturbed_posterior", perturbed))
    rows = []
    progress = Progress("gradient variance: linear-Gaussian draws",
                        len(posteriors) * len(config.estimators) * config.num_draws,
                        unit="draws", quiet_s=5.0)
    with jax.enable_x64(config.lg_float64):
        x = jnp.asarray(x_np, dtype)
        decoder = {"kernel": jnp.asarray(model.w.T, dtype), "bias": jnp.asarray(model.b, dtype),
                   "log_scale": jnp.asarray(math.log(model.noise_std), dtype)}
        # The parameters are {"encoder": ..., "decoder": ...} already: the split is the tree.
        grad_fns = {e: measure.gradient_draws(_lg_loss(e, config.num_samples, x), lambda g: g)
                    for e in config.estimators}
        for ci, (name, enc) in enumerate(posteriors):
            params = {"encoder": jax.tree.map(lambda a: jnp.asarray(a, dtype), enc),
                      "decoder": decoder}
            for estimator in config.estimators:
                figures = measure_gradients(grad_fns[estimator], params,
                                            jax.random.fold_in(key, 100 + ci),
                                            num_draws=config.num_draws, chunk=config.chunk,
                                            progress=progress)
                rows.append({"model": "linear_gaussian", "checkpoint": name,
                             "estimator": estimator, **figures})
    return rows


def _mark_zero_gradients(rows, rel=1e-10):
    """Sets `encoder_grad_zero` (and the SNR, a ratio of rounding errors there, to None) where
    the encoder gradient variance is below `rel` times the largest at the same checkpoint."""
    for r in rows:
        peers = [p["encoder_grad_variance"] for p in rows
                 if (p["model"], p["checkpoint"]) == (r["model"], r["checkpoint"])]
        r["encoder_grad_zero"] = bool(r["encoder_grad_variance"] < rel * max(peers))
        if r["encoder_grad_zero"]:
            r["encoder_snr"] = r["encoder_snr_se"] = None


def ratio_rows(rows) -> list:
    """The `RATIOS` (name, KL term, part): that part's gradient variance under the KL term over
    k1's, per (model, checkpoint), with jackknife SEs (the ratio of the two terms' replicates
    that leave out the same group of draws)."""
    by = {(r["model"], r["checkpoint"], r["estimator"]): r for r in rows}
    out = []
    for model, ckpt in dict.fromkeys((r["model"], r["checkpoint"]) for r in rows):
        k1 = by.get((model, ckpt, "k1"))
        if k1 is None:
            continue
        row = {"model": model, "checkpoint": ckpt}
        for name, e, part in RATIOS:
            if (model, ckpt, e) not in by:
                continue
            field = f"{part}_grad_variance"
            row[name] = by[(model, ckpt, e)][field] / k1[field]
            row[f"{name}_se"] = measure.jackknife_se(by[(model, ckpt, e)]["jackknife"][field]
                                             / k1["jackknife"][field])
        out.append(row)
    return out


def run(config, workdir: str) -> dict:
    """Measures every (model, checkpoint, KL term); writes results.json, results.md, a plot."""
    workdir = report.prepare_workdir(workdir)
    key = jax.random.key(config.seed)
    rows = vae_rows(config, jax.random.fold_in(key, 0))
    rows += linear_gaussian_rows(config, jax.random.fold_in(key, 1))
    _mark_zero_gradients(rows)
    ratios = ratio_rows(rows)
    for r in rows:
        del r["jackknife"]  # Replicates of every figure: used for the ratios, not written.
    exact = {r["estimator"]: r["encoder_grad_variance"] for r in rows
             if r["checkpoint"] == "exact_posterior"}
    others = [v for e, v in exact.items() if e != "stl"]
    stl_relative = exact["stl"] / min(others) if "stl" in exact and others else None
    results = {"experiment": "gradient_variance", "rows": rows, "ratios": ratios,
               "exact_posterior_stl_relative_encoder_variance": stl_relative,
               "linear_gaussian_dtype": "float64" if config.lg_float64 else "float32",
               "batch_size": config.batch_size, "num_draws": config.num_draws}
    report.publish(workdir, results, _markdown(results, config),
                   report.markdown_table(rows, COLUMNS),
                   report.markdown_table(ratios, RATIO_COLUMNS))
    _plot(rows, workdir / "gradient_variance.png")
    return results


def _markdown(results, config) -> str:
    epochs = ", ".join(f"{k} = {_epochs(v)}" for k, v in checkpoint_epochs(config).items())
    return (
        "# Gradient variance of the ELBO under each KL term\n\n"
        f"Gradient of the negative ELBO (mean over a fixed batch of {config.batch_size}) with"
        f" respect to the encoder and the decoder parameters, {config.num_draws} independent"
        f" draws of z ~ q ({config.num_samples} per example per draw), the same keys for every"
        " KL term. `*_grad_variance` = (1/P) sum_p Var[g_p] (per-parameter variance across"
        " draws, averaged over the group's P parameters); `*_snr` = |E g| / sqrt(sum_p"
        " Var[g_p]); `encoder_grad_mean_norm` = |E g| over the draws. Where the encoder"
        " gradient is zero to rounding (variance < 1e-10 of the largest at that checkpoint) the"
        " SNR is left empty. Each estimated figure is `value ± SE`: a delete-a-group jackknife"
        f" over {min(NUM_GROUPS, config.num_draws)} groups of draws (`batch_elbo`: std of the"
        " draws' losses / sqrt(num_draws)).\n\n"
        f"VAE: `{config.vae.data.dataset}`, {config.vae.model.latents} latents, hidden"
        f" {tuple(config.vae.model.hidden)}, trained with kl={config.vae.loss.kl!r} ({epochs}).\n"
        "Linear-Gaussian: d = {d}, k = {k}, s = {s}, W = Q diag(c) with orthonormal Q so that a"
        " diagonal q can equal p(z|x) (`exact_posterior`); `perturbed_posterior` moves the"
        " encoder off it. Computed in {dtype}. At the exact posterior the expected encoder"
        " gradient is 0, so the SNR there only measures noise.\n\n".format(
            d=config.lg_obs_dim, k=len(config.lg_scales), s=config.lg_noise_std,
            dtype=results["linear_gaussian_dtype"])
        + report.markdown_table(results["rows"], COLUMNS)
        + "\n## Encoder gradient variance relative to k1 (SGVB-A)\n\n"
        "k3's figures are unstable from run to run: where q is narrower than p(z) in some"
        " dimension by a factor 2 in variance, E_q[r^2] diverges (r = p(z)/q(z)), and k3 and its"
        " gradient have infinite variance; a finite sample of draws reports a finite, noisy"
        " number.\n\n"
        "Kingma & Welling's claim: the analytic KL (SGVB-B) gives lower-variance gradients than"
        " the generic k1 estimator (SGVB-A); `analytic_over_k1` < 1 supports it. The decoder"
        " gradient does not depend on the KL term (the prior is fixed), so"
        " `decoder_analytic_over_k1` = 1. Each ratio ± its jackknife SE: both terms are"
        " measured with the same keys, and each replicate leaves out the same group of draws"
        " in both, so the SE accounts for their correlation.\n\n"
        + report.markdown_table(results["ratios"], RATIO_COLUMNS)
        + "\nSTL encoder gradient variance at the exact posterior, relative to the smallest of"
        " the other KL terms': {:.3g}.\n".format(
            results["exact_posterior_stl_relative_encoder_variance"]))


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _label(row) -> str:
    text = f"{row['model'].replace('_', '-')}\n{row['checkpoint'].replace('_', ' ')}"
    return text + (f"\n({_epochs(row['epochs'])})" if "epochs" in row else "")


def _plot(rows, path: Path):
    plt = report.pyplot()
    groups = list(dict.fromkeys((r["model"], r["checkpoint"]) for r in rows))
    estimators = list(dict.fromkeys(r["estimator"] for r in rows))
    by = {(r["model"], r["checkpoint"], r["estimator"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8))
    width = 0.8 / len(estimators)
    for ax, part in zip(axes, ("encoder", "decoder")):
        values = np.array([[by[g + (e,)][f"{part}_grad_variance"] for e in estimators]
                           for g in groups])
        positive = values[values > 0]
        visible = positive[positive > 1e-12 * positive.max()]
        floor = visible.min() / 30
        for j, e in enumerate(estimators):
            xs = np.arange(len(groups)) + (j - (len(estimators) - 1) / 2) * width
            shown = np.maximum(values[:, j], floor)
            se = [by[g + (e,)].get(f"{part}_grad_variance_se", 0.0) for g in groups]
            ax.bar(xs, shown - floor, width, bottom=floor, label=e, yerr=se, capsize=2,
                   error_kw={"lw": 0.8})
            for xi, v in zip(xs, values[:, j]):
                if v < floor:
                    ax.annotate(f"{e}: {v:.0e}\n(zero to rounding;\nbelow the axis)", (xi, floor),
                                xytext=(0, 30), textcoords="offset points", ha="center",
                                fontsize=7, color=f"C{j}",
                                bbox={"facecolor": "white", "alpha": 0.9, "edgecolor": f"C{j}"},
                                arrowprops={"arrowstyle": "->", "color": f"C{j}"})
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels([_label(by[g + (estimators[0],)]) for g in groups], fontsize=8)
        ax.set_ylabel("mean per-parameter gradient variance\n(error bars: ± jackknife SE)")
        ax.set_xlabel("model and checkpoint")
        ax.set_title(f"{part.capitalize()} gradient variance of the ELBO, by KL term"
                     + ("\n(the same for every KL term: the KL does not involve the decoder)"
                        if part == "decoder" else "\n(log scale; lower is better)"),
                     fontsize=10)
        ax.legend(title="KL term", fontsize=8)
    report.save_figure(fig, path)
