"""The likelihood pieces of vaekl.models checked against independent references."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaekl import models

REPO = Path(__file__).resolve().parents[1]


def _logits():
    """Logits over [-100, 100]: a dense grid, tiny magnitudes, float32's exp edges."""
    return np.concatenate([np.linspace(-100, 100, 20001), -np.logspace(-10, 2, 300),
                           np.logspace(-10, 2, 300), [0.0, 87.0, -87.0, 88.7, -88.7]])


def _reference(logits, x):
    """log Bernoulli(x; sigmoid(logits)) per element in float64 NumPy:
    x log sigmoid(l) + (1 - x) log sigmoid(-l), with log sigmoid(l) = -log(1 + e^-l)."""
    logits, x = np.asarray(logits, np.float64), np.asarray(x, np.float64)
    return -(x * np.logaddexp(0.0, -logits) + (1.0 - x) * np.logaddexp(0.0, logits))


def check_bernoulli_log_prob(dtype):
    """Values and logit-gradients of `bernoulli_log_prob` in `dtype` against float64 NumPy.

    Per element (a last axis of 1): within 2 ulps of |logit| + 1, the size of
    softplus(logit); the gradient of -log p is sigmoid(logit) - x, within 32 ulps.
    Then a [8, 784] batch of logits in [-100, 100], summed: within 4 ulps of the
    sum of |logit| + 1. Used here in float32 and, in a subprocess with x64 on, in float64.
    """
    eps = float(np.finfo(dtype).eps)
    logits = _logits().astype(dtype)
    l64 = logits.astype(np.float64)
    value = jax.jit(models.bernoulli_log_prob)
    grad = jax.jit(jax.vmap(jax.grad(lambda l, x: -models.bernoulli_log_prob(l[None], x[None]))))
    for target in (0.0, 1.0, 0.3):
        x = np.full(logits.shape, target, dtype)
        got = np.asarray(value(logits[:, None], x[:, None]))
        assert got.dtype == dtype and got.shape == logits.shape
        np.testing.assert_array_less(np.abs(got - _reference(l64, x)), 2 * eps * (np.abs(l64) + 1))
        g = np.asarray(grad(logits, x))
        assert g.dtype == dtype
        sigmoid = np.where(l64 >= 0, 1 / (1 + np.exp(-np.abs(l64))),
                           np.exp(-np.abs(l64)) / (1 + np.exp(-np.abs(l64))))
        np.testing.assert_allclose(g, sigmoid - x.astype(np.float64), rtol=0, atol=32 * eps)
    rng = np.random.default_rng(0)
    logits = rng.uniform(-100, 100, size=(8, 784)).astype(dtype)
    x = np.where(rng.random((8, 784)) < 0.5, rng.integers(0, 2, (8, 784)),
                 rng.random((8, 784))).astype(dtype)
    l64 = logits.astype(np.float64)
    got = np.asarray(value(logits, x))
    ref = np.sum(_reference(l64, x), axis=-1)
    np.testing.assert_array_less(np.abs(got - ref), 4 * eps * np.sum(np.abs(l64) + 1, axis=-1))


def test_bernoulli_log_prob_float32_against_float64_numpy_up_to_logits_of_100():
    check_bernoulli_log_prob(np.float32)


def test_bernoulli_log_prob_float64_against_float64_numpy_up_to_logits_of_100():
    code = ("import numpy as np; from tests.models_test import check_bernoulli_log_prob;"
            " check_bernoulli_log_prob(np.float64); print('OK')")
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=120, check=False)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-4000:]


@pytest.mark.parametrize("seed", [0, 1])
def test_bernoulli_log_prob_matches_a_direct_formula(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(16, 784)) * 4
    x = (rng.random((16, 784)) < 0.3).astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-logits))
    ref = np.sum(x * np.log(p) + (1 - x) * np.log1p(-p), axis=-1)
    got = models.bernoulli_log_prob(jnp.asarray(logits, jnp.float32), jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("kind, posterior, likelihood, prior, encoder, decoder", [
    ("mlp", "iaf", "gaussian", "vamp", {"enc_net", "iaf"}, {"dec_net", "log_scale"}),
    ("mlp", "diag", "bernoulli", "standard", {"enc_net"}, {"dec_net"}),
    ("conv", "diag", "bernoulli", "learned", {"enc_torso", "enc_head"}, {"dec_net"})])
def test_split_params_puts_every_network_parameter_in_one_part(kind, posterior, likelihood,
                                                              prior, encoder, decoder):
    model = models.VAE(latents=2, data_dim=16, hidden=(4,), kind=kind, image_shape=(4, 4, 1),
                       posterior=posterior, likelihood=likelihood, prior=prior, iaf_steps=1,
                       iaf_hidden=(4,), iaf_context=2, num_pseudo_inputs=3)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16)),
                               jnp.zeros((1, 2)))
    parts = models.split_params(variables)
    assert set(parts) == {"encoder", "decoder"}
    assert set(parts["encoder"]) == encoder and set(parts["decoder"]) == decoder
    # The rest is the prior's own: a learned prior's or the VampPrior's pseudo-inputs.
    rest = set(variables["params"]) - encoder - decoder
    assert rest == {"standard": set(), "vamp": {"pseudo_inputs"},
                    "learned": {"prior_mean", "prior_log_var"}}[prior]
    assert parts["encoder"]["enc_head" if kind == "conv" else "enc_net"] is variables["params"][
        "enc_head" if kind == "conv" else "enc_net"]
