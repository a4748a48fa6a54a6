"""Importance-weighted bounds for any q(z|x) and p(z): training objectives with a choice of
gradient estimator, and the evaluation's IWAE-K in bounded memory.

For K draws z_k ~ q(z|x) the log-weights are u_k = log p(x|z_k) + log p(z_k) - log q(z_k|x)
(`log_weights`, the one function that computes them). Every objective here is a
function L(u) of the log-weights, per sample:

  "iwae"   log (1/K) sum_k e^u_k                          (Burda et al. 2015)
  "renyi"  1/(1-a) log (1/K) sum_k e^((1-a) u_k)          (Li & Turner 2016; a = 0 is IWAE,
                                                           a -> 1 the ELBO, mean_k u_k;
                                                           a >= 0 only: for a < 0 it is not
                                                           a lower bound on log p(x), it
                                                           exceeds it as K grows)
  "miwae"  the mean of M IWAE-K bounds over M*K draws      (Rainforth et al. 2018)
  "ciwae"  b ELBO + (1-b) IWAE over the same K draws       (Rainforth et al. 2018)
  "piwae"  IWAE over all M*K draws for the decoder, MIWAE(M, K) for the encoder
           (Rainforth et al. 2018); its value is the IWAE-MK bound.

`objective` returns a surrogate whose *value* is the bound and whose *gradient* is
the chosen estimator. With g = dL/du, the decoder (and prior) parameters theta get
sum_k g_k du_k/dtheta under every estimator; the encoder parameters phi get:

  "reparam"  sum_k g_k du_k/dphi, the plain reparameterised gradient (path + score);
  "stl"      the same with the path-only log q (`vaekl.distributions.path_log_prob`):
             only the path derivative through z_k (Roeder et al. 2017; biased for IWAE, K > 1);
  "dreg"     sum_k (g_k - H_kk) du_k/dz_k dz_k/dphi, H the Hessian of L in u. The score
             term E[g_k dlog q/dphi] equals E[dg_k/dz_k dz_k/dphi] (the reparameterisation
             identity, Tucker et al. 2018), so this is unbiased for the reparam gradient.
             For IWAE g - H_kk = w_k^2 (w the normalised weights: Tucker et al.'s
             DReG), for Renyi a w_k + (1-a) w_k^2, for the ELBO 1/K (STL).

STL and DReG evaluate `q.log_prob` at the draws: for a flow (the IAF) that is its inverse,
`dim` passes of each step's MADE on top of the forward pass. The encoder weights differ
from the decoder's only for DReG and PIWAE; then the decoder's share is taken from a second
evaluation of the log-likelihood at stop_gradient(z) (in the same call as the first), and of
the prior there, so that a prior computed by the encoder (the VampPrior) keeps its
decoder-side gradient. It costs one more decoder pass, but needs nothing of `log_likelihood`
beyond z -> log p(x|z): the decoder parameters stay inside the closure.

A q whose draws have no path gradient (`q.reparameterized` False: a categorical) is
refused by `objective` under every estimator, each of which differentiates the draws'
path; `iwae` (evaluation, no gradient) takes it.
"""

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from vaekl import validate
from vaekl.distributions import STANDARD_NORMAL, path_log_prob
from vaekl.elbo import LogLikelihood

OBJECTIVES = ("iwae", "renyi", "miwae", "piwae", "ciwae")
GRAD_ESTIMATORS = ("reparam", "stl", "dreg")
# Latent values per IWAE chunk by default: 2^20 floats of z (4 MB in float32); the
# decoder's activations for them are that times (hidden + data widths) / latents,
# e.g. about 100 MB for the IWAE net's 200+200+784 units on 50 latents.
CHUNK_ELEMENTS = 2**20

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


