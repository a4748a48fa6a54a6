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


def get_config(arg=None):
    quick = presets.is_quick("posterior_gap", arg)
    config = ml_collections.ConfigDict()
    config.experiment = "posterior_gap"
    config.seed = 0
    config.data_seed = 0
    config.data_options = ml_collections.ConfigDict()  # linear_gaussian's obs_dim, ... .
    config.num_examples = 1000  # Test examples (the split has 1000).
    config.shrink_factors = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
    config.interpolation_ts = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
    # Amortised encoders: Adam (cosine decay) on the Monte Carlo ELBO, decoder fixed.
    config.train_steps = 1000 if quick else 10_000
    config.learning_rate = 3e-2
    config.batch_size = 100
    config.train_num_samples = 1
    config.report_steps = (0, 10, 30, 100, 300, 1000, 3000, 10_000)
    # The sampled check of the closed-form ELBO.
    config.mc_samples = 100 if quick else 1000
    config.mc_repeats = 5 if quick else 20
    return config
