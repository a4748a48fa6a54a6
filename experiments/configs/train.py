"""Train a VAE and evaluate it: `vaekl.train.train_and_evaluate`.

Run:
  python -m experiments.main --config=experiments/configs/train.py --workdir=DIR \
      --config.data.dataset=binarized_mnist --config.loss.kl=k3 --config.loss.num_samples=5

An argument after the file name (`train.py:flax`) picks one of `PRESETS`. The fields
(nested: data, model, loss, optim, train, eval) and presets live in the package,
`vaekl/config.py`, so that an installed vaekl (a notebook) has them too. Posterior families
and priors without a closed-form KL (vaekl.posteriors; the KL terms each pair allows:
vaekl.kl.terms):

  --config.model.posterior=full --config.loss.kl=entropy   full-covariance Gaussian q
  --config.model.posterior=iaf --config.model.iaf_steps=2  inverse autoregressive flow (k1, k3, stl)
  --config.model.prior=vamp --config.model.num_pseudo_inputs=500 --config.loss.kl=k1  VampPrior

Categorical latents (`train.py:categorical` is Jang et al.'s setting; kl analytic or relaxed
for the Gumbel gradients, analytic, k1, k3 or entropy for the score function):
  --config.model.posterior=categorical --config.model.prior=uniform \
      --config.loss.categorical_gradient=score

Every bound of vaekl.bounds takes every family and prior, e.g. IWAE-DReG with a flow:
  --config.loss.objective=iwae --config.loss.grad_estimator=dreg --config.loss.num_samples=5 \
      --config.model.posterior=iaf
"""

from vaekl.config import PRESETS, get_config  # noqa: F401  (this file's config)
