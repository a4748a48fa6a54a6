"""Distributions as small pytrees with one interface: every q(z|x) and every p(z) of vaekl.

The interface is distrax's (names and calling convention), so that a distrax distribution
can stand in for a vaekl one. The whole contract (`Distribution`) is

  sample_and_log_prob(*, seed, sample_shape=()) -> (z [*sample_shape, ..., dim],
                                                    log_prob [*sample_shape, ...])
      draws and log q at them, written in the base noise eps (z = f(eps; params)), so that
      the derivative of log_prob in the parameters is the total one (path + score);
  log_prob(z [..., dim]) -> [...]
      the density at any z, differentiable in z and in the parameters;

and, optional (read with `getattr` defaults):

  entropy() -> [...]   only where it has a closed form (no attribute: none);
  reparameterized      whether z's derivative in the parameters is the draw's (default True);
  diagonal()           a `DiagNormal` summary (what a VampPrior component and the active-unit
                       count read).

Families here: `DiagNormal` (prior and posterior alike), `FullNormal` (full covariance from a
Cholesky factor) and `MixtureOfGaussians` (the learned mixture prior; the VampPrior is one).
The IAF is in `vaekl.posteriors`. Closed-form KLs are registered in `vaekl.kl`.

Noise is drawn as `jax.random.normal(seed, sample_shape + batch_shape + (dim,), dtype)`:
the same key gives the same eps for every family and for distrax's Gaussians.
"""

import math
from typing import NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vaekl import validate

LOG_2PI = math.log(2.0 * math.pi)
sg = jax.lax.stop_gradient


