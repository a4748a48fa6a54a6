"""Posterior families q(z|x) from the encoder's output: diagonal and full-covariance
Gaussians (`vaekl.distributions`) and the IAF, defined here with its MADE.

Every family has the `vaekl.distributions` interface (`sample_and_log_prob`, `log_prob`,
`diagonal`, and `entropy` where closed form), so the bounds, KL terms and evaluation take
any of them. Families (`FAMILIES`, the names of `config.model.posterior`, and their classes):
  "diag"  `DiagNormal` N(mean, diag e^log_var), the encoder of every other vaekl model.
  "full"  `FullNormal` N(mean, L L^T) with L lower triangular: the encoder outputs the mean,
          log L_ii^2 (the diagonal's log-variances, as "diag" does) and the
          strictly lower entries of L.
  "iaf"   `IAF`, an inverse autoregressive flow (Kingma et al. 2016): a diagonal
          Gaussian base z_0 = mean + e^(log_var/2) eps, then T steps
            [m, s] = MADE_t(z_{t-1}, h),  sigma = sigmoid(s),
            z_t = sigma * z_{t-1} + (1 - sigma) * m,
          with log q(z_T|x) = log N(eps; 0, I) - sum log sigma_0 - sum_t sum log sigma_t,
          exact per sample. Each MADE (Germain et al. 2015) has masked dense
          ELU layers; the encoder's context h enters its first hidden layer
          unmasked, as in the paper (a context of width 0 gives an unconditioned
          flow), and the ordering of the latents is reversed from step to step.
          No closed-form entropy.
  "categorical"  `vaekl.categorical.Categorical`: `latents` = N variables of K classes, the
          encoder's outputs the logits [N, K]; its draws have no path gradient, so the
          training step relaxes it (Gumbel) or takes the score-function gradient
          (`vaekl.steps`); evaluation takes it as it is: hard draws, exact KL.
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vaekl.categorical import Categorical
from vaekl.distributions import DiagNormal, FullNormal, MixtureOfGaussians, gaussian_log_prob

# The initial bias of each IAF step's s: sigma = sigmoid(2) = 0.88, so that every
# step starts close to the identity (Kingma et al. 2016 advise s "close to +1 or +2").
IAF_SCALE_BIAS = 2.0


class IAF(NamedTuple):
    """An inverse autoregressive flow on N(mean, diag e^log_var) (see the module docstring).

    Fields: mean, log_var [..., dim]; context h [..., C] (C = 0: unconditioned);
    steps, the MADE parameters of each step from `init_iaf`.
    """

    mean: jax.Array
    log_var: jax.Array
    context: jax.Array
    steps: tuple

    def _shift_scale(self, t: int, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        return made(self.steps[t], z, self.context, reverse=t % 2 == 1)

    def sample_and_log_prob(self, *, seed: jax.Array,
                            sample_shape: Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
        eps = jax.random.normal(seed, tuple(sample_shape) + self.mean.shape, self.mean.dtype)
        z, log_det = self.forward(eps)
        return z, gaussian_log_prob(eps, 0.0, 0.0) - log_det

    def forward(self, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(z_T, log |det dz_T/d eps|) for eps [..., dim]; the log-det is
        sum log sigma_0 + sum_t sum log sigma_t."""
        z = self.mean + jnp.exp(0.5 * self.log_var) * eps
        log_det = 0.5 * jnp.sum(self.log_var, axis=-1)
        for t in range(len(self.steps)):
            m, s = self._shift_scale(t, z)
            z = m + jax.nn.sigmoid(s) * (z - m)
            log_det = log_det + jnp.sum(jax.nn.log_sigmoid(s), axis=-1)
        return z, log_det

    def log_prob(self, z: jax.Array) -> jax.Array:
        """log q(z) by inverting the flow: each step's inverse is `dim` passes.

        For an autoregressive step y = m(x) + sigma(x) (x - m(x)), output d of the MADE
        depends on the coordinates of degree < d only, so pass p sets the coordinates of
        degree p to m + (y - m) / sigma from the coordinates already inverted, and after
        `dim` passes x is the inverse exactly, as a function of y and of the parameters:
        its derivatives are the inverse's too. The coordinates not yet reached keep their
        (finite) value from y: updating every coordinate at every pass would move them far
        away, where 1/sigma overflows and the masked layers turn inf * 0 into NaN. That costs
        `dim` MADE passes per step (what STL and DReG pay for a flow).
        """
        dim = z.shape[-1]
        log_det = 0.5 * jnp.sum(self.log_var, axis=-1)
        for t in reversed(range(len(self.steps))):
            degrees = jnp.asarray(_degrees(dim, reverse=t % 2 == 1))

            def invert_once(p, x, t=t, y=z, degrees=degrees):
                now = degrees == p + 1
                m, s = self._shift_scale(t, x)
                return jnp.where(now, m + (y - m) / jax.nn.sigmoid(jnp.where(now, s, 0.0)), x)

            x = jax.lax.fori_loop(0, dim, invert_once, z)
            _, s = self._shift_scale(t, x)
            log_det = log_det + jnp.sum(jax.nn.log_sigmoid(s), axis=-1)
            z = x
        eps = (z - self.mean) * jnp.exp(-0.5 * self.log_var)
        return gaussian_log_prob(eps, 0.0, 0.0) - log_det

    def diagonal(self) -> DiagNormal:
        """The base N(mean, diag e^log_var) (the flow's marginals are not Gaussian)."""
        return DiagNormal(self.mean, self.log_var)


FAMILIES = {"diag": DiagNormal, "full": FullNormal, "iaf": IAF,  # config.model.posterior's names.
            "categorical": Categorical}


