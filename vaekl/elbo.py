"""Per-sample ELBO and IWAE bounds with a choice of KL term.

The encoder output is a diagonal Gaussian q(z|x) = N(q_mean, diag e^q_log_var);
the decoder enters as `log_likelihood(z) -> log p(x|z)`, a function of latents
with shape [num_samples, ..., dim] returning [num_samples, ...] (a closure over
x and the decoder parameters). The KL term (the rate) is chosen by name:

  "analytic"  the closed form (SGVB-B of Kingma & Welling)
  "k1"        mean of log q(z) - log p(z) over the same z (SGVB-A)
  "k3"        mean of (r - 1) - log r, r = p(z)/q(z)
  "stl"       as k1 but log q evaluated with stop-gradiented variational
              parameters (Roeder et al. 2017): same value, and a gradient with
              zero variance when q is the exact posterior.
  "entropy"   KL = -H(q) - E_q log p(z): q's entropy exact, only the
              cross-entropy sampled (for a q whose entropy has a closed form).

`elbo` and `iwae` take the diagonal Gaussian's parameters; `posterior_elbo` and
`posterior_iwae` take any `vaekl.posteriors` family (a diagonal one is passed on
to `elbo` and `iwae`), with the KL terms `vaekl.posteriors.kl_terms` allows for
the (posterior, prior) pair.
"""

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from vaekl import kl as kl_lib
from vaekl import posteriors, validate
from vaekl.priors import STANDARD_NORMAL, DiagNormal

KL_TERMS = ("analytic", "k1", "k3", "stl", "entropy")
LogLikelihood = Callable[[jax.Array], jax.Array]


class Bound(NamedTuple):
    """Per-sample parts of the ELBO, each of shape [...]: elbo = -(rate + distortion)."""

    elbo: jax.Array
    rate: jax.Array
    distortion: jax.Array


def _check_common(name, key, log_likelihood, prior, num_samples):
    num_samples = validate.positive_int(name, "num_samples", num_samples)
    validate.prng_key(name, key)
    if not callable(log_likelihood):
        raise TypeError(
            f"{name}: `log_likelihood` must be a function z -> log p(x|z), got"
            f" {type(log_likelihood).__name__}.")
    return kl_lib._resolve_prior(name, 0.0, 0.0, prior), num_samples  # None: the standard normal.


def _check(name, key, q_mean, q_log_var, log_likelihood, prior, num_samples):
    prior, num_samples = _check_common(name, key, log_likelihood, prior, num_samples)
    args = validate.floating(name, q_mean=q_mean, q_log_var=q_log_var)
    shape = validate.event_shape(name, args, min_ndim=("q_mean", "q_log_var"))
    validate.finite(name, **args)
    return args["q_mean"], args["q_log_var"], prior, shape, num_samples


def _log_likelihood(name, log_likelihood, z):
    out = log_likelihood(z)
    if jnp.shape(out) != z.shape[:-1]:
        raise ValueError(
            f"{name}: `log_likelihood` must map z of shape {list(z.shape)} to shape"
            f" {list(z.shape[:-1])} (one log p(x|z) per draw), got {list(jnp.shape(out))}.")
    return out


def elbo(key: jax.Array, q_mean: jax.typing.ArrayLike, q_log_var: jax.typing.ArrayLike,
         log_likelihood: LogLikelihood, prior=STANDARD_NORMAL, *, kl: str = "analytic",
         num_samples: int = 1) -> Bound:
    """The evidence lower bound per sample, split into rate and distortion.

    Args:
      key: PRNG key for the reparameterised draws z ~ q.
      q_mean, q_log_var: encoder output, shape [..., dim].
      log_likelihood: z [num_samples, ..., dim] -> log p(x|z) [num_samples, ...].
      prior: a `vaekl.priors` prior (the standard normal by default).
      kl: the KL term, one of `KL_TERMS`.
      num_samples: draws of z per sample, averaged (static int >= 1).

    Returns:
      `Bound(elbo, rate, distortion)`, each with shape [...]; distortion is
      -E_q log p(x|z) and rate the chosen estimate of KL(q(z|x) || p(z)).
    """
    name = "vaekl.elbo.elbo"
    validate.choice(name, "kl", kl, KL_TERMS)
    q_mean, q_log_var, prior, _, num_samples = _check(
        name, key, q_mean, q_log_var, log_likelihood, prior, num_samples)
    z, eps = kl_lib.reparameterize(key, q_mean, q_log_var, num_samples)
    distortion = -jnp.mean(_log_likelihood(name, log_likelihood, z), axis=0)
    if kl == "analytic":
        rate = kl_lib.analytic(q_mean, q_log_var, prior=prior)
    elif kl == "stl":
        sg_mean, sg_log_var = jax.lax.stop_gradient((q_mean, q_log_var))
        sg_eps = (z - sg_mean) * jnp.exp(-0.5 * sg_log_var)
        rate = -jnp.mean(kl_lib.log_ratio(z, sg_eps, sg_log_var, prior), axis=0)
    elif kl == "entropy":
        rate = -posteriors.DiagGaussian(q_mean, q_log_var).entropy() - jnp.mean(
            prior.log_prob(z), axis=0)
    else:
        log_r = kl_lib.log_ratio(z, eps, q_log_var, prior)
        rate = jnp.mean(kl_lib.estimate(kl, log_r), axis=0)
    return Bound(elbo=-(rate + distortion), rate=rate, distortion=distortion)


