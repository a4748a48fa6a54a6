"""Per-sample KL divergences: closed forms and Monte Carlo estimators.

Every function reduces over the last (event) axis and broadcasts over the
leading ones, so `analytic(mean, log_var)` with shapes [batch, dim] returns
[batch]. All are pure and work under `jit`, `vmap` and `grad`.

Sampled estimators follow Schulman (2020), with r = p(z)/q(z) over the whole
latent vector and z ~ q reparameterised as z = mean + exp(log_var/2) * eps:
  k1 = -log r            unbiased, high variance, negative about half the time
  k2 = (log r)^2 / 2     biased, low variance
  k3 = (r - 1) - log r   unbiased (E_q r = 1), never negative
"""

import math
from typing import Optional, Union

import jax
import jax.numpy as jnp

from vaekl import validate
from vaekl.priors import LOG_2PI, DiagNormal, MixtureOfGaussians

ESTIMATORS = ("k1", "k2", "k3")
Prior = Union[DiagNormal, MixtureOfGaussians]

# 2 / n! for n = 2..10: e^x - 1 - x = x^2/2 * sum_n (2/n!) x^(n-2).
_SERIES = tuple(2.0 / math.factorial(n) for n in range(2, 11))
_SERIES_RADIUS = 0.1


def expm1mx(x: jax.Array) -> jax.Array:
    """e^x - 1 - x without cancellation near 0 (elementwise, any shape).

    For |x| < 0.1 a Taylor series to x^10 (truncation below 1e-16 relative),
    elsewhere `expm1(x) - x`, whose cancellation costs about 2 eps/|x| on top of
    expm1's own error: in float32 at most 6e-6 relative (measured just above
    |x| = 0.1), 2e-7 away from there.
    """
    small = jnp.abs(x) < _SERIES_RADIUS
    xs = jnp.where(small, x, 0.0)
    poly = _SERIES[-1]
    for c in reversed(_SERIES[:-1]):
        poly = poly * xs + c
    xl = jnp.where(small, 1.0, x)
    return jnp.where(small, 0.5 * xs * xs * poly, jnp.expm1(xl) - xl)


def _resolve_prior(fn_name, p_mean, p_log_var, prior) -> Prior:
    if prior is None:
        return DiagNormal(p_mean, p_log_var)
    if not isinstance(prior, (DiagNormal, MixtureOfGaussians)):
        raise TypeError(
            f"{fn_name}: `prior` must be a vaekl.priors.DiagNormal or"
            f" MixtureOfGaussians, got {type(prior).__name__}.")
    return prior


def analytic(q_mean: jax.typing.ArrayLike, q_log_var: jax.typing.ArrayLike,
             p_mean: jax.typing.ArrayLike = 0.0, p_log_var: jax.typing.ArrayLike = 0.0,
             *, prior: Optional[Prior] = None) -> jax.Array:
    """KL(N(q_mean, diag e^q_log_var) || N(p_mean, diag e^p_log_var)), closed form.

    Per dimension, with d = q_log_var - p_log_var:
      1/2 [ (q_mean - p_mean)^2 e^-p_log_var + (e^d - 1 - d) ],
    evaluated with `expm1mx`, so it stays accurate where sigma_q ~ sigma_p and is
    exactly 0 when q equals p. The mean difference is scaled by e^(-p_log_var/2)
    before it is squared, so that neither factor under- or overflows alone.

    Args:
      q_mean, q_log_var: posterior parameters, shape [..., dim].
      p_mean, p_log_var: prior parameters broadcastable to [..., dim]
        (default: the standard normal).
      prior: alternatively a `DiagNormal`; a `MixtureOfGaussians` has no closed
        form and raises `ValueError` (use `sampled`).

    Returns:
      The KL per sample, shape [...].
    """
    return jnp.sum(_terms(*_checked("vaekl.kl.analytic", q_mean, q_log_var, p_mean, p_log_var,
                                    prior)), axis=-1)


def analytic_per_dim(q_mean: jax.typing.ArrayLike, q_log_var: jax.typing.ArrayLike,
                     p_mean: jax.typing.ArrayLike = 0.0, p_log_var: jax.typing.ArrayLike = 0.0,
                     *, prior: Optional[Prior] = None) -> jax.Array:
    """The terms of `analytic` before the sum: the KL of each dimension, shape [..., dim].

    What free bits clamp and what a per-dimension KL report shows; arguments as in
    `analytic`.
    """
    return _terms(*_checked("vaekl.kl.analytic_per_dim", q_mean, q_log_var, p_mean, p_log_var,
                            prior))


