"""Tests for vaekl.bounds against a direct float64 NumPy implementation on the same draws.

Model (small, linear-Gaussian, so every derivative has a closed form here):
  encoder q(z|x) = N(x A + b, diag e^lv), decoder p(x|z) = N(z W + c, I), p(z) = N(0, I).
For the draws z_k = mu + sigma eps_k of the library (same key), the reference
computes in float64 the log-weights u_k, the path derivative du_k/dz_k, the
score term, the decoder's du_k/dtheta, and from them each objective's value and
each estimator's gradient from its textbook weights (IWAE's normalised weights
w, DReG's w^2, ...). DReG's unbiasedness is checked statistically against the
reparameterised gradient, STL-IWAE's bias reported by the same statistic.
"""

import functools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaekl import bounds
from vaekl.distributions import DiagNormal

DX, DZ, BATCH = 4, 2, 3
LOG_2PI = math.log(2 * math.pi)


def _params(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    p = {"A": 0.5 * rng.normal(size=(DX, DZ)), "b": 0.3 * rng.normal(size=DZ),
         "lv": -0.5 + 0.2 * rng.normal(size=DZ), "W": rng.normal(size=(DZ, DX)),
         "c": 0.2 * rng.normal(size=DX)}
    x = rng.normal(size=(BATCH, DX))
    return {k: v.astype(dtype) for k, v in p.items()}, x.astype(dtype)


def _surrogate(params, x, key, **kw):
    """Mean over the batch of the library's surrogate (its gradient is the estimator)."""
    mean = x @ params["A"] + params["b"]
    log_var = jnp.broadcast_to(params["lv"], mean.shape)

    def log_lik(z):
        r = x - (z @ params["W"] + params["c"])
        return -0.5 * jnp.sum(r * r + LOG_2PI, axis=-1)

    return jnp.mean(bounds.objective(key, DiagNormal(mean, log_var), log_lik, **kw).bound)


@functools.partial(jax.jit, static_argnames=("objective", "num_samples", "grad_estimator",
                                             "outer_samples", "alpha", "beta"))
def _value_and_grad(params, x, key, **kw):
    return jax.value_and_grad(_surrogate)(params, x, key, **kw)


def _eps(key, shape, num_samples, dtype=np.float32):
    """The library's base noise for `num_samples` draws of a q of batch and event `shape`."""
    return jax.random.normal(key, (num_samples,) + shape, dtype)


def _softmax(a):
    e = np.exp(a - a.max(axis=0))
    return e / e.sum(axis=0)


def _lse(a):
    m = a.max(axis=0)
    return m + np.log(np.exp(a - m).sum(axis=0))


def _reference_parts(params, x, eps):
    """u [S, B], and per draw the path, score and decoder derivatives (float64)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x, eps = np.asarray(x, np.float64), np.asarray(eps, np.float64)
    mu, sigma = x @ p["A"] + p["b"], np.exp(0.5 * p["lv"])
    z = mu + sigma * eps                                            # [S, B, DZ]
    r = x - (z @ p["W"] + p["c"])                                   # [S, B, DX]
    log_lik = -0.5 * np.sum(r * r + LOG_2PI, axis=-1)
    log_p = -0.5 * np.sum(z * z + LOG_2PI, axis=-1)
    log_q = -0.5 * np.sum(eps * eps + p["lv"] + LOG_2PI, axis=-1)
    u = log_lik + log_p - log_q
    du_dz = r @ p["W"].T - z + eps / sigma                          # log q at fixed parameters
    path = {"mu": du_dz, "lv": du_dz * 0.5 * sigma * eps}           # du/dz dz/d(mu, lv)
    score = {"mu": -eps / sigma, "lv": 0.5 * (1 - eps * eps)}       # -dlog q/d(mu, lv), z fixed
    dec = {"W": z[..., :, None] * r[..., None, :], "c": r}
    return u, path, score, dec, x


def _reference_grad(parts, w_dec, w_enc, with_score):
    """Gradient of the batch mean: decoder sum_k w_dec du/dtheta, encoder sum_k w_enc (...)."""
    u, path, score, dec, x = parts
    enc = {k: path[k] + (score[k] if with_score else 0.0) for k in path}
    d_mu = np.einsum("sb,sbd->bd", w_enc, enc["mu"]) / BATCH
    return {"A": x.T @ d_mu, "b": d_mu.sum(0),
            "lv": np.einsum("sb,sbd->d", w_enc, enc["lv"]) / BATCH,
            "W": np.einsum("sb,sbij->ij", w_dec, dec["W"]) / BATCH,
            "c": np.einsum("sb,sbd->d", w_dec, dec["c"]) / BATCH}


def _reference(objective, estimator, u, *, k, m=1, alpha=0.5, beta=0.5):
    """(value [B], decoder weights, encoder weights) written from the papers' definitions."""
    w = _softmax(u)
    iwae = _lse(u) - math.log(u.shape[0])
    if objective == "iwae":
        value, g = iwae, w
        enc = w * w if estimator == "dreg" else w
    elif objective == "renyi":
        s = 1 - alpha
        wa = _softmax(s * u)
        value, g = (_lse(s * u) - math.log(k)) / s, wa
        enc = alpha * wa + s * wa * wa if estimator == "dreg" else wa
    elif objective == "ciwae":
        value, g = beta * u.mean(0) + (1 - beta) * iwae, beta / k + (1 - beta) * w
        enc = beta / k + (1 - beta) * w * w if estimator == "dreg" else g
    else:  # miwae / piwae: groups of k consecutive draws.
        ug = u.reshape((m, k) + u.shape[1:])
        wg = np.stack([_softmax(a) for a in ug]).reshape(u.shape) / m
        miwae = np.mean([_lse(a) - math.log(k) for a in ug], axis=0)
        enc = wg * wg * m if estimator == "dreg" else wg
        value, g = (miwae, wg) if objective == "miwae" else (iwae, w)
    return value, g, enc


CASES = [("iwae", {}), ("renyi", {"alpha": 0.0}), ("renyi", {"alpha": 0.5}),
         ("renyi", {"alpha": 2.0}), ("ciwae", {"beta": 0.3}),
         ("miwae", {"outer_samples": 3}), ("piwae", {"outer_samples": 3})]


@pytest.mark.parametrize("estimator", bounds.GRAD_ESTIMATORS)
@pytest.mark.parametrize("objective, kw", CASES)
def test_value_and_gradient_match_float64_reference_on_same_draws(objective, kw, estimator):
    params, x = _params()
    key, k = jax.random.key(3), 5
    value, grads = _value_and_grad(params, x, key, objective=objective, num_samples=k,
                                   grad_estimator=estimator, **kw)
    m = kw.get("outer_samples", 1)
    mean = x @ params["A"] + params["b"]
    eps = _eps(key, mean.shape, m * k)
    parts = _reference_parts(params, x, eps)
    ref_value, g_dec, g_enc = _reference(objective, estimator, parts[0], k=k, m=m,
                                         alpha=kw.get("alpha", 0.5), beta=kw.get("beta", 0.5))
    ref = _reference_grad(parts, g_dec, g_enc, with_score=estimator == "reparam")
    np.testing.assert_allclose(value, ref_value.mean(), rtol=1e-5, atol=1e-5)
    for name in ref:
        np.testing.assert_allclose(grads[name], ref[name], rtol=2e-4, atol=2e-5, err_msg=name)


def test_decoder_gradient_is_the_same_for_every_estimator():
    params, x = _params()
    grads = {e: _value_and_grad(params, x, jax.random.key(1), objective="iwae", num_samples=7,
                                grad_estimator=e)[1] for e in bounds.GRAD_ESTIMATORS}
    for e in ("stl", "dreg"):
        for name in ("W", "c"):
            np.testing.assert_allclose(grads[e][name], grads["reparam"][name], rtol=1e-5, atol=1e-6)


def test_special_cases_agree():
    """Renyi a = 0 is IWAE; a -> 1 and CIWAE b = 1 are the ELBO; MIWAE M = 1 is IWAE."""
    params, x = _params()
    key = jax.random.key(5)

    def value(objective, **kw):
        return float(_value_and_grad(params, x, key, objective=objective, num_samples=6, **kw)[0])

    iwae = value("iwae")
    assert value("renyi", alpha=0.0) == pytest.approx(iwae, abs=1e-5)
    assert value("miwae", outer_samples=1) == pytest.approx(iwae, abs=1e-5)
    assert value("ciwae", beta=0.0) == pytest.approx(iwae, abs=1e-5)
    elbo = value("ciwae", beta=1.0)
    assert value("renyi", alpha=1.0) == pytest.approx(elbo, abs=1e-5)
    # 1/(1-a) log mean e^((1-a) u) = mean u + (1-a)/2 var u + O((1-a)^2): the gap shrinks ~10x.
    gaps = [value("renyi", alpha=1.0 - s) - elbo for s in (1e-1, 1e-2, 1e-3)]
    assert gaps[0] > 0 and 5 < gaps[0] / gaps[1] < 15 and 5 < gaps[1] / gaps[2] < 15, gaps
    assert elbo < value("renyi", alpha=0.5) < iwae


def test_elbo_parts_and_shapes_under_vmap():
    params, x = _params()
    mean = x @ params["A"] + params["b"]
    log_var = jnp.broadcast_to(params["lv"], mean.shape)
    keys = jax.random.split(jax.random.key(0), 4)

    def one(key):
        def log_lik(z):
            r = x - (z @ params["W"] + params["c"])
            return -0.5 * jnp.sum(r * r + LOG_2PI, axis=-1)
        return bounds.objective(key, DiagNormal(mean, log_var), log_lik, objective="iwae",
                                num_samples=3)

    out = jax.jit(jax.vmap(one))(keys)
    assert out.bound.shape == out.elbo.shape == (4, BATCH)
    np.testing.assert_allclose(out.elbo, -(out.rate + out.distortion), rtol=1e-6)
    assert np.all(out.bound >= out.elbo - 1e-5)  # IWAE-K >= the mean of its log-weights.


def _grad_draws(estimator, objective, num_draws, k, **kw):
    params, x = _params(seed=1)
    keys = jax.random.split(jax.random.key(11), num_draws)
    fn = jax.jit(jax.vmap(lambda key: jax.grad(_surrogate)(
        params, x, key, objective=objective, num_samples=k, grad_estimator=estimator, **kw)))
    return {name: np.asarray(v, np.float64) for name, v in fn(keys).items()}


@pytest.mark.parametrize("objective, kw", [("iwae", {}), ("renyi", {"alpha": 0.5}),
                                           ("ciwae", {"beta": 0.3}),
                                           ("miwae", {"outer_samples": 2})])
def test_dreg_is_unbiased_and_stl_iwae_is_biased(objective, kw):
    """The mean DReG gradient equals reparam's (|t| < 4.5); STL's is off for IWAE (Tucker et al.)."""
    n, k = 20000, 4
    ref = _grad_draws("reparam", objective, n, k, **kw)
    worst = {}
    for estimator in ("dreg", "stl"):
        g = _grad_draws(estimator, objective, n, k, **kw)
        t = [np.abs(g[p].mean(0) - ref[p].mean(0))
             / np.sqrt((g[p].var(0) + ref[p].var(0)) / n) for p in ("A", "b", "lv")]
        worst[estimator] = max(float(np.max(a)) for a in t)
    assert worst["dreg"] < 4.5, worst
    if objective == "iwae":
        assert worst["stl"] > 6, worst


def test_bad_arguments_name_themselves():
    params, x = _params()
    mean = x @ params["A"] + params["b"]
    q = DiagNormal(mean, jnp.zeros_like(mean))
    ll = lambda z: jnp.sum(z, -1)  # noqa: E731
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="objective"):
        bounds.objective(key, q, ll, objective="iwea", num_samples=2)
    with pytest.raises(ValueError, match="grad_estimator"):
        bounds.objective(key, q, ll, num_samples=2, grad_estimator="dreg2")
    with pytest.raises(ValueError, match="outer_samples"):
        bounds.objective(key, q, ll, num_samples=2, outer_samples=3)
    with pytest.raises(ValueError, match="beta"):
        bounds.objective(key, q, ll, objective="ciwae", num_samples=2, beta=1.5)
    with pytest.raises(ValueError, match="num_samples"):
        bounds.objective(key, q, ll, num_samples=0)
    with pytest.raises(TypeError, match="`q`"):
        bounds.objective(key, (mean, mean), ll, num_samples=2)


