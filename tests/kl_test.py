"""Tests for vaekl.kl: closed forms, Monte Carlo estimators, jit/vmap, validation.

References are written here in float64 NumPy, independently of the library:
the textbook Gaussian KL formulas, with e^d - 1 - d summed as a Taylor series
for small d (the naive form cancels there even in float64).
"""

import functools
import inspect
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import vaekl
from vaekl import kl
from vaekl.distributions import DiagNormal, FullNormal, MixtureOfGaussians, mixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32_EPS = float(np.finfo(np.float32).eps)
FAST = {"xla_backend_optimization_level": 0}  # faster XLA:CPU compiles where speed is moot

# Value checks call jitted wrappers: eager dispatch compiles every primitive for
# every new shape, ~10x the cost of one jit compile. The plain (eager) functions
# are exercised by test_jit_and_vmap_agree_with_plain_calls, the exact-zero,
# default-prior and broadcasting tests, and the validation tests.
analytic = jax.jit(kl.analytic)
analytic_full = jax.jit(kl.analytic_full)
draws = jax.jit(kl.draws, static_argnames=("num_samples", "estimator"))
sampled = jax.jit(kl.sampled, static_argnames=("num_samples", "estimator"))


# --------------------------------------------------------------------------
# float64 references (no JAX)
# --------------------------------------------------------------------------


def ref_expm1mx(d):
    """e^d - 1 - d in float64: Taylor series to d^29 for |d| < 0.5, else expm1(d) - d."""
    d = np.asarray(d, np.float64)
    with np.errstate(over="ignore"):
        big = np.expm1(d) - d  # for |d| >= 0.5 the cancellation costs < 4 ulp
    small = np.abs(d) < 0.5
    ds = np.where(small, d, 0.0)
    term = 0.5 * ds * ds
    acc = term.copy()
    for n in range(3, 30):  # 0.5^28 / 29! ~ 1e-39: truncation far below float64 eps
        term = term * ds / n
        acc = acc + term
    return np.where(small, acc, big)


def ref_kl_diag(q_mean, q_log_var, p_mean, p_log_var):
    """KL of diagonal Gaussians in float64 from the textbook formula.

    1/2 sum((s_q^2 + (m_q - m_p)^2) / s_p^2 - 1 - log(s_q^2 / s_p^2)), written as
    1/2 sum((m_q - m_p)^2 / s_p^2 + (e^d - 1 - d)) with d = log(s_q^2 / s_p^2).
    """
    q_mean, q_log_var, p_mean, p_log_var = (
        np.asarray(a, np.float64) for a in (q_mean, q_log_var, p_mean, p_log_var))
    d = q_log_var - p_log_var
    per_dim = (q_mean - p_mean) ** 2 / np.exp(p_log_var) + ref_expm1mx(d)
    return 0.5 * np.sum(per_dim, axis=-1)


def ref_kl_full(q_mean, q_tril, p_mean, p_tril):
    """KL(N(m_q, S_q) || N(m_p, S_p)) in float64.

    1/2 [tr(S_p^-1 S_q) + y' S_p^-1 y - k + ln |S_p| - ln |S_q|], y = m_p - m_q.
    """
    q_mean, q_tril, p_mean, p_tril = (
        np.asarray(a, np.float64) for a in (q_mean, q_tril, p_mean, p_tril))
    k = q_mean.shape[-1]
    s_q = q_tril @ np.swapaxes(q_tril, -1, -2)
    s_p = p_tril @ np.swapaxes(p_tril, -1, -2)
    y = (p_mean - q_mean)[..., None]
    trace = np.trace(np.linalg.solve(s_p, s_q), axis1=-2, axis2=-1)
    maha = (np.swapaxes(y, -1, -2) @ np.linalg.solve(s_p, y))[..., 0, 0]
    logdet = np.linalg.slogdet(s_p)[1] - np.linalg.slogdet(s_q)[1]
    return 0.5 * (trace + maha - k + logdet)


def random_tril(rng, shape, dim, scale=0.3):
    """Random lower-triangular factors with positive diagonal, float32."""
    a = rng.normal(size=shape + (dim, dim)) * scale
    diag = np.exp(rng.normal(size=shape + (dim,)) * scale)
    tril = np.tril(a, -1) + np.eye(dim) * diag[..., None, :]
    return tril.astype(np.float32)


def random_diag_params(rng, shape, mean_scale=1.0, lv_scale=0.5):
    """q_mean, q_log_var, p_mean, p_log_var as float32 arrays of `shape`."""
    return tuple((rng.normal(size=shape) * s).astype(np.float32)
                 for s in (mean_scale, lv_scale, mean_scale, lv_scale))


