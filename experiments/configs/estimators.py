"""The estimator experiment: bias and std of k1, k2, k3 against the analytic KL.

Run:
  python -m experiments.main --config=experiments/configs/estimators.py --workdir=DIR
  python -m experiments.main --config=experiments/configs/estimators.py:quick --workdir=DIR

Each case is q = N(q_mean, e^q_log_var I) against p = N(p_mean, e^p_log_var I) in
`dim` dimensions (every dimension alike), each estimate averaging `num_samples`
draws, measured over `num_draws` independent estimates. The first two cases are
Schulman's table (q = N(0,1) against N(0.1,1) and N(1,1)).
"""

import ml_collections

from experiments.configs import presets

PRESETS = presets.QUICK


def _case(p_mean, p_log_var=0.0, dim=1, num_samples=1, q_mean=0.0, q_log_var=0.0):
    return dict(q_mean=q_mean, q_log_var=q_log_var, p_mean=p_mean, p_log_var=p_log_var,
                dim=dim, num_samples=num_samples)


def get_config(arg=None):
    quick = presets.check("estimators", arg, PRESETS) == "quick"
    config = ml_collections.ConfigDict()
    config.experiment = "estimators"  # What runs: experiments.estimators.
    config.seed = 0  # The PRNG seed of every draw.
    config.estimators = ("k1", "k2", "k3")  # Sampled estimators, each of vaekl.kl.ESTIMATORS.
    config.num_draws = 20_000 if quick else 1_000_000  # Independent estimates per case.
    config.schulman_draws = 200_000 if quick else 10_000_000  # num_draws of Schulman's cases.
    config.chunk_elements = 2_000_000  # Elements (draws x num_samples x dim) per device call.
    cases = [_case(0.1), _case(1.0)]  # Schulman (2020)
    if not quick:
        cases += [_case(m) for m in (0.3, 2.0, 3.0)]  # distance between q and p
        cases += [_case(0.0, lv) for lv in (-1.0, 1.0)]  # a variance mismatch
        cases += [_case(0.3, 0.3, dim=d) for d in (1, 10, 100)]  # latent dimension
        cases += [_case(1.0, num_samples=n) for n in (10, 100)]  # samples per estimate
    else:
        cases += [_case(0.3, 0.3, dim=10), _case(1.0, num_samples=10)]
    config.cases = cases  # dicts of q_mean, q_log_var, p_mean, p_log_var, dim, num_samples.
    config.histogram_draws = 100_000  # Estimates kept for the histograms of the plot.
    return config