def _check_posterior(name, posterior, prior, kl=None):
    if not isinstance(posterior, posteriors.POSTERIORS):
        raise TypeError(f"{name}: `posterior` must be a vaekl.posteriors family"
                        f" ({', '.join(c.__name__ for c in posteriors.POSTERIORS)}), got"
                        f" {type(posterior).__name__}.")
    if kl is None:
        return
    posteriors.check_kl_term(f"{name}: kl={kl!r}", kl, posterior.family, prior,
                             isinstance(prior, DiagNormal))


def posterior_elbo(key: jax.Array, posterior: posteriors.Posterior,
                   log_likelihood: LogLikelihood, prior=STANDARD_NORMAL, *,
                   kl: str = "analytic", num_samples: int = 1) -> Bound:
    """`elbo` for any posterior family of `vaekl.posteriors`.

    A `DiagGaussian` goes to `elbo` unchanged. For the others, with z, log q from
    `posterior.sample`: "analytic" is `posteriors.analytic_kl`, "k1"/"k3" estimate
    from log r = log p(z) - log q(z), "stl" is k1 with log q evaluated by the
    stop-gradiented posterior's `log_prob` (for a flow that inverts it), and
    "entropy" is -H(q) - mean log p(z).

    Args:
      key: PRNG key for the draws z ~ q.
      posterior: a `vaekl.posteriors` family with batch shape [...].
      log_likelihood, prior, num_samples: as in `elbo`.
      kl: one of `posteriors.kl_terms(posterior.family, ...)` for this prior.

    Returns:
      `Bound(elbo, rate, distortion)`, each [...].

    Raises:
      ValueError: for a KL term the (posterior, prior) pair has not, naming the pair
        and the terms that work.
    """
    name = "vaekl.elbo.posterior_elbo"
    validate.choice(name, "kl", kl, KL_TERMS)
    prior, num_samples = _check_common(name, key, log_likelihood, prior, num_samples)
    _check_posterior(name, posterior, prior, kl)
    if isinstance(posterior, posteriors.DiagGaussian):
        return elbo(key, posterior.mean, posterior.log_var, log_likelihood, prior, kl=kl,
                    num_samples=num_samples)
    z, log_q = posterior.sample(key, num_samples)
    distortion = -jnp.mean(_log_likelihood(name, log_likelihood, z), axis=0)
    log_p = prior.log_prob(z)
    if kl == "analytic":
        rate = posteriors.analytic_kl(posterior, prior)
    elif kl == "entropy":
        rate = -posterior.entropy() - jnp.mean(log_p, axis=0)
    elif kl == "stl":
        rate = jnp.mean(jax.lax.stop_gradient(posterior).log_prob(z) - log_p, axis=0)
    else:
        rate = jnp.mean(kl_lib.estimate(kl, log_p - log_q), axis=0)
    return Bound(elbo=-(rate + distortion), rate=rate, distortion=distortion)


# Latent values per IWAE chunk by default: 2^20 floats of z (4 MB in float32); the
# decoder's activations for them are that times (hidden + data widths) / latents,
# e.g. about 100 MB for the IWAE net's 200+200+784 units on 50 latents.
CHUNK_ELEMENTS = 2**20


