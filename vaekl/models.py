"""Flax encoders, decoders and priors; likelihoods beside them, no losses inside.

Networks are configured, not coded: `hidden=(500,)` with ReLU is the Flax
example's 784-500-20 net, `hidden=(200, 200)` with tanh the IWAE net, and
`hidden=()` a linear encoder/decoder. `kind="conv"` gives a small conv net for
image data. The encoder's posterior family (`posterior`: "diag", "full" or
"iaf") and the VampPrior are those of `vaekl.posteriors`; the priors are
`vaekl.distributions`' (`PRIORS` maps `config.model.prior`'s names to their classes).
"""

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vaekl import posteriors, validate
from vaekl.categorical import Categorical
from vaekl.distributions import (STANDARD_NORMAL, DiagNormal, MixtureOfGaussians,
                                 gaussian_log_prob)

ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh, "elu": nn.elu, "gelu": nn.gelu,
               "softplus": nn.softplus, "silu": nn.silu}
PRIORS = {"standard": DiagNormal, "learned": DiagNormal, "mixture": MixtureOfGaussians,
          "vamp": MixtureOfGaussians, "uniform": Categorical}
LIKELIHOODS = ("bernoulli", "gaussian")
KINDS = ("mlp", "conv")
INITS = ("lecun", "torch")


def _dense_init(init: str):
    """Kernel and bias initialisers: Flax's LeCun normal, or PyTorch's nn.Linear default."""
    if init == "torch":
        # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both kernel and bias.
        kernel = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

        def bias(key, shape, dtype=jnp.float32, fan_in=1):
            bound = 1 / math.sqrt(fan_in)
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        return kernel, bias
    return nn.initializers.lecun_normal(), nn.initializers.zeros_init()


class Dense(nn.Module):
    """A dense layer whose initialiser is named (see `INITS`)."""

    features: int
    init: str = "lecun"

    @nn.compact
    def __call__(self, x):
        kernel_init, bias_init = _dense_init(self.init)
        kernel = self.param("kernel", kernel_init, (x.shape[-1], self.features))
        if self.init == "torch":
            bias = self.param("bias", lambda k, s: bias_init(k, s, fan_in=x.shape[-1]),
                              (self.features,))
        else:
            bias = self.param("bias", bias_init, (self.features,))
        return x @ kernel + bias


class MLP(nn.Module):
    """Hidden dense layers with an activation, then a linear output of `out` features."""

    hidden: Sequence[int]
    out: int
    activation: str = "relu"
    init: str = "lecun"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        for i, width in enumerate(self.hidden):
            x = act(Dense(width, self.init, name=f"hidden_{i}")(x))
        return Dense(self.out, self.init, name="out")(x)


class ConvTorso(nn.Module):
    """Two stride-2 3x3 convolutions over an image [..., H, W, C], flattened."""

    image_shape: Sequence[int]
    features: Sequence[int] = (32, 64)
    activation: str = "relu"

    @nn.compact
    def __call__(self, x):
        lead = x.shape[:-1]
        x = x.reshape((-1, *self.image_shape))
        for f in self.features:
            x = ACTIVATIONS[self.activation](nn.Conv(f, (3, 3), strides=2)(x))
        return x.reshape(lead + (-1,))