class Weights(NamedTuple):
    """The log-weights of S draws z_k ~ q and their parts, each [S, ...].

    u: log p(x|z_k) + log p(z_k) - log q(z_k|x).
    log_likelihood: log p(x|z_k); log_ratio: log p(z_k) - log q(z_k|x).
    log_joint_stopped: log p(x, stop_gradient(z_k)) (with `decoder_pass`, else None): the
      decoder's and prior's gradient without the draws' encoder path.
    """

    u: jax.Array
    log_likelihood: jax.Array
    log_ratio: jax.Array
    log_joint_stopped: Optional[jax.Array] = None


def log_weights(key: jax.Array, q, log_likelihood: LogLikelihood, prior=STANDARD_NORMAL, *,
                num_samples: int, path_only: bool = False, decoder_pass: bool = False,
                name: str = "vaekl.bounds.log_weights") -> Weights:
    """u_k for `num_samples` draws z_k ~ q (`q.sample_and_log_prob(seed=key, ...)`).

    `path_only` takes log q through `path_log_prob` (STL, DReG); `decoder_pass` also
    evaluates `log_likelihood` at stop_gradient(z) in the same call ([2S, ...] rows) and
    fills `log_joint_stopped`. Inputs are not checked here (`objective` and `iwae` do);
    `name` is the public function that messages name.
    """
    z, log_q = q.sample_and_log_prob(seed=key, sample_shape=(num_samples,))
    if path_only:
        log_q = path_log_prob(q, z, log_q)
    log_lik = validate.log_likelihood(
        name, log_likelihood, jnp.concatenate([z, sg(z)]) if decoder_pass else z,
        (2 * num_samples if decoder_pass else num_samples,) + log_q.shape[1:])
    log_ratio = prior.log_prob(z) - log_q
    joint = log_lik[num_samples:] + prior.log_prob(sg(z)) if decoder_pass else None
    log_lik = log_lik[:num_samples]
    return Weights(log_lik + log_ratio, log_lik, log_ratio, joint)


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



