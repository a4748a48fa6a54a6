"""Importance-weighted bounds as training objectives, with a choice of gradient estimator.

For K draws z_k ~ q(z|x) = N(q_mean, diag e^q_log_var) the log-weights are
u_k = log p(x|z_k) + log p(z_k) - log q(z_k|x). Every objective here is a
function L(u) of the log-weights, per sample:

  "iwae"   log (1/K) sum_k e^u_k                          (Burda et al. 2015)
  "renyi"  1/(1-a) log (1/K) sum_k e^((1-a) u_k)          (Li & Turner 2016; a = 0 is IWAE,
                                                           a -> 1 the ELBO, mean_k u_k)
  "miwae"  the mean of M IWAE-K bounds over M*K draws      (Rainforth et al. 2018)
  "ciwae"  b ELBO + (1-b) IWAE over the same K draws       (Rainforth et al. 2018)
  "piwae"  IWAE over all M*K draws for the decoder, MIWAE(M, K) for the encoder
           (Rainforth et al. 2018); its value is the IWAE-MK bound.

`objective` returns a surrogate whose *value* is the bound and whose *gradient* is
the chosen estimator. With g = dL/du, the decoder (and prior) parameters theta get
sum_k g_k du_k/dtheta under every estimator; the encoder parameters phi get:

  "reparam"  sum_k g_k du_k/dphi, the plain reparameterised gradient (path + score);
  "stl"      the same with log q's parameters stopped: only the path derivative
             through z_k = mean + sigma * eps (Roeder et al. 2017; biased for IWAE, K > 1);
  "dreg"     sum_k (g_k - H_kk) du_k/dz_k dz_k/dphi, H the Hessian of L in u. The score
             term E[g_k dlog q/dphi] equals E[dg_k/dz_k dz_k/dphi] (the reparameterisation
             identity, Tucker et al. 2018), so this is unbiased for the reparam gradient.
             For IWAE g - H_kk = w_k^2 (w the normalised weights: Tucker et al.'s
             DReG), for Renyi a w_k + (1-a) w_k^2, for the ELBO 1/K (STL).

The encoder weights differ from the decoder's only for DReG and PIWAE; then the
decoder's share is taken from a second evaluation of the log-likelihood at
stop_gradient(z), which carries no encoder gradient. Doing so costs one more
decoder pass, but it needs nothing of `log_likelihood` beyond z -> log p(x|z):
the decoder parameters stay inside the closure, as in `vaekl.elbo`.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vaekl import elbo as elbo_lib
from vaekl import kl as kl_lib
from vaekl import validate
from vaekl.priors import STANDARD_NORMAL

OBJECTIVES = ("iwae", "renyi", "miwae", "piwae", "ciwae")
GRAD_ESTIMATORS = ("reparam", "stl", "dreg")

sg = jax.lax.stop_gradient


class Objective(NamedTuple):
    """Per-sample values, each of shape [...].

    bound: the objective's value; its gradient is the chosen estimator.
    elbo, rate, distortion: the one-sample ELBO and its parts averaged over the
      same draws (no gradient), for logging beside the bound.
    """

    bound: jax.Array
    elbo: jax.Array
    rate: jax.Array
    distortion: jax.Array


def _weights(objective: str, u: jax.Array, *, alpha: float, beta: float):
    """(value, decoder weights g, encoder weights g, DReG encoder weights g - H_kk).

    `u` has shape [M, K, ...] (M = 1 except for miwae/piwae); the weights have
    u's shape, the value shape [...]. Nothing here is differentiated.
    """
    m, k = u.shape[0], u.shape[1]
    log_k = jnp.log(jnp.asarray(k, u.dtype))

    def iwae(u, count, log_count):  # Over the leading `count` draws of u [count, ...].
        w = jax.nn.softmax(u, axis=0)
        return jax.nn.logsumexp(u, axis=0) - log_count, w, w * w

    flat = u.reshape((m * k,) + u.shape[2:])
    if objective == "iwae":
        value, w, w2 = iwae(flat, m * k, log_k)
        return value, w, w, w2
    if objective == "renyi":
        if alpha == 1.0:  # The limit: the ELBO, mean_k u_k, with STL's weights for DReG.
            ones = jnp.full_like(flat, 1.0 / k)
            return jnp.mean(flat, axis=0), ones, ones, ones
        s = 1.0 - alpha
        w = jax.nn.softmax(s * flat, axis=0)
        value = (jax.nn.logsumexp(s * flat, axis=0) - log_k) / s
        return value, w, w, alpha * w + s * w * w
    if objective == "ciwae":
        value, w, w2 = iwae(flat, k, log_k)
        mean = jnp.mean(flat, axis=0)
        g = beta / k + (1.0 - beta) * w
        return beta * mean + (1.0 - beta) * value, g, g, beta / k + (1.0 - beta) * w2
    # miwae and piwae: M groups of K.
    values, w, w2 = jax.vmap(lambda ug: iwae(ug, k, log_k))(u)
    miwae = (jnp.mean(values, axis=0), (w / m).reshape(flat.shape), (w2 / m).reshape(flat.shape))
    if objective == "miwae":
        return miwae[0], miwae[1], miwae[1], miwae[2]
    value, w_all, _ = iwae(flat, m * k, jnp.log(jnp.asarray(m * k, u.dtype)))
    return value, w_all, miwae[1], miwae[2]


def objective(key: jax.Array, q_mean: jax.typing.ArrayLike, q_log_var: jax.typing.ArrayLike,
              log_likelihood: elbo_lib.LogLikelihood, prior=STANDARD_NORMAL, *,
              objective: str = "iwae", num_samples: int, grad_estimator: str = "reparam",
              outer_samples: int = 1, alpha: float = 0.5, beta: float = 0.5) -> Objective:
    """An importance-weighted bound per sample, as a surrogate for its gradient estimator.

    Args:
      key: PRNG key for the reparameterised draws.
      q_mean, q_log_var: encoder output, shape [..., dim].
      log_likelihood: z [S, ..., dim] -> log p(x|z) [S, ...], S = outer_samples *
        num_samples (twice that in one call for DReG and PIWAE, see the module
        docstring).
      prior: a `vaekl.priors` prior.
      objective: one of `OBJECTIVES`.
      num_samples: K, the draws inside each bound (static int >= 1).
      grad_estimator: one of `GRAD_ESTIMATORS`.
      outer_samples: M for miwae and piwae (static int >= 1); must be 1 otherwise.
      alpha: the Renyi bound's alpha (finite; 1 gives the ELBO).
      beta: CIWAE's weight of the ELBO, in [0, 1].

    Returns:
      `Objective(bound, elbo, rate, distortion)`, each of shape [...]; only `bound`
      carries a gradient.
    """
    name = "vaekl.bounds.objective"
    validate.choice(name, "objective", objective, OBJECTIVES)
    validate.choice(name, "grad_estimator", grad_estimator, GRAD_ESTIMATORS)
    outer = validate.positive_int(name, "outer_samples", outer_samples)
    if outer > 1 and objective not in ("miwae", "piwae"):
        raise ValueError(f"{name}: `outer_samples` (M) is for 'miwae' and 'piwae'; got"
                         f" M = {outer} with objective {objective!r}.")
    if objective == "renyi" and not math.isfinite(alpha):
        raise ValueError(f"{name}: `alpha` must be finite, got {alpha!r}.")
    if objective == "ciwae" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name}: `beta` must lie in [0, 1], got {beta!r}.")
    q_mean, q_log_var, prior, _, k = elbo_lib._check(
        name, key, q_mean, q_log_var, log_likelihood, prior, num_samples)

    z, eps = kl_lib.reparameterize(key, q_mean, q_log_var, outer * k)
    if grad_estimator == "reparam":
        log_r = kl_lib.log_ratio(z, eps, q_log_var, prior)
    else:  # log q with stopped parameters: only the path derivative through z.
        sg_mean, sg_log_var = sg((q_mean, q_log_var))
        log_r = kl_lib.log_ratio(z, (z - sg_mean) * jnp.exp(-0.5 * sg_log_var), sg_log_var,
                                 prior)
    two_passes = grad_estimator == "dreg" or objective == "piwae"
    zs = jnp.concatenate([z, sg(z)]) if two_passes else z
    log_lik = elbo_lib._log_likelihood(name, log_likelihood, zs)
    u = log_lik[: outer * k] + log_r
    value, g_dec, g_enc, g_dreg = jax.tree.map(
        sg, _weights(objective, u.reshape((outer, k) + u.shape[1:]), alpha=alpha, beta=beta))
    enc = g_dreg if grad_estimator == "dreg" else g_enc
    bound = value + jnp.sum(enc * (u - sg(u)), axis=0)
    if two_passes:
        # The decoder's gradient from the draws without their encoder path; the
        # first term gave it `enc`'s weights, this gives it the rest.
        # (Its value is irrelevant: only its gradient in the decoder and prior enters.)
        u_dec = log_lik[outer * k:] + prior.log_prob(sg(z))
        bound = bound + jnp.sum((g_dec - enc) * (u_dec - sg(u_dec)), axis=0)
    rate = -jnp.mean(sg(log_r), axis=0)
    distortion = -jnp.mean(sg(log_lik[: outer * k]), axis=0)
    return Objective(bound=bound, elbo=-(rate + distortion), rate=rate, distortion=distortion)