def _checked(name, q_mean, q_log_var, p_mean, p_log_var, prior):
    """The four parameters, validated (prior resolved), in `_terms`' order."""
    if prior is not None:
        prior = _resolve_prior(name, p_mean, p_log_var, prior)
        if not isinstance(prior, DiagNormal):
            raise ValueError(
                f"{name}: KL(diagonal Gaussian || {type(prior).__name__}) has no"
                " closed form; use vaekl.kl.sampled(..., prior=prior) or one of the"
                " sampled KL terms ('k1', 'k3', 'stl').")
        p_mean, p_log_var = prior
    args = validate.floating(name, q_mean=q_mean, q_log_var=q_log_var,
                             p_mean=p_mean, p_log_var=p_log_var)
    validate.event_shape(name, args, min_ndim=("q_mean", "q_log_var"))
    validate.finite(name, **args)
    return tuple(args.values())


def _terms(q_mean, q_log_var, p_mean, p_log_var):
    mean_term = jnp.square((q_mean - p_mean) * jnp.exp(-0.5 * jnp.asarray(p_log_var)))
    return 0.5 * (mean_term + expm1mx(q_log_var - p_log_var))


def analytic_full(q_mean: jax.typing.ArrayLike, q_scale_tril: jax.typing.ArrayLike,
                  p_mean: jax.typing.ArrayLike = 0.0,
                  p_scale_tril: Optional[jax.typing.ArrayLike] = None) -> jax.Array:
    """KL(N(q_mean, L_q L_q^T) || N(p_mean, L_p L_p^T)) from Cholesky factors.

    With M = L_p^-1 L_q and y = L_p^-1 (q_mean - p_mean):
      KL = 1/2 [ sum_{i!=j} M_ij^2 + sum_i (M_ii^2 - 1 - log M_ii^2) + |y|^2 ],
    the diagonal part through `expm1mx`. KL(q || q) is 0 up to the rounding of
    the triangular solve (a few squared ulps, below 1e-12 in float32). Only the
    lower triangles of both factors are read, as in TFP's `MultivariateNormalTriL`:
    entries above the diagonal are ignored.

    Args:
      q_mean: shape [..., dim].
      q_scale_tril: lower-triangular factor with non-zero diagonal, [..., dim, dim].
      p_mean: broadcastable to [..., dim] (default 0).
      p_scale_tril: [..., dim, dim] lower-triangular with non-zero diagonal, or None
        for the identity.

    Returns:
      The KL per sample, shape [...].
    """
    name = "vaekl.kl.analytic_full"
    args = validate.floating(name, q_mean=q_mean, q_scale_tril=q_scale_tril, p_mean=p_mean)
    q_mean, q_scale_tril, p_mean = args.values()
    if jnp.ndim(q_mean) < 1:
        raise ValueError(f"{name}: `q_mean` must have a last (event) axis, shape [..., dim];"
                         " got a scalar.")
    dim = jnp.shape(q_mean)[-1]
    if jnp.ndim(q_scale_tril) < 2 or q_scale_tril.shape[-2:] != (dim, dim):
        raise ValueError(
            f"{name}: `q_scale_tril` must have shape [..., {dim}, {dim}] to match"
            f" q_mean {list(jnp.shape(q_mean))}; got {list(jnp.shape(q_scale_tril))}.")
    mats = {"q_scale_tril": q_scale_tril}
    if p_scale_tril is not None:
        p_scale_tril = validate.floating(name, p_scale_tril=p_scale_tril)["p_scale_tril"]
        mats["p_scale_tril"] = p_scale_tril
    validate.finite(name, q_mean=q_mean, p_mean=p_mean, **mats)
    batch = validate.event_shape(
        name, {"q_mean": q_mean, "p_mean": p_mean,
               **{k: v[..., 0] for k, v in mats.items()}}, min_ndim=("q_mean",))[:-1]
    diff = jnp.broadcast_to(q_mean - p_mean, batch + (dim,))
    lq = jnp.broadcast_to(jnp.tril(q_scale_tril), batch + (dim, dim))
    if p_scale_tril is None:
        m, y = lq, diff
    else:
        lp = jnp.broadcast_to(jnp.tril(p_scale_tril), batch + (dim, dim))
        m = jax.scipy.linalg.solve_triangular(lp, lq, lower=True)
        y = jax.scipy.linalg.solve_triangular(lp, diff[..., None], lower=True)[..., 0]
    diag = jnp.diagonal(m, axis1=-2, axis2=-1)
    off_diag = jnp.sum(jnp.square(jnp.tril(m, -1)), axis=(-2, -1))
    diag_term = jnp.sum(expm1mx(jnp.log(jnp.square(diag))), axis=-1)
    return 0.5 * (off_diag + diag_term + jnp.sum(jnp.square(y), axis=-1))