def objective(key: jax.Array, q, log_likelihood: LogLikelihood, prior=STANDARD_NORMAL, *,
              objective: str = "iwae", num_samples: int, grad_estimator: str = "reparam",
              outer_samples: int = 1, alpha: float = 0.5, beta: float = 0.5) -> Objective:
    """An importance-weighted bound per sample, as a surrogate for its gradient estimator.

    Args:
      key: PRNG key for the draws (`q.sample_and_log_prob(seed=key, sample_shape=(S,))`).
      q: the posterior, any distribution of the `vaekl.distributions` interface with batch
        shape [...] (a flow's STL and DReG pay its inverse, see the module docstring).
      log_likelihood: z [S, ..., dim] -> log p(x|z) [S, ...], S = outer_samples *
        num_samples (twice that in one call for DReG and PIWAE, see the module
        docstring).
      prior: a distribution with `log_prob` (the standard normal by default).
      objective: one of `OBJECTIVES`.
      num_samples: K, the draws inside each bound (static int >= 1).
      grad_estimator: one of `GRAD_ESTIMATORS`.
      outer_samples: M for miwae and piwae (static int >= 1); must be 1 otherwise.
      alpha: the Renyi bound's alpha (finite, >= 0; 1 gives the ELBO).
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
    if objective == "renyi" and not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"{name}: `alpha` must be finite and >= 0 (for alpha < 0 the Renyi"
                         f" objective is not a lower bound on log p(x)), got {alpha!r}.")
    if objective == "ciwae" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name}: `beta` must lie in [0, 1], got {beta!r}.")
    prior, k = validate.bound_inputs(name, key, q, log_likelihood, prior, num_samples)
    # Every estimator here differentiates the draws' path (reparam's has no score term), so
    # for a q without one each would be biased: refused, "reparam" too.
    validate.reparameterized(name, f"grad_estimator={grad_estimator!r}", q,
                             "use vaekl.elbo.elbo (its score-function gradient) or a"
                             " reparameterised family (for a categorical,"
                             " vaekl.categorical.RelaxedCategorical); vaekl.bounds.iwae"
                             " evaluates the bound for any q")
    two_passes = grad_estimator == "dreg" or objective == "piwae"
    w = log_weights(key, q, log_likelihood, prior, num_samples=outer * k,
                    path_only=grad_estimator != "reparam", decoder_pass=two_passes, name=name)
    u = w.u
    value, g_dec, g_enc, g_dreg = jax.tree.map(
        sg, _weights(objective, u.reshape((outer, k) + u.shape[1:]), alpha=alpha, beta=beta))
    enc = g_dreg if grad_estimator == "dreg" else g_enc
    bound = value + jnp.sum(enc * (u - sg(u)), axis=0)
    if two_passes:
        # The decoder's (and prior's) gradient from the draws without their encoder path;
        # the first term gave it `enc`'s weights, this gives it the rest. (Its value is
        # irrelevant: only its gradient in the decoder and prior enters.)
        joint = w.log_joint_stopped
        bound = bound + jnp.sum((g_dec - enc) * (joint - sg(joint)), axis=0)
    rate = -jnp.mean(sg(w.log_ratio), axis=0)
    distortion = -jnp.mean(sg(w.log_likelihood), axis=0)
    return Objective(bound=bound, elbo=-(rate + distortion), rate=rate, distortion=distortion)


def default_chunk_size(num_samples: int, shape: tuple[int, ...]) -> int:
    """Draws per chunk so that one chunk holds about `CHUNK_ELEMENTS` latents, 1..K.

    `shape` is one draw's, [..., dim].
    """
    per_draw = max(1, math.prod(shape))
    return max(1, min(num_samples, CHUNK_ELEMENTS // per_draw))


def iwae(key: jax.Array, q, log_likelihood: LogLikelihood, prior=STANDARD_NORMAL, *,
         num_samples: int, chunk_size: Optional[int] = None) -> jax.Array:
    """The importance-weighted bound log (1/K) sum_k e^u_k per sample, in bounded memory.

    The K = num_samples draws are taken `chunk_size` at a time inside a `lax.scan` with a
    running log-sum-exp (chunk i drawn with the i-th of `jax.random.split(key, num_full + 1)`,
    a last partial chunk with the last key), so memory is O(chunk_size), not O(K):
    K = 5000 runs in the memory of one chunk. By default a chunk holds about
    `CHUNK_ELEMENTS` latent values (chunk * batch * dim), which bounds the decoder's
    activations too, whatever K, the batch or the latent size.

    Args:
      key: PRNG key.
      q: the posterior, a distribution with batch shape [...].
      log_likelihood: z [chunk, ..., dim] -> log p(x|z) [chunk, ...].
      prior: a distribution with `log_prob`.
      num_samples: K >= 1.
      chunk_size: draws per chunk (default: `default_chunk_size(K, one draw's shape)`).

    Returns:
      The bound per sample, shape [...]; K = 1 gives a one-sample k1 ELBO.
    """
    name = "vaekl.bounds.iwae"
    prior, num_samples = validate.bound_inputs(name, key, q, log_likelihood, prior, num_samples)
    draw, log_q = jax.eval_shape(lambda k: q.sample_and_log_prob(seed=k, sample_shape=(1,)), key)
    chunk = default_chunk_size(num_samples, draw.shape[1:]) if chunk_size is None else min(
        validate.positive_int(name, "chunk_size", chunk_size), num_samples)
    num_full, remainder = divmod(num_samples, chunk)
    keys = jax.random.split(key, num_full + 1)

    def lse(key, size):  # log sum_k e^u_k over `size` draws.
        u = log_weights(key, q, log_likelihood, prior, num_samples=size, name=name).u
        return jax.nn.logsumexp(u, axis=0)

    total = jnp.full(log_q.shape[1:], -jnp.inf, log_q.dtype)  # q's batch shape, any event.
    total, _ = jax.lax.scan(lambda t, k: (jnp.logaddexp(t, lse(k, chunk)), None), total,
                            keys[:num_full])
    if remainder:
        total = jnp.logaddexp(total, lse(keys[-1], remainder))
    return total - jnp.log(jnp.asarray(num_samples, log_q.dtype))
