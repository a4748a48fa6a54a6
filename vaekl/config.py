"""The training config: its defaults, its presets, the completion of a partial one, its checks.

`get_config(preset)` is what `experiments/configs/train.py` returns, so an installed
vaekl has the defaults without the experiments folder. `complete(config)` fills a
partial config (a notebook's `ConfigDict(dict(data=dict(dataset="digits")))`) from
them and refuses a field they do not have; `check(config, num_devices=...)` refuses bad
values with one error naming the field. `vaekl.train.train_and_evaluate` calls both.
Each group's checks live beside the code that uses it, and `check` calls them in this
order, before any data loads: model `vaekl.models.check_model_config`, loss
`vaekl.steps.check_loss_config`, optim `vaekl.train.check_optim_config`, train
`vaekl.train.check_train_config`, eval `vaekl.evaluate.check_eval_config`; data's
fields by `vaekl.data.load`'s first lines (and `--config.data.dataset` by experiments.main).

The config is nested in groups, each passed to what uses it; every field (leaf) kept
the name it had in the flat config of before, and leaf names are unique across groups,
so the old name `F` of a field is `config.<group>.F` now (`leaves` and `nest` convert):

  group    old flat names (config.F -> config.<group>.F)
  data     dataset, data_dir, data_path, data_seed, data_options
  model    latents, hidden, activation, kind, likelihood, fixed_log_scale, prior,
           num_components, num_pseudo_inputs, posterior, iaf_steps, iaf_hidden,
           iaf_context, init, categories           (vaekl.models.VAE's attributes)
  loss     objective, kl, num_samples, grad_estimator, outer_samples, renyi_alpha,
           ciwae_beta, beta, kl_warmup_steps, free_bits, categorical_gradient,
           temperature, temperature_rate, temperature_min, prior_temperature,
           baseline_decay
  optim    optimizer, learning_rate, schedule, warmup_steps, adam_b1, adam_b2,
           adam_eps, weight_decay, momentum
  train    batch_size, num_epochs, seed, num_seeds, on_nan, log_every_steps,
           checkpoint_every_epochs, checkpoint_every_secs, keep_checkpoints
  eval     eval_importance_samples, eval_importance_samples_during, eval_elbo_samples,
           eval_batch_size, eval_examples, eval_chunk_size, eval_every_epochs
  top      experiment

results.json keeps its keys (`kl`, `num_samples`, `seed`, ...). A workdir whose
config.json is flat (written before the nesting) resumes: `vaekl.workdir` compares
configs leaf by leaf. A field's description is its comment in `get_config`, which
`python -m experiments.main --help --config=...` prints.
"""

