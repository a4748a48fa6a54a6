"""The training config: its defaults, its presets, the completion of a partial one, its checks.

`get_config(preset)` is what `experiments/configs/train.py` returns, so an installed
vaekl has the defaults without the experiments folder. `complete(config)` fills a
partial config (a notebook's `ConfigDict(dict(dataset="digits", num_epochs=2))`) from
them and refuses a field they do not have; `check(config, num_devices=...)` refuses bad
values with one error naming the field. `vaekl.train.train_and_evaluate` calls both.
"""

import difflib
import math

import ml_collections
from ml_collections import config_dict

PRESETS = {
    "quick": "a few seconds on `digits` (tests and smoke sweeps)",
    "flax": "the Flax example: binarized_mnist, 784-500-20 ReLU, batch 128, Adam 1e-3, 10 epochs",
    "iwae": "Burda et al.'s 1-layer net: 784-200-200-50 tanh, batch 20, their Adam and schedule"
            " (the k = 1 VAE)",
    "iwae_k5": "the iwae preset trained with the IWAE k = 5 bound",
    "iwae_k50": "the iwae preset trained with the IWAE k = 50 bound",
    "iwae_quick": "IWAE k = 5 with DReG gradients on `digits`, for seconds (tests)",
    "linear": "a linear encoder/decoder on the `linear_gaussian` data (exact log p(x) known)",
    "categorical": "Jang et al.'s categorical VAE: mnist, 30 x 10 latents, 784-512-256 ReLU,"
                   " batch 100, Adam 1e-3 x 0.9 every 1000 steps, 84 epochs (50,400 steps)",
    "categorical_quick": "the categorical preset for seconds on `digits` (tests)",
}


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "iwae", "jang")
CATEGORICAL_GRADIENTS = ("gumbel", "st_gumbel", "score")
ON_NAN = ("stop", "skip")


