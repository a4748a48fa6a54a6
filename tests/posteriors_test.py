"""Tests of the posterior families: the flow's density, the full-covariance Gaussian, the
VampPrior, and every KL term of `vaekl.elbo.elbo` for every family against references in value
and gradient."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorflow_probability.substrates import jax as tfp

from vaekl import bounds, elbo, kl, models, posteriors
from vaekl.distributions import STANDARD_NORMAL, DiagNormal, FullNormal, MixtureOfGaussians

tfd = tfp.distributions


def make_iaf(dim, *, steps=2, hidden=(8,), context=3, batch=(4,), seed=0, dtype=jnp.float32,
             scale=1.0):
    """An IAF with random parameters; `scale` multiplies the MADE kernels (far from identity)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    params = posteriors.init_iaf(keys[0], dim, hidden, steps, context, dtype)
    params = jax.tree.map(lambda a: a * scale if a.ndim == 2 else a, params)
    mean = 0.3 * jax.random.normal(keys[1], batch + (dim,), dtype)
    log_var = -0.3 + 0.2 * jax.random.normal(keys[2], batch + (dim,), dtype)
    ctx = jax.random.normal(keys[3], batch + (context,), dtype)
    return posteriors.IAF(mean, log_var, ctx, params)


def make_full(dim, batch=(4,), seed=0, dtype=jnp.float32, log_var=-0.4):
    keys = jax.random.split(jax.random.key(seed), 3)
    mean = 0.5 * jax.random.normal(keys[0], batch + (dim,), dtype)
    log_var = log_var + 0.3 * jax.random.normal(keys[1], batch + (dim,), dtype)
    off = 0.3 * jax.random.normal(keys[2], batch + (dim * (dim - 1) // 2,), dtype)
    return FullNormal.from_encoder(mean, log_var, off)


# --- The flow. ---

@pytest.mark.parametrize("dtype, tol, scale", [(jnp.float32, 2e-4, 1.0), (jnp.float64, 1e-10, 1.5)])
def test_iaf_log_q_is_the_change_of_variables_density(dtype, tol, scale):
    """log q(z) = log N(eps) - log |det dz/deps|, the Jacobian by jax.jacfwd.

    In float32 the flow is kept mild: where a step's sigma is tiny (log-det -20), z no
    longer determines eps to float32 precision, nor do the Jacobian's entries its determinant.
    """
    with jax.enable_x64(dtype == jnp.float64):
        q = make_iaf(3, steps=3, batch=(5,), dtype=dtype, scale=scale)
        eps = jax.random.normal(jax.random.key(1), (5, 3), dtype)
        z, log_det = q.forward(eps)
        jac = jax.vmap(jax.jacfwd(lambda e, i: q._replace(
            mean=q.mean[i], log_var=q.log_var[i], context=q.context[i]).forward(e)[0]))(
                eps, jnp.arange(5))
        sign, direct = np.linalg.slogdet(np.asarray(jac, np.float64))
        assert np.all(sign > 0)
        np.testing.assert_allclose(log_det, direct, atol=tol, rtol=tol)
        # sample() and log_prob() (the inverse flow) agree with the same density.
        z_s, log_q = q.sample_and_log_prob(seed=jax.random.key(2), sample_shape=(7,))
        np.testing.assert_allclose(q.log_prob(z_s), log_q, atol=50 * tol, rtol=50 * tol)
        want = STANDARD_NORMAL.log_prob(eps) - direct
        np.testing.assert_allclose(q.log_prob(z), want, atol=50 * tol, rtol=50 * tol)


def test_each_made_output_depends_only_on_earlier_latents():
    """m_d and s_d depend on the latents before d in the step's order (reversed on odd steps)."""
    q = make_iaf(4, steps=2, batch=())
    z = jax.random.normal(jax.random.key(3), (4,))
    for t, order in ((0, [0, 1, 2, 3]), (1, [3, 2, 1, 0])):
        for out in (0, 1):
            jac = np.asarray(jax.jacfwd(lambda v: q._shift_scale(t, v)[out])(z))
            rank = np.argsort(order)  # position of each latent in the order
            allowed = rank[None, :] < rank[:, None]
            assert np.all(jac[~allowed] == 0)
            assert np.all(jac[allowed] != 0)


def test_iaf_density_integrates_to_one():
    """On a 2-d grid: the inverted-flow density sums to 1."""
    q = make_iaf(2, steps=2, batch=(), scale=1.5)
    q = q._replace(mean=jnp.zeros(2), log_var=jnp.zeros(2))
    grid = jnp.linspace(-9.0, 9.0, 361)
    z = jnp.stack(jnp.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    mass = jnp.sum(jnp.exp(jax.jit(q.log_prob)(z))) * (grid[1] - grid[0]) ** 2
    assert abs(float(mass) - 1.0) < 2e-3


def test_iaf_log_prob_has_no_nan_where_the_inverse_is_well_conditioned():
    """Audit (issue 22): the inversion updated every coordinate at every pass, so those not yet
    fixed jumped far away, 1/sigmoid(s) overflowed and the masked layers made inf * 0 = NaN:
    149 of these 1000 values (float64, one step, dim 10, kernels x3), and the float32 STL
    rate of 81 of 100 examples at the default size with kernels x2. Pass p now sets only the
    coordinates of degree p."""
    with jax.enable_x64(True):
        steps = posteriors.init_iaf(jax.random.key(0), 10, (32,), 1, 0, jnp.float64)
        steps = jax.tree.map(lambda a: 3 * a if a.ndim == 2 else a, steps)
        q = posteriors.IAF(jnp.zeros(10), jnp.zeros(10), jnp.zeros((0,)), steps)
        z, log_q = q.sample_and_log_prob(seed=jax.random.key(1), sample_shape=(1000,))
        got = np.asarray(jax.jit(q.log_prob)(z))
        assert not np.any(np.isnan(got))
        # Well conditioned: every sigma of the step >= e^-6 (the base is N(0, I): z_0 = eps).
        _, s = q._shift_scale(0, jax.random.normal(jax.random.key(1), (1000, 10), jnp.float64))
        good = np.asarray(jnp.min(jax.nn.log_sigmoid(s), axis=-1)) >= -6.0
        assert good.sum() > 850
        np.testing.assert_allclose(got[good], np.asarray(log_q)[good], rtol=0, atol=1e-9)
    q = make_iaf(20, hidden=(320,), context=20, batch=(100,), seed=2, scale=2.0)
    rate = jax.jit(lambda q: elbo.elbo(jax.random.key(3), q, lambda z: jnp.zeros(z.shape[:-1]),
                                       kl="stl").rate)(q)
    assert np.isfinite(np.asarray(rate)).sum() >= 95


def test_init_iaf_needs_a_hidden_layer():
    with pytest.raises(ValueError, match="hidden"):
        posteriors.init_iaf(jax.random.key(0), 3, (), 2, 0)


# --- The full-covariance Gaussian. ---

@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.float64, 1e-12)])
def test_full_gaussian_matches_tfp(dtype, tol):
    with jax.enable_x64(dtype == jnp.float64):
        q = make_full(4, dtype=dtype)
        ref = tfd.MultivariateNormalTriL(q.mean, q.scale_tril)
        z, log_q = q.sample_and_log_prob(seed=jax.random.key(0), sample_shape=(6,))
        np.testing.assert_allclose(log_q, ref.log_prob(z), rtol=tol, atol=tol)
        np.testing.assert_allclose(q.log_prob(z), ref.log_prob(z), rtol=tol, atol=tol)
        np.testing.assert_allclose(q.entropy(), ref.entropy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(np.exp(q.diagonal().log_var), ref.variance(), rtol=tol)
        for prior in (STANDARD_NORMAL, DiagNormal(jnp.asarray([0.1, -0.2, 0.3, 0.0], dtype),
                                                  jnp.asarray([0.2, -0.5, 0.0, 0.4], dtype))):
            p = tfd.MultivariateNormalDiag(jnp.broadcast_to(prior.mean, (4,)).astype(dtype),
                                           jnp.exp(0.5 * jnp.broadcast_to(prior.log_var, (4,)))
                                           .astype(dtype))
            np.testing.assert_allclose(kl.divergence(q, prior),
                                       tfd.kl_divergence(ref, p), rtol=10 * tol, atol=10 * tol)


def test_full_gaussian_without_correlations_is_the_diagonal_one():
    """Zero off-diagonal entries: the same draws and every KL term the same as the diagonal
    Gaussian's."""
    mean = jnp.asarray([[0.3, -0.2, 0.1]])
    log_var = jnp.asarray([[-0.5, 0.2, -1.0]])
    full = FullNormal.from_encoder(mean, log_var, jnp.zeros((1, 3)))
    prior = DiagNormal(0.2, -0.3)
    log_lik = lambda z: -jnp.sum(jnp.square(z - 0.5), -1)  # noqa: E731
    key = jax.random.key(4)
    assert kl.terms(FullNormal, DiagNormal) == kl.terms(DiagNormal, DiagNormal)
    for term in kl.terms(DiagNormal, DiagNormal):
        got = elbo.elbo(key, full, log_lik, prior, kl=term, num_samples=5)
        want = elbo.elbo(key, DiagNormal(mean, log_var), log_lik, prior, kl=term, num_samples=5)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


# --- The VampPrior. ---

def test_vamp_prior_is_the_uniform_mixture_of_the_encoders_posteriors():
    model = models.VAE(latents=3, data_dim=6, hidden=(8,), prior="vamp", num_pseudo_inputs=5)
    params = model.init(jax.random.key(0), jnp.zeros((1, 6)), jnp.zeros((1, 3)))
    prior = model.apply(params, method=models.VAE.get_prior)
    assert isinstance(prior, MixtureOfGaussians)
    u = params["params"]["pseudo_inputs"]
    mean, log_var = (np.asarray(a, np.float64) for a in model.apply(params, u,
                                                                    method=models.VAE.encode))
    z = np.asarray(jax.random.normal(jax.random.key(1), (7, 3)), np.float64)
    # Direct: log (1/K) sum_k prod_d N(z_d; m_kd, e^v_kd), in float64 NumPy.
    dens = np.prod(np.exp(-0.5 * (z[:, None] - mean) ** 2 / np.exp(log_var))
                   / np.sqrt(2 * np.pi * np.exp(log_var)), axis=-1)
    np.testing.assert_allclose(prior.log_prob(jnp.asarray(z, jnp.float32)),
                               np.log(dens.mean(-1)), rtol=1e-5, atol=1e-5)


def test_variational_kl_is_the_exact_kl_for_one_component_and_hershey_olsen_for_more():
    q_diag = DiagNormal(jnp.asarray([0.2, -0.1]), jnp.asarray([-0.3, 0.1]))
    q_full = make_full(2, batch=())
    one = MixtureOfGaussians(jnp.zeros(1), jnp.asarray([[0.5, 0.1]]), jnp.asarray([[0.2, -0.4]]))
    for q in (q_diag, q_full):
        exact = kl.divergence(q, DiagNormal(one.means[0], one.log_vars[0]))
        np.testing.assert_allclose(kl.variational_kl(q, one), exact, rtol=1e-6)
    mix = MixtureOfGaussians(jnp.asarray([0.0, 1.0, -0.5]),
                             jnp.asarray([[0.5, 0.1], [-1.0, 0.3], [0.0, 0.0]]),
                             jnp.asarray([[0.2, -0.4], [0.0, 0.0], [-1.0, 0.5]]))
    ref = tfd.MultivariateNormalTriL(q_full.mean, q_full.scale_tril)
    kls = np.array([tfd.kl_divergence(ref, tfd.MultivariateNormalDiag(m, jnp.exp(0.5 * v)))
                    for m, v in zip(mix.means, mix.log_vars)], np.float64)
    w = np.exp(mix.logits) / np.exp(mix.logits).sum()
    np.testing.assert_allclose(kl.variational_kl(q_full, mix),
                               -np.log(np.sum(w * np.exp(-kls))), rtol=1e-5)


# --- Every KL term against a grid reference, in value and gradient. ---

GRID = jnp.linspace(-8.0, 8.0, 321)
PRIORS = {"standard": STANDARD_NORMAL,
          "mixture": MixtureOfGaussians(jnp.asarray([0.0, 0.5]),
                                        jnp.asarray([[0.6, -0.3], [-0.5, 0.4]]),
                                        jnp.asarray([[-0.2, -0.1], [0.0, -0.3]]))}


def _posterior(family):
    """A 2-d q about as broad as the priors, so that k3 and its gradient have finite variance."""
    if family == "diag":
        return DiagNormal(jnp.asarray([0.3, -0.2]), jnp.asarray([-0.1, 0.1]))
    if family == "full":
        return make_full(2, batch=(), seed=5, log_var=0.1)
    q = make_iaf(2, steps=2, batch=(), seed=6)
    return q._replace(log_var=q.log_var + 0.6)


def _grid_kl(q, prior):
    """KL(q || p) = sum over a 2-d grid of q (log q - log p) dz (q by `log_prob`)."""
    z = jnp.stack(jnp.meshgrid(GRID, GRID, indexing="ij"), -1).reshape(-1, 2)
    log_q = q.log_prob(z)
    return jnp.sum(jnp.exp(log_q) * (log_q - prior.log_prob(z))) * (GRID[1] - GRID[0]) ** 2


CASES = [(f, p, t) for f in posteriors.FAMILIES for p in PRIORS
         for t in kl.terms(posteriors.FAMILIES[f], type(PRIORS[p]))
         if f != "categorical"]  # Discrete: its terms are tests/categorical_test.py's.


@pytest.mark.parametrize("family, prior_name, term", CASES)
def test_kl_term_mean_and_gradient_match_the_reference(family, prior_name, term):
    """The mean of each term over many draws, and its gradient in q's parameters, match the
    KL by quadrature on a grid (within 6 Monte Carlo standard errors from 32 batches)."""
    q, prior = _posterior(family), PRIORS[prior_name]
    ref_value, ref_grad = jax.value_and_grad(_grid_kl)(q, prior)
    zero = lambda z: jnp.zeros(z.shape[:-1])  # noqa: E731

    @jax.jit
    def batch(key):
        return jax.value_and_grad(lambda q: elbo.elbo(
            key, q, zero, prior, kl=term, num_samples=20_000).rate)(q)

    values, grads = jax.lax.map(batch, jax.random.split(jax.random.key(7), 32))
    for got, want in [(values, ref_value)] + list(zip(jax.tree.leaves(grads),
                                                      jax.tree.leaves(ref_grad))):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        se = got.std(0, ddof=1) / math.sqrt(got.shape[0])
        assert np.all(np.abs(got.mean(0) - want) <= 6 * se + 1e-4 + 1e-3 * np.abs(want)), (
            term, got.mean(0), want, se)


@pytest.mark.parametrize("family, prior_name", [("iaf", "standard"), ("iaf", "mixture"),
                                                 ("diag", "mixture"), ("full", "mixture")])
def test_a_term_the_pair_has_not_is_refused_naming_the_pair(family, prior_name):
    q, prior = _posterior(family), PRIORS[prior_name]
    terms = kl.terms(type(q), type(prior))
    pair = f"KL({type(q).__name__} || {type(prior).__name__})"
    for bad in {"analytic", "entropy"} - set(terms):
        with pytest.raises(ValueError, match="no closed form|entropy in closed form") as info:
            elbo.elbo(jax.random.key(0), q, lambda z: z[..., 0], prior, kl=bad)
        assert pair in str(info.value) and str(terms) in str(info.value)
    if "analytic" not in terms:  # The closed form itself refuses the pair alike.
        with pytest.raises(ValueError, match="divergence: the KL has no closed form") as info:
            kl.divergence(q, prior)
        assert pair in str(info.value) and str(terms) in str(info.value)


def test_elbo_refuses_a_q_that_is_not_a_distribution():
    with pytest.raises(TypeError, match="`q`"):
        elbo.elbo(jax.random.key(0), (jnp.zeros(2), jnp.zeros(2)), lambda z: z[..., 0])


def test_iwae_of_the_exact_posterior_is_the_evidence():
    """p(z) = N(0, 1), p(x|z) = N(x; z, 1) in 2-d, q = the exact posterior N(x/2, 1/2) as a
    FullNormal and as an identity-like IAF: every importance weight equals p(x)."""
    x = jnp.asarray([[0.4, -1.0]])
    log_lik = lambda z: -0.5 * jnp.sum(jnp.square(x - z) + math.log(2 * math.pi), -1)  # noqa
    evidence = tfd.MultivariateNormalDiag(jnp.zeros(2), jnp.full(2, math.sqrt(2.0))).log_prob(x)
    full = FullNormal.from_encoder(x / 2, jnp.full((1, 2), math.log(0.5)), jnp.zeros((1, 1)))
    identity = make_iaf(2, batch=(1,))
    identity = identity._replace(
        mean=full.mean, log_var=jnp.full((1, 2), math.log(0.5)),
        steps=jax.tree.map(jnp.zeros_like, identity.steps))
    identity = identity._replace(steps=tuple(dict(s, scale={"kernel": s["scale"]["kernel"],
                                                            "bias": jnp.full(2, 40.0)})
                                             for s in identity.steps))
    for q in (full, identity):
        np.testing.assert_allclose(bounds.iwae(jax.random.key(0), q, log_lik, num_samples=30),
                                   evidence, rtol=1e-5)