def default_chunk_size(num_samples: int, shape: tuple[int, ...]) -> int:
    """Draws per chunk so that one chunk holds about `CHUNK_ELEMENTS` latents, 1..K.

    `shape` is the encoder output's, [..., dim].
    """
    per_draw = max(1, math.prod(shape))
    return max(1, min(num_samples, CHUNK_ELEMENTS // per_draw))


def iwae(key: jax.Array, q_mean: jax.typing.ArrayLike, q_log_var: jax.typing.ArrayLike,
         log_likelihood: LogLikelihood, prior=STANDARD_NORMAL, *, num_samples: int,
         chunk_size: Optional[int] = None) -> jax.Array:
    """The importance-weighted bound log (1/K) sum_k p(x, z_k) / q(z_k|x) per sample.

    The K = num_samples draws are taken `chunk_size` at a time inside a
    `lax.scan` with a running log-sum-exp, so memory is O(chunk_size), not O(K):
    K = 5000 runs in the memory of one chunk. By default a chunk holds about
    `CHUNK_ELEMENTS` latent values (chunk * batch * dim), which bounds the
    decoder's activations too, whatever K, the batch or the latent size.

    Args:
      key: PRNG key.
      q_mean, q_log_var: encoder output, shape [..., dim].
      log_likelihood: z [chunk, ..., dim] -> log p(x|z) [chunk, ...].
      prior: a `vaekl.priors` prior.
      num_samples: K >= 1.
      chunk_size: draws per chunk (default: `default_chunk_size(K, q_mean's shape)`).

    Returns:
      The bound per sample, shape [...]; K = 1 gives a one-sample k1 ELBO.
    """
    name = "vaekl.elbo.iwae"
    q_mean, q_log_var, prior, shape, num_samples = _check(
        name, key, q_mean, q_log_var, log_likelihood, prior, num_samples)

    def log_weights(key, size):
        z, eps = kl_lib.reparameterize(key, q_mean, q_log_var, size)
        return _log_likelihood(name, log_likelihood, z) + kl_lib.log_ratio(
            z, eps, q_log_var, prior)

    return _mean_of_weights(name, key, log_weights, shape, jnp.result_type(q_mean, q_log_var),
                            num_samples, chunk_size)


def posterior_iwae(key: jax.Array, posterior: posteriors.Posterior,
                   log_likelihood: LogLikelihood, prior=STANDARD_NORMAL, *, num_samples: int,
                   chunk_size: Optional[int] = None) -> jax.Array:
    """`iwae` for any posterior family of `vaekl.posteriors` (a `DiagGaussian` goes to `iwae`).

    The weights are log p(x|z) + log p(z) - log q(z|x) with z, log q from
    `posterior.sample`; arguments and result as in `iwae`.
    """
    name = "vaekl.elbo.posterior_iwae"
    _check_posterior(name, posterior, None)
    if isinstance(posterior, posteriors.DiagGaussian):
        return iwae(key, posterior.mean, posterior.log_var, log_likelihood, prior,
                    num_samples=num_samples, chunk_size=chunk_size)
    prior, num_samples = _check_common(name, key, log_likelihood, prior, num_samples)

    def log_weights(key, size):
        z, log_q = posterior.sample(key, size)
        return _log_likelihood(name, log_likelihood, z) + prior.log_prob(z) - log_q

    return _mean_of_weights(name, key, log_weights, posterior.mean.shape, posterior.mean.dtype,
                            num_samples, chunk_size)


def _mean_of_weights(name, key, log_weights, shape, dtype, num_samples, chunk_size):
    """log (1/K) sum_k e^(log w_k) over K draws in chunks; log_weights(key, n) -> [n, ...]."""
    chunk = default_chunk_size(num_samples, shape) if chunk_size is None else min(
        validate.positive_int(name, "chunk_size", chunk_size), num_samples)
    num_full, remainder = divmod(num_samples, chunk)
    keys = jax.random.split(key, num_full + 1)

    def body(total, key):
        return jnp.logaddexp(total, jax.nn.logsumexp(log_weights(key, chunk), axis=0)), None

    total = jnp.full(shape[:-1], -jnp.inf, dtype)
    total, _ = jax.lax.scan(body, total, keys[:num_full])
    if remainder:
        total = jnp.logaddexp(total, jax.nn.logsumexp(log_weights(keys[-1], remainder), axis=0))
    return total - jnp.log(jnp.asarray(num_samples, dtype))