class UnknownPresetError(LookupError):
    """An argument after a config file's name that is none of the file's presets.

    A LookupError rather than a ValueError: ml_collections rewraps a ValueError raised
    by `get_config` into one that carries its traceback as text, while this one reaches
    experiments.main as it was raised, to be printed as one line.
    """


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """The default training config, changed by `preset` (one of `PRESETS`, or None)."""
    if preset not in (None, "") and preset not in PRESETS:
        raise UnknownPresetError(f"train config: unknown preset {preset!r}; expected one of"
                                 f" {', '.join(PRESETS)} or none.")
    c = ml_collections.ConfigDict()
    c.experiment = "train"  # What runs: vaekl.train.train_and_evaluate.
    # Data.
    c.dataset = "digits"  # The data set, one of vaekl.data.NAMES.
    c.data_dir = config_dict.placeholder(str)  # tfds data_dir; None: tfds's own (TFDS_DATA_DIR).
    c.data_path = ""  # frey_face: the path of frey_rawface.mat.
    c.data_seed = 0  # The fixed binarisation of test splits and embedded splits.
    c.data_options = ml_collections.ConfigDict()  # e.g. linear_gaussian's obs_dim.
    # Model.
    c.latents = 20  # Latent dimensions.
    c.hidden = (200,)  # Hidden layer widths of encoder and decoder (mlp).
    c.activation = "relu"  # A name of vaekl.models.ACTIVATIONS.
    c.kind = "mlp"  # The network, one of vaekl.models.KINDS.
    c.likelihood = ""  # "" takes the data set's: bernoulli or gaussian.
    c.fixed_log_scale = config_dict.placeholder(float)  # Gaussian decoder: None learns it.
    c.prior = "standard"  # p(z), one of vaekl.models.PRIORS (standard, learned, mixture, vamp).
    c.num_components = 10  # Components of the mixture prior.
    c.num_pseudo_inputs = 500  # prior="vamp": K, Tomczak & Welling's 500 for MNIST.
    c.posterior = "diag"  # q(z|x), one of vaekl.posteriors.FAMILIES (diag, full, iaf).
    c.iaf_steps = 2  # posterior="iaf": flow steps, each a MADE ...
    c.iaf_hidden = (320,)  # ... with these hidden widths, ...
    c.iaf_context = 20  # ... conditioned on an encoder context h of this width (0: none).
    c.init = "lecun"  # "torch": PyTorch's nn.Linear initialisation.
    # Objective.
    c.objective = "elbo"  # The training objective: elbo or one of vaekl.bounds.OBJECTIVES.
    c.kl = "analytic"  # The ELBO's KL term, one of vaekl.elbo.KL_TERMS (k1, k3, stl, ...).
    c.num_samples = 1  # K: draws of z averaged (elbo) or inside each bound.
    c.grad_estimator = "reparam"  # Encoder gradient of the bounds: reparam, stl or dreg.
    c.outer_samples = 1  # M, the bounds averaged by miwae and piwae.
    c.renyi_alpha = 0.5  # The Renyi bound's alpha >= 0 (0: IWAE, 1: the ELBO).
    c.ciwae_beta = 0.5  # CIWAE's weight of the ELBO against IWAE.
    c.beta = 1.0  # The weight of the KL term.
    c.kl_warmup_steps = 0  # Steps over which the KL weight rises linearly to beta.
    c.free_bits = 0.0  # Per-dimension free bits (kl="analytic", standard prior).
    # Optimisation.
    c.optimizer = "adam"  # One of OPTIMIZERS.
    c.learning_rate = 1e-3  # The (peak) learning rate.
    c.schedule = "constant"  # The learning-rate schedule, one of SCHEDULES.
    c.warmup_steps = 0  # Linear warm-up steps of warmup_cosine.
    c.adam_b1 = 0.9  # Adam's beta1.
    c.adam_b2 = 0.999  # Adam's beta2.
    c.adam_eps = 1e-8  # Adam's epsilon.
    c.weight_decay = 1e-4  # adamw only.
    c.momentum = 0.9  # sgd only (0: none).
    c.batch_size = 64  # Training examples per step, over all devices.
    c.num_epochs = 30  # Passes over the training split.
    c.seed = 0  # The seed of initialisation, epochs and draws.
    c.num_seeds = 1  # Seeds seed, seed + 1, ... trained in one program.
    c.on_nan = "stop"  # A non-finite loss: "stop", or "skip" the step.
    # Categorical latents (issue 24), with posterior="categorical" and prior="uniform":
    # `latents` is N variables of `categories` classes (logits [N, K]; the decoder reads the
    # one-hot or relaxed draw flattened, [N * K]). The gradient: "gumbel" (relaxed draws;
    # kl analytic or relaxed), "st_gumbel" (straight-through: one-hot forward, relaxed
    # gradient) or "score" (REINFORCE, hard draws; kl analytic, k1, k3 or entropy).
    c.categories = 10  # K, the classes of each categorical latent.
    c.categorical_gradient = "gumbel"  # One of CATEGORICAL_GRADIENTS.
    c.temperature = 1.0  # Gumbel: tau = max(temperature * exp(-rate * s), min), s = step ...
    c.temperature_rate = 3e-5  # ... rounded down to a multiple of 1000 (Jang et al.'s r) ...
    c.temperature_min = 0.5  # ... and their floor.
    c.prior_temperature = 0.0  # kl="relaxed": lambda of the relaxed prior (0: q's tau).
    c.baseline_decay = 0.99  # Score: the baseline is this EMA of past steps' batch-mean ELBO.
    # Evaluation and bookkeeping.
    c.eval_importance_samples = 5000  # IWAE bound of log p(x) at the end (0: none).
    c.eval_importance_samples_during = 0  # The same, at every evaluation during training.
    c.eval_elbo_samples = 1  # Draws of z per test example in the test ELBO.
    c.eval_batch_size = 100  # Test examples per evaluation batch.
    c.eval_examples = 0  # The first so many test examples are evaluated (0: all of them).
    c.eval_chunk_size = 100  # Importance samples per device call.
    c.eval_every_epochs = 0  # A test evaluation every so many epochs (0: at the end only).
    c.log_every_steps = 50  # Training metrics every so many steps.
    # A checkpoint every checkpoint_every_epochs epochs, or once checkpoint_every_secs
    # have passed since the last, and always after the last epoch.
    c.checkpoint_every_epochs = 0  # Epochs between checkpoints (0: by time only).
    c.checkpoint_every_secs = 30.0  # Seconds after which an epoch's end checkpoints.
    c.keep_checkpoints = 2  # Checkpoints kept in the workdir.

    if preset == "quick":
        c.num_epochs = 3
        c.eval_importance_samples = 50
        c.log_every_steps = 10
    elif preset == "flax":
        c.dataset = "binarized_mnist"
        c.latents, c.hidden, c.activation = 20, (500,), "relu"
        c.batch_size, c.num_epochs = 128, 10
        c.eval_importance_samples = 0
    elif preset in ("iwae", "iwae_k5", "iwae_k50"):
        c.dataset = "mnist"
        c.latents, c.hidden, c.activation = 50, (200, 200), "tanh"
        c.batch_size, c.num_epochs, c.schedule = 20, 3280, "iwae"
        c.adam_b1, c.adam_eps = 0.99, 1e-4
        if preset != "iwae":
            c.objective, c.num_samples = "iwae", int(preset[len("iwae_k"):])
    elif preset == "iwae_quick":
        c.objective, c.num_samples, c.grad_estimator = "iwae", 5, "dreg"
        c.num_epochs, c.eval_importance_samples, c.log_every_steps = 3, 50, 10
    elif preset in ("categorical", "categorical_quick"):
        c.posterior, c.prior, c.latents, c.categories = "categorical", "uniform", 30, 10
        c.hidden, c.activation, c.batch_size, c.schedule = (512, 256), "relu", 100, "jang"
        c.dataset, c.num_epochs, c.eval_importance_samples = "mnist", 84, 1000
        c.checkpoint_every_secs = 60.0
        if preset == "categorical_quick":
            c.dataset, c.latents, c.hidden, c.num_epochs = "digits", 4, (32,), 3
            c.eval_importance_samples, c.log_every_steps = 50, 10
    elif preset == "linear":
        c.dataset = "linear_gaussian"
        c.latents, c.hidden = 5, ()
        c.batch_size, c.num_epochs, c.learning_rate, c.schedule = 100, 300, 1e-2, "cosine"
    return c


