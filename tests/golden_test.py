"""Golden values: the refactor of issue 22 changed no mathematics and no key.

tests/golden_values.json was written in float64 by the code before the refactor (commit
d4536fb, the start of branch i22) with the old API (`elbo.posterior_elbo`,
`elbo.posterior_iwae`, `bounds.objective(key, q_mean, q_log_var, ...)`) on the inputs that
`inputs()` rebuilds here: every KL term of every (family, prior) pair, every objective x
gradient estimator, and the evaluation's IWAE, each with its gradients where it has them.
The new API must give the same numbers on the same keys.

Three one-epoch training runs on digits (float32) of the same commit give the
`RUNS` figures.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import train as train_config
from vaekl import bounds, elbo, kl, posteriors, train
from vaekl.distributions import (STANDARD_NORMAL, DiagNormal, FullNormal, MixtureOfGaussians,
                                 gaussian_log_prob)

GOLDEN_VALUES = json.loads((Path(__file__).parent / "golden_values.json").read_text())
# float64 throughout; a different but equivalent order of the same sums (the log-ratio
# written as log p(z) - log q(z), the path-only log q as lq - log q + log q) moves the
# last few bits only.
RTOL = ATOL = 1e-9
KEY = jax.random.PRNGKey(7)
PRIORS = {"standard": lambda d: STANDARD_NORMAL, "diagnormal": lambda d: DiagNormal(0.3, -0.2),
          "mixture": lambda d: d["mix"]}


def inputs():
    """The generator's inputs, drawn from the same keys (call with x64 enabled)."""
    k = jax.random.split(jax.random.PRNGKey(42), 8)
    mean = jax.random.normal(k[0], (4, 3))
    log_var = 0.5 * jax.random.normal(k[1], (4, 3)) - 0.3
    off = 0.3 * jax.random.normal(k[2], (4, 3))
    ctx = jax.random.normal(k[3], (4, 5))
    steps = posteriors.init_iaf(k[4], 3, (8,), 2, 5, jnp.float64)
    w = 0.7 * jax.random.normal(k[5], (3, 6))
    b = 0.1 * jax.random.normal(k[6], (6,))
    x = jax.random.normal(k[7], (4, 6))
    mix = MixtureOfGaussians(jnp.array([0.1, -0.2, 0.3]), jax.random.normal(k[0], (3, 3)),
                             -0.5 + 0.2 * jax.random.normal(k[1], (3, 3)))
    return dict(mean=mean, log_var=log_var, off=off, ctx=ctx, steps=steps, w=w, b=b, x=x,
                mix=mix)


def loglik(w, b, x):
    return lambda z: gaussian_log_prob(x, z @ w + b, 0.0)


def family(name, d, mean, log_var):
    if name == "diag":
        return DiagNormal(mean, log_var)
    if name == "full":
        return FullNormal.from_encoder(mean, log_var, d["off"])
    return posteriors.IAF(mean, log_var, d["ctx"], d["steps"])


def _check(got, want, what):
    for name, value in want.items():
        if name == "grad":
            for g, v, arg in zip(got[name], value, ("mean", "log_var", "w")):
                np.testing.assert_allclose(g, np.asarray(v), rtol=RTOL, atol=ATOL,
                                           err_msg=f"{what}: d/d{arg}")
        else:
            np.testing.assert_allclose(got[name], np.asarray(value), rtol=RTOL, atol=ATOL,
                                       err_msg=f"{what}: {name}")


@pytest.mark.parametrize("case", sorted(GOLDEN_VALUES["elbo"]))
def test_elbo_of_every_kl_term_and_pair(case):
    fam, prior_name, term = case.split("/")
    with jax.enable_x64(True):
        d = inputs()
        prior = PRIORS[prior_name](d)
        assert term in kl.terms(type(family(fam, d, d["mean"], d["log_var"])), type(prior))

        @jax.jit
        def f(mean, log_var, w):
            q = family(fam, d, mean, log_var)
            bd = elbo.elbo(KEY, q, loglik(w, d["b"], d["x"]), prior, kl=term, num_samples=3)
            return jnp.sum(bd.elbo), bd

        (_, bd), g = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
            d["mean"], d["log_var"], d["w"])
        _check({**bd._asdict(), "grad": g}, GOLDEN_VALUES["elbo"][case], case)


@pytest.mark.parametrize("case", sorted(GOLDEN_VALUES["objective"]))
def test_every_objective_and_estimator(case):
    prior_name, objective, estimator = case.split("/")
    outer = 2 if objective in ("miwae", "piwae") else 1
    with jax.enable_x64(True):
        d = inputs()
        prior = PRIORS[prior_name](d)

        @jax.jit
        def f(mean, log_var, w):
            o = bounds.objective(KEY, DiagNormal(mean, log_var), loglik(w, d["b"], d["x"]),
                                 prior, objective=objective, num_samples=4,
                                 grad_estimator=estimator, outer_samples=outer, alpha=0.3,
                                 beta=0.4)
            return jnp.sum(o.bound), o

        (_, o), g = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
            d["mean"], d["log_var"], d["w"])
        _check({**o._asdict(), "grad": g}, GOLDEN_VALUES["objective"][case], case)


@pytest.mark.parametrize("case", sorted(GOLDEN_VALUES["iwae"]))
def test_evaluation_iwae(case):
    fam, prior_name = case.split("/")
    with jax.enable_x64(True):
        d = inputs()
        q = family(fam, d, d["mean"], d["log_var"])
        got = jax.jit(lambda q: bounds.iwae(KEY, q, loglik(d["w"], d["b"], d["x"]),
                                            PRIORS[prior_name](d), num_samples=50,
                                            chunk_size=7))(q)
        np.testing.assert_allclose(got, np.asarray(GOLDEN_VALUES["iwae"][case]), rtol=RTOL,
                                   atol=ATOL)


# results.json of `experiments.main --config=experiments/configs/train.py:quick
# --config.train.num_epochs=1` (plus the overrides) at commit d4536fb, before the refactor
# (/work/scratch/golden_run*/results.json). float32 training: relative 1e-5 (measured: 2e-7).
RUNS = {
    "diag-analytic": ({}, dict(test_elbo=-32.54768753051758,
                               test_log_likelihood=-30.824413299560547,
                               test_rate=1.185703158378601)),
    "iaf-stl": ({"model": {"posterior": "iaf"}, "loss": {"kl": "stl"}},
                dict(test_elbo=-32.25419998168945, test_log_likelihood=-30.54242515563965,
                     test_rate=0.9544018507003784)),
    "iwae3-dreg": ({"loss": {"objective": "iwae", "num_samples": 3, "grad_estimator": "dreg"}},
                   dict(test_elbo=-32.43337631225586, test_log_likelihood=-30.58138084411621,
                        test_rate=1.20949125289917)),
}


@pytest.mark.parametrize("run", RUNS)
def test_one_epoch_training_gives_the_same_results(tmp_path, run):
    overrides, want = RUNS[run]
    config = train_config.get_config("quick")
    config.train.num_epochs = 1
    config.update(overrides)  # Group by group: config.loss.update({...}).
    results = train.train_and_evaluate(config, str(tmp_path))
    assert results["steps"] == 23
    for name, value in want.items():
        assert results[name] == pytest.approx(value, rel=1e-5), name
