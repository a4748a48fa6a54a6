"""Discrete latents on the distribution interface: categorical and relaxed categorical.

Both hold `logits` [..., N, K]: N independent K-way variables, the event being the last
two axes ([N, K]); `log_prob` and `entropy` sum over the N variables.

  Categorical(logits)
      one-hot draws y [*sample_shape, ..., N, K]; `reparameterized = False` (a draw has
      no path derivative: vaekl's ELBO uses the score-function estimator for it, and the
      path-only terms, `kl="stl"` and `grad_estimator="stl"|"dreg"`, are refused); its
      closed-form KL against another `Categorical` is registered in `vaekl.kl`.
  RelaxedCategorical(logits, temperature, hard=False)
      the Gumbel-softmax / Concrete distribution (Jang et al. 2017; Maddison et al. 2017):
      y = softmax((logits + g) / temperature), g ~ Gumbel(0, 1), a reparameterised point
      of the simplex. Its density is Maddison et al.'s,
        log p(y) = log (K-1)! + (K-1) log t + sum_k (l_k - (t+1) log y_k)
                   - K logsumexp_k (l_k - t log y_k),
      computed, for its own draws, from x = log y drawn in log space (their ExpConcrete
      form), so that a y_k below float range still has a finite density. No closed-form
      KL; two KL terms in the ELBO: "analytic" against a `Categorical` prior is the
      underlying categoricals' KL (registered by convention, see `_relaxed_categorical_kl`),
      "relaxed" the sampled log-ratio of the relaxed densities of q and of the prior
      (`relaxed_log_ratio`). `hard=True` is straight-through Gumbel: the draw is the one-hot argmax of y
      (forward) with y's gradient (backward), and its log_prob is the relaxed y's.
"""

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from vaekl import kl as kl_lib

sg = jax.lax.stop_gradient


def _log_probs(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits, axis=-1)


class Categorical(NamedTuple):
    """N independent K-way categoricals, logits [..., N, K] (see the module docstring)."""

    logits: jax.Array
    reparameterized = False

    def sample_and_log_prob(self, *, seed: jax.Array,
                            sample_shape: Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
        """One-hot draws [*sample_shape, ..., N, K] and log q at them [*sample_shape, ...]."""
        shape = tuple(sample_shape) + self.logits.shape[:-1]
        index = jax.random.categorical(seed, self.logits, shape=shape)
        y = jax.nn.one_hot(index, self.logits.shape[-1], dtype=self.logits.dtype)
        return y, self.log_prob(y)

    def log_prob(self, y: jax.Array) -> jax.Array:
        """log q(y) of one-hot y [..., N, K], summed over the N variables: [...]."""
        terms = jnp.where(y > 0, y * _log_probs(self.logits), 0.0)  # No 0 * -inf.
        return jnp.sum(terms, axis=(-2, -1))

    def entropy(self) -> jax.Array:
        lp = _log_probs(self.logits)
        return -jnp.sum(jnp.where(lp > -jnp.inf, jnp.exp(lp) * lp, 0.0), axis=(-2, -1))

    def probs(self) -> jax.Array:
        return jax.nn.softmax(self.logits, axis=-1)


@kl_lib.register(Categorical, Categorical)
def _categorical_kl(q: Categorical, p: Categorical) -> jax.Array:
    """sum_n sum_k q_nk (log q_nk - log p_nk), [...]; a category q gives no mass adds 0."""
    lq, lp = _log_probs(q.logits), _log_probs(p.logits)
    terms = jnp.where(lq > -jnp.inf, jnp.exp(lq) * (lq - lp), 0.0)
    return jnp.sum(terms, axis=(-2, -1))


class RelaxedCategorical(NamedTuple):
    """Gumbel-softmax / Concrete over N K-way variables (see the module docstring)."""

    logits: jax.Array
    temperature: jax.typing.ArrayLike
    hard: bool = False

    def _log_sample(self, seed, sample_shape) -> jax.Array:
        """x = log y [*sample_shape, ..., N, K] of a draw, in log space (ExpConcrete)."""
        shape = tuple(sample_shape) + self.logits.shape
        gumbel = jax.random.gumbel(seed, shape, self.logits.dtype)
        scores = (self.logits + gumbel) / self.temperature
        return scores - jax.nn.logsumexp(scores, axis=-1, keepdims=True)

    def _log_prob_log_space(self, x: jax.Array) -> jax.Array:
        """log p(y) at y = e^x, summed over the N variables."""
        k = self.logits.shape[-1]
        t = jnp.asarray(self.temperature, x.dtype)
        scores = self.logits - t * x
        per_variable = (math.lgamma(k) + (k - 1) * jnp.log(t)
                        + jnp.sum(scores - x, axis=-1)
                        - k * jax.nn.logsumexp(scores, axis=-1))
        return jnp.sum(per_variable, axis=-1)

    def sample_and_log_prob(self, *, seed: jax.Array,
                            sample_shape: Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
        """Draws y [*sample_shape, ..., N, K] on the simplex (one-hot forward if `hard`)
        and log p(y) of the relaxed y [*sample_shape, ...]."""
        x = self._log_sample(seed, sample_shape)
        y = jnp.exp(x)
        if self.hard:
            one_hot = jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=x.dtype)
            y = one_hot + (y - sg(y))  # Straight-through: exactly the one-hot, y's gradient.
        return y, self._log_prob_log_space(x)

    def log_prob(self, y: jax.Array) -> jax.Array:
        """log p(y) for y [..., N, K] in the simplex's interior, summed over the variables."""
        return self._log_prob_log_space(jnp.log(y))

    def relaxed_log_ratio(self, prior, *, seed: jax.Array,
                          sample_shape: Sequence[int] = ()) -> jax.Array:
        """log q(y) - log p_lambda(y), [*sample_shape, ...]: the ELBO's `kl="relaxed"` draws.

        y are the relaxed draws of `sample_and_log_prob` with the same `seed` (with `hard`,
        the relaxed y behind the one-hot), both densities evaluated from x = log y. The
        prior is relaxed: a `RelaxedCategorical` is used as it is (its own temperature
        lambda), a `Categorical` at q's temperature (lambda = tau, vaekl's default; Maddison
        et al. let the two differ). Only with relaxed densities on both sides is the
        objective a bound (Maddison et al. 2017; Jang et al. 2017 note that a categorical
        prior with relaxed draws gives none).
        """
        x = self._log_sample(seed, sample_shape)
        if not isinstance(prior, RelaxedCategorical):
            prior = RelaxedCategorical(prior.logits, self.temperature)
        return self._log_prob_log_space(x) - prior._log_prob_log_space(x)


RelaxedCategorical.relaxed_priors = (Categorical, RelaxedCategorical)  # kl="relaxed" (vaekl.kl).


@kl_lib.register(RelaxedCategorical, Categorical)
def _relaxed_categorical_kl(q: RelaxedCategorical, p: Categorical) -> jax.Array:
    """KL(Cat(q.logits) || p), [...]: the discrete KL of the model that the relaxation
    stands in for (what most code with relaxed draws uses, Jang et al.'s notebook
    included). It is not a KL of the relaxed q, which has no closed form: a convention,
    named "analytic" in the ELBO so that the same KL term serves both gradients."""
    return _categorical_kl(Categorical(q.logits), p)