class Distribution(Protocol):
    """What vaekl's bounds, KL terms and evaluation call on a q or a p (see the module)."""

    def sample_and_log_prob(self, *, seed: jax.Array,
                            sample_shape: Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
        ...

    def log_prob(self, value: jax.Array) -> jax.Array:
        ...


def path_log_prob(q: Distribution, z: jax.Array, log_q: jax.Array) -> jax.Array:
    """log q(z) whose gradient is the path derivative only (STL, DReG), for any family.

    `z, log_q` come from `q.sample_and_log_prob`: log_q's gradient is the total one, and
    subtracting q.log_prob at stop_gradient(z) (its value added back) removes the score
    term dlog q / dparams at fixed z. Unlike `stop_gradient(q).log_prob(z)` this stops the
    parameters of any distribution object (distrax's scale bijector included). For a flow,
    `log_prob` inverts it: that inverse is what STL and DReG cost there.
    """
    fixed = q.log_prob(sg(z))
    return log_q - fixed + sg(fixed)


def gaussian_log_prob(x: jax.Array, mean: jax.typing.ArrayLike,
                      log_scale: jax.typing.ArrayLike) -> jax.Array:
    """Sum over the last axis of log N(x; mean, exp(log_scale)^2): x [..., dim] -> [...].

    `mean` and `log_scale` broadcast against x. The residual is scaled before it
    is squared, so a small residual at a small scale neither underflows nor
    overflows on the way. The one Gaussian log-density of vaekl: priors,
    posteriors, decoders and the experiments' linear-Gaussian models all use it.
    """
    log_scale = jnp.asarray(log_scale, jnp.result_type(x, mean))
    sq = jnp.square((x - mean) * jnp.exp(-log_scale))
    return -jnp.sum(0.5 * sq + log_scale + 0.5 * LOG_2PI, axis=-1)


def _standard_log_prob(eps: jax.Array) -> jax.Array:
    return gaussian_log_prob(eps, 0.0, 0.0)


class DiagNormal(NamedTuple):
    """N(mean, diag e^log_var); fields broadcast against z of shape [..., dim].

    As a prior the fields may be scalars (`STANDARD_NORMAL`); drawing needs an event axis.
    """

    mean: jax.typing.ArrayLike = 0.0
    log_var: jax.typing.ArrayLike = 0.0

    def _shape(self) -> tuple[int, ...]:
        name = "vaekl.distributions.DiagNormal"
        args = validate.floating(name, mean=self.mean, log_var=self.log_var)
        shape = validate.event_shape(name, args)
        if not shape:
            raise ValueError(f"{name}: `mean` or `log_var` must have a last (event) axis,"
                             " shape [..., dim], to draw from it; got scalars.")
        return shape

    def sample_and_log_prob(self, *, seed: jax.Array,
                            sample_shape: Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
        """z = mean + e^(log_var/2) eps [*sample_shape, ..., dim], log q(z) [*sample_shape, ...]."""
        shape, dtype = self._shape(), jnp.result_type(self.mean, self.log_var)
        log_var = jnp.broadcast_to(jnp.asarray(self.log_var, dtype), shape)
        eps = jax.random.normal(seed, tuple(sample_shape) + shape, dtype)
        z = self.mean + jnp.exp(0.5 * log_var) * eps
        return z, _standard_log_prob(eps) - 0.5 * jnp.sum(log_var, axis=-1)

    def log_prob(self, z: jax.Array) -> jax.Array:
        """Log-density of z with shape [..., dim]; returns shape [...]."""
        return gaussian_log_prob(z, self.mean, 0.5 * jnp.asarray(self.log_var))

    def entropy(self) -> jax.Array:
        log_var = jnp.broadcast_to(jnp.asarray(self.log_var, jnp.result_type(*self)),
                                   self._shape())
        return 0.5 * jnp.sum(log_var + 1.0 + LOG_2PI, axis=-1)

    def diagonal(self) -> "DiagNormal":
        return self


STANDARD_NORMAL = DiagNormal(0.0, 0.0)


def diag_matrix(v: jax.Array) -> jax.Array:
    """[..., dim] -> [..., dim, dim] with v on the diagonal."""
    return v[..., None] * jnp.eye(v.shape[-1], dtype=v.dtype)


class FullNormal(NamedTuple):
    """N(mean, L L^T): mean [..., dim], scale_tril L [..., dim, dim] lower triangular.

    Only the lower triangle of L is read, and its diagonal must be non-zero. The batch
    shapes broadcast (one L shared by every mean is [dim, dim]).
    """

    mean: jax.Array
    scale_tril: jax.Array

    @classmethod
    def from_encoder(cls, mean: jax.Array, log_var: jax.Array,
                     off_diagonal: jax.Array) -> "FullNormal":
        """L = diag(e^(log_var/2)) + the strictly lower entries [..., dim (dim - 1) / 2],
        row by row (NumPy's `tril_indices(dim, -1)` order)."""
        dim = mean.shape[-1]
        rows, cols = np.tril_indices(dim, -1)
        lower = jnp.zeros(off_diagonal.shape[:-1] + (dim, dim), off_diagonal.dtype)
        lower = lower.at[..., rows, cols].set(off_diagonal)
        return cls(mean, lower + diag_matrix(jnp.exp(0.5 * log_var)))

    def _tril(self):
        return jnp.tril(self.scale_tril)

    def _log_det(self):
        """log |det L|, [...] (L's batch shape)."""
        return jnp.sum(jnp.log(jnp.abs(jnp.diagonal(self.scale_tril, axis1=-2, axis2=-1))),
                       axis=-1)

    def _shape(self) -> tuple[int, ...]:
        return jnp.broadcast_shapes(jnp.shape(self.mean), jnp.shape(self.scale_tril)[:-1])

    def sample_and_log_prob(self, *, seed: jax.Array,
                            sample_shape: Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
        eps = jax.random.normal(seed, tuple(sample_shape) + self._shape(), self.mean.dtype)
        z = self.mean + jnp.matmul(self._tril(), eps[..., None])[..., 0]
        return z, _standard_log_prob(eps) - self._log_det()

    def log_prob(self, z: jax.Array) -> jax.Array:
        diff = z - self.mean
        tril = jnp.broadcast_to(self._tril(), diff.shape + diff.shape[-1:])
        eps = jax.scipy.linalg.solve_triangular(tril, diff[..., None], lower=True)[..., 0]
        return _standard_log_prob(eps) - self._log_det()

    def entropy(self) -> jax.Array:
        dim = self.mean.shape[-1]
        log_det = jnp.broadcast_to(self._log_det(), self._shape()[:-1])
        return 0.5 * dim * (1.0 + LOG_2PI) + log_det

    def covariance(self) -> jax.Array:
        """L L^T, [..., dim, dim]."""
        tril = self._tril()
        return tril @ jnp.swapaxes(tril, -1, -2)

    def diagonal(self) -> DiagNormal:
        """The marginals: N(mean, diag(L L^T))."""
        log_var = jnp.log(jnp.sum(jnp.square(self._tril()), axis=-1))
        return DiagNormal(self.mean, jnp.broadcast_to(log_var, self._shape()))


class MixtureOfGaussians(NamedTuple):
    """Σ_k softmax(logits)_k N(means_k, diag(exp(log_vars_k))): no closed-form KL.

    Fields: logits [num_components], means and log_vars [num_components, dim]. A draw picks
    its component by a categorical draw, which has no path derivative (`reparameterized`).
    """

    logits: jax.Array
    means: jax.Array
    log_vars: jax.Array
    reparameterized = False

    def log_prob(self, z: jax.Array) -> jax.Array:
        """Log-density of z with shape [..., dim]; returns shape [...]."""
        components = DiagNormal(self.means, self.log_vars).log_prob(z[..., None, :])
        return jax.nn.logsumexp(components + jax.nn.log_softmax(self.logits), axis=-1)

    def sample_and_log_prob(self, *, seed: jax.Array,
                            sample_shape: Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
        """Draws [*sample_shape, dim] and their log-density [*sample_shape]."""
        sample_shape = tuple(sample_shape)
        k_comp, k_noise = jax.random.split(seed)
        comp = jax.random.categorical(k_comp, self.logits, shape=sample_shape)
        eps = jax.random.normal(k_noise, sample_shape + self.means.shape[-1:], self.means.dtype)
        z = self.means[comp] + jnp.exp(0.5 * self.log_vars[comp]) * eps
        return z, self.log_prob(z)


def mixture(key: jax.Array, num_components: int, dim: int, *, spread: float = 2.0,
            log_var: float = -1.0, dtype=jnp.float32) -> MixtureOfGaussians:
    """A mixture prior with equal weights and random means of scale `spread`."""
    means = spread * jax.random.normal(key, (num_components, dim), dtype)
    return MixtureOfGaussians(
        logits=jnp.zeros((num_components,), dtype),
        means=means,
        log_vars=jnp.full((num_components, dim), log_var, dtype))
