"""Where the KL has no closed form: KL terms for flow posteriors, the VampPrior, full-covariance q.

For each (posterior family, prior) pair of `config.pairs` (`vaekl.posteriors`:
diag, full, iaf; priors standard, vamp, ...):

(b) training: `config.vae` trained with each KL term of `config.kls` that the
    pair allows (`vaekl.kl.terms`), `vae.train.num_seeds` seeds in one
    program, by `vaekl.train.train_and_evaluate(cfg, workdir/runs/<posterior>_<prior>_<kl>)`
    (a finished run with the same config is read, not retrained). Rows: test ELBO
    (analytic KL where the pair has one, k1 otherwise), the IWAE test
    log-likelihood with `vae.eval.eval_importance_samples` draws, active units and
    rate, over seeds (`vaekl.measure.seed_figures`): `_mean`, its standard error
    `_mean_se`, and `_std`, the sample std (ddof 1) over the `num_seeds` seeds.
(a) estimators: at the model trained with kl = `config.estimate_kl` (seed
    `vae.train.seed`), on the first `num_examples` test examples, every KL term the pair
    allows:
      kl_reference     the closed form where there is one; otherwise the mean of
                       `reference_draws` single draws of the lowest-variance unbiased
                       term ("entropy" where q's entropy is closed form, else "k1"),
                       with its standard error `reference_se`;
      bias, bias_se    mean over examples of (mean of `num_draws` single-draw
                       estimates - reference), and its Monte Carlo standard error;
      std, std_over_k1 the root-mean-square over examples of one draw's standard
                       deviation, and that over k1's (same draws for every term; "stl"
                       has k1's values and differs in its gradient only);
      encoder_grad_variance, encoder_grad_variance_over_k1
                       the per-parameter variance of the negative ELBO's gradient in
                       the encoder's weights (the flow's included) over `grad_draws`
                       draws (`vaekl.measure.gradient_figures`), for training
                       with that term.
    Every sampled figure uses `vaekl.measure.draw_moments`' key scheme (draw i:
    fold_in(key, i)); the estimator table committed before that scheme (issue 23) drew
    its keys per chunk instead, so its figures differ from a rerun's within their errors.
    Where q is Gaussian and the prior a mixture, Hershey & Olsen's variational
    approximation ("variational", closed form, not a bound) is reported beside them.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import report
from vaekl import bounds, checkpoint, elbo, kl, measure, models
from vaekl.distributions import DiagNormal, MixtureOfGaussians
from vaekl.progress import Progress

ESTIMATOR_COLUMNS = ("posterior", "prior", "kl", "kl_reference", "reference_se", "bias",
                     "bias_se", "std", "std_over_k1", "encoder_grad_variance",
                     "encoder_grad_variance_over_k1")
TRAINING_COLUMNS = ("posterior", "prior", "kl", "test_elbo_mean", "test_elbo_std",
                    "test_log_likelihood_mean", "test_log_likelihood_std",
                    "test_log_likelihood_se", "active_units_mean", "test_rate_mean", "num_seeds")


def run_name(posterior: str, prior: str, kl: str) -> str:
    return f"{posterior}_{prior}_{kl}"


def pair_terms(posterior: str, prior: str, kls) -> tuple[str, ...]:
    """The terms of `kls` that apply to the pair, in `kls`' order."""
    allowed = kl.terms(*models.pair_types(posterior, prior))
    return tuple(k for k in kls if k in allowed)


def train_config(config, posterior: str, prior: str, kl: str):
    cfg = config.vae.copy_and_resolve_references()
    cfg.model.posterior, cfg.model.prior, cfg.loss.kl = posterior, prior, kl
    return cfg


def _train_or_read(config, workdir: Path, posterior, prior, kl) -> tuple[Path, dict]:
    from vaekl import train

    sub = workdir / "runs" / run_name(posterior, prior, kl)
    cfg = train_config(config, posterior, prior, kl)
    results = measure.finished_results(sub, cfg)
    if results is None:
        results = train.train_and_evaluate(cfg, str(sub))
    return sub, results


def training_rows(config, workdir: Path) -> list:
    runs = [(posterior, prior, kl) for posterior, prior in config.pairs
            for kl in pair_terms(posterior, prior, config.kls)]
    rows = []
    for i, (posterior, prior, kl) in enumerate(runs):
        logging.info("no_closed_form: run %d/%d, %s", i + 1, len(runs),
                     run_name(posterior, prior, kl))
        sub, results = _train_or_read(config, workdir, posterior, prior, kl)
        rows.append({"posterior": posterior, "prior": prior, "kl": kl,
                     "num_seeds": results["num_seeds"], "steps": results["steps"],
                     "train_wall_s": results["train_wall_s"],
                     "test_examples": results.get("test_examples"),
                     "test_log_likelihood_se": results.get("test_log_likelihood_se"),
                     "run": str(sub.relative_to(workdir)),
                     **measure.seed_figures(results)})
    return rows


