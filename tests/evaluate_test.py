"""vaekl.evaluate: the summary's figures from per-example values, and the exact marginal of a
linear Gaussian decoder, against NumPy and SciPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from vaekl import evaluate, linear_gaussian, models


@pytest.mark.parametrize("lead", [(), (3,)])  # One seed, or three vmapped.
def test_summary_figures_are_the_test_set_means_and_their_standard_errors(lead):
    rng = np.random.default_rng(0)
    n, latents = 50, 4
    out = {"elbo": rng.normal(-90.0, 5.0, lead + (n,)), "rate": rng.gamma(3.0, size=lead + (n,)),
           "distortion": rng.normal(60.0, 4.0, lead + (n,)),
           # Unit 0 never moves (inactive), unit 1 barely, 2 and 3 do.
           "mean": rng.normal(size=lead + (n, latents)) * np.array([0.0, 0.05, 1.0, 2.0]),
           "per_dim_kl": rng.gamma(2.0, size=lead + (n, latents)),
           "log_likelihood": rng.normal(-85.0, 5.0, lead + (n,))}
    got = evaluate.summarize(out)
    np.testing.assert_allclose(got["test_elbo"], out["elbo"].mean(-1), rtol=1e-12)
    np.testing.assert_allclose(got["test_log_likelihood"], out["log_likelihood"].mean(-1),
                               rtol=1e-12)
    np.testing.assert_allclose(got["per_dim_kl"], out["per_dim_kl"].mean(-2), rtol=1e-12)
    # Standard errors over the test examples: the sample std (ddof 1) over sqrt(n).
    for name, key in (("test_elbo", "elbo"), ("test_log_likelihood", "log_likelihood")):
        x = out[key].reshape(-1, n)
        expected = [np.sqrt(np.sum((r - r.mean()) ** 2) / (n - 1) / n) for r in x]
        np.testing.assert_allclose(np.reshape(got[f"{name}_se"], -1), expected, rtol=1e-12)
    # Active units: Cov_x E_q z above 1e-2 (unit 1's variance is about 0.0025).
    np.testing.assert_array_equal(got["active_units"], np.full(lead, 2))
    assert "test_model_log_likelihood" not in got


@pytest.mark.parametrize("prior,fixed_log_scale", [("standard", None), ("learned", None),
                                                   ("learned", -0.3)])
def test_exact_marginal_of_a_linear_decoder_matches_scipy(prior, fixed_log_scale):
    """evaluate.decoder_model: log p_theta(x) of a linear Gaussian VAE, against SciPy."""
    vae = models.VAE(latents=3, data_dim=5, hidden=(), likelihood="gaussian", prior=prior,
                     fixed_log_scale=fixed_log_scale)
    params = vae.init(jax.random.key(0), jnp.zeros((1, 5)), jnp.zeros((1, 3)))
    # Moved off the initialisation, so that the prior and the noise scale are not 0.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [v + 0.3 * jax.random.normal(k, v.shape)
                                       for v, k in zip(leaves, keys)])
    p = jax.tree.map(np.float64, params)["params"]
    kernel, bias = p["dec_net"]["out"]["kernel"], p["dec_net"]["out"]["bias"]  # [3, 5], [5]
    mean, log_var = (p["prior_mean"], p["prior_log_var"]) if prior == "learned" else (0.0, 0.0)
    log_scale = p["log_scale"] if fixed_log_scale is None else np.full(5, fixed_log_scale)
    cov = kernel.T @ np.diag(np.broadcast_to(np.exp(log_var), 3)) @ kernel \
        + np.diag(np.exp(2 * log_scale))
    x = np.random.default_rng(2).standard_normal((7, 5))
    expected = scipy.stats.multivariate_normal(np.broadcast_to(mean, 3) @ kernel + bias,
                                               cov).logpdf(x)
    got = linear_gaussian.log_marginal(evaluate.decoder_model(vae, params), x)
    assert evaluate.has_exact_marginal(vae)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
