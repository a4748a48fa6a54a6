"""Posterior families q(z|x) as small pytrees: diagonal and full-covariance Gaussians, IAF.

Each family is a `NamedTuple` of arrays, so it passes through `jit`, `vmap`,
`grad` and `stop_gradient` like the priors of `vaekl.priors`, and offers

  sample(key, num_samples) -> (z [S, ..., dim], log_q [S, ...])
      reparameterised draws and log q(z|x) at them, written in the base noise
      eps, so that its derivative in the parameters is the total (path + score) one;
  log_prob(z [S, ..., dim]) -> [S, ...]
      the density at any z (the flow is inverted for it);
  diagonal() -> DiagGaussian
      a diagonal Gaussian summary of q (what a VampPrior component and the
      active-unit count read);
  entropy() -> [...]
      only where it has a closed form (`ENTROPY_FAMILIES`).

Families (`FAMILIES`, the names of `config.posterior`):
  "diag"  N(mean, diag e^log_var), the encoder of every other vaekl model.
  "full"  N(mean, L L^T) with L lower triangular: the encoder outputs the mean,
          log L_ii^2 (the diagonal's log-variances, as "diag" does) and the
          strictly lower entries of L.
  "iaf"   an inverse autoregressive flow (Kingma et al. 2016): a diagonal
          Gaussian base z_0 = mean + e^(log_var/2) eps, then T steps
            [m, s] = MADE_t(z_{t-1}, h),  sigma = sigmoid(s),
            z_t = sigma * z_{t-1} + (1 - sigma) * m,
          with log q(z_T|x) = log N(eps; 0, I) - sum log sigma_0 - sum_t sum log sigma_t,
          exact per sample. Each MADE (Germain et al. 2015) has masked dense
          ELU layers; the encoder's context h enters its first hidden layer
          unmasked, as in the paper (a context of width 0 gives an unconditioned
          flow), and the ordering of the latents is reversed from step to step.
"""

from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from vaekl import kl as kl_lib
from vaekl.priors import LOG_2PI, STANDARD_NORMAL, DiagNormal, MixtureOfGaussians

FAMILIES = ("diag", "full", "iaf")
ENTROPY_FAMILIES = ("diag", "full")
# The initial bias of each IAF step's s: sigma = sigmoid(2) = 0.88, so that every
# step starts close to the identity (Kingma et al. 2016 advise s "close to +1 or +2").
IAF_SCALE_BIAS = 2.0


