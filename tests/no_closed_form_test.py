"""Training with each posterior family and prior, the config checks, the sweep, and the
`no_closed_form` experiment end to end (its quick config, on `digits`)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import main, no_closed_form
from experiments.configs import no_closed_form as no_closed_form_config
from experiments.configs import train as train_config
from launch import sweeps
from vaekl.distributions import DiagNormal
from vaekl import config as vaekl_config
from vaekl import kl, models, posteriors, train
from vaekl import steps as steps_lib

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
    config = train_config.get_config("quick")
    config.model.latents, config.model.hidden, config.train.num_epochs = 3, (32,), 1
    config.model.iaf_hidden, config.model.iaf_context, config.model.num_pseudo_inputs = (
        (16,), 4, 8)
    config.eval.eval_importance_samples = 10
    groups = vaekl_config.groups()
    for k, v in overrides.items():  # Leaf names, each set in its group.
        config[groups[k]][k] = v
    return config


@pytest.mark.parametrize("posterior, prior, kl", [
    ("diag", "vamp", "entropy"), ("full", "standard", "analytic"), ("full", "learned", "entropy"),
    ("full", "mixture", "stl"), ("iaf", "standard", "k1"), ("iaf", "vamp", "stl"),
    ("iaf", "learned", "k3")])
def test_each_family_and_prior_trains(posterior, prior, kl):
    """One epoch of train.py's own jitted steps on digits: finite, and the loss falls."""
    config = tiny_config(posterior=posterior, prior=prior, kl=kl, learning_rate=3e-3)
    vaekl_config.check(config, num_devices=1)
    train_data, _ = train.load_data(config)
    model = train.create_model(config, train_data)
    steps = len(train_data) // config.train.batch_size
    tx = train.create_optimizer(config, steps)
    keys, init, epoch = steps_lib.training_fns(model, config, tx, data_dim=train_data.dim,
                                           steps_per_epoch=steps, binarize=False)
    state, metrics = epoch(init(keys), keys, 0, jnp.asarray(train_data.x))
    loss = np.asarray(metrics["loss"])
    assert np.all(np.isfinite(loss)) and int(state.step) == steps
    assert loss[-5:].mean() < loss[:5].mean()
    q = model.apply(state.params, train_data.x[:2], method=models.VAE.encode_posterior)
    assert type(q) is posteriors.FAMILIES[posterior]


@pytest.mark.parametrize("overrides, pieces", [
    ({"posterior": "iaf", "kl": "analytic"},
     ["config.loss.kl", "'analytic' has no closed form", "posterior='iaf'",
      "('k1', 'k3', 'stl')"]),
    ({"posterior": "diag", "prior": "vamp", "kl": "analytic"},
     ["config.loss.kl", "prior='vamp'", "('k1', 'k3', 'stl', 'entropy')"]),
    ({"posterior": "full", "prior": "mixture", "kl": "analytic"},
     ["config.loss.kl", "posterior='full'", "prior='mixture'",
      "('k1', 'k3', 'stl', 'entropy')"]),
    ({"posterior": "iaf", "prior": "vamp", "kl": "entropy"},
     ["config.loss.kl", "'entropy'", "posterior='iaf'", "('k1', 'k3', 'stl')"]),
    ({"posterior": "flow"}, ["config.model.posterior", "'iaf'"]),
    ({"iaf_hidden": ()}, ["config.model.iaf_hidden"]),
    ({"num_pseudo_inputs": 0}, ["config.model.num_pseudo_inputs"]),
    ({"posterior": "full", "free_bits": 0.5}, ["config.loss.free_bits", "posterior='diag'"]),
])
def test_a_pair_without_the_term_fails_at_once_naming_it(tmp_path, overrides, pieces):
    with pytest.raises(ValueError) as info:
        train.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "run"))
    for piece in pieces:
        assert piece in str(info.value), (piece, str(info.value))
    assert not (tmp_path / "run").exists()


def test_sweep_lists_the_terms_each_pair_allows_and_every_run_is_a_valid_config():
    sweep = sweeps.get("no_closed_form")
    for (q, p), terms in sweeps.NO_CLOSED_FORM_TERMS.items():
        assert tuple(terms) == kl.terms(*models.pair_types(q, p)), (q, p)
    pairs = {(r["model.posterior"], r["model.prior"]) for r in sweep.runs}
    # Every continuous family; categorical latents have their own sweep, categorical_vae.
    assert {q for q, _ in pairs} == set(posteriors.FAMILIES) - {"categorical"}
    assert {"standard", "vamp"} <= {p for _, p in pairs}
    path, _, arg = sweep.config.partition(":")
    assert path == "experiments/configs/train.py"
    for run in sweep.runs:
        config = train_config.get_config(arg)
        for field, value in {**sweep.fixed, **run}.items():  # "model.prior": a group's.
            group, _, leaf = field.partition(".")
            config[group][leaf] = value
        vaekl_config.check(config, num_devices=1)


