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
"""

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from vaekl import kl as kl_lib
from vaekl import validate
from vaekl.priors import STANDARD_NORMAL

KL_TERMS = ("analytic", "k1", "k3", "stl")
LogLikelihood = Callable[[jax.Array], jax.Array]


class Bound(NamedTuple):
    """Per-sample parts of the ELBO, each of shape [...]: elbo = -(rate + distortion)."""

    elbo: jax.Array
    rate: jax.Array
    distortion: jax.Array


def _check(name, key, q_mean, q_log_var, log_likelihood, prior, num_samples):
    num_samples = validate.positive_int(name, "num_samples", num_samples)
    validate.prng_key(name, key)
    if not callable(log_likelihood):
        raise TypeError(
            f"{name}: `log_likelihood` must be a function z -> log p(x|z), got"
            f" {type(log_likelihood).__name__}.")
    prior = kl_lib._resolve_prior(name, 0.0, 0.0, prior)  # None: the standard normal.
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
    else:
        log_r = kl_lib.log_ratio(z, eps, q_log_var, prior)
        rate = jnp.mean(kl_lib.estimate(kl, log_r), axis=0)
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
    chunk = default_chunk_size(num_samples, shape) if chunk_size is None else min(
        validate.positive_int(name, "chunk_size", chunk_size), num_samples)
    num_full, remainder = divmod(num_samples, chunk)

    def chunk_logsumexp(key, size):
        z, eps = kl_lib.reparameterize(key, q_mean, q_log_var, size)
        log_w = _log_likelihood(name, log_likelihood, z) + kl_lib.log_ratio(
            z, eps, q_log_var, prior)
        return jax.nn.logsumexp(log_w, axis=0)

    keys = jax.random.split(key, num_full + 1)

    def body(total, key):
        return jnp.logaddexp(total, chunk_logsumexp(key, chunk)), None

    dtype = jnp.result_type(q_mean, q_log_var)
    total = jnp.full(shape[:-1], -jnp.inf, dtype)
    total, _ = jax.lax.scan(body, total, keys[:num_full])
    if remainder:
        total = jnp.logaddexp(total, chunk_logsumexp(keys[-1], remainder))
    return total - jnp.log(jnp.asarray(num_samples, dtype))
