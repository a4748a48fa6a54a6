"""The gradient-variance experiment: ELBO gradient variance and SNR under each KL term.

Run:
  python -m experiments.main --config=experiments/configs/gradient_variance.py --workdir=DIR
  python -m experiments.main --config=experiments/configs/gradient_variance.py:quick --workdir=DIR

A VAE on `digits` at initialisation, early in training and converged (trained with
train.py's initialisation and jitted epoch for `config.vae`), and a linear-Gaussian model
whose exact posterior a diagonal linear encoder matches exactly.
"""

import ml_collections

from experiments.configs import presets
from experiments.configs import train as train_config

PRESETS = presets.QUICK


def get_config(arg=None):
    quick = presets.check("gradient_variance", arg, PRESETS) == "quick"
    config = ml_collections.ConfigDict()
    config.experiment = "gradient_variance"  # What runs: experiments.gradient_variance.
    config.seed = 0  # The PRNG seed of the gradient draws.
    config.estimators = ("analytic", "k1", "k3", "stl")  # KL terms, of vaekl.elbo.KL_TERMS.
    config.num_samples = 1  # Draws of z per example in each gradient.
    config.num_draws = 250 if quick else 5000  # Independent gradients per row.
    config.chunk = 250  # Gradients per vmapped device call.
    config.batch_size = 64  # The fixed batch: the first test examples.
    # The VAE (model, data, optimiser: train.py's config; its kl is the one trained with) and
    # its checkpoints: init (0 epochs), early and converged.
    vae = train_config.get_config()
    vae.data.dataset = "digits"
    config.vae = vae  # The VAE's training config (train.py's fields).
    config.early_epochs = 1  # Epochs of the early checkpoint.
    config.converged_epochs = 5 if quick else 300  # Epochs of the converged checkpoint.
    # The linear-Gaussian model: W = Q diag(lg_scales), Q with orthonormal columns.
    config.lg_obs_dim = 20  # Observed dimensions d.
    config.lg_scales = (0.5, 1.0, 1.5, 2.0, 3.0)  # The singular values of W, one per latent.
    config.lg_noise_std = 0.5  # The observation noise s.
    config.lg_seed = 0  # The seed of Q.
    config.lg_float64 = True  # Compute the linear-Gaussian rows in float64.
    return config
