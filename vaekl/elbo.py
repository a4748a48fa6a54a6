"""The per-sample ELBO with a choice of KL term, for any q(z|x) and p(z).

q and p are distributions of the `vaekl.distributions` interface (a distrax one works
too); the decoder enters as `log_likelihood(z) -> log p(x|z)`, a function of latents with
shape [num_samples, ..., dim] returning [num_samples, ...] (a closure over x and the
decoder parameters). The KL term (the rate) is chosen by name:

  "analytic"  the closed form `vaekl.kl.divergence` (SGVB-B of Kingma & Welling), for a
              registered (q, p) pair
  "k1"        mean of log q(z) - log p(z) over the same z (SGVB-A)
  "k3"        mean of (r - 1) - log r, r = p(z)/q(z)
  "stl"       as k1 with the path-only log q (`vaekl.distributions.path_log_prob`,
              Roeder et al. 2017): same value, and a gradient with zero variance when q
              is the exact posterior; for a flow it pays the flow's inverse
  "entropy"   KL = -H(q) - E_q log p(z): q's entropy exact, only the
              cross-entropy sampled (for a q whose entropy has a closed form)

`vaekl.kl.terms(type(q), type(p))` says which apply to a pair. The importance-weighted
bounds are `vaekl.bounds`'.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from vaekl import kl as kl_lib
from vaekl import validate
from vaekl.distributions import STANDARD_NORMAL, path_log_prob

KL_TERMS = ("analytic", "k1", "k3", "stl", "entropy")
LogLikelihood = Callable[[jax.Array], jax.Array]


class Bound(NamedTuple):
    """Per-sample parts of the ELBO, each of shape [...]: elbo = -(rate + distortion)."""

    elbo: jax.Array
    rate: jax.Array
    distortion: jax.Array


def elbo(key: jax.Array, q, log_likelihood: LogLikelihood, prior=STANDARD_NORMAL, *,
         kl: str = "analytic", num_samples: int = 1) -> Bound:
    """The evidence lower bound per sample, split into rate and distortion.

    Args:
      key: PRNG key for the draws z ~ q (`q.sample_and_log_prob(seed=key,
        sample_shape=(num_samples,))`).
      q: the posterior, a distribution with batch shape [...] (e.g.
        `vaekl.distributions.DiagNormal(mean, log_var)` of the encoder's output).
      log_likelihood: z [num_samples, ..., dim] -> log p(x|z) [num_samples, ...].
      prior: a distribution with `log_prob` (the standard normal by default; None too).
      kl: the KL term, one of `KL_TERMS` that `vaekl.kl.terms` allows for the pair.
      num_samples: draws of z per sample, averaged (static int >= 1).

    Returns:
      `Bound(elbo, rate, distortion)`, each with shape [...]; distortion is
      -E_q log p(x|z) and rate the chosen estimate of KL(q(z|x) || p(z)).

    Raises:
      ValueError: for a KL term the (q, prior) pair has not, naming the pair and the terms
        that work.
    """
    name = "vaekl.elbo.elbo"
    validate.choice(name, "kl", kl, KL_TERMS)
    prior, num_samples = validate.bound_inputs(name, key, q, log_likelihood, prior, num_samples)
    kl_lib.check_term(f"{name}: kl={kl!r}", kl, type(q), type(prior))
    z, log_q = q.sample_and_log_prob(seed=key, sample_shape=(num_samples,))
    distortion = -jnp.mean(validate.log_likelihood(name, log_likelihood, z), axis=0)
    if kl == "analytic":
        rate = kl_lib.divergence(q, prior)
    elif kl == "entropy":
        rate = -q.entropy() - jnp.mean(prior.log_prob(z), axis=0)
    else:
        if kl == "stl":
            log_q = path_log_prob(q, z, log_q)
        rate = jnp.mean(kl_lib.estimate("k1" if kl == "stl" else kl, prior.log_prob(z) - log_q),
                        axis=0)
    return Bound(elbo=-(rate + distortion), rate=rate, distortion=distortion)