def test_command_line_trains_iwae_dreg_with_an_iaf_and_the_vamp_prior(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "experiments.main", "--config=experiments/configs/train.py:quick",
         f"--workdir={tmp_path}", "--config.model.posterior=iaf", "--config.model.prior=vamp",
         "--config.loss.objective=iwae", "--config.loss.grad_estimator=dreg",
         "--config.loss.num_samples=3", "--config.train.num_epochs=1",
         "--config.model.iaf_hidden=(16,)", "--config.model.iaf_steps=1",
         "--config.model.num_pseudo_inputs=8", "--config.model.latents=3",
         "--config.eval.eval_importance_samples=10"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["model"]["posterior"], saved["model"]["prior"], saved["loss"]["objective"],
            saved["loss"]["grad_estimator"]) == ("iaf", "vamp", "iwae", "dreg")
    assert np.isfinite(results["test_log_likelihood"]) and np.isfinite(results["test_elbo"])


# --- The experiment, end to end. ---

@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("no_closed_form")
    config = no_closed_form_config.get_config("quick")
    return workdir, config, main.run(config, str(workdir))


@pytest.mark.slow  # About a minute: in CI's slow pass.
def test_experiment_writes_its_files_and_a_row_per_run(experiment):
    workdir, config, results = experiment
    for name in ("results.json", "results.md", "no_closed_form.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert json.loads((workdir / "results.json").read_text()) == json.loads(json.dumps(results))
    runs = {(r["posterior"], r["prior"], r["kl"]) for r in results["training"]}
    assert runs == {(q, p, k) for q, p in config.pairs for k in config.kls}
    for row in results["training"]:
        assert row["num_seeds"] == config.vae.train.num_seeds
        assert len(row["test_log_likelihood_seeds"]) == config.vae.train.num_seeds
        # IWAE >= ELBO up to the noise of a few hundred test examples.
        assert row["test_log_likelihood_mean"] > row["test_elbo_mean"] - 0.5
    md = (workdir / "results.md").read_text()
    assert "| full | vamp | entropy |" in md and "| iaf | standard | stl |" in md


@pytest.mark.slow  # About a minute: in CI's slow pass.
def test_experiment_measures_every_term_of_every_pair(experiment):
    _, config, results = experiment
    by = {(r["posterior"], r["prior"], r["kl"]): r for r in results["estimators"]}
    for q, p in config.pairs:
        terms = kl.terms(*models.pair_types(q, p))
        extra = ("variational",) if q != "iaf" and models.PRIORS[p] is not DiagNormal else ()
        assert {k for (qq, pp, k) in by if (qq, pp) == (q, p)} == set(terms + extra)
        k1 = by[(q, p, "k1")]
        assert k1["std_over_k1"] == 1.0 and k1["encoder_grad_variance_over_k1"] == 1.0
        # STL has k1's values; its gradient differs.
        assert by[(q, p, "stl")]["bias"] == pytest.approx(k1["bias"], abs=1e-5)
        for t in terms:
            row = by[(q, p, t)]
            assert row["std"] > 0 and row["encoder_grad_variance"] > 0
            # Every term is unbiased: within 5 Monte Carlo standard errors of the reference.
            assert abs(row["bias"]) < 5 * row["bias_se"], row
        if "entropy" in terms:
            # For a Gaussian q, log q written in eps makes k1's gradient the entropy term's.
            assert by[(q, p, "entropy")]["encoder_grad_variance_over_k1"] == pytest.approx(
                1.0, rel=1e-4)
    assert by[("full", "vamp", "variational")]["approximation"] is True
    assert by[("full", "vamp", "variational")]["std"] == 0.0


@pytest.mark.slow  # Uses the minute-long experiment above: in CI's slow pass.
def test_a_rerun_reads_every_finished_run_and_says_which(experiment, caplog):
    workdir, config, results = experiment
    with caplog.at_level(logging.INFO):
        rows = no_closed_form.training_rows(config, workdir)
    assert json.loads(json.dumps(rows)) == json.loads(json.dumps(results["training"]))
    runs = [f"{r['posterior']}_{r['prior']}_{r['kl']}" for r in results["training"]]
    said = [r.getMessage() for r in caplog.records if r.name == "absl"]
    assert said == [f"no_closed_form: run {i + 1}/{len(runs)}, {run}"
                    for i, run in enumerate(runs)]
