"""A linear-Gaussian latent variable model with exact likelihood and posterior.

The model is probabilistic PCA (isotropic noise) or factor analysis (noise per dimension):

    p(z) = N(0, I_k),    p(x | z) = N(W z + b, S),    S = s^2 I_d or diag(s_1^2, ..., s_d^2).

Its marginal is x ~ N(b, W W^T + S) and its posterior is

    p(z | x) = N(M^-1 W^T S^-1 (x - b), M^-1),    M = I_k + W^T S^-1 W,

so a VAE trained on data drawn from it can be compared against the exact
log-likelihood, the exact posterior and hence the exact KL terms. A VAE with a
linear Gaussian decoder and a Gaussian prior is such a model too
(`vaekl.evaluate.decoder_model`), with per-dimension noise.

`make_model` and `sample` use NumPy (data generation, host side); the exact
densities are pure `jax.numpy` functions that accept NumPy or JAX arrays and
can be jitted.
"""

from typing import NamedTuple

import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from vaekl.distributions import FullNormal


class LinearGaussian(NamedTuple):
    """Parameters of p(z) = N(0, I_k), p(x | z) = N(W z + b, diag(s^2)).

    Attributes:
      w: loading matrix W, [d, k].
      b: observation offset b, [d].
      noise_std: observation noise standard deviation s > 0: a float, or [d]
        (one per dimension of x).
    """

    w: np.ndarray
    b: np.ndarray
    noise_std: float | np.ndarray

    @property
    def obs_dim(self) -> int:
        """d, the dimension of x."""
        return self.w.shape[0]

    @property
    def latent_dim(self) -> int:
        """k, the dimension of z."""
        return self.w.shape[1]


def make_model(
    obs_dim: int = 20, latent_dim: int = 5, noise_std: float = 0.5, seed: int = 0
) -> LinearGaussian:
    """Draws the model's parameters from a fixed seed.

    The entries of W and b are independent N(0, 1) draws (float64).

    Args:
      obs_dim: d, the dimension of x (>= 1).
      latent_dim: k, the dimension of z (>= 1).
      noise_std: s, the observation noise standard deviation (> 0).
      seed: seed of the parameter draw (>= 0).

    Returns:
      The model, with w [d, k] and b [d].

    Raises:
      ValueError: if an argument is out of range.
    """
    if obs_dim < 1 or latent_dim < 1:
        raise ValueError(
            f"obs_dim and latent_dim must be >= 1, got obs_dim={obs_dim}, latent_dim={latent_dim}"
        )
    if not noise_std > 0:
        raise ValueError(f"noise_std must be > 0, got {noise_std}")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((obs_dim, latent_dim))
    b = rng.standard_normal(obs_dim)
    return LinearGaussian(w=w, b=b, noise_std=float(noise_std))


def sample(
    model: LinearGaussian, num: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draws (x, z) pairs from the joint p(z) p(x | z).

    Args:
      model: the model.
      num: number of pairs N.
      rng: NumPy random generator.

    Returns:
      x [N, d] and z [N, k], float64.
    """
    z = rng.standard_normal((num, model.latent_dim))
    noise = rng.standard_normal((num, model.obs_dim))
    x = z @ model.w.T + model.b + model.noise_std * noise
    return x, z


def noise_var(model: LinearGaussian) -> jnp.ndarray:
    """The observation noise variances s^2, [d]."""
    s = jnp.asarray(model.noise_std, jnp.asarray(model.w).dtype)
    return jnp.broadcast_to(jnp.square(s), (model.obs_dim,))


def marginal_cov(model: LinearGaussian) -> jnp.ndarray:
    """Covariance of the marginal p(x): W W^T + diag(s^2), [d, d]."""
    w = jnp.asarray(model.w)
    return w @ w.T + jnp.diag(noise_var(model))


def log_marginal(model: LinearGaussian, x: jnp.ndarray) -> jnp.ndarray:
    """Exact log p(x) under x ~ N(b, W W^T + diag(s^2)).

    Args:
      model: the model.
      x: observations, [..., d].

    Returns:
      log p(x), [...].
    """
    chol = jnp.linalg.cholesky(marginal_cov(model))
    centred = jnp.asarray(x) - jnp.asarray(model.b)
    # Whitened residuals L^-1 (x - b), one column per observation.
    white = jax.scipy.linalg.solve_triangular(
        chol, centred.reshape(-1, model.obs_dim).T, lower=True
    )
    mahalanobis = jnp.sum(white**2, axis=0).reshape(centred.shape[:-1])
    log_det = 2.0 * jnp.sum(jnp.log(jnp.diag(chol)))
    return -0.5 * (mahalanobis + log_det + model.obs_dim * jnp.log(2.0 * jnp.pi))


def posterior(model: LinearGaussian, x: jnp.ndarray) -> FullNormal:
    """Exact posterior p(z | x) = N(M^-1 W^T S^-1 (x - b), M^-1), S = diag(s^2).

    Args:
      model: the model.
      x: observations, [..., d].

    Returns:
      The posterior, a `FullNormal`: mean [..., k] and scale_tril [k, k] (the lower
      Cholesky factor of M^-1, the same for every x; `covariance()` gives M^-1).
    """
    w = jnp.asarray(model.w)
    w_over_var = w / noise_var(model)[:, None]  # S^-1 W, [d, k].
    precision = jnp.eye(model.latent_dim, dtype=w.dtype) + w.T @ w_over_var  # M
    precision_chol = jnp.linalg.cholesky(precision)
    cov = jax.scipy.linalg.cho_solve(
        (precision_chol, True), jnp.eye(model.latent_dim, dtype=w.dtype)
    )
    centred = jnp.asarray(x) - jnp.asarray(model.b)
    mean = centred @ w_over_var @ cov  # cov is symmetric: (M^-1 W^T S^-1 r)^T = r^T S^-1 W M^-1.
    return FullNormal(mean=mean, scale_tril=jnp.linalg.cholesky(cov))