# --- MADE: the autoregressive network of each IAF step. ---

def _degrees(dim: int, *, reverse: bool) -> np.ndarray:
    """The latents' MADE degrees, 1..dim (dim..1 when `reverse`)."""
    order = np.arange(1, dim + 1)
    return order[::-1] if reverse else order


def made_masks(dim: int, hidden: Sequence[int], *, reverse: bool) -> list[np.ndarray]:
    """MADE's connectivity masks [in, out] of each layer, hidden layers then the output.

    The latents get degrees 1..dim (dim..1 when `reverse`); hidden unit k of a
    layer gets degree 1 + k mod (dim - 1) (0 when dim = 1). A hidden unit sees
    inputs of degree <= its own, an output of degree d hidden units of degree < d,
    so output d depends on the latents of degree < d only.
    """
    degrees_in = _degrees(dim, reverse=reverse)
    degrees = [degrees_in] + [(1 + np.arange(w) % (dim - 1)) if dim > 1 else np.zeros(w, int)
                              for w in hidden]
    masks = [(degrees[i][:, None] <= degrees[i + 1][None, :]) for i in range(len(hidden))]
    masks.append(degrees[-1][:, None] < degrees_in[None, :])
    return [m.astype(np.float32) for m in masks]


def init_iaf(key: jax.Array, dim: int, hidden: Sequence[int], num_steps: int,
             context: int, dtype=jnp.float32) -> tuple:
    """The MADE parameters of `num_steps` IAF steps, a tuple of dicts (a Flax param init).

    Kernels LeCun-normal (on the full matrix, before masking), biases zero, the
    output s's bias `IAF_SCALE_BIAS`.
    """
    hidden = tuple(hidden)
    if not hidden or any(w < 1 for w in hidden):
        raise ValueError(f"vaekl.posteriors.init_iaf: `hidden` must be one or more widths >= 1,"
                         f" got {hidden!r}.")
    lecun = jax.nn.initializers.lecun_normal()
    widths = (dim,) + hidden
    steps = []
    for key_t in jax.random.split(key, num_steps):
        keys = iter(jax.random.split(key_t, len(hidden) + 3))
        step = {f"hidden_{i}": {"kernel": lecun(next(keys), (widths[i], widths[i + 1]), dtype),
                                "bias": jnp.zeros((widths[i + 1],), dtype)}
                for i in range(len(hidden))}
        if context:
            step["context"] = lecun(next(keys), (context, hidden[0]), dtype)
        step["shift"] = {"kernel": lecun(next(keys), (hidden[-1], dim), dtype),
                         "bias": jnp.zeros((dim,), dtype)}
        step["scale"] = {"kernel": lecun(next(keys), (hidden[-1], dim), dtype),
                         "bias": jnp.full((dim,), IAF_SCALE_BIAS, dtype)}
        steps.append(step)
    return tuple(steps)


def made(params: dict, z: jax.Array, context: jax.Array, *,
         reverse: bool) -> tuple[jax.Array, jax.Array]:
    """(m, s), each [..., dim], of one IAF step for z [..., dim] and context [..., C]
    (read only if the step has context weights)."""
    num_hidden = sum(1 for k in params if k.startswith("hidden_"))
    hidden = [params[f"hidden_{i}"]["bias"].shape[0] for i in range(num_hidden)]
    masks = made_masks(z.shape[-1], hidden, reverse=reverse)
    h = z
    for i in range(num_hidden):
        layer = params[f"hidden_{i}"]
        h = h @ (layer["kernel"] * masks[i]) + layer["bias"]
        if i == 0 and "context" in params:
            h = h + context @ params["context"]
        h = jax.nn.elu(h)
    out = [h @ (params[k]["kernel"] * masks[-1]) + params[k]["bias"] for k in ("shift", "scale")]
    return out[0], out[1]


def vamp_prior(pseudo_posterior) -> MixtureOfGaussians:
    """The VampPrior (Tomczak & Welling 2018) from q at K pseudo-inputs (batch shape [K]).

    The uniform mixture (1/K) sum_k of the encoder's diagonal Gaussians at the
    pseudo-inputs: for the "diag" family exactly the paper's prior; for "full" the
    components keep q's marginal variances and drop its correlations, for "iaf"
    they are the flow's Gaussian base.
    """
    base = pseudo_posterior.diagonal()
    return MixtureOfGaussians(jnp.zeros(base.mean.shape[:1], base.mean.dtype), base.mean,
                              base.log_var)


def encoder_outputs(family: str, latents: int, context: int = 0, categories: int = 0) -> int:
    """Width of the encoder's last layer for `family` (see `from_encoder`)."""
    if family == "categorical":
        return latents * categories
    extra = {"diag": 0, "full": latents * (latents - 1) // 2, "iaf": context}[family]
    return 2 * latents + extra


def from_encoder(family: str, out: jax.Array, latents: int, steps: tuple = ()):
    """The posterior from the encoder's last layer `out` [..., encoder_outputs(...)].

    The first 2 * latents features are the mean and log-variances (of the base for
    "iaf"), the rest the strictly lower entries of L ("full") or the context ("iaf");
    for "categorical" all of it are the logits, [..., latents, K].
    """
    if family == "categorical":
        return Categorical(out.reshape(out.shape[:-1] + (latents, -1)))
    mean, log_var, rest = out[..., :latents], out[..., latents:2 * latents], out[..., 2 * latents:]
    if family == "full":
        return FullNormal.from_encoder(mean, log_var, rest)
    if family == "iaf":
        return IAF(mean, log_var, rest, steps)
    return DiagNormal(mean, log_var)