def assert_close_rel_or_abs(got, ref, rel, abs_, what=""):
    """Checks |got - ref| <= max(rel |ref|, abs_) elementwise, reporting the worst entry."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    err = np.abs(got - ref)
    bad = err > np.maximum(rel * np.abs(ref), abs_)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / np.maximum(np.abs(ref), 1e-300), 0)),
                             err.shape)
        pytest.fail(f"{what}: {bad.sum()} entries out of tolerance; worst at {i}:"
                    f" got {got[i]!r}, ref {ref[i]!r}")


# --------------------------------------------------------------------------
# The references themselves
# --------------------------------------------------------------------------


def test_reference_matches_naive_textbook_formula_where_it_is_safe():
    """The float64 reference agrees with the literal textbook formula away from cancellation."""
    rng = np.random.default_rng(0)
    qm, qlv, pm, plv = (rng.normal(size=(200, 5)) * 2 for _ in range(4))
    qlv = plv + np.sign(rng.normal(size=qlv.shape)) * rng.uniform(1.0, 5.0, size=qlv.shape)
    vq, vp = np.exp(qlv), np.exp(plv)
    naive = 0.5 * np.sum((vq + (qm - pm) ** 2) / vp - 1 - np.log(vq / vp), axis=-1)
    np.testing.assert_allclose(ref_kl_diag(qm, qlv, pm, plv), naive, rtol=1e-13)
    # The series branch agrees with expm1 - x at the switch and with the Taylor value at 1e-8.
    np.testing.assert_allclose(ref_expm1mx(0.4999), np.expm1(0.4999) - 0.4999, rtol=1e-14)
    assert ref_expm1mx(1e-8) == pytest.approx(0.5e-16 + 1e-24 / 6, rel=1e-15)


def test_full_reference_matches_diag_reference():
    """The full-covariance reference reduces to the diagonal one for diagonal factors."""
    rng = np.random.default_rng(1)
    qm, qlv, pm, plv = random_diag_params(rng, (10, 4))
    tq = np.eye(4) * np.exp(qlv.astype(np.float64) / 2.0)[..., None, :]
    tp = np.eye(4) * np.exp(plv.astype(np.float64) / 2.0)[..., None, :]
    np.testing.assert_allclose(ref_kl_full(qm, tq, pm, tp), ref_kl_diag(qm, qlv, pm, plv),
                               rtol=1e-10)


# --------------------------------------------------------------------------
# analytic: accuracy
# --------------------------------------------------------------------------


def test_analytic_random_inputs_match_float64_reference():
    """float32 `analytic` on random [batch, dim] inputs is within 2e-6 relative of float64."""
    rng = np.random.default_rng(2)
    args = random_diag_params(rng, (500, 8), mean_scale=3.0, lv_scale=4.0)
    got = analytic(*args)
    assert got.shape == (500,) and got.dtype == jnp.float32
    # A sum of 8 positive terms, each a few ulp: measured worst ~1e-6.
    assert_close_rel_or_abs(got, ref_kl_diag(*args), rel=2e-6, abs_=0.0, what="random")


def test_analytic_extreme_grid_matches_float64_reference():
    """Dense log-variance grid on [-30, 30] (and near-cancelling +-1e-3..1e-8), extreme means.

    Required: 1e-5 relative or 1e-7 absolute. The float32 rounding of d = q_lv - p_lv
    moves e^d by up to |d| eps ~ 60 * 6e-8 = 3.6e-6 relative (measured worst 1.1e-6).
    Checked with the absolute floor lowered to 1e-30 (only underflow, e.g. a mean
    difference of 1e-30 squared, needs it): the 1e-7 floor alone would accept the
    naive exp(d) - 1 - d, whose error at d = 1e-8 is ~eps/d^2 relative.
    """
    near = [0.0, 1e-8, -1e-8, 1e-6, -1e-6, 1e-3, -1e-3, 0.0999, 0.1, 0.1001, -0.0999,
            -0.1, -0.1001, 0.5, -0.5, 1.0, -1.0]
    lv = np.unique(np.concatenate([np.linspace(-30.0, 30.0, 481), near,
                                   np.add.outer([-30.0, -7.0, 0.0, 2.0, 30.0], near).ravel()]))
    lv = lv[(lv >= -30) & (lv <= 30)].astype(np.float32)
    q_lv, p_lv = (a.reshape(-1, 1) for a in np.meshgrid(lv, lv, indexing="ij"))
    means = [0.0, 1e-30, -1e-12, 1e-6, 1e-3, -0.7, 3.0, 1e3, -1e3]
    for q_m in means:
        for p_m in (0.0, 1e-3, -1e3):
            q_mean = np.full_like(q_lv, q_m)
            p_mean = np.float32(p_m)
            got = analytic(q_mean, q_lv, p_mean, p_lv)
            ref = ref_kl_diag(q_mean, q_lv, p_mean, p_lv)
            assert np.all(np.isfinite(got))
            assert_close_rel_or_abs(got, ref, rel=1e-5, abs_=1e-30,
                                    what=f"q_mean={q_m}, p_mean={p_m}")


def test_analytic_mean_term_at_extreme_prior_variances_matches_float64_reference():
    """Mean differences from 1e-30 to 1e20 against prior log-variances of -80..80, float32.

    (q_mean - p_mean)^2 alone underflows below 1e-19 (and overflows above 1e19);
    scaled by e^(-p_log_var/2) before squaring, the term is accurate wherever the
    KL itself is a normal float32: within 1e-5 relative of float64.
    """
    diff = np.concatenate([np.logspace(-30, 20, 201), -np.logspace(-30, 20, 201)])
    p_lv = np.array([-80.0, -40.0, 0.0, 40.0, 80.0])
    diff, p_lv = (a.ravel().astype(np.float32)[:, None] for a in np.meshgrid(diff, p_lv))
    for q_lv in (p_lv, p_lv + np.float32(1.0)):
        for p_mean in (np.zeros_like(diff), 0.25 * diff):
            q_mean = p_mean + diff
            got = np.asarray(analytic(q_mean, q_lv, p_mean, p_lv))
            ref = ref_kl_diag(q_mean, q_lv, p_mean, p_lv)
            normal = (ref > np.finfo(np.float32).tiny) & (ref < np.finfo(np.float32).max / 4)
            assert normal.sum() > diff.size // 2
            assert_close_rel_or_abs(got[normal], ref[normal], rel=1e-5, abs_=0.0,
                                    what=f"q_lv - p_lv = {float(q_lv[0, 0] - p_lv[0, 0])}")


@pytest.mark.parametrize("d", [1e-8, -1e-8, 1e-6, -1e-6, 1e-3, -1e-3])
def test_analytic_near_equal_variances_is_relatively_accurate(d):
    """Where sigma_q ~ sigma_p the KL ~ d^2/4 is still accurate to 1e-6 relative."""
    q_lv = np.full((1, 3), d, np.float32)
    got = float(analytic(np.zeros((1, 3), np.float32), q_lv)[0])
    ref = float(ref_kl_diag(0.0, q_lv, 0.0, 0.0)[0])
    assert ref > 0
    assert got == pytest.approx(ref, rel=1e-6)


def test_analytic_is_exactly_zero_for_equal_distributions():
    """KL(q || q) == 0 exactly, for random q of several scales."""
    rng = np.random.default_rng(3)
    for scale in (1e-6, 1.0, 20.0):
        qm, qlv, _, _ = random_diag_params(rng, (64, 7), mean_scale=scale * 50, lv_scale=scale)
        out = np.asarray(kl.analytic(qm, qlv, qm, qlv))
        np.testing.assert_array_equal(out, np.zeros(64, np.float32))
        np.testing.assert_array_equal(analytic(qm, qlv, qm, qlv), np.zeros(64, np.float32))
        out = np.asarray(kl.analytic(qm, qlv, prior=DiagNormal(qm, qlv)))
        np.testing.assert_array_equal(out, np.zeros(64, np.float32))


def test_analytic_default_prior_is_standard_normal_and_prior_kwarg_matches():
    """Defaults mean N(0, I); `prior=DiagNormal(m, lv)` equals passing p_mean/p_log_var."""
    rng = np.random.default_rng(4)
    qm, qlv, pm, plv = random_diag_params(rng, (6, 4))
    np.testing.assert_allclose(kl.analytic(qm, qlv), ref_kl_diag(qm, qlv, 0.0, 0.0), rtol=1e-6)
    np.testing.assert_array_equal(kl.analytic(qm, qlv, pm, plv),
                                  kl.analytic(qm, qlv, prior=DiagNormal(pm, plv)))


def test_analytic_broadcasts_prior_over_batch():
    """A prior of shape [dim] broadcasts against q of shape [batch, dim]."""
    rng = np.random.default_rng(5)
    qm, qlv, _, _ = random_diag_params(rng, (2, 5, 3))
    pm, plv = (rng.normal(size=(3,)).astype(np.float32) for _ in range(2))
    out = kl.analytic(qm, qlv, pm, plv)
    assert out.shape == (2, 5)
    np.testing.assert_allclose(out, ref_kl_diag(qm, qlv, pm, plv), rtol=2e-6)


# --------------------------------------------------------------------------
# analytic: an independent peer library
# --------------------------------------------------------------------------


def test_analytic_matches_tfp():
    """Agrees with TFP's JAX substrate (Independent Normal; MVN TriL is checked below)."""
    tfp = pytest.importorskip("tensorflow_probability.substrates.jax")
    tfd = tfp.distributions
    rng = np.random.default_rng(6)
    qm, qlv, pm, plv = random_diag_params(rng, (100, 6), mean_scale=2.0, lv_scale=1.0)
    ours = np.asarray(analytic(qm, qlv, pm, plv))

    def normal(m, lv):
        return tfd.Independent(tfd.Normal(m, jnp.exp(lv / 2.0)), reinterpreted_batch_ndims=1)

    peer = np.asarray(jax.jit(lambda *a: tfd.kl_divergence(normal(*a[:2]), normal(*a[2:])))(
        qm, qlv, pm, plv))
    # Both float32 on O(1) values; TFP's own rounding dominates (~1e-6).
    np.testing.assert_allclose(ours, peer, rtol=1e-4, atol=1e-6)
    # Sanity of the comparison itself: the peer is close to the float64 reference too.
    np.testing.assert_allclose(peer, ref_kl_diag(qm, qlv, pm, plv), rtol=1e-4, atol=1e-6)


