"""Train a VAE and evaluate it: `vaekl.train.train_and_evaluate`.

Run:
  python -m experiments.main --config=experiments/configs/train.py --workdir=DIR \
      --config.dataset=binarized_mnist --config.kl=k3 --config.num_samples=5

Arguments after the file name pick a preset:
  quick      a few seconds on `digits` (tests and smoke sweeps)
  flax       the Flax example: binarized_mnist, 784-500-20 ReLU, batch 128, Adam 1e-3, 10 epochs
  iwae       Burda et al.'s 1-layer net: 784-200-200-50 tanh, batch 20, their Adam and schedule
             (the k = 1 VAE); iwae_k5, iwae_k50 the same net trained with IWAE k = 5 / 50
  iwae_quick IWAE k = 5 with DReG gradients on `digits`, for seconds (tests)
  linear     a linear encoder/decoder on the `linear_gaussian` data (exact log p(x) known)

Posterior families and priors without a closed-form KL (vaekl.posteriors):
  --config.posterior=full --config.kl=entropy      full-covariance Gaussian q
  --config.posterior=iaf --config.iaf_steps=2      inverse autoregressive flow (kl k1, k3, stl)
  --config.prior=vamp --config.num_pseudo_inputs=500 --config.kl=k1   the VampPrior
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "train"
    # Data.
    c.dataset = "digits"
    c.data_dir = config_dict.placeholder(str)  # tfds data_dir; None: tfds's own (TFDS_DATA_DIR).
    c.data_path = ""  # frey_face: the path of frey_rawface.mat.
    c.data_seed = 0  # The fixed binarisation of test splits and embedded splits.
    c.data_options = ml_collections.ConfigDict()  # e.g. linear_gaussian's obs_dim.
    # Model.
    c.latents = 20
    c.hidden = (200,)
    c.activation = "relu"
    c.kind = "mlp"
    c.likelihood = ""  # "" takes the data set's: bernoulli or gaussian.
    c.fixed_log_scale = config_dict.placeholder(float)  # Gaussian decoder: None learns it.
    c.prior = "standard"  # standard | learned | mixture | vamp.
    c.num_components = 10  # prior="mixture".
    c.num_pseudo_inputs = 500  # prior="vamp": K, Tomczak & Welling's 500 for MNIST.
    c.posterior = "diag"  # q(z|x): diag | full | iaf (vaekl.posteriors).
    c.iaf_steps = 2  # posterior="iaf": flow steps, ...
    c.iaf_hidden = (320,)  # ... each a MADE with these hidden widths, ...
    c.iaf_context = 20  # ... conditioned on an encoder context h of this width (0: none).
    c.init = "lecun"  # "torch": PyTorch's nn.Linear initialisation.
    # Objective.
    c.objective = "elbo"  # elbo | iwae | renyi | miwae | piwae | ciwae (vaekl.bounds).
    c.kl = "analytic"  # The ELBO's KL term: analytic | k1 | k3 | stl | entropy.
    c.num_samples = 1  # K: draws averaged (elbo) or inside each bound.
    c.grad_estimator = "reparam"  # Encoder gradient of the bounds: reparam | stl | dreg.
    c.outer_samples = 1  # M of miwae / piwae.
    c.renyi_alpha = 0.5
    c.ciwae_beta = 0.5
    c.beta = 1.0
    c.kl_warmup_steps = 0
    c.free_bits = 0.0
    # Optimisation.
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.schedule = "constant"
    c.warmup_steps = 0
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.weight_decay = 1e-4
    c.momentum = 0.9
    c.batch_size = 64
    c.num_epochs = 30
    c.seed = 0
    c.num_seeds = 1
    c.on_nan = "stop"
    # Evaluation and bookkeeping.
    c.eval_importance_samples = 5000
    c.eval_importance_samples_during = 0
    c.eval_elbo_samples = 1
    c.eval_batch_size = 100
    c.eval_chunk_size = 100
    c.eval_every_epochs = 0
    c.log_every_steps = 50
    # A checkpoint every so many epochs (0: off), or once this many seconds have
    # passed since the last, and always after the last epoch.
    c.checkpoint_every_epochs = 0
    c.checkpoint_every_secs = 30.0
    c.keep_checkpoints = 2

    if arg == "quick":
        c.num_epochs = 3
        c.eval_importance_samples = 50
        c.log_every_steps = 10
    elif arg == "flax":
        c.dataset = "binarized_mnist"
        c.latents, c.hidden, c.activation = 20, (500,), "relu"
        c.batch_size, c.num_epochs = 128, 10
        c.eval_importance_samples = 0
    elif arg == "iwae":
        c.dataset = "mnist"
        c.latents, c.hidden, c.activation = 50, (200, 200), "tanh"
        c.batch_size, c.num_epochs, c.schedule = 20, 3280, "iwae"
        c.adam_b1, c.adam_eps = 0.99, 1e-4
    elif arg in ("iwae_k5", "iwae_k50"):
        c.dataset = "mnist"
        c.latents, c.hidden, c.activation = 50, (200, 200), "tanh"
        c.batch_size, c.num_epochs, c.schedule = 20, 3280, "iwae"
        c.adam_b1, c.adam_eps = 0.99, 1e-4
        c.objective, c.num_samples = "iwae", int(arg[len("iwae_k"):])
    elif arg == "iwae_quick":
        c.objective, c.num_samples, c.grad_estimator = "iwae", 5, "dreg"
        c.num_epochs, c.eval_importance_samples, c.log_every_steps = 3, 50, 10
    elif arg == "linear":
        c.dataset = "linear_gaussian"
        c.latents, c.hidden = 5, ()
        c.batch_size, c.num_epochs, c.learning_rate, c.schedule = 100, 300, 1e-2, "cosine"
    elif arg:
        raise ValueError(f"train config: unknown preset {arg!r}; expected quick, flax, iwae,"
                         " iwae_k5, iwae_k50, iwae_quick, linear or none.")
    return c
