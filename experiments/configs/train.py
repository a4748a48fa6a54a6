"""Train a VAE and evaluate it: `vaekl.train.train_and_evaluate`.

Run:
  python -m experiments.main --config=experiments/configs/train.py --workdir=DIR \
      --config.dataset=binarized_mnist --config.kl=k3 --config.num_samples=5

An argument after the file name (`train.py:flax`) picks one of `PRESETS`. The fields
and presets live in the package, `vaekl/config.py`, so that an installed vaekl (a
notebook) has them too. Posterior families and priors without a closed-form KL
(vaekl.posteriors; the KL terms each pair allows: vaekl.kl.terms):

  --config.posterior=full --config.kl=entropy      full-covariance Gaussian q
  --config.posterior=iaf --config.iaf_steps=2      inverse autoregressive flow (kl k1, k3, stl)
  --config.prior=vamp --config.num_pseudo_inputs=500 --config.kl=k1   the VampPrior

Categorical latents (`train.py:categorical` is Jang et al.'s setting; kl analytic or relaxed
for the Gumbel gradients, analytic, k1, k3 or entropy for the score function):
  --config.posterior=categorical --config.prior=uniform --config.categorical_gradient=score

Every bound of vaekl.bounds takes every family and prior, e.g. IWAE-DReG with a flow:
  --config.objective=iwae --config.grad_estimator=dreg --config.num_samples=5 --config.posterior=iaf
"""

from vaekl.config import PRESETS, get_config  # noqa: F401  (this file's config)
