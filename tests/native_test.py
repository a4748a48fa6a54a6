"""The native CPU kernel behind `kl.analytic` for large float32 inputs."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaekl import kl, native

REPO = Path(__file__).resolve().parents[1]
ROWS, DIM = 4096, 64  # 2^18 elements: above native.MIN_ELEMENTS.

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler")


def _expm1mx64(x):
    """e^x - 1 - x in float64 (a series below 1e-3), exact enough for float32 inputs."""
    x = np.asarray(x, np.float64)
    with np.errstate(over="ignore"):
        return np.where(np.abs(x) < 1e-3, x**2 / 2 + x**3 / 6 + x**4 / 24, np.expm1(x) - x)


def _reference(mean, log_var):
    """float64 NumPy: 1/2 sum(mean^2 + expm1(lv) - lv)."""
    m = np.asarray(mean, np.float64)
    return 0.5 * np.sum(m * m + _expm1mx64(log_var), axis=-1)


def _inputs(seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    log_var = (rng.normal(size=(ROWS, DIM)) * scale).astype(np.float32)
    return mean, log_var


def test_the_kernel_builds_and_is_what_analytic_runs_for_large_float32():
    assert native.available()
    mean, log_var = _inputs()
    hlo = jax.jit(kl.analytic).lower(mean, log_var).as_text()
    assert native.TARGET in hlo
    small = jax.jit(kl.analytic).lower(mean[:8], log_var[:8]).as_text()
    assert native.TARGET not in small  # Small inputs stay in XLA, fused with their neighbours.
    other_prior = jax.jit(kl.analytic).lower(mean, log_var, 0.0, jnp.zeros(DIM)).as_text()
    assert native.TARGET not in other_prior  # Any other prior: XLA's formulation.


def test_matches_float64_to_float32_rounding():
    mean, log_var = _inputs()
    got = np.asarray(jax.jit(kl.analytic)(mean, log_var))
    np.testing.assert_allclose(got, _reference(mean, log_var), rtol=2e-6)
    # ... and XLA's own formulation of the same sums.
    xla = np.asarray(jax.jit(lambda m, v: jnp.sum(kl.analytic_per_dim(m, v), -1))(mean, log_var))
    np.testing.assert_allclose(got, xla, rtol=2e-6)


@pytest.mark.parametrize("magnitude", [1e-8, 1e-5, 1e-3, 0.1, 0.4999, 0.5, 0.5001, 5.0, 30.0,
                                       80.0])
def test_relative_accuracy_at_every_scale_of_the_variance_ratio(magnitude):
    # mean = 0, every log-variance +-magnitude: the KL is sum(e^x - 1 - x)/2, tiny near 0.
    log_var = np.full((ROWS, DIM), magnitude, np.float32)
    log_var[::2] *= -1
    got = np.asarray(kl.analytic(np.zeros_like(log_var), log_var))
    ref = _reference(np.zeros_like(log_var), log_var)
    assert np.all(got > 0)
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def _reference_elementwise(x):
    """(e^x - 1 - x) / 2 in float64 rounded to float32, and whether e^x - 1 - x overflows it."""
    ref = 0.5 * _expm1mx64(x)
    with np.errstate(over="ignore"):
        return ref.astype(np.float32), 2 * ref > np.finfo(np.float32).max


def _log_variances_across_the_range():
    """[2^16, 1]: -100..100, the clamp and overflow edges, tiny values (dim 1: a short row)."""
    edges = [-87.5, -87.0, -86.9, 87.9, 88.0, 88.02, 88.04, 88.4, 88.6, 88.7, 88.72, 88.73, 88.8,
             1e-8, -1e-8, 1e-30, 0.0, 1e30, -1e30]
    x = np.concatenate([np.linspace(-100, 100, (1 << 16) - len(edges)), edges])
    return x.astype(np.float32)[:, None]


def _check_elementwise(kl_fn):
    log_var = _log_variances_across_the_range()
    got = np.asarray(kl_fn(np.zeros_like(log_var), log_var))
    ref, overflows = _reference_elementwise(log_var[:, 0])
    assert np.all(got[overflows] == np.inf)
    np.testing.assert_allclose(got[~overflows], ref[~overflows], rtol=1e-6)


def test_every_log_variance_from_minus_100_to_100_one_per_row():
    # Up to log FLT_MAX = 88.72 the result is finite (the kernel once gave NaN and inf
    # for log-variances in (88.03, 88.72], where 2^k alone overflows); above, inf.
    _check_elementwise(kl.analytic)


@pytest.mark.parametrize("dim", [1, 5, 16, 17, 20, 64, 100])
def test_row_lengths_that_do_and_do_not_fill_whole_vectors(dim):
    rng = np.random.default_rng(dim)
    rows = -(-(1 << 16) // dim)
    mean = rng.normal(size=(rows, dim)).astype(np.float32)
    log_var = (rng.normal(size=(rows, dim)) * 3).astype(np.float32)
    np.testing.assert_allclose(kl.analytic(mean, log_var), _reference(mean, log_var), rtol=2e-6)


def test_the_portable_build_without_avx512_agrees(tmp_path):
    # The kernel's scalar form, which the compiler vectorises, serves CPUs without AVX-512.
    import ctypes

    native._compile(native.compiler(), tmp_path / "portable.so", extra_flags=("-mno-avx512f",))
    lib = ctypes.cdll.LoadLibrary(str(tmp_path / "portable.so"))
    jax.ffi.register_ffi_target("vaekl_kl_diag_portable", jax.ffi.pycapsule(lib.VaeklKlDiag),
                                platform="cpu")

    def portable(mean, log_var):
        return jax.ffi.ffi_call("vaekl_kl_diag_portable",
                                jax.ShapeDtypeStruct(mean.shape[:-1], mean.dtype))(mean, log_var)

    _check_elementwise(portable)
    mean, log_var = _inputs()
    np.testing.assert_allclose(portable(mean, log_var), _reference(mean, log_var), rtol=2e-6)


def test_exact_zero_at_the_prior_and_non_finite_values_propagate():
    mean, log_var = np.zeros((ROWS, DIM), np.float32), np.zeros((ROWS, DIM), np.float32)
    log_var[1, 3], log_var[2, 0], mean[3, 5] = np.nan, 100.0, np.inf
    got = np.asarray(kl.analytic(mean, log_var))
    assert got[0] == 0.0 and np.all(got[4:] == 0.0)
    assert np.isnan(got[1]) and got[2] == np.inf and got[3] == np.inf


def test_gradients_and_vmap():
    mean, log_var = (jnp.asarray(a) for a in _inputs(1, scale=1.0))
    g_mean, g_log_var = jax.grad(lambda m, v: jnp.sum(kl.analytic(m, v)), (0, 1))(mean, log_var)
    np.testing.assert_allclose(g_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(g_log_var, 0.5 * jnp.expm1(log_var), rtol=1e-6, atol=1e-7)
    batched = jax.vmap(kl.analytic)(mean.reshape(4, -1, DIM), log_var.reshape(4, -1, DIM))
    np.testing.assert_allclose(batched.reshape(-1), kl.analytic(mean, log_var), rtol=1e-7)


def _run(env_extra, tmp_path):
    code = ("import numpy as np, jax; from vaekl import kl, native;"
            " x = np.linspace(-3, 3, 4096 * 64, dtype=np.float32).reshape(4096, 64);"
            " print(native.available(), float(kl.analytic(x, x).sum()),"
            " native.TARGET in jax.jit(kl.analytic).lower(x, x).as_text())")
    env = {**os.environ, "VAEKL_CACHE": str(tmp_path), **env_extra}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    available, total, used = proc.stdout.split()
    return available == "True", float(total), used == "True", proc.stderr


def test_without_the_kernel_vaekl_uses_xla_with_the_same_values(tmp_path):
    built, total, used, _ = _run({}, tmp_path / "fresh")
    assert built and used and list((tmp_path / "fresh").glob("kl_diag-*.so"))
    off, total_off, used_off, _ = _run({"VAEKL_NATIVE": "0"}, tmp_path / "off")
    assert not off and not used_off
    broken, total_broken, used_broken, log = _run({"CXX": "false"}, tmp_path / "broken")
    assert not broken and not used_broken
    assert "native KL kernel is unavailable" in log
    np.testing.assert_allclose([total_off, total_broken], total, rtol=1e-6)


def test_concurrent_kernels_on_the_pool_threads_do_not_deadlock(tmp_path):
    # Four large KLs per loop step, each fed by a matmul that XLA runs on its intra-op
    # pool, so the kernels start on pool threads at once. A kernel that waited for work
    # it had queued on the (then fully busy) pool hung here within a few steps.
    code = ("import jax, jax.numpy as jnp, numpy as np; from vaekl import kl, native;"
            " assert native.available();"
            " rng = np.random.default_rng(0);"
            " x = [jnp.asarray(rng.normal(size=(1 << 15, 64)), jnp.float32) for _ in range(8)];"
            " w = jnp.asarray(rng.normal(size=(64, 64)) * 0.1, jnp.float32);"
            " body = lambda i, c: c + 1e-3 * sum(kl.analytic(jnp.tanh(x[2 * j] @ w) + c[:, None],"
            " jnp.tanh(x[2 * j + 1] @ w)) for j in range(4));"
            " f = jax.jit(lambda: jax.lax.fori_loop(0, 50, body, jnp.zeros(1 << 15)));"
            " [jax.block_until_ready(f()) for _ in range(5)]; print('done')")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, timeout=240, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail("concurrent native KL kernels deadlocked (no result in 240 s)")
    assert proc.stdout.split()[-1] == "done"
