"""Priors p(z) as small pytrees with a `log_prob`: Gaussians and a Gaussian mixture.

Each prior is a `NamedTuple`, so it passes through `jax.jit`, `jax.vmap` and
`jax.grad` as an ordinary argument, and a learnable prior is just one whose
fields come from a parameter tree.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(x: jax.Array, mean: jax.typing.ArrayLike,
                      log_scale: jax.typing.ArrayLike) -> jax.Array:
    """Sum over the last axis of log N(x; mean, exp(log_scale)^2): x [..., dim] -> [...].

    `mean` and `log_scale` broadcast against x. The residual is scaled before it
    is squared, so a small residual at a small scale neither underflows nor
    overflows on the way. The one Gaussian log-density of vaekl: priors,
    decoders and the experiments' linear-Gaussian models all use it.
    """
    log_scale = jnp.asarray(log_scale, jnp.result_type(x, mean))
    sq = jnp.square((x - mean) * jnp.exp(-log_scale))
    return -jnp.sum(0.5 * sq + log_scale + 0.5 * LOG_2PI, axis=-1)


class DiagNormal(NamedTuple):
    """N(mean, diag(exp(log_var))); fields broadcast against z of shape [..., dim]."""

    mean: jax.typing.ArrayLike = 0.0
    log_var: jax.typing.ArrayLike = 0.0

    def log_prob(self, z: jax.Array) -> jax.Array:
        """Log-density of z with shape [..., dim]; returns shape [...]."""
        return gaussian_log_prob(z, self.mean, 0.5 * jnp.asarray(self.log_var))


STANDARD_NORMAL = DiagNormal(0.0, 0.0)


class MixtureOfGaussians(NamedTuple):
    """Σ_k softmax(logits)_k N(means_k, diag(exp(log_vars_k))): no closed-form KL.

    Fields: logits [num_components], means and log_vars [num_components, dim].
    """

    logits: jax.Array
    means: jax.Array
    log_vars: jax.Array

    def log_prob(self, z: jax.Array) -> jax.Array:
        """Log-density of z with shape [..., dim]; returns shape [...]."""
        components = DiagNormal(self.means, self.log_vars).log_prob(z[..., None, :])
        return jax.nn.logsumexp(components + jax.nn.log_softmax(self.logits), axis=-1)

    def sample(self, key: jax.Array, shape: tuple[int, ...] = ()) -> jax.Array:
        """Draws samples with shape [*shape, dim]."""
        k_comp, k_noise = jax.random.split(key)
        comp = jax.random.categorical(k_comp, self.logits, shape=shape)
        eps = jax.random.normal(k_noise, shape + self.means.shape[-1:], self.means.dtype)
        return self.means[comp] + jnp.exp(0.5 * self.log_vars[comp]) * eps


def mixture(key: jax.Array, num_components: int, dim: int, *, spread: float = 2.0,
            log_var: float = -1.0, dtype=jnp.float32) -> MixtureOfGaussians:
    """A mixture prior with equal weights and random means of scale `spread`."""
    means = spread * jax.random.normal(key, (num_components, dim), dtype)
    return MixtureOfGaussians(
        logits=jnp.zeros((num_components,), dtype),
        means=means,
        log_vars=jnp.full((num_components, dim), log_var, dtype))
