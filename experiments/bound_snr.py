"""Gradient SNR of the IWAE bound against K, per network and estimator (Rainforth et al. 2018).

For a fixed batch and fixed parameters the gradient of the IWAE-K bound
(`vaekl.bounds.objective`) is drawn `num_draws` times (vmapped, in chunks) under
each encoder-gradient estimator (reparam, stl, dreg), with the same keys for
each, and reported per network (encoder, decoder):

  snr_median  the median over the network's parameters of |E g_p| / std g_p
  snr         |E g| / sqrt(sum_p Var g_p), the whole vector's (`vaekl.measure.snr`)
  snr_floor   1/sqrt(num_draws): what |mean| / std shows for a zero-mean gradient;
              a row is `below_floor` when snr_median < 5 snr_floor, and such rows
              are left out of the fitted slopes of log snr_median on log K (K >= 10).

Models:
  gaussian_toy  Rainforth et al.'s example in float64: D = 20, p(z) = N(mu, I),
      p(x|z) = N(z, I), q(z|x) = N(A x + b, 2/3 I). The decoder parameter is mu; the
      encoder's A and b are moved off their optimum A* = I/2, b* = mu/2 by draws of
      N(0, s^2) for each s in `toy_perturbations` (one checkpoint per s).
  vae           a Bernoulli VAE (`config.vae`) on its data set at initialisation
      and after `config.vae_epochs` epochs of the ELBO, trained with train.py's own
      initialisation and epoch; the fixed batch is the first test images.

Bias (`results["bias"]`): on the toy, for each K in `bias_ks`, `bias_draws` paired
draws of each estimator and of reparam with the same keys; per parameter group the
largest |t| over the group's parameters of the mean paired difference
(mean / (std / sqrt n)). DReG is unbiased for the IWAE gradient, STL-IWAE is not
for K > 1 (Tucker et al. 2018).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import report
from vaekl import bounds, measure
from vaekl.distributions import DiagNormal

COLUMNS = ("model", "checkpoint", "estimator", "num_importance", "network", "snr_median",
           "snr", "num_draws", "snr_floor", "below_floor")
FLOOR_FACTOR = 5.0
ROUNDING = 1e-10  # Paired gradient differences with a std below this are rounding.


def _iwae_loss(q_fn, log_lik_fn, prior_fn, k, estimator):
    """loss(params, key) -> minus the batch-mean IWAE-k surrogate; q_fn(params) -> q."""
    def loss(params, key):
        out = bounds.objective(key, q_fn(params), log_lik_fn(params), prior_fn(params),
                               objective="iwae", num_samples=k, grad_estimator=estimator)
        return -jnp.mean(out.bound)
    return loss


def _moments(loss, split, params, key, *, num_draws, chunk):
    """Per-parameter moments of the gradient's parts ("encoder", "decoder") over `num_draws`
    draws (`measure.draw_moments`: draw i uses fold_in(key, i))."""
    grad_fn = measure.gradient_draws(loss, split)
    m = measure.draw_moments(functools.partial(grad_fn, params), key, num_draws=num_draws,
                             chunk=chunk)
    return {part: m[part][0] for part in ("encoder", "decoder")}


def snr_figures(m, num_draws: int) -> dict:
    """SNR figures of one network's moments `m` (see the module docstring)."""
    std = np.sqrt(m.variance())
    ok = std > 0
    per_param = np.abs(m.mean[ok]) / std[ok]
    floor = 1.0 / math.sqrt(num_draws)
    median = float(np.median(per_param)) if per_param.size else None
    return {"snr_median": median, "snr": measure.snr(m), "num_draws": num_draws,
            "snr_floor": floor, "below_floor": median is None or median < FLOOR_FACTOR * floor}