def check_analytic_full_against_tfp(dtype):
    """`analytic_full` in `dtype` agrees with TFP's MultivariateNormalTriL KL; like
    TFP it reads only the lower triangles, so entries above either diagonal change nothing.

    Used here in float32 and, in a subprocess with x64 on, in float64.
    """
    tfd = pytest.importorskip("tensorflow_probability.substrates.jax").distributions
    rng = np.random.default_rng(7)
    qm, _, pm, _ = (a.astype(dtype) for a in random_diag_params(rng, (50, 4)))
    tq, tp = (random_tril(rng, (50,), 4).astype(dtype) for _ in range(2))
    upper = np.triu(rng.normal(size=(2, 50, 4, 4)) * 5.0, 1).astype(dtype)
    peer = jax.jit(lambda a, b, c, d: tfd.kl_divergence(tfd.MultivariateNormalTriL(a, b),
                                                        tfd.MultivariateNormalTriL(c, d)))
    ours = np.asarray(analytic_full(qm, tq, pm, tp))
    assert ours.dtype == dtype
    # float32: both sides' triangular solves round (~1e-6); float64: ~1e-15.
    rtol, atol = (1e-4, 1e-5) if dtype == np.float32 else (1e-11, 1e-13)
    np.testing.assert_allclose(ours, peer(qm, tq, pm, tp), rtol=rtol, atol=atol)
    np.testing.assert_allclose(peer(qm, tq + upper[0], pm, tp + upper[1]), ours,
                               rtol=rtol, atol=atol)
    for gq, gp in ((upper[0], 0), (0, upper[1]), (upper[0], upper[1])):
        np.testing.assert_array_equal(analytic_full(qm, tq + gq, pm, tp + gp), ours)
    np.testing.assert_array_equal(analytic_full(qm, tq + upper[0]), analytic_full(qm, tq))


def test_analytic_full_matches_tfp_and_ignores_upper_triangles():
    check_analytic_full_against_tfp(np.float32)


