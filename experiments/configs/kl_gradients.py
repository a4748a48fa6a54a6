"""The kl_gradients experiment: which divergence's gradient each KL estimator gives (exact).

Run:
  python -m experiments.main --config=experiments/configs/kl_gradients.py --workdir=DIR
  python -m experiments.main --config=experiments/configs/kl_gradients.py:quick --workdir=DIR

For a categorical q with K categories and p at each target KL(q || p), every
(estimator, mode, sampling) of experiments/kl_gradients.py is computed exactly by
enumeration; a Monte Carlo run checks the code at K = mc_categories.
"""

import ml_collections

from experiments.configs import presets

PRESETS = presets.QUICK


def get_config(arg=None):
    quick = presets.check("kl_gradients", arg, PRESETS) == "quick"
    config = ml_collections.ConfigDict()
    config.experiment = "kl_gradients"  # What runs: experiments.kl_gradients.
    config.seed = 0  # The PRNG seed of q, p, q_old and the Monte Carlo draws.
    config.estimators = ("k1", "k2", "k3")  # Each of vaekl.kl.ESTIMATORS.
    config.num_categories = (10,) if quick else (10, 1000, 50_000)  # K of each case.
    config.kls = (0.1, 1.0) if quick else (0.001, 0.01, 0.1, 1.0, 5.0)  # Targets KL(q || p).
    config.old_kl = 0.05  # KL(q_old || q) of the off-policy samplings.
    config.logit_scale = 1.0  # q's logits ~ N(0, logit_scale^2).
    config.mc_categories = 10  # The K whose cases the Monte Carlo check repeats.
    config.mc_draws = 20_000 if quick else 100_000  # Draws per Monte Carlo case.
    return config
