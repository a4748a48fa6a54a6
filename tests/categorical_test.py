"""Categorical and relaxed categorical q and p, against TFP's JAX substrate and distrax."""

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorflow_probability.substrates import jax as tfp

from vaekl import bounds, elbo, kl
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


# A toy decoder for N = 2 three-way variables: log p(x|z) = sum_nk z_nk W_nk, and its
# 9 joint configurations (one-hot [9, 2, 3]) for exact sums over z.
W = jnp.array([[0.3, -1.2, 2.0], [1.5, 0.1, -0.7]])
CONFIGS = jnp.stack([jnp.stack([jax.nn.one_hot(i, 3), jax.nn.one_hot(j, 3)])
                     for i in range(3) for j in range(3)])


def _toy_log_lik(z):
    """z [S, ..., 2, 3] -> [S, ...]."""
    return jnp.sum(z * W.astype(z.dtype), axis=(-2, -1))


def test_the_path_only_terms_and_the_bounds_refuse_a_categorical_q():
    assert kl.terms(Categorical, Categorical) == ("analytic", "k1", "k3", "entropy")
    q, p, key = Categorical(jnp.zeros((4, 2, 3))), Categorical(jnp.zeros((2, 3))), jax.random.key(0)
    with pytest.raises(ValueError, match=r"kl='stl'.*Categorical.*'analytic', 'k1'"):
        elbo.elbo(key, q, _toy_log_lik, p, kl="stl")
    for estimator in bounds.GRAD_ESTIMATORS:
        with pytest.raises(ValueError, match=rf"grad_estimator='{estimator}'.*Categorical is not"
                                             r".*vaekl.elbo.elbo"):
            bounds.objective(key, q, _toy_log_lik, p, num_samples=2, grad_estimator=estimator)


def test_a_two_axis_event_takes_one_log_likelihood_per_draw():
    """log p(x|z) is checked against log q's shape [S, batch], not z's less one axis."""
    q, p, key = Categorical(jnp.zeros((4, 2, 3))), Categorical(jnp.zeros((2, 3))), jax.random.key(0)
    assert elbo.elbo(key, q, _toy_log_lik, p, num_samples=3).elbo.shape == (4,)
    per_variable = lambda z: jnp.sum(z * W, axis=-1)  # noqa: E731  [S, 4, 2]: N not summed.
    with pytest.raises(ValueError, match=r"`log_likelihood` must map .* to shape \[3, 4\]"):
        elbo.elbo(key, q, per_variable, p, num_samples=3)
    with pytest.raises(ValueError, match=r"`log_likelihood` must map .* to shape \[5, 4\]"):
        bounds.iwae(key, q, per_variable, p, num_samples=10, chunk_size=5)


def test_iwae_with_a_categorical_q_approaches_the_exact_evidence(dtype):
    """IWAE-K with hard draws (evaluation) tends to log sum_z p(z) p(x|z), enumerated."""
    q = Categorical(jnp.array([[[0.5, -1.0, 0.2], [2.0, 0.0, -1.0]]], dtype))
    p = Categorical(jnp.zeros((2, 3), dtype))
    exact = jax.nn.logsumexp(p.log_prob(CONFIGS) + _toy_log_lik(CONFIGS))
    bound = bounds.iwae(jax.random.key(1), q, _toy_log_lik, p, num_samples=4000, chunk_size=1000)
    assert bound.shape == (1,) and bound.dtype == dtype
    np.testing.assert_allclose(bound, exact, atol=0.02)


class _WithoutScore(Categorical):
    """The same q claiming a path gradient: the ELBO then differentiates it as a loss, z
    held fixed, with no score term (what the k1/k2/k3-as-a-loss code does)."""

    reparameterized = True


def _mc_gradient(q_type, kl_term, baseline, num_keys=20_000):
    """(mean, standard error) over keys of d ELBO / d logits with one draw, float64."""
    def one(key):
        return jax.grad(lambda l: elbo.elbo(key, q_type(l), _toy_log_lik, _TOY_PRIOR,
                                            kl=kl_term, baseline=baseline).elbo[0])(_TOY_LOGITS)

    grads = np.asarray(jax.vmap(one)(jax.random.split(jax.random.key(8), num_keys)))
    return grads.mean(0), grads.std(0, ddof=1) / np.sqrt(num_keys)


