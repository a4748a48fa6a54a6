"""The distribution interface is the only contract: a family defined here, outside vaekl, and a
distrax distribution run through `vaekl.elbo.elbo` and `vaekl.bounds.objective` unchanged.

The Laplace posterior below has nothing of vaekl but the interface's three methods. Its
values and gradients are checked against float64 NumPy on the same draws (the base noise is
the family's own: u ~ U(-1/2, 1/2), z = loc - b sign(u) log(1 - 2|u|)); registering its
closed-form KL with `vaekl.kl.register` is all it takes for kl="analytic".
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaekl import bounds, elbo, kl
from vaekl.distributions import STANDARD_NORMAL, DiagNormal

LOG_2PI = math.log(2 * math.pi)
X = np.array([[0.5, -1.0], [1.5, 0.2], [-0.3, 0.8]])  # [B, dim]: p(x|z) = N(x; z, 1).


class Laplace(NamedTuple):
    """Independent Laplace(loc, e^log_scale) per dimension: loc, log_scale [..., dim]."""

    loc: jax.Array
    log_scale: jax.Array

    def _noise(self, seed, sample_shape):
        tiny = jnp.finfo(self.loc.dtype).tiny
        return jax.random.uniform(seed, tuple(sample_shape) + self.loc.shape, self.loc.dtype,
                                  -0.5 + tiny, 0.5)

    def sample_and_log_prob(self, *, seed, sample_shape=()):
        u = self._noise(seed, sample_shape)
        e = -jnp.log1p(-2 * jnp.abs(u))  # |z - loc| / b, a function of the noise only.
        z = self.loc + jnp.exp(self.log_scale) * jnp.sign(u) * e
        return z, -jnp.sum(math.log(2.0) + self.log_scale + e, axis=-1)

    def log_prob(self, z):
        return -jnp.sum(math.log(2.0) + self.log_scale
                        + jnp.abs(z - self.loc) * jnp.exp(-self.log_scale), axis=-1)

    def entropy(self):
        return jnp.sum(1.0 + math.log(2.0) + self.log_scale, axis=-1)


@kl.register(Laplace, Laplace)
def _laplace_laplace(q, p):
    """log(b2/b1) + |m1 - m2|/b2 + (b1/b2) e^(-|m1 - m2|/b1) - 1, summed over dimensions."""
    d = jnp.abs(q.loc - p.loc)
    b1, b2 = jnp.exp(q.log_scale), jnp.exp(p.log_scale)
    return jnp.sum(p.log_scale - q.log_scale + d / b2 + b1 / b2 * jnp.exp(-d / b1) - 1.0, -1)


def _log_lik(z):
    return -0.5 * jnp.sum(jnp.square(jnp.asarray(X, z.dtype) - z) + LOG_2PI, axis=-1)


def _params():
    loc = np.array([[0.3, -0.6], [1.0, 0.1], [-0.2, 0.4]])
    log_scale = np.array([[-0.5, -0.2], [-0.8, -0.4], [-0.3, -0.6]])
    return jnp.asarray(loc), jnp.asarray(log_scale)


def _reference(loc, log_scale, key, num_samples):
    """The same draws in float64 NumPy: z, log q, log p(z), log p(x|z), and per draw the path
    derivative du/dz dz/d(loc, log_scale) and the score -dlog q/d(loc, log_scale) at fixed z,
    each [S, B, dim] (u = log p(x|z) + log p(z) - log q(z))."""
    loc, log_scale = np.asarray(loc), np.asarray(log_scale)
    u_noise = np.asarray(Laplace(jnp.asarray(loc), jnp.asarray(log_scale))._noise(
        key, (num_samples,)), np.float64)
    b = np.exp(log_scale)
    z = loc - b * np.sign(u_noise) * np.log1p(-2 * np.abs(u_noise))
    log_q = -np.sum(np.log(2 * b) + np.abs(z - loc) / b, axis=-1)
    log_p = -0.5 * np.sum(z * z + LOG_2PI, axis=-1)
    log_lik = -0.5 * np.sum((X - z) ** 2 + LOG_2PI, axis=-1)
    du_dz = (X - z) - z + np.sign(z - loc) / b
    path = {"loc": du_dz, "log_scale": du_dz * (z - loc)}
    score = {"loc": -np.sign(z - loc) / b, "log_scale": 1.0 - np.abs(z - loc) / b}
    return z, log_q, log_p, log_lik, path, score


@pytest.mark.parametrize("term", ["k1", "k3", "stl", "entropy"])
def test_an_outside_family_runs_through_the_elbo_with_every_kl_term(term):
    assert kl.terms(Laplace, DiagNormal) == ("k1", "k3", "stl", "entropy")
    key = jax.random.key(5)
    with jax.enable_x64(True):
        loc, log_scale = _params()

        def rate_sum(loc, log_scale):
            b = elbo.elbo(key, Laplace(loc, log_scale), _log_lik, kl=term, num_samples=4)
            return jnp.sum(b.rate), b

        (_, got), grads = jax.value_and_grad(rate_sum, argnums=(0, 1), has_aux=True)(
            loc, log_scale)
        z, log_q, log_p, log_lik, path, score = _reference(loc, log_scale, key, 4)
        log_r = log_p - log_q
        rate = {"k1": -log_r.mean(0), "stl": -log_r.mean(0), "k3": np.expm1(log_r).mean(0)
                - log_r.mean(0), "entropy": -np.sum(1 + np.log(2 * np.exp(np.asarray(
                    log_scale))), -1) - log_p.mean(0)}[term]
        np.testing.assert_allclose(got.rate, rate, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got.distortion, -log_lik.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got.elbo, -(rate - log_lik.mean(0)), rtol=1e-10, atol=1e-12)
        if term in ("k1", "stl"):
            # d rate / d params: k1's is minus the total (path + score) derivative of log r,
            # STL's minus the path one alone (log p(x|z) is not in the rate: take it out).
            dll_dz = X - z
            for i, name in enumerate(("loc", "log_scale")):
                dz = np.ones_like(z) if name == "loc" else (z - np.asarray(loc))
                want = -(path[name] - dll_dz * dz).mean(0)
                if term == "k1":
                    want = want - score[name].mean(0)
                np.testing.assert_allclose(grads[i], want, rtol=1e-9, atol=1e-12, err_msg=name)


def test_analytic_is_refused_for_an_unregistered_pair_and_works_for_a_registered_one():
    q = Laplace(*(jnp.asarray(a, jnp.float32) for a in _params()))
    with pytest.raises(ValueError, match="has no closed form") as info:
        elbo.elbo(jax.random.key(0), q, _log_lik, kl="analytic")
    assert "KL(Laplace || DiagNormal)" in str(info.value)
    assert "('k1', 'k3', 'stl', 'entropy')" in str(info.value)
    with pytest.raises(ValueError, match="vaekl.kl.divergence.*KL\\(Laplace \\|\\| DiagNormal\\)"):
        kl.divergence(q, STANDARD_NORMAL)
    # Against a Laplace prior the registered closed form is the rate, and the mean of the
    # sampled k1 rate over many draws agrees with it.
    prior = Laplace(jnp.zeros(2), jnp.full((2,), 0.3))
    assert kl.terms(Laplace, Laplace)[0] == "analytic"
    exact = elbo.elbo(jax.random.key(0), q, _log_lik, prior, kl="analytic").rate
    np.testing.assert_array_equal(exact, kl.divergence(q, prior))
    sampled = elbo.elbo(jax.random.key(1), q, _log_lik, prior, kl="k1", num_samples=200_000).rate
    np.testing.assert_allclose(sampled, exact, atol=0.01)


def _objective_reference(objective, u, k, m):
    """(value [B], encoder weights of DReG) from the log-weights u [M*K, B] (NumPy)."""
    def lse(a, axis=0):
        top = a.max(axis)
        return top + np.log(np.exp(a - np.expand_dims(top, axis)).sum(axis))

    iwae = lse(u) - math.log(len(u))
    if objective == "iwae":
        return iwae
    if objective == "renyi":  # alpha = 0.5
        return 2 * (lse(0.5 * u) - math.log(k))
    if objective == "ciwae":  # beta = 0.5
        return 0.5 * u.mean(0) + 0.5 * iwae
    groups = u.reshape((m, k) + u.shape[1:])
    return iwae if objective == "piwae" else np.mean(lse(groups, 1) - math.log(k), axis=0)


@pytest.mark.parametrize("estimator", bounds.GRAD_ESTIMATORS)
@pytest.mark.parametrize("objective", bounds.OBJECTIVES)
def test_an_outside_family_runs_through_every_bound_and_estimator(objective, estimator):
    """The value against NumPy for every objective; for IWAE the encoder gradient too:
    reparam sum_k w_k (path + score), STL sum_k w_k path, DReG sum_k w_k^2 path."""
    key, k = jax.random.key(6), 4
    m = 2 if objective in ("miwae", "piwae") else 1
    with jax.enable_x64(True):
        loc, log_scale = _params()

        def bound_sum(loc, log_scale):
            o = bounds.objective(key, Laplace(loc, log_scale), _log_lik, objective=objective,
                                 num_samples=k, grad_estimator=estimator, outer_samples=m)
            return jnp.sum(o.bound), o

        (_, got), grads = jax.value_and_grad(bound_sum, argnums=(0, 1), has_aux=True)(
            loc, log_scale)
        z, log_q, log_p, log_lik, path, score = _reference(loc, log_scale, key, m * k)
        u = log_lik + log_p - log_q
        np.testing.assert_allclose(got.bound, _objective_reference(objective, u, k, m),
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got.rate, -(log_p - log_q).mean(0), rtol=1e-10, atol=1e-12)
        assert all(np.all(np.isfinite(g)) for g in grads)
        if objective == "iwae":
            w = np.exp(u - u.max(0))
            w = w / w.sum(0)
            weights = w * w if estimator == "dreg" else w
            for i, name in enumerate(("loc", "log_scale")):
                per_draw = path[name] + (score[name] if estimator == "reparam" else 0.0)
                np.testing.assert_allclose(grads[i], np.einsum("sb,sbd->bd", weights, per_draw),
                                           rtol=1e-9, atol=1e-12, err_msg=name)


# --- distrax's Gaussian as q: the same numbers as vaekl's on the same key. ---

def _distrax_and_ours():
    distrax = pytest.importorskip("distrax")
    rng = np.random.default_rng(3)
    mean, log_var = rng.normal(size=(3, 2)), -0.5 + 0.3 * rng.normal(size=(3, 2))
    return (lambda m, lv: distrax.MultivariateNormalDiag(m, jnp.exp(0.5 * lv)),
            DiagNormal, jnp.asarray(mean), jnp.asarray(log_var))


@pytest.mark.parametrize("how", [("elbo", "k1"), ("elbo", "stl"), ("objective", "reparam"),
                                 ("objective", "dreg")])
def test_a_distrax_gaussian_gives_vaekls_values_and_gradients(how):
    kind, option = how
    with jax.enable_x64(True):
        make_distrax, make_ours, mean, log_var = _distrax_and_ours()
        key = jax.random.key(8)

        def run(make, mean, log_var):
            q = make(mean, log_var)
            if kind == "elbo":
                out = elbo.elbo(key, q, _log_lik, kl=option, num_samples=5)
                return jnp.sum(out.elbo), out
            out = bounds.objective(key, q, _log_lik, objective="iwae", num_samples=5,
                                   grad_estimator=option)
            return jnp.sum(out.bound), out

        results = [jax.value_and_grad(run, argnums=(1, 2), has_aux=True)(make, mean, log_var)
                   for make in (make_distrax, make_ours)]
        (_, theirs), grads_theirs = results[0]
        (_, ours), grads_ours = results[1]
        for a, b in zip(theirs, ours):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads_theirs, grads_ours):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
            assert np.all(a != 0)