def _unknown_field_message(config, field: str, defaults) -> str:
    """`config.<field>: unknown field`, with the nearest default field names as a hint."""
    close = difflib.get_close_matches(field, list(defaults), n=3)
    hint = ("did you mean " + " or ".join(repr(c) for c in close) + "?" if close
            else "expected a field of vaekl.config.get_config().")
    message = f"config.{field}: unknown field; {hint}"
    known = [k for k in config if k in defaults and k != "experiment"]
    unknown = [k for k in config if k not in defaults]
    if "kl" not in config and len(unknown) > max(len(known), 2):
        message += (" It looks like another experiment's config: it has no field 'kl', which"
                    " experiment 'train' needs; use --config=experiments/configs/train.py or"
                    " vaekl.config.get_config().")
    return message


def complete(config) -> ml_collections.ConfigDict:
    """The default config (`get_config()`) with the fields of `config` set over it.

    Args:
      config: a ConfigDict or a dict holding any subset of the default fields (a full
        config comes back equal to itself). Nested values such as `data_options`
        replace the default whole.

    Returns:
      A new, unlocked ConfigDict; `config` is left unchanged.

    Raises:
      ValueError: `config.<field>: unknown field; did you mean ...?` for the first field
        that the defaults lack.
      TypeError: `config.<field>: ...` for a value of the wrong type (e.g. a string for
        `latents`).
    """
    full = get_config()
    for field in config:
        if field not in full:
            raise ValueError(_unknown_field_message(config, field, full))
    for field, value in config.items():
        try:
            full[field] = value
        except TypeError as e:
            raise TypeError(f"config.{field}: {e}") from None
    return full


