"""The main job: a short end-to-end comparison of analytic and sampled KL on embedded data.

Run (a few minutes on 2 CPU cores, no data files needed):
  python -m experiments.main --config=experiments/configs/main.py --workdir=runs/main
  python -m experiments.main --config=experiments/configs/main.py:quick --workdir=DIR   # tests

Parts, each in DIR/<part> with its own results.json, results.md and plots:
  estimators         Schulman's table of k1, k2, k3 (q = N(0,1), p = N(0.1,1) and N(1,1)), plus
                     a 10-dimensional case and a 10-sample case
  gradient_variance  ELBO gradient variance and SNR under analytic, k1, k3, stl: a VAE on
                     digits at init / early / converged, and a linear-Gaussian model at its
                     exact posterior (where STL's encoder gradient has zero variance)
  compare_training   a VAE on digits trained with each KL term (one sample per example)
  posterior_gap      log p(x) = ELBO + KL(q(z|x) || p(z|x)), exactly, on the linear-Gaussian model
Any part's field can be overridden, e.g. --config.compare_training.vae.train.num_epochs=50,
and --config.parts='("posterior_gap",)' runs a subset.
"""

import ml_collections

from experiments.configs import (compare_training, estimators, gradient_variance,
                                 posterior_gap, presets)

PRESETS = presets.QUICK


def get_config(arg=None):
    quick = presets.check("main", arg, PRESETS) == "quick"
    config = ml_collections.ConfigDict()
    config.experiment = "main_job"  # What runs: experiments.main_job.
    config.parts = (  # The parts that run, in order; each has its own config below.
        "estimators", "gradient_variance", "compare_training", "posterior_gap")

    # quick: every part's own quick config (what tests/experiments_test.py runs).
    est = estimators.get_config("quick")
    config.estimators = est  # The estimators experiment's config.

    grad = gradient_variance.get_config("quick")
    if not quick:
        grad.num_draws = 500
        grad.converged_epochs = 30
    config.gradient_variance = grad  # The gradient_variance experiment's config.

    train = compare_training.get_config("quick")
    if not quick:
        train.num_samples = (1,)
        train.vae.train.num_epochs = 20
        train.vae.eval.eval_every_epochs = 2
        train.vae.eval.eval_importance_samples = 100
        train.vae.eval.eval_importance_samples_during = 100
    config.compare_training = train  # The compare_training experiment's config.

    gap = posterior_gap.get_config("quick")
    if not quick:
        gap.train_steps = 2000
        gap.mc_samples, gap.mc_repeats = 200, 10
    config.posterior_gap = gap  # The posterior_gap experiment's config.
    return config