class DiagGaussian(NamedTuple):
    """N(mean, diag e^log_var); mean and log_var with shape [..., dim]."""

    mean: jax.Array
    log_var: jax.Array
    family = "diag"

    def sample(self, key: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
        z, eps = kl_lib.reparameterize(key, self.mean, self.log_var, num_samples)
        return z, STANDARD_NORMAL.log_prob(eps) - 0.5 * jnp.sum(self.log_var, axis=-1)

    def log_prob(self, z: jax.Array) -> jax.Array:
        return DiagNormal(self.mean, self.log_var).log_prob(z)

    def entropy(self) -> jax.Array:
        return 0.5 * jnp.sum(self.log_var + 1.0 + LOG_2PI, axis=-1)

    def diagonal(self) -> "DiagGaussian":
        return self


class FullGaussian(NamedTuple):
    """N(mean, L L^T): mean [..., dim], scale_tril L [..., dim, dim] lower triangular.

    Only the lower triangle of L is read, and its diagonal must be non-zero.
    """

    mean: jax.Array
    scale_tril: jax.Array
    family = "full"

    @classmethod
    def from_encoder(cls, mean: jax.Array, log_var: jax.Array,
                     off_diagonal: jax.Array) -> "FullGaussian":
        """L = diag(e^(log_var/2)) + the strictly lower entries [..., dim (dim - 1) / 2],
        row by row (NumPy's `tril_indices(dim, -1)` order)."""
        dim = mean.shape[-1]
        rows, cols = np.tril_indices(dim, -1)
        lower = jnp.zeros(off_diagonal.shape[:-1] + (dim, dim), off_diagonal.dtype)
        lower = lower.at[..., rows, cols].set(off_diagonal)
        return cls(mean, lower + _diag_matrix(jnp.exp(0.5 * log_var)))

    def _tril(self):
        return jnp.tril(self.scale_tril)

    def _log_det(self):
        return jnp.sum(jnp.log(jnp.abs(jnp.diagonal(self.scale_tril, axis1=-2, axis2=-1))),
                       axis=-1)

    def sample(self, key: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
        eps = jax.random.normal(key, (num_samples,) + self.mean.shape, self.mean.dtype)
        z = self.mean + jnp.matmul(self._tril(), eps[..., None])[..., 0]
        return z, STANDARD_NORMAL.log_prob(eps) - self._log_det()

    def log_prob(self, z: jax.Array) -> jax.Array:
        diff = z - self.mean
        tril = jnp.broadcast_to(self._tril(), diff.shape + diff.shape[-1:])
        eps = jax.scipy.linalg.solve_triangular(tril, diff[..., None], lower=True)[..., 0]
        return STANDARD_NORMAL.log_prob(eps) - self._log_det()

    def entropy(self) -> jax.Array:
        dim = self.mean.shape[-1]
        return 0.5 * dim * (1.0 + LOG_2PI) + self._log_det()

    def diagonal(self) -> DiagGaussian:
        """The marginals: N(mean, diag(L L^T))."""
        return DiagGaussian(self.mean, jnp.log(jnp.sum(jnp.square(self._tril()), axis=-1)))


class IAF(NamedTuple):
    """An inverse autoregressive flow on N(mean, diag e^log_var) (see the module docstring).

    Fields: mean, log_var [..., dim]; context h [..., C] (C = 0: unconditioned);
    steps, the MADE parameters of each step from `init_iaf`.
    """

    mean: jax.Array
    log_var: jax.Array
    context: jax.Array
    steps: tuple
    family = "iaf"

    def _shift_scale(self, t: int, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        return made(self.steps[t], z, self.context, reverse=t % 2 == 1)

    def sample(self, key: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
        eps = jax.random.normal(key, (num_samples,) + self.mean.shape, self.mean.dtype)
        z, log_det = self.forward(eps)
        return z, STANDARD_NORMAL.log_prob(eps) - log_det

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
        """log q(z) by inverting the flow: each step's inverse is `dim` fixed-point passes.

        For an autoregressive step y = m(x) + sigma(x) (x - m(x)), the map
        x -> m(x) + (y - m(x)) / sigma(x) fixes one more coordinate (in the step's
        order) per pass, so `dim` passes give the inverse exactly, as a function of
        y and of the parameters: its derivatives are the inverse's too. That costs
        `dim` MADE passes per step (what STL pays for a flow).
        """
        dim = z.shape[-1]
        log_det = 0.5 * jnp.sum(self.log_var, axis=-1)
        for t in reversed(range(len(self.steps))):
            def invert_once(_, x, t=t, y=z):
                m, s = self._shift_scale(t, x)
                return m + (y - m) / jax.nn.sigmoid(s)

            x = jax.lax.fori_loop(0, dim, invert_once, z)
            _, s = self._shift_scale(t, x)
            log_det = log_det + jnp.sum(jax.nn.log_sigmoid(s), axis=-1)
            z = x
        eps = (z - self.mean) * jnp.exp(-0.5 * self.log_var)
        return STANDARD_NORMAL.log_prob(eps) - log_det

    def diagonal(self) -> DiagGaussian:
        """The base N(mean, diag e^log_var) (the flow's marginals are not Gaussian)."""
        return DiagGaussian(self.mean, self.log_var)


Posterior = Union[DiagGaussian, FullGaussian, IAF]
POSTERIORS = (DiagGaussian, FullGaussian, IAF)


def _diag_matrix(v: jax.Array) -> jax.Array:
    """[..., dim] -> [..., dim, dim] with v on the diagonal."""
    return v[..., None] * jnp.eye(v.shape[-1], dtype=v.dtype)


# --- MADE: the autoregressive network of each IAF step. ---

def made_masks(dim: int, hidden: Sequence[int], *, reverse: bool) -> list[np.ndarray]:
    """MADE's connectivity masks [in, out] of each layer, hidden layers then the output.

    The latents get degrees 1..dim (dim..1 when `reverse`); hidden unit k of a
    layer gets degree 1 + k mod (dim - 1) (0 when dim = 1). A hidden unit sees
    inputs of degree <= its own, an output of degree d hidden units of degree < d,
    so output d depends on the latents of degree < d only.
    """
    order = np.arange(1, dim + 1)
    degrees_in = order[::-1] if reverse else order
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


# --- KLs against the priors. ---

def kl_terms(family: str, gaussian_prior: bool) -> tuple[str, ...]:
    """The KL terms of `vaekl.elbo` that apply to a (posterior family, prior) pair.

    "analytic" needs a Gaussian q and a Gaussian prior, "entropy" a closed-form
    entropy of q; "k1", "k3" and "stl" apply everywhere.
    """
    closed_entropy = family in ENTROPY_FAMILIES
    return ((("analytic",) if closed_entropy and gaussian_prior else ())
            + ("k1", "k3", "stl") + (("entropy",) if closed_entropy else ()))


def pair_name(family: str, prior) -> str:
    """'KL(iaf posterior || MixtureOfGaussians prior)', for messages."""
    prior_name = prior if isinstance(prior, str) else type(prior).__name__
    return f"KL({family} posterior || {prior_name} prior)"


def check_kl_term(what: str, kl: str, family: str, prior, gaussian_prior: bool,
                  pair: str = "") -> None:
    """Raises ValueError if the KL term `kl` does not apply to (`family`, `prior`).

    The message starts with `what` (the argument or config field and its value), names
    the pair (`pair`, or `pair_name`'s) and lists the terms of `kl_terms` that work.
    """
    terms = kl_terms(family, gaussian_prior)
    if kl not in terms:
        reason = ("has no closed form" if kl == "analytic"
                  else "needs q's entropy in closed form, which is not known")
        raise ValueError(f"{what} {reason} for {pair or pair_name(family, prior)}; the KL"
                         f" terms that work for this pair: {terms}.")


def _component_kls(posterior, prior: MixtureOfGaussians) -> jax.Array:
    """KL(q || component b) for each component, [..., num_components]."""
    if isinstance(posterior, DiagGaussian):
        return kl_lib.analytic(posterior.mean[..., None, :], posterior.log_var[..., None, :],
                               prior.means, prior.log_vars)
    return kl_lib.analytic_full(posterior.mean[..., None, :], posterior.scale_tril[..., None, :, :],
                                prior.means, _diag_matrix(jnp.exp(0.5 * prior.log_vars)))


def analytic_kl(posterior: Posterior, prior) -> jax.Array:
    """KL(q || p) in closed form, [...]: a Gaussian q (diag or full) and a `DiagNormal` prior.

    Raises:
      ValueError: for a pair without a closed form, naming it and the KL terms that work.
    """
    check_kl_term("vaekl.posteriors.analytic_kl: the KL", "analytic", posterior.family, prior,
                  isinstance(prior, DiagNormal))
    if isinstance(posterior, DiagGaussian):
        return kl_lib.analytic(posterior.mean, posterior.log_var, prior=prior)
    dim = posterior.mean.shape[-1]  # A FullGaussian.
    p_scale = jnp.broadcast_to(jnp.exp(0.5 * jnp.asarray(prior.log_var, posterior.mean.dtype)),
                               (dim,))
    return kl_lib.analytic_full(posterior.mean, posterior.scale_tril, prior.mean,
                                _diag_matrix(p_scale))


def variational_kl(posterior: Union[DiagGaussian, FullGaussian],
                   prior: MixtureOfGaussians) -> jax.Array:
    """Hershey & Olsen's (2007) variational approximation of KL(q || mixture), [...].

    For a single Gaussian q against sum_b w_b g_b it is -log sum_b w_b e^-KL(q || g_b):
    closed form, but an approximation (neither a bound nor unbiased), reported
    beside the sampled estimates, not used for training.
    """
    if not isinstance(posterior, (DiagGaussian, FullGaussian)) or not isinstance(
            prior, MixtureOfGaussians):
        raise TypeError("vaekl.posteriors.variational_kl: expects a DiagGaussian or FullGaussian"
                        f" posterior and a MixtureOfGaussians prior, got"
                        f" {type(posterior).__name__} and {type(prior).__name__}.")
    log_w = jax.nn.log_softmax(prior.logits)
    return -jax.nn.logsumexp(log_w - _component_kls(posterior, prior), axis=-1)


def vamp_prior(pseudo_posterior: Posterior) -> MixtureOfGaussians:
    """The VampPrior (Tomczak & Welling 2018) from q at K pseudo-inputs (batch shape [K]).

    The uniform mixture (1/K) sum_k of the encoder's diagonal Gaussians at the
    pseudo-inputs: for the "diag" family exactly the paper's prior; for "full" the
    components keep q's marginal variances and drop its correlations, for "iaf"
    they are the flow's Gaussian base.
    """
    base = pseudo_posterior.diagonal()
    return MixtureOfGaussians(jnp.zeros(base.mean.shape[:1], base.mean.dtype), base.mean,
                              base.log_var)


def encoder_outputs(family: str, latents: int, context: int = 0) -> int:
    """Width of the encoder's last layer for `family` (see `from_encoder`)."""
    extra = {"diag": 0, "full": latents * (latents - 1) // 2, "iaf": context}[family]
    return 2 * latents + extra


def from_encoder(family: str, out: jax.Array, latents: int, steps: tuple = ()) -> Posterior:
    """The posterior from the encoder's last layer `out` [..., encoder_outputs(...)].

    The first 2 * latents features are the mean and log-variances (of the base for
    "iaf"), the rest the strictly lower entries of L ("full") or the context ("iaf").
    """
    mean, log_var, rest = out[..., :latents], out[..., latents:2 * latents], out[..., 2 * latents:]
    if family == "full":
        return FullGaussian.from_encoder(mean, log_var, rest)
    if family == "iaf":
        return IAF(mean, log_var, rest, steps)
    return DiagGaussian(mean, log_var)

