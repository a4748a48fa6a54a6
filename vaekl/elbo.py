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
  "relaxed"   for a relaxed q (`vaekl.categorical.RelaxedCategorical`): mean of
              log q_tau(y) - log p_lambda(y) at the relaxed draws y, p's relaxed density
              (`q.relaxed_log_ratio`); its "analytic" is the underlying categoricals' KL

`vaekl.kl.terms(type(q), type(p))` says which apply to a pair.

For a q whose draws carry no path gradient (`q.reparameterized` False: a categorical)
the gradient is the score-function (REINFORCE) estimator, chosen automatically: the
surrogate f + sg(f - b) log q(z), f the ELBO's integrand at the draw and b a `baseline`
that the caller keeps (vaekl's training step: an exponential moving average of the batch
mean ELBO over past steps, `vaekl.steps`). The values returned are the plain ELBO's;
only the gradients change. The importance-weighted
bounds are `vaekl.bounds`'.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from vaekl import kl as kl_lib
from vaekl import validate
from vaekl.distributions import STANDARD_NORMAL, path_log_prob

sg = jax.lax.stop_gradient
KL_TERMS = ("analytic", "k1", "k3", "stl", "entropy", "relaxed")
LogLikelihood = Callable[[jax.Array], jax.Array]


class Bound(NamedTuple):
    """Per-sample parts of the ELBO, each of shape [...]: elbo = -(rate + distortion)."""

    elbo: jax.Array
    rate: jax.Array
    distortion: jax.Array


def elbo(key: jax.Array, q, log_likelihood: LogLikelihood, prior=STANDARD_NORMAL, *,
         kl: str = "analytic", num_samples: int = 1,
         baseline: jax.typing.ArrayLike = 0.0) -> Bound:
    """The evidence lower bound per sample, split into rate and distortion.

    Args:
      key: PRNG key for the draws z ~ q (`q.sample_and_log_prob(seed=key,
        sample_shape=(num_samples,))`).
      q: the posterior, a distribution with batch shape [...] (e.g.
        `vaekl.distributions.DiagNormal(mean, log_var)` of the encoder's output).
      log_likelihood: z [num_samples, ..., *event] -> log p(x|z) [num_samples, ...]
        (event [dim], or [N, K] for a categorical).
      prior: a distribution with `log_prob` (the standard normal by default; None too).
      kl: the KL term, one of `KL_TERMS` that `vaekl.kl.terms` allows for the pair.
      num_samples: draws of z per sample, averaged (static int >= 1).
      baseline: b of the score-function gradient (a q with `reparameterized` False only,
        ignored otherwise): a scalar or [...], e.g. a running mean of past ELBOs; it must
        not depend on this call's draws (then the gradient stays unbiased).

    Returns:
      `Bound(elbo, rate, distortion)`, each with shape [...]; distortion is
      -E_q log p(x|z) and rate the chosen estimate of KL(q(z|x) || p(z)). For a q that is
      not reparameterised the values are the same and the gradients the score-function
      estimator's (see `_score_terms`).

    Raises:
      ValueError: for a KL term the (q, prior) pair has not, naming the pair and the terms
        that work.
    """
    name = "vaekl.elbo.elbo"
    validate.choice(name, "kl", kl, KL_TERMS)
    prior, num_samples = validate.bound_inputs(name, key, q, log_likelihood, prior, num_samples)
    kl_lib.check_term(f"{name}: kl={kl!r}", kl, type(q), type(prior))
    z, log_q = q.sample_and_log_prob(seed=key, sample_shape=(num_samples,))
    log_lik = validate.log_likelihood(name, log_likelihood, z, log_q.shape)
    closed, rate_draws = 0.0, None  # The KL's exact part and its sampled part per draw.
    if kl == "analytic":
        closed = kl_lib.divergence(q, prior)
    elif kl == "entropy":
        closed, rate_draws = -q.entropy(), -prior.log_prob(z)
    elif kl == "relaxed":
        rate_draws = q.relaxed_log_ratio(prior, seed=key, sample_shape=(num_samples,))
    else:
        if kl == "stl":
            log_q = path_log_prob(q, z, log_q)
        rate_draws = kl_lib.estimate("k1" if kl == "stl" else kl, prior.log_prob(z) - log_q)
    if not getattr(q, "reparameterized", True):
        log_lik, rate_draws = _score_terms(log_q, log_lik, rate_draws, baseline)
    distortion = -jnp.mean(log_lik, axis=0)
    rate = closed if rate_draws is None else closed + jnp.mean(rate_draws, axis=0)
    return Bound(elbo=-(rate + distortion), rate=rate, distortion=distortion)


def _score_terms(log_q, log_lik, rate_draws, baseline):
    """log p(x|z) and the rate's draws [S, ...] with the score-function terms added.

    With f = log p(x|z) - rate(z) the ELBO's integrand, the surrogate of E_q f is
    f + sg(f - b) log q(z): its gradient is the score-function (REINFORCE) estimator,
    unbiased for any b that does not depend on z. Each part gets its own share,
    sg(log p(x|z) - b) and sg(rate(z)), so that a weighted rate (beta != 1) is still
    differentiated right; and each share multiplies log q - sg(log q), which is 0 in value:
    the values (and so the reported ELBO) are the plain ones.
    """
    score = log_q - sg(log_q)
    log_lik = log_lik + sg(log_lik - baseline) * score
    if rate_draws is not None:
        rate_draws = rate_draws + sg(rate_draws) * score
    return log_lik, rate_draws
