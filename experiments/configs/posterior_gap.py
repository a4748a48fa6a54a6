"""The posterior-gap experiment: log p(x) = ELBO + KL(q(z|x) || p(z|x)), exactly.

Run:
  python -m experiments.main --config=experiments/configs/posterior_gap.py --workdir=DIR
  python -m experiments.main --config=experiments/configs/posterior_gap.py:quick --workdir=DIR

On the `linear_gaussian` data set's generating model (d = 20, k = 5, s = 0.5), every term
in closed form for Gaussian q's: scaled posterior covariances, an interpolation from the
prior to the posterior, the best mean-field q, and amortised linear encoders trained with
the decoder fixed at the true model.
"""

import ml_collections

from experiments.configs import presets

PRESETS = presets.QUICK


def get_config(arg=None):
    quick = presets.check("posterior_gap", arg, PRESETS) == "quick"
    config = ml_collections.ConfigDict()
    config.experiment = "posterior_gap"  # What runs: experiments.posterior_gap.
    config.seed = 0  # The PRNG seed of the encoders' training and the sampled check.
    config.data_seed = 0  # The seed of the linear_gaussian data.
    config.data_options = ml_collections.ConfigDict()  # linear_gaussian's obs_dim, ... .
    config.num_examples = 1000  # Test examples (the split has 1000).
    config.shrink_factors = (  # c of q = N(posterior mean, c x posterior covariance).
        0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
    config.interpolation_ts = (  # t of q_t, from the prior (t = 0) to the posterior (t = 1).
        0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
    # Amortised encoders: Adam (cosine decay) on the Monte Carlo ELBO, decoder fixed.
    config.train_steps = 1000 if quick else 10_000  # Adam steps of the encoders.
    config.learning_rate = 3e-2  # The peak learning rate.
    config.batch_size = 100  # Training examples per step.
    config.train_num_samples = 1  # Draws of z per example in the training ELBO.
    config.report_steps = (0, 10, 30, 100, 300, 1000, 3000, 10_000)  # Steps with a table row.
    # The sampled check of the closed-form ELBO.
    config.mc_samples = 100 if quick else 1000  # Draws of z per estimate.
    config.mc_repeats = 5 if quick else 20  # Independent estimates.
    return config