def _trained(config, workdir: Path, posterior, prior):
    """(model, train config, params of the first seed, the fixed test batch) of the pair's
    `estimate_kl` run, restored from its final checkpoint."""
    from vaekl import steps as steps_lib
    from vaekl import train

    sub, _ = _train_or_read(config, workdir, posterior, prior, config.estimate_kl)
    cfg = train_config(config, posterior, prior, config.estimate_kl)
    train_data, test_data = train.load_data(cfg)
    model = train.create_model(cfg, train_data)
    steps_per_epoch = len(train_data) // cfg.train.batch_size
    tx = train.create_optimizer(cfg, steps_per_epoch)
    keys, init, _ = steps_lib.training_fns(model, cfg, tx, data_dim=train_data.dim,
                                       steps_per_epoch=steps_per_epoch,
                                       binarize=train_data.dynamic_binarization)
    # The state's shapes only (nothing is compiled), on this process's first device.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            jax.eval_shape(init, keys))
    ckpt = checkpoint.Checkpointer(sub / "checkpoints")
    _, state = ckpt.restore_latest(template)
    ckpt.close()
    params = state.params
    if cfg.train.num_seeds > 1:
        params = jax.tree.map(lambda a: a[0], params)
    return model, cfg, params, jnp.asarray(test_data.x[: config.num_examples])


def _zero_log_likelihood(z):
    """A decoder that contributes nothing: the bound's rate is then all that is computed."""
    return jnp.zeros(z.shape[:-1], z.dtype)


def _pair_fns(model, cfg, x, terms):
    """Jitted functions of the parameters at the batch x, for the KL terms of one pair:

      draws_of(names) -> a jitted (params, keys [n]) -> {name: single-draw estimates [n, B]}
      closed_forms(params) -> {"analytic" and/or "variational": [B]} where they exist
      grads(params, keys [n]) -> {term: encoder gradients of the negative ELBO [n, P]}
    """
    from vaekl import steps as steps_lib

    def q_and_prior(params):
        return (model.apply(params, x, method=models.VAE.encode_posterior),
                model.apply(params, method=models.VAE.get_prior))

    def draws_of(names):
        @jax.jit
        def draws(params, keys):
            q, prior = q_and_prior(params)
            return jax.vmap(lambda key: {t: elbo.elbo(
                key, q, _zero_log_likelihood, prior, kl=t).rate for t in names})(keys)

        return draws

    @jax.jit
    def closed_forms(params):
        q, prior = q_and_prior(params)
        out = {"analytic": kl.divergence(q, prior)} if "analytic" in terms else {}
        if isinstance(prior, MixtureOfGaussians) and "analytic" in kl.terms(type(q), DiagNormal):
            out["variational"] = kl.variational_kl(q, prior)
        return out

    grad_fns = {}
    for t in terms:
        cfg_t = cfg.copy_and_resolve_references()
        cfg_t.loss.kl = t
        loss = steps_lib.make_loss_fn(model, cfg_t)
        grad_fns[t] = measure.gradient_draws(
            lambda prm, k, loss=loss: loss(prm, x, k, 0)[0],
            lambda g: {"encoder": models.split_params(g)["encoder"]})

    def grads(params, keys):
        return {t: fn(params, keys)["encoder"] for t, fn in grad_fns.items()}

    return draws_of, closed_forms, grads


def _moments(fn, params, key, num_draws: int, chunk: int, what: str) -> dict:
    """{name: `vaekl.measure.Moments` over `num_draws` draws} of fn(params, keys [chunk]) ->
    {name: [chunk, ...]} (`measure.draw_moments`: draw i uses fold_in(key, i)); `what` names
    the work on the progress lines."""
    progress = Progress(f"no_closed_form: {what}", num_draws, unit="draws", quiet_s=5.0)
    m = measure.draw_moments(functools.partial(fn, params), key, num_draws=num_draws,
                             chunk=chunk, progress=progress)
    return {name: groups[0] for name, groups in m.items()}


