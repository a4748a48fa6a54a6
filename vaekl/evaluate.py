"""Test-set evaluation: ELBO, IWAE log-likelihood, rate, distortion, active units.

Every posterior family and prior is evaluated the same way: the ELBO with the analytic KL
where the (posterior, prior) pair has one (`vaekl.kl.terms`), k1 otherwise, and the IWAE
log-likelihood of `vaekl.bounds.iwae`.

The test set is padded to whole batches, each evaluated by one jitted call (the
same executable for every batch); the figures are means over the real
(unpadded) examples, in nats per example. With a device mesh each batch is split
over its devices (of one process or several), its size rounded up to a multiple
of their number, and the per-example figures gathered back onto every device.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vaekl import (bounds, distributed, elbo, kl, linear_gaussian, measure, models, posteriors,
                   validate)
from vaekl import progress as progress_lib
from vaekl.categorical import Categorical
from vaekl.distributions import DiagNormal

ACTIVE_UNIT_THRESHOLD = 1e-2  # Burda et al. (2015): Cov_x(E_q[u]) > 1e-2.


def _per_dim_kl(q, prior):
    """Analytic KL per latent dimension, [..., latents] (zeros unless q and p are diagonal
    Gaussians: otherwise the KL does not split over dimensions)."""
    if not (isinstance(prior, DiagNormal) and isinstance(q, DiagNormal)):
        return jnp.zeros_like(_location(q))
    return kl.analytic_per_dim(q.mean, q.log_var, prior=prior)


def _location(q):
    """E_q[z] for the Gaussians; for a flow the image of its base's mean (its mean has no
    closed form); for a categorical its probabilities flattened, [..., N * K]: what the
    active-unit count reads and the reconstructions decode."""
    if isinstance(q, posteriors.IAF):
        return q.forward(jnp.zeros_like(q.mean))[0]
    if isinstance(q, Categorical):
        return q.probs().reshape(q.logits.shape[:-2] + (-1,))
    return q.mean


def decoder_model(model: models.VAE, params) -> linear_gaussian.LinearGaussian:
    """The `LinearGaussian` that a linear Gaussian decoder and its Gaussian prior make.

    The decoder x = z W + b + noise, noise ~ N(0, diag e^(2 log_scale)), under the
    prior z ~ N(m, diag e^v) is, with z = m + e^(v/2) u and u ~ N(0, I), the model
    of `vaekl.linear_gaussian` with loadings (e^(v/2) W)^T and offset m W + b. The
    decoder's W and b are its Jacobian and its value at z = 0 (exact for an affine
    map), so no parameter is looked up by name. Only for `has_exact_marginal` models.
    """
    decode = functools.partial(model.apply, params, method=models.VAE.decode)
    zero = jnp.zeros((model.latents,), jnp.float32)
    w, b = jax.jacfwd(decode)(zero), decode(zero)  # [D, latents], [D]
    prior = model.apply(params, method=models.VAE.get_prior)
    mean = jnp.broadcast_to(jnp.asarray(prior.mean, w.dtype), zero.shape)
    log_var = jnp.broadcast_to(jnp.asarray(prior.log_var, w.dtype), zero.shape)
    log_scale = model.apply(params, method=models.VAE.noise_log_scale)
    return linear_gaussian.LinearGaussian(w=w * jnp.exp(0.5 * log_var), b=w @ mean + b,
                                          noise_std=jnp.exp(jnp.asarray(log_scale, w.dtype)))


def has_exact_marginal(model: models.VAE) -> bool:
    """Whether `decoder_model` applies: a linear Gaussian decoder and a Gaussian prior."""
    return (model.kind == "mlp" and not tuple(model.hidden) and model.likelihood == "gaussian"
            and models.PRIORS[model.prior] is DiagNormal)


def check_eval_config(config) -> None:
    """Raises one error naming the first bad field of `config.eval` (called by
    `vaekl.config.check`, before any data loads; `vaekl.train.load_data` refuses more
    `eval_examples` than the test split has, once it is loaded).

    Raises:
      ValueError (TypeError for a count that is no int): `config.eval.<field> ...`.
    """
    for field in ("eval_importance_samples", "eval_examples"):
        validate.config_int(config, f"eval.{field}", minimum=0)


class Evaluator:
    """Evaluates parameters (of one seed, or stacked over seeds) on a test set."""

    def __init__(self, model: models.VAE, config, test_data, keys, *, vmapped: bool,
                 mesh: jax.sharding.Mesh | None = None):
        self._model, self._config, self._keys, self._vmapped = model, config, keys, vmapped
        self._mesh = mesh
        devices = 1 if mesh is None else mesh.size
        batch = -(-min(config.eval.eval_batch_size, len(test_data)) // devices) * devices
        num_batches = -(-len(test_data) // batch)
        pad = num_batches * batch - len(test_data)
        x = np.concatenate([test_data.x, np.zeros((pad, test_data.dim), np.float32)])
        self._x = x.reshape(num_batches, batch, test_data.dim)
        self._n = len(test_data)
        self._exact = None
        if test_data.model is not None:
            self._exact = float(np.mean(linear_gaussian.log_marginal(test_data.model,
                                                                     test_data.x)))
        self._shape = tuple(test_data.shape)
        self._likelihood = model.likelihood

    @functools.lru_cache(maxsize=4)
    def _batch_fn(self, importance_samples: int):
        """A jitted (params, x [B, D], key) -> per-example figures, vmapped over seeds."""
        model, config = self._model, self._config

        def one_batch(params, x, key):
            q = model.apply(params, x, method=models.VAE.encode_posterior)
            prior = model.apply(params, method=models.VAE.get_prior)
            log_lik = functools.partial(model.apply, params, x,
                                        method=models.VAE.log_likelihood)
            closed = "analytic" in kl.terms(type(q), type(prior))
            k_elbo, k_iwae = jax.random.split(key)
            bound = elbo.elbo(k_elbo, q, log_lik, prior, kl="analytic" if closed else "k1",
                              num_samples=config.eval.eval_elbo_samples)
            out = {"elbo": bound.elbo, "rate": bound.rate, "distortion": bound.distortion,
                   "mean": _location(q), "per_dim_kl": _per_dim_kl(q, prior)}
            if has_exact_marginal(model):
                out["model_log_likelihood"] = linear_gaussian.log_marginal(
                    decoder_model(model, params), x)
            if importance_samples:
                out["log_likelihood"] = bounds.iwae(
                    k_iwae, q, log_lik, prior, num_samples=importance_samples,
                    chunk_size=config.eval.eval_chunk_size)
            return out

        if self._vmapped:
            one_batch = jax.vmap(one_batch, in_axes=(0, None, 0))
        return jax.jit(one_batch, out_shardings=distributed.replicated(self._mesh))

    def per_example(self, params, importance_samples: int, stop=None) -> dict:
        """Figures per test example, [N, ...] (or [seeds, N, ...]), as NumPy arrays.

        A Python loop over test batches, one device call each: memory stays that
        of one batch (with `eval_chunk_size` importance samples at a time). Progress
        is logged once it has taken 5 s; `stop()`, if given, is called after each batch
        (it raises to abandon the evaluation).
        """
        fn = self._batch_fn(importance_samples)
        num_batches = self._x.shape[0]
        split = functools.partial(jax.random.split, num=num_batches)
        keys = (jax.vmap(split)(self._keys["eval"]) if self._vmapped
                else split(self._keys["eval"]))
        axis = 1 if self._vmapped else 0
        what = f"eval (IWAE-{importance_samples})" if importance_samples else "eval"
        progress = progress_lib.Progress(what, num_batches, unit="batches", quiet_s=5.0)
        outs = []
        for i in range(num_batches):
            # Fetching each batch before the next is dispatched keeps one batch in flight.
            x = distributed.shard_batch(self._x[i], self._mesh)
            outs.append(jax.tree.map(np.asarray, fn(params, x, keys[:, i] if self._vmapped
                                                    else keys[i])))
            progress.advance(1)
            if stop is not None:
                stop()
        return {k: np.concatenate([o[k] for o in outs], axis).take(np.arange(self._n), axis)
                for k in outs[0]}

    def summary(self, params, *, importance_samples: int, stop=None) -> dict:
        """Scalars (lists over seeds when vmapped): test ELBO, rate, distortion, ...

        `importance_samples` = 0 skips the IWAE estimate; `stop` as in `per_example`.
        """
        return summarize(self.per_example(params, importance_samples, stop))

    def results(self, summary: dict, num_seeds: int) -> dict:
        """The results.json figures: scalars, plus a per-seed list when vmapped.

        With several seeds, each figure is the mean over the seeds, `<figure>_std` their
        sample std (ddof 1, `vaekl.measure.seed_summary`) and `seeds` the per-seed figures.
        """
        evaluation = self._config.eval
        extra = {"eval_importance_samples": evaluation.eval_importance_samples,
                 "eval_elbo_samples": evaluation.eval_elbo_samples, "test_examples": self._n}
        if self._exact is not None:
            # Exact log p(x) under the model that generated the data.
            extra["exact_test_log_likelihood"] = self._exact
        if num_seeds == 1:
            return {**summary, **extra}
        seeds = [{k: v[s] for k, v in summary.items()} | {"seed": self._config.train.seed + s}
                 for s in range(num_seeds)]
        means = {k: float(np.mean(v)) for k, v in summary.items() if k != "per_dim_kl"}
        # The sample std over the seeds (ddof 1); an SE gets its mean, not its spread.
        stds = {f"{k}_std": measure.seed_summary(v).std for k, v in summary.items()
                if k != "per_dim_kl" and not k.endswith("_se")}
        return {**means, **stds, **extra, "seeds": seeds}

    def write_images(self, workdir: Path, params, keys, *, epoch: int, step: int,
                     test_elbo) -> dict:
        """reconstructions.png (test images over their reconstructions) and samples.png.

        Each is titled with the data set, `epoch`, `step` and `test_elbo` (the
        summary's; of the first seed, whose images these are, when vmapped) and
        says what its rows are. Returns the two grids [rows * (H + 1), cols * (W + 1)]
        of grey values in [0, 1], by name, for TensorBoard.
        """
        if self._vmapped:
            params, keys = jax.tree.map(lambda v: v[0], (params, keys))
            test_elbo = test_elbo[0]
        model = self._model
        x = self._x.reshape(-1, self._x.shape[-1])[:16]
        # Decoded at q's location (the active units' `_location`), in z's shape.
        mean = _location(model.apply(params, x, method=models.VAE.encode_posterior))
        mean = mean.reshape(mean.shape[:1] + models.latent_shape(model))
        recon = self._mean_image(model.apply(params, mean, method=models.VAE.decode))
        prior = model.apply(params, method=models.VAE.get_prior)
        z_key = jax.random.fold_in(keys["eval"], 1)
        if isinstance(prior, DiagNormal):  # The standard normal's fields are scalars.
            prior = DiagNormal(*(jnp.broadcast_to(jnp.asarray(a, jnp.float32),
                                                  (self._config.model.latents,)) for a in prior))
        z, _ = prior.sample_and_log_prob(seed=z_key, sample_shape=(64,))
        samples = self._mean_image(model.apply(params, z, method=models.VAE.decode))
        when = (f"{self._config.data.dataset}, epoch {epoch} (step {step}),"
                f" seed {self._config.train.seed}:"
                f" test ELBO {float(test_elbo):.2f} nats per example")
        shape = self._shape[:2]
        _save_grid(workdir / "reconstructions.png", np.concatenate([x, recon]), shape, 16,
                   f"{when}\ntop: {len(x)} test images; bottom: their reconstructions"
                   " (decoder mean at q's mean, or its probabilities)",
                   ("test images", "reconstructions"))
        _save_grid(workdir / "samples.png", np.asarray(samples), shape, 8,
                   f"{when}\n{len(samples)} samples: decoder means at z drawn from the prior")
        return {name: _grid(np.asarray(images).reshape((-1,) + shape), cols)
                for name, images, cols in (("reconstructions", np.concatenate([x, recon]), 16),
                                           ("samples", samples, 8))}

    def _mean_image(self, out):
        return jax.nn.sigmoid(out) if self._likelihood == "bernoulli" else out


def summarize(out: dict) -> dict:
    """The summary's scalars (lists over seeds) from `Evaluator.per_example`'s arrays."""
    figures = {
        "test_elbo": out["elbo"].mean(-1),
        "test_rate": out["rate"].mean(-1),
        "test_distortion": out["distortion"].mean(-1),
        "active_units": np.sum(out["mean"].var(-2) > ACTIVE_UNIT_THRESHOLD, axis=-1),
        "per_dim_kl": out["per_dim_kl"].mean(-2),
    }
    if "log_likelihood" in out:
        figures["test_log_likelihood"] = out["log_likelihood"].mean(-1)
    # Standard errors over the test examples (their spread, not the seeds').
    for name, key in (("test_elbo", "elbo"), ("test_log_likelihood", "log_likelihood")):
        if key in out:
            figures[f"{name}_se"] = out[key].std(-1, ddof=1) / np.sqrt(out[key].shape[-1])
    if "model_log_likelihood" in out:
        # Exact log p_theta(x) under the trained (linear) model: what IWAE estimates.
        figures["test_model_log_likelihood"] = out["model_log_likelihood"].mean(-1)
    return {k: v.tolist() for k, v in figures.items()}


def _save_grid(path: Path, images, shape, cols: int, title: str, row_labels=()) -> None:
    """Writes images [N, H * W] (values in [0, 1]) as a titled grid of `cols` columns, with
    `row_labels` beside the first rows. Uses matplotlib's Figure, not pyplot, so that a
    notebook's backend is left alone."""
    from matplotlib.figure import Figure

    h = shape[0]
    grid = _grid(np.clip(np.asarray(images).reshape((-1,) + tuple(shape)), 0, 1), cols)
    width = 9.0 if cols > 8 else 5.5
    fig = Figure(figsize=(width, width * grid.shape[0] / grid.shape[1] + 0.6))
    ax = fig.subplots()
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(i + 0.5) * (h + 1) for i in range(len(row_labels))], list(row_labels),
                  fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _grid(images: np.ndarray, cols: int) -> np.ndarray:
    """[N, H, W] -> one [rows*(H+1), cols*(W+1)] image with 1-pixel gaps."""
    n, h, w = images.shape
    rows = -(-n // cols)
    grid = np.ones((rows * (h + 1), cols * (w + 1)), np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = img
    return grid


def write_learning_curve(rows: list[dict], path: Path, *, title: str) -> None:
    """A PNG of the train ELBO against the step, with the eval figures as points.

    Args:
      rows: metrics.jsonl rows (`workdir.read_metrics`); a figure that is a list holds
        one value per seed, each drawn.
      path: the PNG to write.
      title: the figure's title (data set, KL term, epochs).
    """
    from matplotlib.figure import Figure  # No pyplot: no global backend for a notebook to lose.

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for split, field, style in (("train", "elbo", dict(lw=1, label="train ELBO (window mean)")),
                                ("eval", "test_elbo", dict(marker="o", ls="", label="test ELBO")),
                                ("eval", "test_log_likelihood",
                                 dict(marker="^", ls="", label="test log p(x), IWAE"))):
        points = [(r["step"], np.atleast_1d(r[field])) for r in rows
                  if r["split"] == split and field in r]
        if points:
            steps = [p[0] for p in points]
            values = np.array([p[1] for p in points], np.float64)  # [points, seeds]
            lines = ax.plot(steps, values, **style)
            for extra in lines[1:]:
                extra.set_label("_nolegend_")  # One legend entry for all seeds.
                extra.set_color(lines[0].get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel("nats per example (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