import difflib

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
    d = c.data = ml_collections.ConfigDict()  # The data set: vaekl.data.load's arguments.
    d.dataset = "digits"  # The data set, one of vaekl.data.NAMES.
    d.data_dir = config_dict.placeholder(str)  # tfds data_dir; None: tfds's own (TFDS_DATA_DIR).
    d.data_path = ""  # frey_face: the path of frey_rawface.mat.
    d.data_seed = 0  # The fixed binarisation of test splits and embedded splits.
    d.data_options = ml_collections.ConfigDict()  # e.g. linear_gaussian's obs_dim.
    # The VAE: every field is an attribute of vaekl.models.VAE of the same name (`init`
    # is its `init_scheme`), passed on as it is by vaekl.train.create_model.
    m = c.model = ml_collections.ConfigDict()  # The VAE: vaekl.models.VAE's fields.
    m.latents = 20  # Latent dimensions.
    m.hidden = (200,)  # Hidden layer widths of encoder and decoder (mlp).
    m.activation = "relu"  # A name of vaekl.models.ACTIVATIONS.
    m.kind = "mlp"  # The network, one of vaekl.models.KINDS.
    m.likelihood = ""  # "" takes the data set's: bernoulli or gaussian.
    m.fixed_log_scale = config_dict.placeholder(float)  # Gaussian decoder: None learns it.
    m.prior = "standard"  # p(z), one of vaekl.models.PRIORS (standard, learned, mixture, vamp).
    m.num_components = 10  # Components of the mixture prior.
    m.num_pseudo_inputs = 500  # prior="vamp": K, Tomczak & Welling's 500 for MNIST.
    m.posterior = "diag"  # q(z|x), one of vaekl.posteriors.FAMILIES (diag, full, iaf).
    m.iaf_steps = 2  # posterior="iaf": flow steps, each a MADE ...
    m.iaf_hidden = (320,)  # ... with these hidden widths, ...
    m.iaf_context = 20  # ... conditioned on an encoder context h of this width (0: none).
    m.init = "lecun"  # "torch": PyTorch's nn.Linear initialisation.
    m.categories = 10  # posterior="categorical": K, the classes of each of the `latents`.
    o = c.loss = ml_collections.ConfigDict()  # The objective: vaekl.steps.make_loss_fn.
    o.objective = "elbo"  # The training objective: elbo or one of vaekl.bounds.OBJECTIVES.
    o.kl = "analytic"  # The ELBO's KL term, one of vaekl.elbo.KL_TERMS (k1, k3, stl, ...).
    o.num_samples = 1  # K: draws of z averaged (elbo) or inside each bound.
    o.grad_estimator = "reparam"  # Encoder gradient of the bounds: reparam, stl or dreg.
    o.outer_samples = 1  # M, the bounds averaged by miwae and piwae.
    o.renyi_alpha = 0.5  # The Renyi bound's alpha >= 0 (0: IWAE, 1: the ELBO).
    o.ciwae_beta = 0.5  # CIWAE's weight of the ELBO against IWAE.
    o.beta = 1.0  # The weight of the KL term.
    o.kl_warmup_steps = 0  # Steps over which the KL weight rises linearly to beta.
    o.free_bits = 0.0  # Per-dimension free bits (kl="analytic", standard prior).
    # Categorical latents (posterior="categorical", prior="uniform"): N = `latents`
    # variables of `categories` classes (logits [N, K]; the decoder reads the one-hot or
    # relaxed draw flattened, [N * K]). The gradient: "gumbel" (relaxed draws; kl analytic
    # or relaxed), "st_gumbel" (straight-through: one-hot forward, relaxed gradient) or
    # "score" (REINFORCE, hard draws; kl analytic, k1, k3 or entropy).
    o.categorical_gradient = "gumbel"  # One of vaekl.steps.CATEGORICAL_GRADIENTS.
    o.temperature = 1.0  # Gumbel: tau = max(temperature * exp(-rate * s), min), s = step ...
    o.temperature_rate = 3e-5  # ... rounded down to a multiple of 1000 (Jang et al.'s r) ...
    o.temperature_min = 0.5  # ... and their floor.
    o.prior_temperature = 0.0  # kl="relaxed": lambda of the relaxed prior (0: q's tau).
    o.baseline_decay = 0.99  # Score: the baseline is this EMA of past steps' batch-mean ELBO.
    p = c.optim = ml_collections.ConfigDict()  # The optimiser: vaekl.train.create_optimizer.
    p.optimizer = "adam"  # One of vaekl.train.OPTIMIZERS.
    p.learning_rate = 1e-3  # The (peak) learning rate.
    p.schedule = "constant"  # The learning-rate schedule, one of vaekl.train.SCHEDULES.
    p.warmup_steps = 0  # Linear warm-up steps of warmup_cosine.
    p.adam_b1 = 0.9  # Adam's beta1.
    p.adam_b2 = 0.999  # Adam's beta2.
    p.adam_eps = 1e-8  # Adam's epsilon.
    p.weight_decay = 1e-4  # adamw only.
    p.momentum = 0.9  # sgd only (0: none).
    t = c.train = ml_collections.ConfigDict()  # The training loop: epochs, seeds, saving.
    t.batch_size = 64  # Training examples per step, over all devices.
    t.num_epochs = 30  # Passes over the training split.
    t.seed = 0  # The seed of initialisation, epochs and draws.
    t.num_seeds = 1  # Seeds seed, seed + 1, ... trained in one program.
    t.on_nan = "stop"  # A non-finite loss: "stop", or "skip" the step.
    t.log_every_steps = 50  # Training metrics every so many steps.
    # A checkpoint every checkpoint_every_epochs epochs, or once checkpoint_every_secs
    # have passed since the last, and always after the last epoch.
    t.checkpoint_every_epochs = 0  # Epochs between checkpoints (0: by time only).
    t.checkpoint_every_secs = 30.0  # Seconds after which an epoch's end checkpoints.
    t.keep_checkpoints = 2  # Checkpoints kept in the workdir.
    e = c.eval = ml_collections.ConfigDict()  # Evaluation: may change when a run resumes.
    e.eval_importance_samples = 5000  # IWAE bound of log p(x) at the end (0: none).
    e.eval_importance_samples_during = 0  # The same, at every evaluation during training.
    e.eval_elbo_samples = 1  # Draws of z per test example in the test ELBO.
    e.eval_batch_size = 100  # Test examples per evaluation batch.
    e.eval_examples = 0  # The first so many test examples are evaluated (0: all of them).
    e.eval_chunk_size = 100  # Importance samples per device call.
    e.eval_every_epochs = 0  # A test evaluation every so many epochs (0: at the end only).

    if preset == "quick":
        t.num_epochs = 3
        e.eval_importance_samples = 50
        t.log_every_steps = 10
    elif preset == "flax":
        d.dataset = "binarized_mnist"
        m.latents, m.hidden, m.activation = 20, (500,), "relu"
        t.batch_size, t.num_epochs = 128, 10
        e.eval_importance_samples = 0
    elif preset in ("iwae", "iwae_k5", "iwae_k50"):
        d.dataset = "mnist"
        m.latents, m.hidden, m.activation = 50, (200, 200), "tanh"
        t.batch_size, t.num_epochs, p.schedule = 20, 3280, "iwae"
        p.adam_b1, p.adam_eps = 0.99, 1e-4
        if preset != "iwae":
            o.objective, o.num_samples = "iwae", int(preset[len("iwae_k"):])
    elif preset == "iwae_quick":
        o.objective, o.num_samples, o.grad_estimator = "iwae", 5, "dreg"
        t.num_epochs, e.eval_importance_samples, t.log_every_steps = 3, 50, 10
    elif preset in ("categorical", "categorical_quick"):
        m.posterior, m.prior, m.latents, m.categories = "categorical", "uniform", 30, 10
        m.hidden, m.activation, t.batch_size, p.schedule = (512, 256), "relu", 100, "jang"
        d.dataset, t.num_epochs, e.eval_importance_samples = "mnist", 84, 1000
        t.checkpoint_every_secs = 60.0
        if preset == "categorical_quick":
            d.dataset, m.latents, m.hidden, t.num_epochs = "digits", 4, (32,), 3
            e.eval_importance_samples, t.log_every_steps = 50, 10
    elif preset == "linear":
        d.dataset = "linear_gaussian"
        m.latents, m.hidden = 5, ()
        t.batch_size, t.num_epochs, p.learning_rate, p.schedule = 100, 300, 1e-2, "cosine"
    return c