def log_ratio(z: jax.Array, eps: jax.Array, q_log_var: jax.Array, prior: Prior) -> jax.Array:
    """log p(z) - log q(z) for z = q_mean + exp(q_log_var / 2) * eps.

    Written with eps rather than (z - q_mean) / sigma, so that its derivative in
    the variational parameters is the full (path + score) derivative. For a
    Gaussian prior the two log 2 pi terms cancel before they are added.

    Args:
      z, eps: shape [..., dim].
      q_log_var: broadcastable to [..., dim].
      prior: a `DiagNormal` or `MixtureOfGaussians`.

    Returns:
      Shape [...].
    """
    if isinstance(prior, DiagNormal):
        sq = jnp.square(z - prior.mean) * jnp.exp(-jnp.asarray(prior.log_var, z.dtype))
        return -0.5 * jnp.sum(sq - jnp.square(eps) + (prior.log_var - q_log_var), axis=-1)
    log_q = -0.5 * jnp.sum(jnp.square(eps) + q_log_var + LOG_2PI, axis=-1)
    return prior.log_prob(z) - log_q


def estimate(estimator: str, log_r: jax.Array) -> jax.Array:
    """Maps log r = log p(z) - log q(z) to the k1, k2 or k3 estimate (elementwise)."""
    validate.choice("vaekl.kl.estimate", "estimator", estimator, ESTIMATORS)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * jnp.square(log_r)
    return expm1mx(log_r)


def reparameterize(key: jax.Array, q_mean: jax.Array, q_log_var: jax.Array,
                   num_samples: int) -> tuple[jax.Array, jax.Array]:
    """Draws z = q_mean + exp(q_log_var/2) * eps, both with shape [num_samples, ..., dim]."""
    shape = jnp.broadcast_shapes(jnp.shape(q_mean), jnp.shape(q_log_var))
    dtype = jnp.result_type(q_mean, q_log_var)
    eps = jax.random.normal(key, (num_samples,) + shape, dtype)
    return q_mean + jnp.exp(0.5 * q_log_var) * eps, eps


def draws(key: jax.Array, q_mean: jax.typing.ArrayLike, q_log_var: jax.typing.ArrayLike,
          p_mean: jax.typing.ArrayLike = 0.0, p_log_var: jax.typing.ArrayLike = 0.0, *,
          prior: Optional[Prior] = None, num_samples: int = 1,
          estimator: str = "k1") -> jax.Array:
    """Single-draw KL estimates, one per z ~ q: shape [num_samples, ...].

    Arguments as in `sampled`, which averages these over the first axis.
    """
    return _draws("vaekl.kl.draws", key, q_mean, q_log_var, p_mean, p_log_var,
                  prior, num_samples, estimator)


def _draws(name, key, q_mean, q_log_var, p_mean, p_log_var, prior, num_samples, estimator):
    validate.choice(name, "estimator", estimator, ESTIMATORS)
    num_samples = validate.positive_int(name, "num_samples", num_samples)
    validate.prng_key(name, key)
    prior = _resolve_prior(name, p_mean, p_log_var, prior)
    args = validate.floating(name, q_mean=q_mean, q_log_var=q_log_var)
    shapes = dict(args)
    if isinstance(prior, DiagNormal):
        p_args = validate.floating(name, p_mean=prior.mean, p_log_var=prior.log_var)
        prior = DiagNormal(*p_args.values())
        shapes.update(p_args)
    else:
        shapes["prior.means[0]"] = prior.means[0]
    validate.event_shape(name, shapes, min_ndim=("q_mean", "q_log_var"))
    validate.finite(name, **shapes)
    q_mean, q_log_var = args.values()
    z, eps = reparameterize(key, q_mean, q_log_var, num_samples)
    return estimate(estimator, log_ratio(z, eps, q_log_var, prior))


def sampled(key: jax.Array, q_mean: jax.typing.ArrayLike, q_log_var: jax.typing.ArrayLike,
            p_mean: jax.typing.ArrayLike = 0.0, p_log_var: jax.typing.ArrayLike = 0.0, *,
            prior: Optional[Prior] = None, num_samples: int = 1,
            estimator: str = "k1") -> jax.Array:
    """Monte Carlo KL(q || p) from reparameterised z ~ q, averaged over num_samples.

    Gradients flow through z, so this is a pathwise (SGVB) estimate in value and
    gradient.

    Args:
      key: a PRNG key.
      q_mean, q_log_var: posterior parameters, shape [..., dim].
      p_mean, p_log_var: Gaussian prior parameters broadcastable to [..., dim].
      prior: alternatively any prior with `log_prob`, e.g. `MixtureOfGaussians`.
      num_samples: draws of z per sample (static int >= 1).
      estimator: "k1", "k2" or "k3".

    Returns:
      The estimate per sample, shape [...].
    """
    return jnp.mean(_draws("vaekl.kl.sampled", key, q_mean, q_log_var, p_mean, p_log_var,
                           prior, num_samples, estimator), axis=0)