def test_analytic_matches_distrax():
    """Agrees with distrax's MultivariateNormalDiag KL."""
    distrax = pytest.importorskip("distrax")
    rng = np.random.default_rng(8)
    qm, qlv, pm, plv = random_diag_params(rng, (40, 5), mean_scale=2.0, lv_scale=1.0)
    peer = jax.jit(lambda a, b, c, d: distrax.MultivariateNormalDiag(a, b).kl_divergence(
        distrax.MultivariateNormalDiag(c, d)))(qm, np.exp(qlv / 2.0), pm, np.exp(plv / 2.0))
    np.testing.assert_allclose(analytic(qm, qlv, pm, plv), peer, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------
# analytic_full
# --------------------------------------------------------------------------


def test_analytic_full_matches_float64_reference():
    """Random Cholesky factors, batch [3, 20], dim 5: within 1e-4 relative of float64."""
    rng = np.random.default_rng(9)
    qm, _, pm, _ = random_diag_params(rng, (3, 20, 5))
    tq, tp = random_tril(rng, (3, 20), 5), random_tril(rng, (3, 20), 5)
    got = analytic_full(qm, tq, pm, tp)
    assert got.shape == (3, 20) and got.dtype == jnp.float32
    # Triangular solves in float32 on well-conditioned factors: a few ulp times dim^2.
    assert_close_rel_or_abs(got, ref_kl_full(qm, tq, pm, tp), rel=1e-4, abs_=1e-6, what="full")


def test_analytic_full_negative_diagonal_factor_is_same_distribution():
    """Flipping the sign of a factor's columns leaves L L^T, hence the KL, unchanged."""
    rng = np.random.default_rng(10)
    qm, _, pm, _ = random_diag_params(rng, (8, 4))
    tq, tp = random_tril(rng, (8,), 4), random_tril(rng, (8,), 4)
    flip = np.array([1.0, -1.0, -1.0, 1.0], np.float32)
    np.testing.assert_allclose(analytic_full(qm, tq * flip, pm, tp * flip[::-1]),
                               analytic_full(qm, tq, pm, tp), rtol=1e-5, atol=1e-6)


def test_analytic_full_equals_analytic_for_diagonal_factors():
    """Diagonal factors exp(lv/2) give the diagonal KL."""
    rng = np.random.default_rng(11)
    qm, qlv, pm, plv = random_diag_params(rng, (30, 6))
    tq = np.eye(6, dtype=np.float32) * np.exp(qlv / 2.0)[..., None, :]
    tp = np.eye(6, dtype=np.float32) * np.exp(plv / 2.0)[..., None, :]
    # log(exp(lv/2)^2) re-rounds lv: ~1e-7 absolute on d, so atol rather than rtol on small KL.
    np.testing.assert_allclose(analytic_full(qm, tq, pm, tp), analytic(qm, qlv, pm, plv),
                               rtol=1e-5, atol=1e-6)


def test_analytic_full_default_prior_is_identity():
    """p_scale_tril=None (and p_mean default 0) means the standard normal."""
    rng = np.random.default_rng(12)
    qm, _, _, _ = random_diag_params(rng, (10, 3))
    tq = random_tril(rng, (10,), 3)
    eye = np.eye(3, dtype=np.float32)
    np.testing.assert_allclose(analytic_full(qm, tq), analytic_full(qm, tq, 0.0, eye),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(analytic_full(qm, tq), ref_kl_full(qm, tq, 0.0 * qm, eye),
                               rtol=1e-4, atol=1e-6)
    # q = N(0, I) against the default prior is exactly 0.
    np.testing.assert_array_equal(
        analytic_full(np.zeros((2, 3), np.float32), np.broadcast_to(eye, (2, 3, 3))),
        np.zeros(2, np.float32))


def test_analytic_full_equal_distributions_is_tiny():
    """KL(q || q) with a general p_scale_tril is within float32 rounding of 0."""
    rng = np.random.default_rng(13)
    qm, _, _, _ = random_diag_params(rng, (16, 4))
    tq = random_tril(rng, (16,), 4)
    out = np.asarray(analytic_full(qm, tq, qm, tq))
    assert np.all(out >= 0.0)
    assert np.all(out < 1e-12)  # a few squared ulps of L_p^-1 L_q - I


# --------------------------------------------------------------------------
# float64 (a separate process: x64 is a global switch)
# --------------------------------------------------------------------------

_X64_SCRIPT = """
import numpy as np
import jax, jax.numpy as jnp
assert jax.config.jax_enable_x64
from vaekl import kl as _kl
class kl:  # jitted: eager dispatch would compile each primitive separately
    analytic = jax.jit(_kl.analytic)
    analytic_full = jax.jit(_kl.analytic_full)
    expm1mx = jax.jit(_kl.expm1mx)
    sampled = jax.jit(_kl.sampled, static_argnames=("num_samples", "estimator"))
{refs}
rng = np.random.default_rng(0)
worst = {{}}
def check(name, got, ref, rel, abs_):
    got = np.asarray(got)
    assert got.dtype == np.float64, (name, got.dtype)
    err = np.abs(got - ref)
    ok = err <= np.maximum(rel * np.abs(ref), abs_)
    assert ok.all(), (name, got[~ok][:5], ref[~ok][:5])
    worst[name] = float(np.max(err / np.maximum(np.abs(ref), 1e-300)))

near = [0.0, 1e-8, -1e-8, 1e-6, -1e-6, 1e-3, -1e-3, 0.0999, 0.1001, -0.1001]
lv = np.concatenate([np.linspace(-30.0, 30.0, 241), near])
q_lv, p_lv = (a.reshape(-1, 1) for a in np.meshgrid(lv, lv, indexing="ij"))
for q_m in (0.0, 1e-12, 1e-3, -1e3):
    q_mean = np.full_like(q_lv, q_m)
    for p_m in (q_m, 0.0, 1e3):  # p_m = q_m isolates the e^d - 1 - d term
        check("grid", kl.analytic(q_mean, q_lv, p_m, p_lv), ref_kl_diag(q_mean, q_lv, p_m, p_lv),
              1e-12, 1e-300)
assert np.all(np.asarray(kl.analytic(q_mean, q_lv, q_mean, q_lv)) == 0.0)
qm, qlv, pm, plv = (rng.normal(size=(200, 6)) * 3 for _ in range(4))
check("random", kl.analytic(qm, qlv, pm, plv), ref_kl_diag(qm, qlv, pm, plv), 1e-13, 0.0)
x = np.concatenate([np.linspace(-80, 80, 20001), np.logspace(-150, 0, 301),
                    -np.logspace(-150, 0, 301)])
check("expm1mx", kl.expm1mx(jnp.asarray(x)), ref_expm1mx(x), 1e-13, 0.0)
def tril(shape):
    diag = np.exp(rng.normal(size=shape[:-1] + (1, shape[-1])) * 0.3)
    return np.tril(rng.normal(size=shape + (shape[-1],)) * 0.3, -1) + np.eye(shape[-1]) * diag
tq, tp = tril((50, 5)), tril((50, 5))
qm, pm = rng.normal(size=(50, 5)), rng.normal(size=(50, 5))
check("full", kl.analytic_full(qm, tq, pm, tp), ref_kl_full(qm, tq, pm, tp), 1e-11, 0.0)
s = kl.sampled(jax.random.key(0), qm, np.log(np.diagonal(tq, axis1=1, axis2=2) ** 2),
               num_samples=3, estimator="k3")
assert s.dtype == np.float64, s.dtype
print("OK", worst)
"""


def _x64_env():
    """The environment of a float64 subprocess that imports this checkout's vaekl."""
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_float64_accuracy_in_subprocess():
    """With JAX_ENABLE_X64=1: float64 in, float64 out, ~1e-12 relative of the reference."""
    refs = "\n".join(textwrap.dedent(inspect.getsource(f))
                     for f in (ref_expm1mx, ref_kl_diag, ref_kl_full))
    code = _X64_SCRIPT.format(refs=refs)
    proc = subprocess.run([sys.executable, "-c", code], env=_x64_env(), capture_output=True,
                          text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "OK" in proc.stdout


def test_analytic_full_matches_tfp_and_ignores_upper_triangles_in_float64():
    pytest.importorskip("tensorflow_probability.substrates.jax")
    code = ("import numpy as np; from tests.kl_test import check_analytic_full_against_tfp;"
            " check_analytic_full_against_tfp(np.float64); print('OK')")
    proc = subprocess.run([sys.executable, "-c", code], env=_x64_env(), capture_output=True,
                          text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


# --------------------------------------------------------------------------
# expm1mx
# --------------------------------------------------------------------------


def test_expm1mx_float32_accuracy():
    """Relative error vs float64 over [-80, 80] and tiny |x|.

    Measured (XLA CPU): <= 1.8 eps for |x| < 0.1 and |x| >= 1, but up to ~51 eps
    (6.0e-6) just above |x| = 0.1, where expm1(x) - x cancels (expm1 itself is ~2.5
    ulp). Bounds: 1e-6 outside [0.1, 1), 1e-5 inside (margins ~5x and ~1.7x).
    Results below float32's normal range (x^2/2 < 1.2e-38) may flush to 0.
    """
    x = np.concatenate([
        np.linspace(-80.0, 80.0, 160001), np.linspace(-1.0, 1.0, 200001),
        np.linspace(0.0995, 0.1015, 4001), -np.linspace(0.0995, 0.1015, 4001),
        np.logspace(-30, 0, 3001), -np.logspace(-30, 0, 3001)]).astype(np.float32)
    got = np.asarray(kl.expm1mx(jnp.asarray(x)), np.float64)
    ref = ref_expm1mx(x)
    assert np.all(np.isfinite(got)) and np.all(got >= 0.0)
    normal = ref > 1e-36
    np.testing.assert_array_less(np.abs(got - ref)[~normal], 1.2e-38)
    rel = np.abs(got - ref)[normal] / ref[normal]
    band = (np.abs(x[normal]) >= 0.1) & (np.abs(x[normal]) < 1.0)
    assert rel[~band].max() < 1e-6, rel[~band].max()
    assert rel[band].max() < 1e-5, rel[band].max()
    assert float(kl.expm1mx(jnp.float32(0.0))) == 0.0


def test_expm1mx_gradient_is_expm1():
    """d/dx (e^x - 1 - x) = expm1(x), finite on both branches and at the switch."""
    x = np.array([-80.0, -5.0, -0.1, -1e-3, 0.0, 1e-6, 0.0999, 0.1, 0.5, 20.0, 80.0], np.float32)
    g = np.asarray(jax.vmap(jax.grad(kl.expm1mx))(jnp.asarray(x)))
    np.testing.assert_allclose(g, np.expm1(x.astype(np.float64)), rtol=1e-5, atol=1e-12)


def test_expm1mx_preserves_shape_and_dtype():
    """Elementwise on any shape; float32 in, float32 out."""
    x = jnp.linspace(-2.0, 2.0, 24).reshape(2, 3, 4)
    out = kl.expm1mx(x)
    assert out.shape == (2, 3, 4) and out.dtype == jnp.float32


# --------------------------------------------------------------------------
# Sampled estimators
# --------------------------------------------------------------------------


def _mc_bound(values, axis=0, z=5.0):
    """z standard errors of the mean of `values` along `axis` (float64)."""
    v = np.asarray(values, np.float64)
    return z * v.std(axis=axis, ddof=1) / math.sqrt(v.shape[axis])


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_sampled_unbiased_estimators_converge_to_analytic(estimator):
    """k1 and k3: |mean - KL| < 5 standard errors (from the draws) per batch entry.

    sigma_q^2 > sigma_p^2 / 2 keeps E_q r^2 finite, so k3's variance (and its
    standard error) exists.
    """
    rng = np.random.default_rng(20)
    qm, qlv, pm, plv = random_diag_params(rng, (4, 3), mean_scale=0.4, lv_scale=0.15)
    assert np.all(qlv - plv > -0.5 * math.log(2.0))  # else k3 has infinite variance
    n = 200_000
    d = np.asarray(draws(jax.random.key(1), qm, qlv, pm, plv, num_samples=n,
                         estimator=estimator))
    assert d.shape == (n, 4)
    true = ref_kl_diag(qm, qlv, pm, plv)
    err = np.abs(d.astype(np.float64).mean(0) - true)
    assert np.all(err < _mc_bound(d)), (err, _mc_bound(d))
    # `sampled` is the mean of `draws` for the same key.
    s = sampled(jax.random.key(1), qm, qlv, pm, plv, num_samples=n, estimator=estimator)
    np.testing.assert_allclose(s, d.mean(0), rtol=1e-4, atol=1e-5)
    if estimator == "k1":
        assert np.mean(d < 0) > 0.1  # k1 is negative on a good share of draws
    else:
        assert np.all(d >= 0)


@pytest.mark.parametrize("m", [0.5, 1.0, 2.0])
def test_sampled_k2_has_the_theoretical_bias(m):
    """q = N(0, 1), p = N(m, 1): log r = m eps - m^2/2, so E[k2] = (m^2 + m^4/4) / 2 != m^2/2."""
    n = 200_000
    d = np.asarray(draws(jax.random.key(2), np.zeros(1, np.float32), np.zeros(1, np.float32),
                         np.float32(m), 0.0, num_samples=n, estimator="k2"))
    mean, bound = d.astype(np.float64).mean(), _mc_bound(d)
    assert abs(mean - 0.5 * (m**2 + m**4 / 4)) < bound
    assert abs(mean - m**2 / 2) > bound  # the bias m^4/8 is resolved at this n
    assert float(analytic(np.zeros(1, np.float32), np.zeros(1, np.float32),
                          np.float32(m), 0.0)) == pytest.approx(m**2 / 2, rel=1e-6)


def test_k3_is_never_negative():
    """k3 >= 0 for every draw, including far-apart and very different-width p and q."""
    rng = np.random.default_rng(21)
    qm, qlv, pm, plv = random_diag_params(rng, (64, 4), mean_scale=5.0, lv_scale=3.0)
    d = np.asarray(draws(jax.random.key(3), qm, qlv, pm, plv, num_samples=500,
                         estimator="k3"))
    assert np.all(np.isfinite(d)) and np.all(d >= 0.0)
    lr = jnp.linspace(-80.0, 80.0, 100001)
    assert bool(jnp.all(kl.estimate("k3", lr) >= 0.0))


@pytest.mark.parametrize("log_r", [80.0, -80.0, 60.0, -60.0, 1e-4, -1e-4])
def test_k3_finite_and_accurate_for_large_log_ratio(log_r):
    """estimate('k3', +-80) in float32 is finite and matches float64 e^lr - 1 - lr."""
    got = kl.estimate("k3", jnp.float32(log_r))
    assert got.dtype == jnp.float32 and np.isfinite(float(got))
    ref = float(ref_expm1mx(np.float64(np.float32(log_r))))
    assert float(got) == pytest.approx(ref, rel=1e-6)
    assert float(kl.estimate("k1", jnp.float32(log_r))) == -np.float32(log_r)
    assert float(kl.estimate("k2", jnp.float32(log_r))) == pytest.approx(0.5 * log_r**2, rel=1e-6)


def test_k3_through_draws_with_far_apart_prior():
    """q = N(0, 1), p = N(12.65, 1) in 1-D: log r = m eps - m^2/2 spans ~[-130, -30] around -80.

    (log r ~ +80 can't be reached by random draws: E_q log r = -KL <= 0 and
    the upper tail is Gaussian, so +80 is checked at a chosen z below.)
    k3 must be finite and equal float64 e^lr - 1 - lr with lr taken from k1 = -lr.
    """
    m = np.float32(math.sqrt(160.0))
    args = (np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32), m, 0.0)
    k1 = np.asarray(draws(jax.random.key(4), *args, num_samples=4000, estimator="k1"))
    k3 = np.asarray(draws(jax.random.key(4), *args, num_samples=4000, estimator="k3"))
    lr = -k1.astype(np.float64)
    assert lr.min() < -100 and lr.max() > -60 and abs(np.median(lr) + 80) < 2
    assert np.all(np.isfinite(k3))
    np.testing.assert_allclose(k3, ref_expm1mx(lr), rtol=1e-6)


def test_k3_through_log_ratio_near_plus_80():
    """q wide (log var 80) and p narrow (log var -80), z at both means: log r = 80, as the
    ELBO's k3 term forms it (log p(z) - log q(z))."""
    prior = DiagNormal(jnp.float32(0.25), jnp.float32(-80.0))
    q = DiagNormal(jnp.full((1, 1), 0.25, jnp.float32), jnp.float32(80.0))
    z = jnp.full((1, 1), 0.25, jnp.float32)
    lr = prior.log_prob(z) - q.log_prob(z)
    assert float(lr[0]) == pytest.approx(80.0, rel=1e-6)
    k3 = kl.estimate("k3", lr)
    assert np.isfinite(float(k3[0]))
    assert float(k3[0]) == pytest.approx(math.exp(80.0) - 81.0, rel=1e-5)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("standard_prior", [True, False])
def test_sampled_gradient_converges_to_analytic_gradient(estimator, standard_prior):
    """Per-draw gradients (jacobian of `draws`) average to grad(analytic) within 5 SE.

    q is kept near p (|d| <= 0.3, means within ~0.5 sd): the k3 gradient contains r,
    whose second moment is infinite once sigma_q^2 < sigma_p^2 / 2, and heavy tails
    would make the standard error computed from the draws meaningless.
    """
    qm = np.array([0.3, -0.2, 0.5], np.float32)
    qlv = np.array([-0.2, 0.1, 0.3], np.float32)
    if standard_prior:
        pm, plv = np.zeros(3, np.float32), np.zeros(3, np.float32)
    else:
        pm = np.array([0.1, 0.2, -0.1], np.float32)
        plv = np.array([0.1, -0.1, 0.2], np.float32)
    n = 100_000
    key = jax.random.key(5)

    def per_draw(m, lv):
        return kl.draws(key, m, lv, pm, plv, num_samples=n, estimator=estimator)

    jac_m, jac_lv = jax.jit(jax.jacfwd(per_draw, argnums=(0, 1)))(jnp.asarray(qm), jnp.asarray(qlv))
    true_m, true_lv = jax.grad(kl.analytic, argnums=(0, 1))(qm, qlv, pm, plv)
    # Cross-check the true gradient against its closed form too.
    np.testing.assert_allclose(true_m, (qm - pm) / np.exp(plv), rtol=1e-5)
    np.testing.assert_allclose(true_lv, 0.5 * np.expm1(qlv - plv), rtol=1e-5, atol=1e-7)
    for jac, true in ((jac_m, true_m), (jac_lv, true_lv)):
        g = np.asarray(jac, np.float64)  # [n, dim]: d draw_i / d param_j is diagonal in j
        assert np.all(np.abs(g.mean(0) - true) < _mc_bound(g) + 1e-6), (g.mean(0), true)
    # jax.grad of `sampled` is the mean of the per-draw gradients.
    gs = jax.jit(jax.grad(lambda m: kl.sampled(key, m, qlv, pm, plv, num_samples=n,
                                               estimator=estimator)))(jnp.asarray(qm))
    np.testing.assert_allclose(gs, np.asarray(jac_m).mean(0), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------
# Mixture prior
# --------------------------------------------------------------------------


def _numpy_mixture_log_prob(z, prior):
    """log sum_k w_k N(z; mu_k, diag e^lv_k) in float64 with scipy's logsumexp."""
    from scipy.special import logsumexp
    logits = np.asarray(prior.logits, np.float64)
    log_w = logits - logsumexp(logits)
    mu = np.asarray(prior.means, np.float64)
    lv = np.asarray(prior.log_vars, np.float64)
    comp = -0.5 * np.sum((z[..., None, :] - mu) ** 2 / np.exp(lv) + lv + np.log(2 * np.pi), axis=-1)
    return logsumexp(comp + log_w, axis=-1)


def test_sampled_with_mixture_prior_matches_numpy_monte_carlo():
    """k1 with a 5-component mixture equals an independent NumPy MC estimate to MC error."""
    prior = mixture(jax.random.key(6), 5, 3, spread=1.5, log_var=-0.5)
    prior = prior._replace(logits=jnp.asarray([0.3, -1.0, 0.0, 0.8, -0.2], jnp.float32))
    qm = np.array([0.3, -0.4, 1.0], np.float32)
    qlv = np.array([-0.5, 0.2, -1.0], np.float32)
    n = 100_000
    d = np.asarray(draws(jax.random.key(7), qm, qlv, prior=prior, num_samples=n), np.float64)
    rng = np.random.default_rng(23)
    eps = rng.normal(size=(n, 3))
    z = qm + np.exp(qlv / 2.0) * eps
    log_q = -0.5 * np.sum(eps**2 + qlv + np.log(2 * np.pi), axis=-1)
    ref = log_q - _numpy_mixture_log_prob(z, prior)
    bound = 5.0 * math.sqrt(d.var() / n + ref.var() / n)
    assert abs(d.mean() - ref.mean()) < bound
    s = sampled(jax.random.key(7), qm, qlv, prior=prior, num_samples=n)
    assert float(s) == pytest.approx(d.mean(), rel=1e-4)
    k3 = np.asarray(draws(jax.random.key(8), qm, qlv, prior=prior, num_samples=10_000,
                          estimator="k3"))
    assert np.all(k3 >= 0.0)


def test_mixture_log_prob_matches_numpy():
    """The mixture's log_prob agrees with the scipy logsumexp formula."""
    prior = mixture(jax.random.key(9), 4, 2)
    prior = prior._replace(logits=jnp.asarray([0.0, 1.0, -2.0, 0.5], jnp.float32))
    z = np.random.default_rng(24).normal(size=(7, 2)).astype(np.float32) * 2
    got = jax.jit(lambda p, z: p.log_prob(z))(prior, jnp.asarray(z))
    np.testing.assert_allclose(got, _numpy_mixture_log_prob(z, prior), rtol=1e-5, atol=1e-5)


def test_analytic_with_mixture_prior_raises():
    """There is no closed form against a mixture: ValueError saying so."""
    prior = mixture(jax.random.key(10), 3, 2)
    with pytest.raises(ValueError, match="no closed form"):
        kl.analytic(jnp.zeros(2), jnp.zeros(2), prior=prior)


def test_one_component_mixture_equals_diag_normal():
    """A 1-component mixture is the DiagNormal: same draws (same key) and MC -> analytic."""
    pm = np.array([0.5, -1.0, 0.2], np.float32)
    plv = np.array([0.3, -0.4, 0.0], np.float32)
    mix = MixtureOfGaussians(jnp.zeros(1), jnp.asarray(pm[None]), jnp.asarray(plv[None]))
    normal = DiagNormal(pm, plv)
    qm = np.array([[0.1, 0.2, 0.3], [-1.0, 0.0, 1.0]], np.float32)
    qlv = np.array([[0.0, -0.5, 0.5], [0.2, 0.1, -0.3]], np.float32)
    key = jax.random.key(11)
    d_mix = draws(key, qm, qlv, prior=mix, num_samples=1000)
    d_normal = draws(key, qm, qlv, prior=normal, num_samples=1000)
    # Same z; the two code paths differ only by rounding of O(10) terms.
    np.testing.assert_allclose(d_mix, d_normal, rtol=1e-5, atol=2e-5)
    n = 100_000
    d = np.asarray(draws(jax.random.key(12), qm, qlv, prior=mix, num_samples=n))
    true = np.asarray(analytic(qm, qlv, prior=normal))
    assert np.all(np.abs(d.astype(np.float64).mean(0) - true) < _mc_bound(d))


# --------------------------------------------------------------------------
# jit, vmap, retracing
# --------------------------------------------------------------------------


def test_jit_and_vmap_agree_with_plain_calls():
    """analytic, analytic_full and sampled give the same values under jit and vmap."""
    rng = np.random.default_rng(25)
    qm, qlv, pm, plv = random_diag_params(rng, (6, 4))
    plain = kl.analytic(qm, qlv, pm, plv)
    np.testing.assert_allclose(jax.jit(kl.analytic)(qm, qlv, pm, plv), plain, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.vmap(kl.analytic))(qm, qlv, pm, plv), plain, rtol=1e-6)

    tq, tp = random_tril(rng, (6,), 4), random_tril(rng, (6,), 4)
    plain = kl.analytic_full(qm, tq, pm, tp)
    np.testing.assert_allclose(jax.jit(kl.analytic_full)(qm, tq, pm, tp), plain, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(jax.vmap(kl.analytic_full))(qm, tq, pm, tp), plain,
                               rtol=1e-5)

    jsampled = jax.jit(kl.sampled, static_argnames=("num_samples", "estimator"))
    for est in ("k1", "k3"):
        key = jax.random.key(13)
        plain = kl.sampled(key, qm, qlv, pm, plv, num_samples=16, estimator=est)
        np.testing.assert_allclose(jsampled(key, qm, qlv, pm, plv, num_samples=16, estimator=est),
                                   plain, rtol=1e-5, atol=1e-6)
    keys = jax.random.split(jax.random.key(14), 4)
    vm = jax.jit(jax.vmap(lambda k: kl.sampled(k, qm, qlv, pm, plv, num_samples=16,
                                               estimator="k3")))(keys)
    loop = np.stack([jsampled(k, qm, qlv, pm, plv, num_samples=16, estimator="k3")
                     for k in keys])
    np.testing.assert_allclose(vm, loop, rtol=1e-5, atol=1e-6)
    assert not np.allclose(loop[0], loop[1])  # different keys, different draws


def test_no_retracing_for_equal_shapes():
    """Two calls with new values of equal shape trace once; a new shape traces again."""
    traces = []

    @functools.partial(jax.jit, compiler_options=FAST)
    def f(key, qm, qlv, pm, plv):
        traces.append(qm.shape)
        return kl.analytic(qm, qlv, pm, plv), kl.sampled(key, qm, qlv, pm, plv, num_samples=4)

    rng = np.random.default_rng(26)
    for seed in range(3):
        f(jax.random.key(seed), *random_diag_params(rng, (5, 3)))
    assert len(traces) == 1
    f(jax.random.key(0), *random_diag_params(rng, (2, 3)))
    assert len(traces) == 2

    # sampled jitted directly, num_samples static: equal shapes reuse the trace.
    sampled_traces = []

    def counted_sampled(key, qm, qlv, *, num_samples):
        sampled_traces.append(num_samples)
        return kl.sampled(key, qm, qlv, num_samples=num_samples, estimator="k3")

    g = jax.jit(counted_sampled, static_argnames="num_samples", compiler_options=FAST)
    for seed in range(3):
        qm, qlv, _, _ = random_diag_params(rng, (4, 2))
        g(jax.random.key(seed), qm, qlv, num_samples=8)
    assert sampled_traces == [8]
    g(jax.random.key(0), qm, qlv, num_samples=9)
    assert sampled_traces == [8, 9]


# --------------------------------------------------------------------------
# Properties (Hypothesis)
# --------------------------------------------------------------------------

_means = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
_log_vars = st.floats(-30.0, 30.0, width=32, allow_subnormal=False)


@st.composite
def _diag_pair(draw, dim=None):
    """(q_mean, q_log_var, p_mean, p_log_var) float32 arrays of a common shape [dim]."""
    dim = dim or draw(st.integers(1, 4))

    def arr(elements):
        return draw(hnp.arrays(np.float32, (dim,), elements=elements))

    return arr(_means), arr(_log_vars), arr(_means), arr(_log_vars)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(_diag_pair())
def test_property_nonnegative_and_finite(args):
    """KL >= 0 exactly (no rounding below zero) and finite on [-1e3, 1e3] x [-30, 30]."""
    out = float(analytic(*args))
    assert np.isfinite(out) and out >= 0.0


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(_diag_pair(), st.integers(0, 3), st.sampled_from(["mean", "log_var"]),
       st.integers(-1000, 1000))
def test_property_zero_iff_equal(args, index, which, ulps):
    """p = q gives 0; p = q with one parameter moved by `ulps` ulps gives > 0 unless underflow."""
    qm, qlv, _, _ = args
    assert float(analytic(qm, qlv, qm, qlv)) == 0.0
    pm, plv = qm.copy(), qlv.copy()
    target = pm if which == "mean" else plv
    i = index % target.shape[0]
    for _ in range(abs(ulps)):
        target[i] = np.nextafter(target[i], np.float32(np.inf if ulps > 0 else -np.inf))
    out = float(analytic(qm, qlv, pm, plv))
    ref = float(ref_kl_diag(qm, qlv, pm, plv))
    if ulps == 0:
        assert out == 0.0
    elif ref > 1e-30:  # well above float32's smallest normal (1.2e-38): must not vanish
        assert out > 0.0
        assert out == pytest.approx(ref, rel=1e-4)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(_diag_pair(), _diag_pair())
def test_property_additive_over_independent_dimensions(a, b):
    """KL over concatenated dimensions equals the sum of the parts' KLs."""
    whole = float(analytic(*(np.concatenate([x, y]) for x, y in zip(a, b))))
    parts = float(analytic(*a)) + float(analytic(*b))
    # Both are float32 sums of <= 8 nonnegative terms: a few ulp of the total.
    assert whole == pytest.approx(parts, rel=4 * 8 * F32_EPS, abs=1e-37)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(_diag_pair(dim=3))
def test_property_matches_reference(args):
    """Random-point version of the grid test: 1e-5 relative or 1e-7 absolute."""
    got = float(analytic(*args))
    ref = float(ref_kl_diag(*args))
    assert abs(got - ref) <= max(1e-5 * abs(ref), 1e-7), (got, ref)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

_Q = np.zeros((2, 3), np.float32)


def test_shape_mismatch_names_arguments():
    """Non-broadcasting shapes: ValueError listing the arguments."""
    with pytest.raises(ValueError, match=r"q_mean.*q_log_var"):
        kl.analytic(_Q, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="p_mean"):
        kl.analytic(_Q, _Q, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="q_log_var"):
        kl.sampled(jax.random.key(0), _Q, np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="q_scale_tril"):
        kl.analytic_full(_Q, np.zeros((2, 4, 4), np.float32))


@pytest.mark.parametrize("name", ["q_mean", "q_log_var", "p_mean", "p_log_var"])
def test_integer_dtype_names_argument(name):
    """An integer array is refused with TypeError naming it (no silent cast)."""
    args = {"q_mean": _Q, "q_log_var": _Q, "p_mean": _Q, "p_log_var": _Q}
    args[name] = np.zeros((2, 3), np.int32)
    with pytest.raises(TypeError, match=f"`{name}`"):
        kl.analytic(**args)
    with pytest.raises(TypeError, match=f"`{name}`"):
        kl.sampled(jax.random.key(0), **args)


def test_integer_scale_tril_and_bool_mean_refused():
    """analytic_full refuses an integer factor; booleans are not floats either."""
    with pytest.raises(TypeError, match="`q_scale_tril`"):
        kl.analytic_full(_Q, np.ones((2, 3, 3), np.int64))
    with pytest.raises(TypeError, match="`p_scale_tril`"):
        kl.analytic_full(_Q, np.ones((2, 3, 3), np.float32), 0.0, np.eye(3, dtype=np.int32))
    with pytest.raises(TypeError, match="`q_mean`"):
        kl.analytic(np.zeros((2, 3), bool), _Q)


def test_scalar_q_mean_refused():
    """q_mean without an event axis: ValueError naming it."""
    with pytest.raises(ValueError, match="q_mean"):
        kl.analytic(np.float32(0.0), _Q)
    with pytest.raises(ValueError, match="q_mean"):
        kl.sampled(jax.random.key(0), jnp.float32(0.0), jnp.float32(0.0))
    with pytest.raises(ValueError, match="q_mean"):
        kl.analytic_full(jnp.float32(0.0), jnp.eye(2))


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError),
                                          (1.5, TypeError), (True, TypeError)])