class ConvHead(nn.Module):
    """The transpose of `ConvTorso`: a dense layer, then stride-2 transposed convs."""

    image_shape: Sequence[int]
    channels_out: int
    features: Sequence[int] = (64, 32)
    activation: str = "relu"

    @nn.compact
    def __call__(self, z):
        act = ACTIVATIONS[self.activation]
        h, w, _ = self.image_shape
        scale = 2 ** len(self.features)
        sh, sw = -(-h // scale), -(-w // scale)
        lead = z.shape[:-1]
        x = act(nn.Dense(sh * sw * self.features[0])(z)).reshape((-1, sh, sw, self.features[0]))
        for f in self.features[1:]:
            x = act(nn.ConvTranspose(f, (3, 3), strides=(2, 2))(x))
        x = nn.ConvTranspose(self.channels_out, (3, 3), strides=(2, 2))(x)
        return x[:, :h, :w, :].reshape(lead + (-1,))


class VAE(nn.Module):
    """Encoder q(z|x), decoder p(x|z) and prior p(z).

    Attributes:
      latents: latent dimension.
      data_dim: D, features per example (flattened).
      hidden: hidden widths of the MLP encoder; the decoder mirrors them.
      activation: a name in `ACTIVATIONS`.
      likelihood: "bernoulli" (decoder outputs logits) or "gaussian" (means, and
        a learned per-pixel log-scale unless `fixed_log_scale` is set).
      prior: "standard", "learned" (diagonal Gaussian), "mixture" (`num_components`
        learned diagonal Gaussians) or "vamp" (the VampPrior over
        `num_pseudo_inputs` learned pseudo-inputs, initialised uniform in [0, 1)), or
        "uniform" (the uniform categorical, for posterior="categorical").
      kind: "mlp" or "conv" (then `image_shape` is needed).
      init_scheme: dense initialisation, "lecun" (Flax) or "torch" (nn.Linear).
      posterior: the family of q(z|x), one of `vaekl.posteriors.FAMILIES`.
      iaf_steps, iaf_hidden, iaf_context: for posterior="iaf", the flow's steps, the
        widths of each step's MADE hidden layers and the width of the encoder's
        context h (0: an unconditioned flow).
      categories: for posterior="categorical", K: z is [..., latents, K] (one-hot or
        relaxed), flattened to [..., latents * K] for the decoder; prior="uniform" is the
        uniform categorical.
    """

    latents: int
    data_dim: int
    hidden: Sequence[int] = (500,)
    activation: str = "relu"
    likelihood: str = "bernoulli"
    fixed_log_scale: Optional[float] = None
    prior: str = "standard"
    num_components: int = 10
    kind: str = "mlp"
    image_shape: Sequence[int] = ()
    init_scheme: str = "lecun"
    posterior: str = "diag"
    iaf_steps: int = 2
    iaf_hidden: Sequence[int] = (320,)
    iaf_context: int = 20
    num_pseudo_inputs: int = 500
    categories: int = 0

    def setup(self):
        enc_out = posteriors.encoder_outputs(self.posterior, self.latents, self.iaf_context,
                                             self.categories)
        if self.kind == "conv":
            self.enc_torso = ConvTorso(self.image_shape, activation=self.activation)
            self.enc_head = nn.Dense(enc_out)
            self.dec_net = ConvHead(self.image_shape, self.image_shape[-1],
                                    activation=self.activation)
        else:
            self.enc_net = MLP(self.hidden, enc_out, self.activation, self.init_scheme)
            self.dec_net = MLP(tuple(reversed(self.hidden)), self.data_dim, self.activation,
                               self.init_scheme)
        if self.likelihood == "gaussian" and self.fixed_log_scale is None:
            self.log_scale = self.param("log_scale", nn.initializers.zeros_init(),
                                        (self.data_dim,))
        if self.prior == "learned":
            self.prior_mean = self.param("prior_mean", nn.initializers.zeros_init(),
                                         (self.latents,))
            self.prior_log_var = self.param("prior_log_var", nn.initializers.zeros_init(),
                                            (self.latents,))
        elif self.prior == "mixture":
            self.prior_logits = self.param("prior_logits", nn.initializers.zeros_init(),
                                           (self.num_components,))
            self.prior_means = self.param("prior_means", nn.initializers.normal(1.0),
                                          (self.num_components, self.latents))
            self.prior_log_vars = self.param("prior_log_vars", nn.initializers.zeros_init(),
                                             (self.num_components, self.latents))
        elif self.prior == "vamp":
            self.pseudo_inputs = self.param("pseudo_inputs", nn.initializers.uniform(1.0),
                                            (self.num_pseudo_inputs, self.data_dim))
        if self.posterior == "iaf":
            self.iaf = self.param("iaf", posteriors.init_iaf, self.latents,
                                  tuple(self.iaf_hidden), self.iaf_steps, self.iaf_context)

    def _encoder_out(self, x):
        return self.enc_head(self.enc_torso(x)) if self.kind == "conv" else self.enc_net(x)

    def encode(self, x):
        """x [..., D] -> (mean, log_var), each [..., latents]: the diagonal Gaussian head.

        For posterior="diag" that is q(z|x); for "full" the log-variances are those of
        L's diagonal (log L_ii^2), for "iaf" the flow's base. `encode_posterior` gives q.
        """
        out = self._encoder_out(x)
        return out[..., :self.latents], out[..., self.latents:2 * self.latents]

    def encode_posterior(self, x):
        """x [..., D] -> q(z|x), a `vaekl.posteriors.FAMILIES` class with batch shape [...]."""
        steps = self.iaf if self.posterior == "iaf" else ()
        return posteriors.from_encoder(self.posterior, self._encoder_out(x), self.latents, steps)

    def decode(self, z):
        """z [..., *latent_shape(self)] -> decoder output [..., D] (logits or Gaussian means)."""
        if self.posterior == "categorical":
            z = z.reshape(z.shape[:-2] + (-1,))
        return self.dec_net(z)

    def log_likelihood(self, x, z):
        """log p(x|z), z [S, ..., *latent_shape()] and x [..., D] -> [S, ...]."""
        out = self.decode(z)
        if self.likelihood == "bernoulli":
            return bernoulli_log_prob(out, x)
        return gaussian_log_prob(x, out, self.noise_log_scale())

    def noise_log_scale(self):
        """The Gaussian decoder's log-scale: learned [D], or `fixed_log_scale` (a float)."""
        return self.log_scale if self.fixed_log_scale is None else self.fixed_log_scale

    def get_prior(self):
        """The prior, a `vaekl.distributions` pytree of the class `PRIORS[self.prior]`."""
        if self.prior == "learned":
            return DiagNormal(self.prior_mean, self.prior_log_var)
        if self.prior == "mixture":
            return MixtureOfGaussians(self.prior_logits, self.prior_means, self.prior_log_vars)
        if self.prior == "vamp":
            return posteriors.vamp_prior(self.encode_posterior(self.pseudo_inputs))
        if self.prior == "uniform":
            return Categorical(jnp.zeros(latent_shape(self), jnp.float32))
        return STANDARD_NORMAL

    def __call__(self, x, z):
        """Touches every parameter (for `init`): x [B, D], z [B, *latent_shape()]."""
        return self.encode_posterior(x), self.log_likelihood(x, z[None]), self.get_prior()


def pair_types(posterior: str, prior: str) -> tuple[type, type]:
    """The classes of q and p that `config.model.posterior` and `config.model.prior` name
    (for `vaekl.kl.terms`, which answers which KL terms apply to them)."""
    return posteriors.FAMILIES[posterior], PRIORS[prior]


def check_model_config(config) -> None:
    """Raises one error naming the first bad field of `config.model` (a complete config).

    Called by `vaekl.config.check`, before any data loads: the names, the counts, that
    posterior="categorical" goes with prior="uniform", and the layer widths.

    Raises:
      ValueError (TypeError for a count that is no int): `config.model.<field>: ...`.
    """
    model = config.model
    for field, allowed in (("prior", PRIORS), ("posterior", posteriors.FAMILIES),
                           ("kind", KINDS), ("activation", ACTIVATIONS), ("init", INITS)):
        validate.config_choice(config, f"model.{field}", allowed)
    if model.likelihood:  # "" takes the data set's.
        validate.config_choice(config, "model.likelihood", LIKELIHOODS)
    for field, minimum in (("latents", 1), ("iaf_steps", 1), ("num_pseudo_inputs", 1),
                           ("iaf_context", 0), ("categories", 2)):
        validate.config_int(config, f"model.{field}", minimum=minimum)
    if (model.posterior == "categorical") != (model.prior == "uniform"):
        raise ValueError("config.model.prior: posterior='categorical' and prior='uniform' go"
                         f" together (got posterior={model.posterior!r}, prior={model.prior!r}).")
    for field, allow_empty in (("hidden", True), ("iaf_hidden", False)):
        widths = model[field]
        if any(not isinstance(h, int) or h < 1 for h in widths) or not (widths or allow_empty):
            raise ValueError(f"config.model.{field}: expected a tuple of ints >= 1"
                             f"{'' if allow_empty else ' (at least one)'}, got {widths!r}.")


def latent_shape(model: VAE) -> tuple[int, ...]:
    """One draw's event shape: (latents,), or (latents, categories) for "categorical"."""
    return (model.latents,) + ((model.categories,) if model.posterior == "categorical" else ())


# The VAE's submodules and parameters by part (see `split_params`); the prior's own parameters
# (a learned prior's, a mixture's, the VampPrior's pseudo-inputs) are in neither.
ENCODER_PARAMS = ("enc_net", "enc_torso", "enc_head", "iaf")
DECODER_PARAMS = ("dec_net", "log_scale")


def split_params(variables) -> dict:
    """The encoder's and the decoder's parts of a `VAE`'s variables, or of a tree shaped like
    them (their gradients): {"encoder": {name: subtree}, "decoder": {name: subtree}}.

    The encoder holds the MLP or conv encoder and the IAF flow (`ENCODER_PARAMS`), the
    decoder the decoder net and a Gaussian decoder's learned log-scale (`DECODER_PARAMS`).

    Args:
      variables: {"params": {...}} as `VAE.init` returns it.

    Returns:
      The two parts; each keeps the names of its subtrees, so its leaves come in a fixed order.
    """
    params = variables["params"]
    return {"encoder": {k: params[k] for k in ENCODER_PARAMS if k in params},
            "decoder": {k: params[k] for k in DECODER_PARAMS if k in params}}


def bernoulli_log_prob(logits: jax.Array, x: jax.Array) -> jax.Array:
    """Sum over the last axis of log Bernoulli(x; sigmoid(logits)), x in [0, 1].

    x * logits - softplus(logits) per pixel (`jax.nn.softplus`, stable for any
    logit): its error is a few ulps of |logits| + 1, and its gradient in the
    logits is x - sigmoid(logits).
    """
    return jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)