def check(config, *, num_devices: int) -> None:
    """Raises one error naming the first field of a complete `config` that is bad.

    Checked before anything loads: the choices, the numbers' ranges, the fields that
    must agree with each other (the KL term with the (posterior, prior) pair, the
    objective's fields), and a batch that splits over the `num_devices`. Every
    objective, gradient estimator, posterior and prior combine; what is refused is what
    is undefined (a closed-form KL or entropy that the pair has not, say).

    Raises:
      ValueError: `config.<field>: ...`, naming what was expected.
    """
    from vaekl import bounds, elbo, models, posteriors, validate  # JAX: not for config files.

    objectives = ("elbo",) + bounds.OBJECTIVES
    for field, allowed in (("kl", elbo.KL_TERMS), ("objective", objectives),
                           ("grad_estimator", bounds.GRAD_ESTIMATORS), ("optimizer", OPTIMIZERS),
                           ("schedule", SCHEDULES), ("on_nan", ON_NAN), ("prior", models.PRIORS),
                           ("posterior", posteriors.FAMILIES),
                           ("kind", models.KINDS), ("activation", models.ACTIVATIONS),
                           ("init", models.INITS)):
        validate.config_choice(config, field, allowed)
    if config.get("likelihood"):
        validate.config_choice(config, "likelihood", models.LIKELIHOODS)
    for field in ("latents", "batch_size", "num_samples", "num_seeds", "outer_samples",
                  "iaf_steps", "num_pseudo_inputs"):
        validate.config_int(config, field, minimum=1)
    for field in ("num_epochs", "eval_importance_samples", "kl_warmup_steps", "iaf_context",
                  "eval_examples"):
        validate.config_int(config, field, minimum=0)
    if not config.learning_rate > 0:
        raise ValueError(f"config.learning_rate: expected > 0, got {config.learning_rate!r}.")
    if config.beta < 0 or config.free_bits < 0:
        raise ValueError("config.beta and config.free_bits: expected >= 0.")
    if config.free_bits and (config.kl != "analytic" or config.prior != "standard"
                             or config.posterior != "diag"):
        raise ValueError("config.free_bits: per-dimension free bits need kl='analytic',"
                         " prior='standard' and posterior='diag' (got kl="
                         f"{config.kl!r}, prior={config.prior!r}, posterior={config.posterior!r}).")
    _check_categorical(config)
    _check_kl_term(config)
    _check_objective(config)
    for field, allow_empty in (("hidden", True), ("iaf_hidden", False)):
        widths = config[field]
        if any(not isinstance(h, int) or h < 1 for h in widths) or not (widths or allow_empty):
            raise ValueError(f"config.{field}: expected a tuple of ints >= 1"
                             f"{'' if allow_empty else ' (at least one)'}, got {widths!r}.")
    if config.batch_size % num_devices:
        raise ValueError(f"config.batch_size: {config.batch_size} must be divisible by the"
                         f" {num_devices} devices it is sharded over.")


def pair_types(posterior: str, prior: str) -> tuple[type, type]:
    """The classes of q and p that `config.posterior` and `config.prior` name (for
    `vaekl.kl.terms`, which answers which KL terms apply to them)."""
    from vaekl import models, posteriors  # JAX: not for config files.

    return posteriors.FAMILIES[posterior], models.PRIORS[prior]


# The KL terms of each categorical gradient: k1/k3 of relaxed draws against the discrete
# prior (a mass function at a point of the simplex) would be no KL estimate at all.
CATEGORICAL_KL_TERMS = {"gumbel": ("analytic", "relaxed"), "st_gumbel": ("analytic", "relaxed"),
                        "score": ("analytic", "k1", "k3", "entropy")}


