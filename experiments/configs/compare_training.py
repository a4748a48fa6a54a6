"""The training comparison: one model trained with each KL term and samples per example.

Run:
  python -m experiments.main --config=experiments/configs/compare_training.py --workdir=DIR
  python -m experiments.main --config=experiments/configs/compare_training.py:quick --workdir=DIR
  ... --config.vae.data.dataset=binarized_mnist --config.vae.train.num_epochs=10  # other data

Each (kl, num_samples) run trains `vae.train.num_seeds` seeds in one vmapped program in
DIR/runs/<kl>_n<num_samples>; rerunning skips runs that finished.
"""

import ml_collections

from experiments.configs import presets
from experiments.configs import train as train_config

PRESETS = presets.QUICK


def get_config(arg=None):
    quick = presets.check("compare_training", arg, PRESETS) == "quick"
    config = ml_collections.ConfigDict()
    config.experiment = "compare_training"  # What runs: experiments.compare_training.
    config.kls = ("analytic", "k1", "k3", "stl")  # KL terms, each of vaekl.elbo.KL_TERMS.
    config.num_samples = (1, 5)  # Draws of z per example; one run per (kl, num_samples).
    vae = train_config.get_config()
    vae.data.dataset = "digits"
    vae.train.num_seeds = 2 if quick else 3
    vae.train.num_epochs = 3 if quick else 200
    vae.eval.eval_every_epochs = 1 if quick else 10  # Test ELBO curves.
    # The final log-likelihood (IWAE bound); the curves hold the ELBO (and, in quick, the
    # same IWAE bound: one evaluation program serves both).
    vae.eval.eval_importance_samples = 20 if quick else 1000
    vae.eval.eval_importance_samples_during = 20 if quick else 0
    # Draws of z per test example in the test ELBO: a one-draw ELBO on 300 examples has a
    # standard error of about 0.2 nats, as large as the differences between KL terms.
    vae.eval.eval_elbo_samples = 10 if quick else 100
    vae.train.log_every_steps = 5 if quick else 23
    vae.train.checkpoint_every_secs = 1e9  # Only the final checkpoint.
    config.vae = vae  # The training config of every run (train.py's fields).
    return config
