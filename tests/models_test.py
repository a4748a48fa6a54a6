"""The likelihood pieces of vaekl.models checked against independent references."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaekl import models

REPO = Path(__file__).resolve().parents[1]


def _grid():
    return np.concatenate([np.linspace(-80, 100, 20001), -np.logspace(-10, 1.9, 300),
                           np.logspace(-10, 2, 300), [0.0]])


def test_softplus_float32_within_a_few_ulp_of_float64():
    x = _grid().astype(np.float32)
    ref = np.logaddexp(0.0, x.astype(np.float64))
    got = np.asarray(jax.jit(models.softplus)(jnp.asarray(x)))
    np.testing.assert_allclose(got, ref, rtol=4e-7, atol=0)


def test_softplus_float64_to_double_precision():
    code = ("import jax, numpy as np; jax.config.update('jax_enable_x64', True);"
            " from vaekl import models; from tests.models_test import _grid;"
            " x = _grid(); got = np.asarray(models.softplus(x));"
            " print(np.max(np.abs(got - np.logaddexp(0.0, x)) / np.logaddexp(0.0, x)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, text=True,
                         capture_output=True, timeout=120)
    assert float(out.stdout) < 2e-15


def test_softplus_gradient_is_the_sigmoid_and_extremes_are_kept():
    x = jnp.asarray(_grid(), jnp.float32)
    g = jax.grad(lambda v: models.softplus(v).sum())(x)
    np.testing.assert_allclose(g, 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64))), atol=2e-7)
    out = models.softplus(jnp.array([jnp.nan, jnp.inf, -jnp.inf, -200.0, 200.0]))
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == 0.0 and out[3] == 0.0
    assert out[4] == 200.0


@pytest.mark.parametrize("seed", [0, 1])
def test_bernoulli_log_prob_matches_a_direct_formula(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(16, 784)) * 4
    x = (rng.random((16, 784)) < 0.3).astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-logits))
    ref = np.sum(x * np.log(p) + (1 - x) * np.log1p(-p), axis=-1)
    got = models.bernoulli_log_prob(jnp.asarray(logits, jnp.float32), jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