def _chunk(config, k, per_draw):
    return max(1, min(config.num_draws_cap, config.chunk_elements // (k * per_draw)))


def _snr_rows(model, checkpoint, loss_for, split, params, key, config, num_draws, per_draw,
              ks):
    rows = []
    for k in ks:
        for estimator in config.estimators:
            m = _moments(loss_for(k, estimator), split, params, jax.random.fold_in(key, k),
                         num_draws=num_draws, chunk=_chunk(config, k, per_draw))
            for network in ("encoder", "decoder"):
                rows.append({"model": model, "checkpoint": checkpoint, "estimator": estimator,
                             "num_importance": k, "network": network,
                             **snr_figures(m[network], num_draws)})
        logging.info(f"bound_snr {model}/{checkpoint}: K = {k} done")
    return rows


# --- Rainforth et al.'s Gaussian example, float64. ---

def toy_problem(config, perturbation: float):
    """(params, x [N, D], mu) for one perturbation: params = {encoder: {A, b}, decoder: {mu}}."""
    rng = np.random.default_rng(config.toy_seed)
    d = config.toy_dim
    mu = rng.standard_normal(d)
    x = mu + math.sqrt(2.0) * rng.standard_normal((config.toy_num_data, d))  # p(x) = N(mu, 2I)
    noise = np.random.default_rng(config.toy_seed + 1)
    a = 0.5 * np.eye(d) + perturbation * noise.standard_normal((d, d))
    b = 0.5 * mu + perturbation * noise.standard_normal(d)
    return {"encoder": {"A": a, "b": b}, "decoder": {"mu": mu}}, x


def _toy_loss_for(x, d):
    log_var = math.log(2.0 / 3.0)

    def q_fn(p):
        mean = x @ p["encoder"]["A"].T + p["encoder"]["b"]
        return DiagNormal(mean, jnp.full_like(mean, log_var))

    def log_lik_fn(p):
        return lambda z: -0.5 * jnp.sum(jnp.square(x - z) + math.log(2 * math.pi), axis=-1)

    def prior_fn(p):
        return DiagNormal(p["decoder"]["mu"], 0.0)

    return lambda k, estimator: _iwae_loss(q_fn, log_lik_fn, prior_fn, k, estimator)


def _toy_split(g):
    """The toy's parameters are {"encoder": ..., "decoder": ...} already."""
    return g


def toy_rows(config, key) -> list:
    rows = []
    with jax.enable_x64(True):
        for i, s in enumerate(config.toy_perturbations):
            params, x = toy_problem(config, s)
            params = jax.tree.map(jnp.asarray, params)
            loss_for = _toy_loss_for(jnp.asarray(x), config.toy_dim)
            rows += _snr_rows("gaussian_toy", f"perturbation={s:g}", loss_for, _toy_split, params,
                              jax.random.fold_in(key, i), config, config.toy_draws,
                              config.toy_dim * config.toy_num_data, config.num_importance)
    return rows


def bias_rows(config, key) -> list:
    """Paired t-statistics of each estimator's mean gradient against reparam's (toy, float64)."""
    rows = []
    with jax.enable_x64(True):
        params, x = toy_problem(config, config.bias_perturbation)
        params = jax.tree.map(jnp.asarray, params)
        loss_for = _toy_loss_for(jnp.asarray(x), config.toy_dim)

        def paired(k, estimator):
            ref, est = loss_for(k, "reparam"), loss_for(k, estimator)
            return lambda p, key: est(p, key) - ref(p, key)  # Its gradient is the difference.

        for k in config.bias_ks:
            for estimator in ("stl", "dreg"):
                m = _moments(paired(k, estimator), _toy_split, params, jax.random.fold_in(key, k),
                             num_draws=config.bias_draws,
                             chunk=_chunk(config, k, config.toy_dim * config.toy_num_data))
                a = config.toy_dim**2  # The encoder's flat gradient is A's entries, then b's.
                groups = {"encoder.A": (m["encoder"], slice(0, a)),
                          "encoder.b": (m["encoder"], slice(a, None)),
                          "decoder.mu": (m["decoder"], slice(None))}
                for group, (mg, part) in groups.items():
                    mean, se = mg.mean[part], np.sqrt(mg.variance()[part] / mg.n)
                    # Gradients equal to rounding (the decoder's, and K = 1 where STL is
                    # DReG) have no t: their differences are float64 rounding, ~1e-16.
                    same = bool(np.max(se) * math.sqrt(mg.n) < ROUNDING)
                    t = None if same else float(np.max(np.abs(mean) / np.maximum(se, 1e-300)))
                    rows.append({"estimator": estimator, "num_importance": k, "group": group,
                                 "t": t, "equal_to_rounding": same, "num_params": int(mean.size),
                                 "num_draws": config.bias_draws})
            logging.info(f"bound_snr bias: K = {k} done")
    return rows


# --- A VAE on binarized MNIST (or digits for the quick run). ---

def vae_rows(config, key) -> list:
    from vaekl import models, train

    trained = f"epochs={config.vae_epochs}"
    model, _, checkpoints = measure.vae_checkpoints(
        config.vae, {"init": 0, trained: config.vae_epochs}, "bound_snr: training the VAE")
    _, test = train.load_data(config.vae)
    x = jnp.asarray(test.x[: config.vae_batch_size])

    def loss_for(k, estimator):
        return _iwae_loss(
            lambda p: model.apply(p, x, method=models.VAE.encode_posterior),
            lambda p: lambda z: model.apply(p, x, z, method=models.VAE.log_likelihood),
            lambda p: model.apply(p, method=models.VAE.get_prior), k, estimator)

    rows = []
    for i, (name, params) in enumerate(checkpoints.items()):
        rows += _snr_rows("vae", name, loss_for, models.split_params, params,
                          jax.random.fold_in(key, i), config, config.vae_draws,
                          config.vae_batch_size * (sum(config.vae.model.hidden) + x.shape[-1]),
                          config.vae_num_importance)
    return rows


def fit_slopes(rows) -> dict:
    """model/checkpoint -> estimator -> network -> slope of log snr_median on log K (K >= 10)."""
    out = {}
    groups = {}
    for r in rows:
        if r["num_importance"] >= 10 and not r["below_floor"]:
            groups.setdefault((f'{r["model"]}/{r["checkpoint"]}', r["estimator"], r["network"]),
                              []).append((r["num_importance"], r["snr_median"]))
    for (model, estimator, network), pts in groups.items():
        if len(pts) >= 2:
            k, s = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            out.setdefault(model, {}).setdefault(estimator, {})[network] = float(
                np.polyfit(k, s, 1)[0])
    return out


def run(config, workdir: str) -> dict:
    workdir = report.prepare_workdir(workdir)
    key = jax.random.key(config.seed)
    rows = toy_rows(config, jax.random.fold_in(key, 0))
    if config.vae_draws:
        rows += vae_rows(config, jax.random.fold_in(key, 1))
    results = {"experiment": "bound_snr", "rows": rows, "slopes": fit_slopes(rows),
               "bias": bias_rows(config, jax.random.fold_in(key, 2)),
               "floor_factor": FLOOR_FACTOR, "config": config.to_dict()}
    report.publish(workdir, results, markdown(results))
    plot(rows, workdir / "bound_snr.png")
    return results


def markdown(results) -> str:
    lines = ["# Gradient SNR of IWAE-K (median over parameters of |E g| / std g)\n"]
    rows = results["rows"]
    for model in dict.fromkeys(f'{r["model"]}/{r["checkpoint"]}' for r in rows):
        sub = [r for r in rows if f'{r["model"]}/{r["checkpoint"]}' == model]
        ks = sorted({r["num_importance"] for r in sub})
        lines.append(f"\n## {model} ({sub[0]['num_draws']} draws, floor "
                     f"{sub[0]['snr_floor']:.3g}; * = below {FLOOR_FACTOR:g}x floor)\n")
        lines.append("| network | estimator | " + " | ".join(f"K={k}" for k in ks)
                     + " | slope (K >= 10) |")
        lines.append("|---|---|" + "---|" * (len(ks) + 1))
        for network in ("encoder", "decoder"):
            for est in dict.fromkeys(r["estimator"] for r in sub):
                cells = []
                for k in ks:
                    r = next(r for r in sub if (r["network"], r["estimator"],
                                                r["num_importance"]) == (network, est, k))
                    cells.append(report.fmt(r["snr_median"], 3) + ("*" if r["below_floor"]
                                                                   else ""))
                slope = results["slopes"].get(model, {}).get(est, {}).get(network)
                lines.append(f"| {network} | {est} | " + " | ".join(cells)
                             + f" | {report.fmt(slope, 3) if slope is not None else '-'} |")
    lines.append("\n## Bias against reparam (max |t| over each group's parameters, paired)\n")
    lines.append(report.markdown_table(results["bias"], ("estimator", "num_importance", "group",
                                                         "t", "equal_to_rounding", "num_params",
                                                         "num_draws"), 3))
    return "\n".join(lines) + "\n"


def plot(rows, path) -> None:
    plt = report.pyplot()
    models = list(dict.fromkeys(f'{r["model"]}/{r["checkpoint"]}' for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = [r for r in rows if f'{r["model"]}/{r["checkpoint"]}' == model]
        ks = np.array(sorted({r["num_importance"] for r in sub}), float)
        for network, style in (("encoder", "-"), ("decoder", "--")):
            for est, color in zip(("reparam", "stl", "dreg"), ("C0", "C1", "C2")):
                pts = sorted((r["num_importance"], r["snr_median"]) for r in sub
                             if r["network"] == network and r["estimator"] == est
                             and r["snr_median"])
                if pts:
                    ax.loglog(*zip(*pts), style, color=color, marker="o", ms=3,
                              label=f"{network} {est}")
        mid = np.median([r["snr_median"] for r in sub if r["snr_median"]])
        for sign, ls in ((0.5, ":"), (-0.5, "-.")):
            ax.loglog(ks, mid * (ks / ks[len(ks) // 2]) ** sign, ls, color="grey", lw=1,
                      label=f"K^{sign:+g}")
        ax.axhline(sub[0]["snr_floor"] * FLOOR_FACTOR, color="k", lw=0.5)
        ax.set(title=model, xlabel="K (importance samples)", ylabel="median SNR |E g|/std g")
    axes[0][0].legend(fontsize=6)
    fig.suptitle("IWAE gradient SNR (solid: encoder, dashed: decoder; thin line: 5x floor)")
    report.save_figure(fig, path)