def _check_categorical(config):
    """The categorical fields (called by `check`): posterior="categorical" goes with
    prior="uniform" and objective="elbo", and its gradient with its KL terms."""
    from vaekl import validate

    validate.config_choice(config, "categorical_gradient", CATEGORICAL_GRADIENTS)
    validate.config_int(config, "categories", minimum=2)
    for field in ("temperature", "temperature_min"):
        if not config[field] > 0:
            raise ValueError(f"config.{field}: expected > 0, got {config[field]!r}.")
    if not (config.temperature_rate >= 0 and config.prior_temperature >= 0):
        raise ValueError("config.temperature_rate and config.prior_temperature: expected >= 0.")
    if not 0.0 <= config.baseline_decay < 1.0:
        raise ValueError(f"config.baseline_decay: expected a number in [0, 1), got"
                         f" {config.baseline_decay!r}.")
    if (config.posterior == "categorical") != (config.prior == "uniform"):
        raise ValueError(f"config.prior: posterior='categorical' and prior='uniform' go together"
                         f" (got posterior={config.posterior!r}, prior={config.prior!r}).")
    if config.posterior != "categorical":
        return
    if config.objective != "elbo":
        raise ValueError(f"config.objective: {config.objective!r} has no gradient for"
                         " categorical latents (vaekl.bounds needs a reparameterised q); use"
                         " 'elbo' (score-function or Gumbel gradients).")
    terms = CATEGORICAL_KL_TERMS[config.categorical_gradient]
    if config.kl not in terms:
        raise ValueError(f"config.kl: {config.kl!r} does not apply to categorical_gradient="
                         f"{config.categorical_gradient!r}; expected one of {terms}.")


def _check_kl_term(config):
    """config.kl applies to the (config.posterior, config.prior) pair (by `check`)."""
    from vaekl import kl

    if config.objective == "elbo" and config.posterior != "categorical":  # Checked above.
        q_type, p_type = pair_types(config.posterior, config.prior)
        kl.check_term(f"config.kl: {config.kl!r}", config.kl, q_type, p_type,
                      pair=(f"posterior={config.posterior!r} with prior={config.prior!r}"
                            f" ({kl.pair_name(q_type, p_type)})"))


def _check_objective(config):
    """The objective's fields agree with each other (called by `check`)."""
    objective = config.objective
    if objective == "elbo":
        if config.grad_estimator != "reparam":
            raise ValueError(
                f"config.grad_estimator: {config.grad_estimator!r} is for the importance-"
                "weighted objectives; with objective='elbo' the gradient follows config.kl"
                " (kl='stl' is sticking the landing; DReG with K = 1 is STL too).")
    elif config.kl != "analytic" or config.beta != 1.0 or config.kl_warmup_steps \
            or config.free_bits:
        raise ValueError(
            f"config.objective: {objective!r} samples its KL inside the bound; config.kl,"
            " beta, kl_warmup_steps and free_bits apply to objective='elbo' only (got"
            f" kl={config.kl!r}, beta={config.beta}, kl_warmup_steps="
            f"{config.kl_warmup_steps}, free_bits={config.free_bits}).")
    if config.outer_samples > 1 and objective not in ("miwae", "piwae"):
        raise ValueError(f"config.outer_samples: M = {config.outer_samples} is for"
                         f" objective 'miwae' or 'piwae', not {objective!r}.")
    if not 0.0 <= config.ciwae_beta <= 1.0:
        raise ValueError(f"config.ciwae_beta: expected a number in [0, 1], got"
                         f" {config.ciwae_beta!r}.")
    if not (math.isfinite(config.renyi_alpha) and config.renyi_alpha >= 0):
        raise ValueError(f"config.renyi_alpha: expected a finite number >= 0 (for alpha < 0"
                         " the Renyi objective is not a lower bound on log p(x)), got"
                         f" {config.renyi_alpha!r}.")
