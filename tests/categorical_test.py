"""Categorical and relaxed categorical q and p, against TFP's JAX substrate and distrax."""

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorflow_probability.substrates import jax as tfp

from vaekl import kl
from vaekl.categorical import Categorical, RelaxedCategorical

tfd = tfp.distributions
DTYPES = [jnp.float32, jnp.float64]
TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.float64: dict(rtol=1e-12, atol=1e-12)}


def _logits(key, shape, scale, dtype):
    return (scale * jax.random.normal(key, shape)).astype(dtype)


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
    with jax.enable_x64(request.param == jnp.float64):
        yield request.param


@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])  # 300: probabilities far below float range.
def test_categorical_log_prob_entropy_and_kl_match_tfp_and_distrax(dtype, scale):
    lq = _logits(jax.random.key(0), (4, 3, 6), scale, dtype)
    lp = _logits(jax.random.key(1), (4, 3, 6), scale, dtype)
    q, p = Categorical(lq), Categorical(lp)
    y, log_q = q.sample_and_log_prob(seed=jax.random.key(2), sample_shape=(5,))
    assert y.shape == (5, 4, 3, 6) and log_q.shape == (5, 4)
    ref = tfd.OneHotCategorical(logits=lq, dtype=dtype)
    np.testing.assert_allclose(log_q, ref.log_prob(y).sum(-1), **TOL[dtype])
    np.testing.assert_allclose(q.entropy(), ref.entropy().sum(-1), **TOL[dtype])
    expected = tfd.kl_divergence(ref, tfd.OneHotCategorical(logits=lp)).sum(-1)
    np.testing.assert_allclose(kl.divergence(q, p), expected, **TOL[dtype])
    np.testing.assert_allclose(
        kl.divergence(q, p),
        distrax.Categorical(logits=lq).kl_divergence(distrax.Categorical(logits=lp)).sum(-1),
        **TOL[dtype])
    assert np.all(np.isfinite(kl.divergence(q, p))) and np.all(kl.divergence(q, q) == 0)


def test_categorical_draws_follow_the_probabilities():
    logits = jnp.log(jnp.array([[0.1, 0.2, 0.7]]))
    y, _ = Categorical(logits).sample_and_log_prob(seed=jax.random.key(0),
                                                  sample_shape=(40_000,))
    freq = np.asarray(y.mean(0))[0]
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.7], atol=4 * np.sqrt(0.25 / 40_000))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_relaxed_log_prob_matches_tfp(dtype, temperature, scale):
    logits = _logits(jax.random.key(3), (2, 4, 5), scale, dtype)
    q = RelaxedCategorical(logits, temperature)
    y, log_q = q.sample_and_log_prob(seed=jax.random.key(4), sample_shape=(7,))
    assert y.shape == (7, 2, 4, 5) and log_q.shape == (7, 2)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5 if dtype == jnp.float32 else 1e-12)
    ref = tfd.RelaxedOneHotCategorical(jnp.asarray(temperature, dtype), logits=logits)
    # At its own draws (computed in log space) and at any interior point.
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == jnp.float32 else TOL[dtype]
    np.testing.assert_allclose(log_q, ref.log_prob(y).sum(-1), **tol)
    np.testing.assert_allclose(q.log_prob(y), ref.log_prob(y).sum(-1), **tol)


def test_relaxed_draws_in_log_space_keep_a_finite_density_where_y_underflows():
    logits = jnp.array([[[0.0, -60.0, 3.0]]])
    q = RelaxedCategorical(logits, 0.1)
    y, log_q = q.sample_and_log_prob(seed=jax.random.key(5), sample_shape=(100,))
    assert np.any(y == 0.0)  # Some y_k below float32's range ...
    assert np.all(np.isfinite(log_q))  # ... and still a density, from x = log y.
    assert not np.all(np.isfinite(q.log_prob(y)))  # log y would have been -inf there.


def test_relaxed_argmax_is_the_categorical_and_hard_is_straight_through():
    logits = jnp.log(jnp.array([[0.1, 0.2, 0.7]]))
    y, _ = RelaxedCategorical(logits, 0.5).sample_and_log_prob(seed=jax.random.key(6),
                                                               sample_shape=(40_000,))
    freq = np.bincount(np.asarray(y.argmax(-1)).ravel(), minlength=3) / 40_000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.7], atol=4 * np.sqrt(0.25 / 40_000))

    def first(logits, hard):
        z, log_q = RelaxedCategorical(logits, 0.5, hard).sample_and_log_prob(
            seed=jax.random.key(7))
        return z, log_q

    z_hard, lq_hard = first(logits, True)
    z_soft, lq_soft = first(logits, False)
    assert set(np.unique(z_hard).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(z_hard.argmax(-1), z_soft.argmax(-1))
    np.testing.assert_allclose(lq_hard, lq_soft)  # The relaxed y's density.
    w = jnp.arange(3.0)
    grad = lambda hard: jax.grad(lambda l: jnp.sum(first(l, hard)[0] * w))(logits)  # noqa: E731
    np.testing.assert_allclose(grad(True), grad(False), rtol=1e-6)


def test_the_path_only_terms_refuse_a_categorical_q():
    assert kl.terms(Categorical, Categorical) == ("analytic", "k1", "k3", "entropy")
    with pytest.raises(ValueError, match="stl"):
        kl.check_term("kl='stl'", "stl", Categorical, Categorical)
