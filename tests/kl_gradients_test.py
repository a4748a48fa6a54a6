"""The kl_gradients experiment: the exact reduction against autodiff, the algebra's predictions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import kl_gradients
from experiments.configs import kl_gradients as config_lib


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    config = config_lib.get_config("quick")
    return config, kl_gradients.run(config, str(tmp_path_factory.mktemp("klg")))


def _rows(results, **where):
    return [r for r in results["rows"] if all(r[k] == v for k, v in where.items())]


def test_exact_moments_equal_full_enumeration_of_autodiff_gradients():
    """E[g] and E|g - E g|^2 from c(z) equal the enumeration of each z's gradient in the
    logits, taken by autodiff (no use of g = c (e_z - q)), at K = 7 in float64."""
    with jax.enable_x64(True):
        config = config_lib.get_config("quick")
        case = kl_gradients.categorical_case(jax.random.key(3), 7, 0.7, config)
        theta, lp, lold = (jnp.asarray(case[k]) for k in ("theta", "lp", "lold"))
        for estimator in ("k1", "k2", "k3"):
            for mode in kl_gradients.MODES:
                for sampling in kl_gradients.SAMPLINGS:
                    def loss(t, z):
                        lq = jax.nn.log_softmax(t)[z]
                        return kl_gradients.surrogate(estimator, mode, sampling, lq, lp[z],
                                                      lold[z])
                    g = np.asarray(jax.vmap(jax.grad(loss), in_axes=(None, 0))(
                        theta, jnp.arange(7)))
                    s = np.exp(case["lq"] if sampling == "on_policy" else case["lold"])
                    mean, var = s @ g, s @ np.sum(g**2, 1) - np.sum((s @ g) ** 2)
                    c = kl_gradients.coefficients(estimator, mode, sampling,
                                                  jnp.asarray(case["lq"]), lp, lold)
                    exact_mean, exact_var = kl_gradients.exact_moments(
                        c, s, np.exp(case["lq"]))
                    np.testing.assert_allclose(exact_mean, mean, rtol=1e-10, atol=1e-13)
                    np.testing.assert_allclose(exact_var, var, rtol=1e-9)


def test_references_are_the_gradients_of_both_kls():
    with jax.enable_x64(True):
        lp = jax.nn.log_softmax(jnp.array([0.3, -1.0, 2.0, 0.1]))
        def kl(t, forward):
            lq = jax.nn.log_softmax(t)
            a, b = (lp, lq) if forward else (lq, lp)
            return jnp.sum(jnp.exp(a) * (a - b))
        theta = jnp.array([1.0, 0.5, -0.3, 0.0])
        reverse, forward = kl_gradients.references(np.asarray(jax.nn.log_softmax(theta)),
                                                   np.asarray(lp))
        np.testing.assert_allclose(reverse, jax.grad(kl)(theta, False), rtol=1e-12)
        np.testing.assert_allclose(forward, jax.grad(kl)(theta, True), rtol=1e-12)


def test_the_algebra_on_policy(quick):
    _, results = quick
    for kl in (0.1, 1.0):
        on = {r["estimator"]: r for r in _rows(results, family="categorical", kl=kl,
                                                 mode="loss", sampling="on_policy")}
        assert on["k1"]["rel_bias_reverse"] == pytest.approx(1.0, abs=1e-9)  # E[g] = 0.
        assert on["k2"]["rel_bias_reverse"] < 1e-9
        assert on["k3"]["rel_bias_forward"] < 1e-9 and on["k3"]["rel_bias_reverse"] > 0.05
        gauss = {r["estimator"]: r for r in _rows(results, family="gaussian (reparameterised)",
                                                    kl=kl)}
        assert gauss["k1"]["rel_bias_reverse"] < 1e-9 and gauss["k3"]["rel_bias_reverse"] < 1e-9
        assert gauss["k2"]["rel_bias_reverse"] > 0.1


def test_every_claim_and_the_monte_carlo_check(quick, tmp_path):
    config, results = quick
    assert len(_rows(results, family="categorical")) == 2 * 3 * 3 * 3
    assert [c["verdict"] for c in results["claims"]] == ["confirmed"] * 6
    # 54 cases x 10 components of |mean - exact| / SE: beyond 5 only if the code is wrong.
    assert len(results["monte_carlo"]) == 54 and results["mc_max_abs_z"] < 5.0
    # A wrong exact value is caught: the check is not vacuous.
    case = kl_gradients.categorical_case(jax.random.key(0), 10, 1.0, config)
    with jax.enable_x64(True):
        mean, se = kl_gradients.monte_carlo(jax.random.key(1), case, "k3", "loss", "on_policy",
                                            20_000)
        _, forward = kl_gradients.references(case["lq"], case["lp"])
        assert np.max(np.abs(mean - forward) / se) < 5.0
        reverse, _ = kl_gradients.references(case["lq"], case["lp"])
        assert np.max(np.abs(mean - reverse) / se) > 5.0
