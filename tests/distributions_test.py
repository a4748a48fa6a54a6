"""Tests of vaekl.distributions: the Gaussians against TFP in float64, batch shapes, the mixture's
draws, and the path-only log q in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaekl import distributions as dist

tfd = pytest.importorskip("tensorflow_probability.substrates.jax").distributions


def _diag(dtype=jnp.float64):
    rng = np.random.default_rng(0)
    return dist.DiagNormal(jnp.asarray(rng.normal(size=(4, 3)), dtype),
                           jnp.asarray(-0.5 + 0.4 * rng.normal(size=(4, 3)), dtype))


def test_diag_normal_matches_tfp_and_draws_from_the_documented_noise():
    with jax.enable_x64(True):
        q = _diag()
        ref = tfd.MultivariateNormalDiag(q.mean, jnp.exp(0.5 * q.log_var))
        key = jax.random.key(1)
        z, log_q = q.sample_and_log_prob(seed=key, sample_shape=(5,))
        eps = jax.random.normal(key, (5, 4, 3), jnp.float64)
        np.testing.assert_array_equal(z, q.mean + jnp.exp(0.5 * q.log_var) * eps)
        np.testing.assert_allclose(log_q, ref.log_prob(z), rtol=1e-12)
        np.testing.assert_allclose(q.log_prob(z), ref.log_prob(z), rtol=1e-12)
        np.testing.assert_allclose(q.entropy(), ref.entropy(), rtol=1e-12)
        # A shared log-variance broadcasts: the same draws as the broadcast one.
        shared = dist.DiagNormal(q.mean, q.log_var[0])
        full = dist.DiagNormal(q.mean, jnp.broadcast_to(q.log_var[0], q.mean.shape))
        for a, b in zip(shared.sample_and_log_prob(seed=key, sample_shape=(2,)),
                        full.sample_and_log_prob(seed=key, sample_shape=(2,))):
            np.testing.assert_array_equal(a, b)
        assert shared.entropy().shape == (4,)


def test_full_normal_with_a_shared_factor_has_the_means_batch_shape():
    """One L [k, k] for every mean [N, k] (the linear-Gaussian posterior): [N]-shaped log q,
    entropy and marginals, as with L broadcast."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        mean = jnp.asarray(rng.normal(size=(6, 3)))
        tril = jnp.asarray(np.tril(rng.normal(size=(3, 3))) + 2 * np.eye(3))
        shared, full = dist.FullNormal(mean, tril), dist.FullNormal(
            mean, jnp.broadcast_to(tril, (6, 3, 3)))
        key = jax.random.key(3)
        for a, b in zip(shared.sample_and_log_prob(seed=key, sample_shape=(2,)),
                        full.sample_and_log_prob(seed=key, sample_shape=(2,))):
            np.testing.assert_allclose(a, b, rtol=1e-14)
        assert shared.entropy().shape == (6,)
        np.testing.assert_allclose(shared.entropy(), full.entropy(), rtol=1e-14)
        np.testing.assert_allclose(shared.covariance(), tril @ tril.T, rtol=1e-14)
        np.testing.assert_allclose(shared.diagonal().log_var,
                                   jnp.log(jnp.diagonal(full.covariance(), axis1=-2, axis2=-1)),
                                   rtol=1e-12)


def test_mixture_draws_and_their_log_prob():
    prior = dist.mixture(jax.random.key(4), 3, 2, spread=3.0, log_var=-2.0)
    z, log_p = prior.sample_and_log_prob(seed=jax.random.key(5), sample_shape=(20_000,))
    assert z.shape == (20_000, 2) and log_p.shape == (20_000,)
    np.testing.assert_array_equal(log_p, prior.log_prob(z))
    # Equal weights: the draws' mean is the components' mean (within 5 SE).
    z = np.asarray(z, np.float64)
    se = z.std(0) / np.sqrt(len(z))
    assert np.all(np.abs(z.mean(0) - np.asarray(prior.means).mean(0)) < 5 * se)
    assert not prior.reparameterized


def test_path_log_prob_keeps_the_value_and_drops_the_score():
    """Its gradient in the parameters is d log q(z(params))/d params minus the score at z."""
    with jax.enable_x64(True):
        q = _diag()
        key = jax.random.key(6)

        def path(q):
            z, log_q = q.sample_and_log_prob(seed=key, sample_shape=(3,))
            return jnp.sum(dist.path_log_prob(q, z, log_q)), jnp.sum(log_q)

        (value, log_q), grads = jax.value_and_grad(path, has_aux=True)(q)
        np.testing.assert_allclose(value, log_q, rtol=1e-14)
        # For z = m + s eps, d log q(z)/dz dz/d(m, v) with log q(z) = log N(z; m, s^2):
        # -(z - m)/s^2 * 1 = -eps/s and -(z - m)/s^2 * (z - m)/2 = -eps^2/2.
        eps = jax.random.normal(key, (3, 4, 3), jnp.float64)
        s = jnp.exp(0.5 * q.log_var)
        np.testing.assert_allclose(grads.mean, jnp.sum(-eps / s, 0), rtol=1e-12)
        np.testing.assert_allclose(grads.log_var, jnp.sum(-0.5 * eps**2, 0), rtol=1e-12)