def test_bad_num_samples(value, error):
    """num_samples must be an int >= 1; the message names it."""
    for fn in (kl.sampled, kl.draws):
        with pytest.raises(error, match="num_samples"):
            fn(jax.random.key(0), _Q, _Q, num_samples=value)


def test_unknown_estimator():
    """estimator='k4' is refused, naming the argument and the choices."""
    with pytest.raises(ValueError, match=r"estimator.*'k4'.*k1.*k2.*k3"):
        kl.sampled(jax.random.key(0), _Q, _Q, estimator="k4")


@pytest.mark.parametrize("prior", [(0.0, 0.0), {"mean": 0.0}, "normal"])
def test_prior_of_wrong_type(prior):
    """A prior that is not a vaekl prior: TypeError naming `prior`."""
    with pytest.raises(TypeError, match="`prior`"):
        kl.analytic(_Q, _Q, prior=prior)
    with pytest.raises(TypeError, match="`prior`"):
        kl.sampled(jax.random.key(0), _Q, _Q, prior=prior)


@pytest.mark.parametrize("name", ["q_mean", "q_log_var", "p_mean", "p_log_var"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_checked_nonfinite_inputs_raise_naming_argument(name, bad):
    """checked(jit(analytic)) raises FloatingPointError naming the bad argument."""
    args = {k: np.zeros((2, 3), np.float32) for k in ("q_mean", "q_log_var", "p_mean", "p_log_var")}
    args[name][1, 2] = bad
    with pytest.raises(FloatingPointError, match=f"`{name}`"):
        vaekl.checked(jax.jit(kl.analytic))(**args)
    # Without `checked`, no error: the value just propagates.
    out = jax.jit(kl.analytic)(**args)
    assert np.isfinite(out[0]) and not np.isfinite(out[1])


def test_checked_sampled_and_full():
    """checked() also covers sampled and analytic_full; finite inputs pass through unchanged."""
    q = np.zeros((2, 3), np.float32)
    bad = q.copy()
    bad[0, 0] = np.nan
    jsampled = jax.jit(kl.sampled, static_argnames=("num_samples", "estimator"))
    with pytest.raises(FloatingPointError, match="`q_log_var`"):
        vaekl.checked(jsampled)(jax.random.key(0), q, bad, num_samples=2)
    bad_tril = np.stack([np.eye(3, dtype=np.float32), np.full((3, 3), np.nan, np.float32)])
    with pytest.raises(FloatingPointError, match="`q_scale_tril`"):
        vaekl.checked(jax.jit(kl.analytic_full))(q, bad_tril)
    ok = vaekl.checked(jax.jit(kl.analytic))(q, q)
    np.testing.assert_array_equal(ok, np.zeros(2, np.float32))
    out = jsampled(jax.random.key(0), q, bad, num_samples=2)  # no error without checked
    assert np.isnan(out[0]) and np.isfinite(out[1])


def test_estimate_refuses_an_unknown_estimator():
    with pytest.raises(ValueError, match="estimator.*k1"):
        vaekl.kl.estimate("k4", jnp.zeros(3))


def test_analytic_per_dim_sums_to_analytic():
    rng = np.random.default_rng(5)
    qm, qlv, pm, plv = (jnp.asarray(rng.normal(size=(7, 4)), jnp.float32) for _ in range(4))
    per_dim = vaekl.kl.analytic_per_dim(qm, qlv, pm, plv)
    assert per_dim.shape == (7, 4)
    np.testing.assert_array_equal(jnp.sum(per_dim, -1), vaekl.kl.analytic(qm, qlv, pm, plv))
    with pytest.raises(ValueError, match="analytic_per_dim.*no closed form"):
        vaekl.kl.analytic_per_dim(qm, qlv, prior=mixture(jax.random.key(0), 2, 4))


# --------------------------------------------------------------------------
# The registry: divergence(q, p), terms(q_type, p_type)
# --------------------------------------------------------------------------


def test_terms_of_every_family_and_prior():
    """The one answer to "which KL terms apply": closed form where a pair is registered,
    entropy where q has one, k1/k3/stl everywhere (every family here is reparameterised)."""
    from vaekl import posteriors

    every = ("analytic", "k1", "k3", "stl", "entropy")
    want = {("diag", DiagNormal): every, ("full", DiagNormal): every,
            ("iaf", DiagNormal): ("k1", "k3", "stl"),
            ("diag", MixtureOfGaussians): every[1:], ("full", MixtureOfGaussians): every[1:],
            ("iaf", MixtureOfGaussians): ("k1", "k3", "stl"),
            ("full", FullNormal): every, ("diag", FullNormal): every[1:]}
    for (family, p_type), terms in want.items():
        assert kl.terms(posteriors.FAMILIES[family], p_type) == terms, (family, p_type)
    # A mixture as q: its component draw has no path derivative, so no STL.
    assert kl.terms(MixtureOfGaussians, DiagNormal) == ("k1", "k3")


def test_divergence_of_each_registered_pair_matches_tfp():
    """diag-diag, full-diag and full-full against TFP's closed forms, batched q and p."""
    tfd = pytest.importorskip("tensorflow_probability.substrates.jax").distributions
    rng = np.random.default_rng(12)
    qm, qlv, pm, plv = random_diag_params(rng, (6, 3))
    tq, tp = random_tril(rng, (6,), 3), random_tril(rng, (6,), 3)
    diag_q, diag_p = DiagNormal(qm, qlv), DiagNormal(pm, plv)
    full_q, full_p = FullNormal(qm, tq), FullNormal(pm, tp)

    def mvn_diag(m, lv):
        return tfd.MultivariateNormalDiag(m, np.exp(0.5 * lv))

    cases = [(diag_q, diag_p, mvn_diag(qm, qlv), mvn_diag(pm, plv)),
             (full_q, diag_p, tfd.MultivariateNormalTriL(qm, tq), mvn_diag(pm, plv)),
             (full_q, full_p, tfd.MultivariateNormalTriL(qm, tq),
              tfd.MultivariateNormalTriL(pm, tp))]
    for q, p, ref_q, ref_p in cases:
        got = jax.jit(kl.divergence)(q, p)
        assert got.shape == (6,)
        np.testing.assert_allclose(got, tfd.kl_divergence(ref_q, ref_p), rtol=1e-4, atol=1e-5,
                                   err_msg=kl.pair_name(type(q), type(p)))


def test_full_against_a_batched_diagonal_prior():
    """Audit (issue 22): KL(full || diag) raised for a prior with batched log_var [B, dim]
    (`broadcast_to(..., (dim,))`) where the diagonal q accepts it; each row now matches TFP."""
    tfd = pytest.importorskip("tensorflow_probability.substrates.jax").distributions
    rng = np.random.default_rng(13)
    qm, _, pm, plv = random_diag_params(rng, (5, 4))
    tq = random_tril(rng, (5,), 4)
    got = kl.divergence(FullNormal(qm, tq), DiagNormal(pm, plv))
    want = tfd.kl_divergence(tfd.MultivariateNormalTriL(qm, tq),
                             tfd.MultivariateNormalDiag(pm, np.exp(0.5 * plv)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # A scalar prior and a shared [dim] one still broadcast.
    for p in (DiagNormal(0.0, 0.0), DiagNormal(pm[0], plv[0])):
        assert kl.divergence(FullNormal(qm, tq), p).shape == (5,)


def test_divergence_of_an_unregistered_pair_names_it_and_the_terms_that_work():
    from vaekl import posteriors

    iaf = posteriors.IAF(jnp.zeros(2), jnp.zeros(2), jnp.zeros(0),
                         posteriors.init_iaf(jax.random.key(0), 2, (4,), 1, 0))
    for q, p, pair, terms in [
            (DiagNormal(jnp.zeros(2), jnp.zeros(2)), mixture(jax.random.key(1), 2, 2),
             "KL(DiagNormal || MixtureOfGaussians)", ("k1", "k3", "stl", "entropy")),
            (iaf, DiagNormal(0.0, 0.0), "KL(IAF || DiagNormal)", ("k1", "k3", "stl"))]:
        with pytest.raises(ValueError, match="vaekl.kl.divergence: the KL has no closed form"
                           ) as info:
            kl.divergence(q, p)
        assert pair in str(info.value) and str(terms) in str(info.value)


def _scaled_eye(scale):
    return np.float32(scale) * np.eye(3, dtype=np.float32)


@pytest.mark.parametrize("scale, want", [(1e-20, 0.5 * 3 * (1e-40 - 1 + 40 * math.log(10))),
                                         (1e-30, 0.5 * 3 * (1e-60 - 1 + 60 * math.log(10))),
                                         (1e-3, 0.5 * 3 * (1e-6 - 1 + 6 * math.log(10)))])
def test_analytic_full_of_a_tiny_scale_is_finite_in_float32(scale, want):
    """Audit (issue 22): log(M_ii^2) underflowed to log(0) = -inf in float32 for
    |M_ii| < 1.1e-19 (and M_ii^2 overflowed to inf above 1.8e19, inf - inf = NaN);
    2 log |M_ii| avoids both."""
    got = float(analytic_full(np.zeros(3, np.float32), _scaled_eye(scale)))
    assert got == pytest.approx(want, rel=1e-6)


def test_analytic_full_of_a_huge_scale_is_inf_not_nan_in_float32():
    """M_ii = 1e20: the KL, ~1.5e40, exceeds float32: +inf, not the NaN of inf - inf."""
    assert np.isposinf(float(analytic_full(np.zeros(3, np.float32), _scaled_eye(1e20))))
    # In float32 range the large-scale KL is accurate: M_ii = 1e15, KL ~ 1.5e30.
    got = float(analytic_full(np.zeros(3, np.float32), _scaled_eye(1e15)))
    assert got == pytest.approx(0.5 * 3 * (1e30 - 1 - 30 * math.log(10)), rel=1e-5)