GROUPS = ("data", "model", "loss", "optim", "train", "eval")  # The sub-configs, in order.
RESUMABLE_GROUPS = ("eval",)  # Groups whose fields a resumed run may change.


def groups(defaults=None) -> dict[str, str]:
    """Leaf -> its group ("" for a top-level leaf such as `experiment`), of the defaults."""
    defaults = get_config() if defaults is None else defaults
    return {leaf: (group if group in GROUPS else "")
            for group in defaults for leaf in (defaults[group] if group in GROUPS else (group,))}


def leaves(config) -> dict:
    """Leaf -> value of a nested config (a ConfigDict or its JSON dict), or of a flat one
    (config.json written before the config was nested): leaf names are unique."""
    flat = {}
    for key, value in dict(config).items():
        flat.update(dict(value) if key in GROUPS and hasattr(value, "items") else {key: value})
    return flat


def nest(flat: dict) -> dict:
    """The nested dict of a flat one (leaf -> value), by the table above; unknown leaves
    stay at the top, where `complete` refuses them by name."""
    where, out = groups(), {}
    for leaf, value in flat.items():
        group = where.get(leaf, "")
        (out.setdefault(group, {}) if group else out)[leaf] = value
    return out


def _unknown_field_message(path: str, known) -> str:
    """`config.<path>: unknown field`, with the nearest known names as a hint; a leaf of
    the flat layout is told its new place."""
    field = path.rpartition(".")[2]
    where = groups().get(field)
    if where and path != f"{where}.{field}":
        return (f"config.{path}: unknown field; it is config.{where}.{field} (the config is"
                " nested: see vaekl/config.py's table of old -> new names).")
    close = difflib.get_close_matches(field, list(known), n=3)
    hint = ("did you mean " + " or ".join(repr(c) for c in close) + "?" if close
            else "expected a field of vaekl.config.get_config().")
    return f"config.{path}: unknown field; {hint}"


