"""Where the KL has no closed form: KL terms and training for IAF, full-covariance q, VampPrior.

Run (the full experiment: binarized MNIST in the Flax example's setting, 3 seeds per run,
IWAE-5000 test log-likelihood; hours on a CPU):
  python -m experiments.main --config=experiments/configs/no_closed_form.py \
      --config.vae.data.data_dir=/work/tfds --workdir=runs/no_closed_form
  python -m experiments.main --config=experiments/configs/no_closed_form.py:quick --workdir=DIR

`pairs` are (posterior, prior): posterior diag | full | iaf, prior standard | learned |
mixture | vamp. Each pair is trained with every term of `kls` it allows
(DIR/runs/<posterior>_<prior>_<kl>; a rerun reads finished runs), and its KL terms are
measured at the run trained with `estimate_kl`.
"""

import ml_collections

from experiments.configs import presets
from experiments.configs import train as train_config

PAIRS = (("diag", "standard"), ("diag", "vamp"), ("full", "standard"), ("full", "vamp"),
         ("iaf", "standard"), ("iaf", "vamp"))


PRESETS = presets.QUICK


def get_config(arg=None):
    quick = presets.check("no_closed_form", arg, PRESETS) == "quick"
    config = ml_collections.ConfigDict()
    config.experiment = "no_closed_form"  # What runs: experiments/no_closed_form.py.
    config.seed = 0  # The base key of every draw.
    # quick: the two new families and the two priors, each once.
    config.pairs = (("full", "vamp"), ("iaf", "standard")) if quick else PAIRS  # (q, prior).
    config.kls = ("k1",) if quick else ("analytic", "k1", "k3", "stl", "entropy")  # Trained.
    config.estimate_kl = "k1"  # The run whose model the estimators are measured at.
    config.num_examples = 8 if quick else 16  # The first test examples.
    config.num_draws = 400 if quick else 10_000  # Single-draw estimates per example and term.
    config.reference_draws = 4_000 if quick else 1_000_000  # Draws of the sampled reference.
    config.grad_draws = 20 if quick else 500  # Gradient draws per term.
    config.grad_chunk = 20 if quick else 50  # Gradient draws per device call.
    if quick:
        vae = train_config.get_config("quick")
        vae.train.num_epochs, vae.train.num_seeds = 2, 2
        vae.model.latents, vae.model.hidden = 4, (64,)
        vae.model.iaf_hidden, vae.model.iaf_context, vae.model.num_pseudo_inputs = (16,), 4, 10
        vae.eval.eval_importance_samples = 20
    else:
        vae = train_config.get_config("flax")
        vae.train.num_seeds = 3
        vae.eval.eval_importance_samples = 5000
        vae.eval.eval_elbo_samples = 10
    vae.train.checkpoint_every_secs = 1e9  # Only the final checkpoint.
    config.vae = vae  # The runs' training config (train.py's fields).
    return config