def _exact_gradient():
    """d/dlogits of sum_z q(z) log p(x|z) - KL(q || p), the 9 configurations enumerated."""
    def exact_elbo(logits):
        q = Categorical(logits)
        return (jnp.sum(jnp.exp(q.log_prob(CONFIGS)) * _toy_log_lik(CONFIGS))
                - kl.divergence(q, _TOY_PRIOR)[0])
    return np.asarray(jax.grad(exact_elbo)(_TOY_LOGITS))


_TOY_LOGITS = np.array([[[0.5, -1.0, 0.2], [2.0, 0.0, -1.0]]])
_TOY_PRIOR = Categorical(np.log(np.array([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])))


@pytest.mark.parametrize("kl_term", ["analytic", "k1"])
@pytest.mark.parametrize("baseline", [0.0, 2.0])
def test_the_score_function_gradient_is_unbiased_with_and_without_baseline(kl_term, baseline):
    with jax.enable_x64(True):
        mean, se = _mc_gradient(Categorical, kl_term, baseline)
        exact = _exact_gradient()
    assert np.all(np.abs(mean - exact) < 4 * se + 1e-12), (mean, exact, se)
    assert np.linalg.norm(exact) > 0.1  # Not a trivial zero.


def test_the_value_is_the_plain_elbo_and_without_the_score_term_the_gradient_is_wrong():
    with jax.enable_x64(True):
        key = jax.random.key(9)
        values = [elbo.elbo(key, t(_TOY_LOGITS), _toy_log_lik, _TOY_PRIOR, kl="k1",
                            baseline=3.0) for t in (Categorical, _WithoutScore)]
        mean, se = _mc_gradient(_WithoutScore, "k1", 0.0)
        exact = _exact_gradient()
    np.testing.assert_allclose(values[0], values[1], rtol=1e-15)
    # As a loss, k1's expected gradient is E[d log q] = 0 and the decoder term has none.
    np.testing.assert_allclose(mean, 0.0, atol=4 * se.max() + 1e-12)
    assert np.max(np.abs(mean - exact) / se) > 20


@pytest.mark.parametrize("hard", [False, True])
def test_relaxed_kl_terms_in_the_elbo(dtype, hard):
    """"analytic": the underlying categoricals' KL; "relaxed": log q_tau(y) - log p_lambda(y)
    at the relaxed y (TFP's densities), the same for straight-through draws."""
    logits = _logits(jax.random.key(10), (4, 2, 3), 2.0, dtype)
    q = RelaxedCategorical(logits, 0.7, hard)
    prior = Categorical(jnp.zeros((2, 3), dtype))
    assert kl.terms(RelaxedCategorical, Categorical) == ("analytic", "k1", "k3", "stl", "relaxed")
    assert "relaxed" not in kl.terms(Categorical, Categorical)
    key = jax.random.key(11)
    analytic = elbo.elbo(key, q, _toy_log_lik, prior, kl="analytic", num_samples=3)
    np.testing.assert_allclose(analytic.rate, kl.divergence(Categorical(logits), prior),
                               **TOL[dtype])
    y, _ = RelaxedCategorical(logits, 0.7).sample_and_log_prob(seed=key, sample_shape=(3,))
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == jnp.float32 else TOL[dtype]
    for p, lam in ((prior, 0.7), (RelaxedCategorical(prior.logits, 0.5), 0.5)):
        relaxed = elbo.elbo(key, q, _toy_log_lik, p, kl="relaxed", num_samples=3)
        want = (tfd.RelaxedOneHotCategorical(jnp.asarray(0.7, dtype), logits=logits).log_prob(y)
                - tfd.RelaxedOneHotCategorical(jnp.asarray(lam, dtype),
                                               logits=prior.logits).log_prob(y)).sum(-1)
        np.testing.assert_allclose(relaxed.rate, want.mean(0), **tol)
    with pytest.raises(ValueError, match=r"kl='relaxed' needs a relaxed q.*Categorical"):
        elbo.elbo(key, Categorical(logits), _toy_log_lik, prior, kl="relaxed")