def estimator_rows(config, workdir: Path, key) -> list:
    """The rows of part (a): every KL term of every pair against its reference."""
    if config.estimate_kl not in ("k1", "k3", "stl"):
        raise ValueError(f"config.estimate_kl: expected 'k1', 'k3' or 'stl' (a term every pair"
                         f" allows), got {config.estimate_kl!r}.")
    rows = []
    for pi, (posterior, prior) in enumerate(config.pairs):
        pair = f"{posterior}_{prior}"
        logging.info("no_closed_form: KL terms, pair %d/%d, %s", pi + 1, len(config.pairs), pair)
        model, cfg, params, x = _trained(config, workdir, posterior, prior)
        keys = [jax.random.fold_in(jax.random.fold_in(key, pi), i) for i in range(3)]
        terms = kl.terms(*models.pair_types(posterior, prior))
        draws_of, closed_forms, grads = _pair_fns(model, cfg, x, terms)
        # Draws per call: about `bounds.CHUNK_ELEMENTS` latent values.
        cap = max(1, bounds.CHUNK_ELEMENTS // x.shape[0] // cfg.model.latents)
        sampled = tuple(t for t in terms if t != "analytic")
        moments = _moments(draws_of(sampled), params, keys[0], config.num_draws,
                           min(config.num_draws, cap), f"{pair} KL draws")
        fixed = {t: np.asarray(v, np.float64) for t, v in closed_forms(params).items()}
        if "analytic" in fixed:
            reference_term, reference, reference_draws = "analytic", fixed["analytic"], 0
            reference_var = np.zeros_like(reference)
        else:
            reference_term = "entropy" if "entropy" in terms else "k1"
            ref = _moments(draws_of((reference_term,)), params, keys[1], config.reference_draws,
                           min(config.reference_draws, cap),
                           f"{pair} reference draws")[reference_term]
            reference, reference_draws = ref.mean, ref.n
            reference_var = ref.variance() / ref.n
        grad_moments = _moments(grads, params, keys[2], config.grad_draws, config.grad_chunk,
                                f"{pair} gradient draws")
        summary = {"reference_term": reference_term, "kl_reference": float(np.mean(reference)),
                   "reference_se": float(np.sqrt(np.mean(reference_var) / reference.size)),
                   "reference_draws": reference_draws}
        variances = {t: m.variance() for t, m in moments.items()}
        variances.update({t: np.zeros_like(reference) for t in fixed})
        k1_grad = measure.gradient_figures(grad_moments["k1"], "encoder")[
            "encoder_grad_variance"]
        for t in list(fixed) + [t for t in terms if t in moments]:
            mean = fixed[t] if t in fixed else moments[t].mean
            draws_t = 0 if t in fixed else moments[t].n
            se2 = variances[t] / draws_t if draws_t else 0.0
            std = float(np.sqrt(np.mean(variances[t])))
            row = {"posterior": posterior, "prior": prior, "kl": t, **summary,
                   "bias": float(np.mean(mean - reference)),
                   "bias_se": float(np.sqrt(np.mean(se2 + reference_var) / reference.size)),
                   "std": std, "std_over_k1": std / float(np.sqrt(np.mean(variances["k1"]))),
                   "approximation": t == "variational", "num_draws": draws_t}
            if t in grad_moments:
                g = measure.gradient_figures(grad_moments[t], "encoder")
                row.update(encoder_grad_variance=g["encoder_grad_variance"],
                           encoder_snr=g["encoder_snr"],
                           encoder_grad_variance_over_k1=g["encoder_grad_variance"] / k1_grad)
            rows.append(row)
    return rows


def run(config, workdir: str) -> dict:
    """Trains (or reads) every run and measures the KL terms; writes results.json, results.md
    and no_closed_form.png."""
    workdir = report.prepare_workdir(workdir)
    training = training_rows(config, workdir)
    estimators = estimator_rows(config, workdir, jax.random.key(config.seed))
    cfg = config.vae
    results = {"experiment": "no_closed_form", "estimators": estimators, "training": training,
               "dataset": cfg.data.dataset, "num_epochs": cfg.train.num_epochs,
               "num_seeds": cfg.train.num_seeds,
               "eval_importance_samples": cfg.eval.eval_importance_samples,
               "estimate_kl": config.estimate_kl, "num_examples": config.num_examples}
    report.publish(workdir, results, _markdown(results, config),
                   report.markdown_table(estimators, ESTIMATOR_COLUMNS),
                   report.markdown_table(training, TRAINING_COLUMNS))
    _plot(results, workdir / "no_closed_form.png")
    return results


def _markdown(results, config) -> str:
    cfg = config.vae
    return (
        "# Where the KL has no closed form\n\n"
        f"`{cfg.data.dataset}`, {cfg.model.latents} latents, hidden {tuple(cfg.model.hidden)}"
        f" {cfg.model.activation}, batch {cfg.train.batch_size}, Adam {cfg.optim.learning_rate},"
        f" {cfg.train.num_epochs} epochs, {cfg.train.num_seeds} seeds; IAF:"
        f" {cfg.model.iaf_steps} steps, MADE hidden"
        f" {tuple(cfg.model.iaf_hidden)}, context {cfg.model.iaf_context}; VampPrior:"
        f" {cfg.model.num_pseudo_inputs} pseudo-inputs.\n\n"
        "## KL terms at a trained model\n\n"
        f"Each pair's model trained with kl={config.estimate_kl!r}; the first"
        f" {config.num_examples} test examples. `kl_reference`: the closed form where there is"
        f" one, else the mean of {config.reference_draws} draws of `reference_term`;"
        " `bias` ± `bias_se` (Monte Carlo standard error) of the term's mean against it; `std`:"
        " one draw's standard deviation (RMS over examples), and relative to k1's;"
        " `encoder_grad_variance`: the per-parameter variance of the negative ELBO's gradient"
        f" in the encoder (and flow) weights over {config.grad_draws} draws, and relative to"
        " k1's. `variational` is Hershey & Olsen's closed-form approximation (not a bound, not"
        " unbiased); `stl` has k1's values and its own gradient. k3's `bias_se` understates"
        " its error where the KL is large: E_q r = 1 is then carried by rare draws with"
        " r = p/q >> 1, which a finite sample seldom holds, so k3 reads about k1 - 1 there."
        " For a Gaussian q, `entropy` has k1's gradient (log q(z) written in eps is"
        " log N(eps) - log |det L|, whose gradient is -H(q)'s): it changes the estimate's"
        " value, not training.\n\n"
        + report.markdown_table(results["estimators"], ESTIMATOR_COLUMNS)
        + "\n## Training outcomes\n\n"
        "Test ELBO (analytic KL where the pair has one, k1 otherwise), IWAE log-likelihood"
        f" with {cfg.eval.eval_importance_samples} samples, active units (Cov_x E_q z > 0.01; for"
        " the flow the image of its base's mean) and rate, on"
        f" {'the first ' + str(cfg.eval.eval_examples) if cfg.eval.eval_examples else 'all the'}"
        f" test examples; nats per example, over the n = {cfg.train.num_seeds} seeds: a `_mean`"
        " cell is the mean ± its standard error (the `_std` over sqrt(n)), `_std` the sample"
        " std (ddof 1) over the seeds, and `test_log_likelihood_se`"
        " the standard error over the test examples (a seed's, averaged over seeds): the"
        " examples are the same in every row, so differences between rows are paired and"
        " their error is smaller.\n\n"
        + report.markdown_table(results["training"], TRAINING_COLUMNS))


def _grouped(rows):
    """The plots' layout of `rows` (dicts with posterior, prior, kl): (pairs in order of first
    appearance, terms likewise, width of one term's mark, x of (pair index i, term index j))."""
    pairs = list(dict.fromkeys((r["posterior"], r["prior"]) for r in rows))
    terms = list(dict.fromkeys(r["kl"] for r in rows))
    width = 0.8 / max(len(terms), 1)
    return pairs, terms, width, lambda i, j: i + (j - (len(terms) - 1) / 2) * width


def _plot(results, path: Path):
    plt = report.pyplot()
    est = results["estimators"]
    pairs, terms, width, x = _grouped(est)
    by = {(r["posterior"], r["prior"], r["kl"]): r for r in est}
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    labels = [f"{a}\n{b}" for a, b in pairs]
    for ax, field, title in ((axes[0], "std_over_k1", "std of one draw, relative to k1"),
                             (axes[1], "encoder_grad_variance_over_k1",
                              "encoder gradient variance, relative to k1")):
        for j, t in enumerate(terms):
            values = [by.get(pr + (t,), {}).get(field) for pr in pairs]
            shown = [v if v else np.nan for v in values]  # 0 (analytic) has no log-scale bar.
            ax.bar([x(i, j) for i in range(len(pairs))], shown, width, label=t)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(pairs)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(f"{title} (log scale; missing: zero or n/a)", fontsize=10)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.legend(title="KL term", fontsize=8)
    # Training outcomes grouped alike: a pair per tick, a KL term per colour and offset.
    rows = results["training"]
    ax = axes[2]
    train_pairs, train_terms, _, x = _grouped(rows)
    for j, t in enumerate(train_terms):
        picked = [r for r in rows if r["kl"] == t]
        xs = [x(train_pairs.index((r["posterior"], r["prior"])), j) for r in picked]
        means = [r.get("test_log_likelihood_mean", r.get("test_elbo_mean")) for r in picked]
        stds = [r.get("test_log_likelihood_std", r.get("test_elbo_std")) for r in picked]
        ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=3, label=t)
    ax.set_xticks(np.arange(len(train_pairs)))
    ax.set_xticklabels([f"{a}\n{b}" for a, b in train_pairs], fontsize=8)
    ax.legend(title="KL term", fontsize=8)
    figure = ("IWAE-%d log-likelihood" % results["eval_importance_samples"]
              if results["eval_importance_samples"] else "test ELBO")
    ax.set_ylabel(f"{figure} [nats per example]")
    ax.set_title(f"{results['dataset']}: {figure},\nmean ± sample std (ddof 1) over"
                 f" n = {results['num_seeds']} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    report.save_figure(fig, path)