_X64 = """
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from tests import bounds_test as t
params, x = t._params(dtype=np.float64)
key = jax.random.key(3)
for est in ("reparam", "stl", "dreg"):
    value, grads = t._value_and_grad(params, x, key, objective="iwae", num_samples=50,
                                     grad_estimator=est)
    mean = x @ params["A"] + params["b"]
    eps = t._eps(key, mean.shape, 50, np.float64)
    parts = t._reference_parts(params, x, eps)
    v, g_dec, g_enc = t._reference("iwae", est, parts[0], k=50)
    ref = t._reference_grad(parts, g_dec, g_enc, with_score=est == "reparam")
    assert abs(float(value) - v.mean()) < 1e-12, (value, v.mean())
    for name in ref:
        np.testing.assert_allclose(grads[name], ref[name], rtol=1e-10, atol=1e-12)
print("ok")
"""


def test_float64_matches_reference_to_rounding():
    out = subprocess.run([sys.executable, "-c", _X64], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_renyi_below_zero_is_refused_since_it_exceeds_the_evidence():
    """Audit (issue 22): for alpha < 0 the Renyi objective is no lower bound: with K = 500 it
    exceeds log p(x) (1-d linear Gaussian: p(z) = N(0, 1), p(x|z) = N(z, 1), x = 1, q wider
    than the posterior), where IWAE (alpha = 0) stays below; `objective` refuses it."""
    x = 1.0
    log_px = -0.5 * (x * x / 2 + math.log(2 * math.pi * 2))
    q = DiagNormal(jnp.asarray([0.3]), jnp.asarray([math.log(1.5)]))
    log_lik = lambda z: -0.5 * jnp.sum(jnp.square(x - z) + LOG_2PI, axis=-1)  # noqa: E731
    u = jax.jit(jax.vmap(lambda key: bounds.log_weights(key, q, log_lik, num_samples=500).u))(
        jax.random.split(jax.random.key(4), 200))  # [keys, K]

    def renyi(alpha):
        s = 1.0 - alpha
        v = (jax.nn.logsumexp(s * u, axis=1) - math.log(500)) / s
        return float(jnp.mean(v)), float(jnp.std(v) / math.sqrt(len(v)))

    above, se = renyi(-1.0)
    assert above > log_px + 5 * se + 0.05, (above, log_px)
    iwae, se = renyi(0.0)
    assert iwae < log_px + 5 * se
    ll = lambda z: jnp.zeros(z.shape[:-1])  # noqa: E731
    with pytest.raises(ValueError, match="`alpha` must be finite and >= 0"):
        bounds.objective(jax.random.key(0), q, ll, objective="renyi", num_samples=2, alpha=-1.0)