def complete(config) -> ml_collections.ConfigDict:
    """The default config (`get_config()`) with the fields of `config` set over it.

    Args:
      config: a ConfigDict or a dict holding any subset of the default fields, nested
        like them (`dict(data=dict(dataset="digits"), train=dict(num_epochs=2))`; a full
        config comes back equal to itself). `data_options` replaces the default whole.

    Returns:
      A new, unlocked ConfigDict; `config` is left unchanged.

    Raises:
      ValueError: `config.<group>.<field>: unknown field; did you mean ...?` for the first
        field that the defaults lack (a flat field is told its group).
      TypeError: `config.<group>.<field>: ...` for a value of the wrong type (e.g. a
        string for `model.latents`).
    """
    full = get_config()
    for key, value in dict(config).items():
        if key not in full:
            message = _unknown_field_message(key, full)
            if "kl" not in leaves(config) and "loss" not in config and len(config) > 2:
                message += (" It looks like another experiment's config: it has no field"
                            " 'loss.kl', which experiment 'train' needs; use"
                            " --config=experiments/configs/train.py or vaekl.config.get_config().")
            raise ValueError(message)
        fields = (dict(value).items() if key in GROUPS and hasattr(value, "items")
                  else [(None, value)])
        for field, v in fields:
            path = f"{key}.{field}" if field is not None else key
            holder = full[key] if field is not None else full
            if field is not None and field not in holder:
                raise ValueError(_unknown_field_message(path, holder))
            try:
                holder[field if field is not None else key] = v
            except TypeError as e:
                raise TypeError(f"config.{path}: {e}") from None
    return full


def check(config, *, num_devices: int) -> None:
    """Raises one error naming the first field of a complete `config` that is bad.

    Checked before anything loads, group by group, by the checks beside the code that
    uses each group (see the module docstring): the choices, the numbers' ranges, the
    fields that must agree with each other, and a batch that splits over the
    `num_devices`.

    Raises:
      ValueError (TypeError for a count that is no int): `config.<group>.<field>: ...`,
        naming what was expected.
    """
    from vaekl import evaluate, models, steps, train  # JAX: not for config files.

    models.check_model_config(config)
    steps.check_loss_config(config)
    train.check_optim_config(config)
    train.check_train_config(config, num_devices=num_devices)
    evaluate.check_eval_config(config)
