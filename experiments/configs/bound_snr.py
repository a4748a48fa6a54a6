"""The bound_snr experiment: IWAE gradient SNR against K per network and estimator.

Run:
  python -m experiments.main --config=experiments/configs/bound_snr.py --workdir=DIR
  python -m experiments.main --config=experiments/configs/bound_snr.py:quick --workdir=DIR

The VAE part trains on binarized_mnist, found the way the train config finds tfds
data (`--config.vae.data.data_dir=`, else $TFDS_DATA_DIR / ~/tensorflow_datasets);
`quick` uses the embedded digits and few draws.
"""

import ml_collections

from experiments.configs import presets
from experiments.configs import train as train_config


PRESETS = presets.QUICK


def get_config(arg=None):
    quick = presets.check("bound_snr", arg, PRESETS) == "quick"
    c = ml_collections.ConfigDict()
    c.experiment = "bound_snr"  # What runs: experiments/bound_snr.py.
    c.seed = 0  # The base key of every draw.
    c.num_importance = (1, 3, 10) if quick else (1, 3, 10, 30, 100, 300, 1000)  # The Ks.
    c.estimators = ("reparam", "stl", "dreg")  # Encoder-gradient estimators compared.
    c.chunk_elements = 2**22  # Latent (toy) or decoder-activation (VAE) values per device call.
    c.num_draws_cap = 1000  # At most this many gradient draws per device call.
    # Rainforth et al.'s Gaussian example (float64).
    c.toy_dim = 20  # D, the latent and data dimension.
    c.toy_num_data = 1  # Data points in the fixed batch, drawn from the model.
    c.toy_seed = 0  # Seed of mu, the data and the perturbations.
    c.toy_perturbations = (0.1, 0.01)  # Std of the N(0, s^2) moves of A and b off the optimum.
    c.toy_draws = 500 if quick else 40000  # Gradient draws per (K, estimator).
    # The VAE: 784-200-20 tanh, the ELBO with the analytic KL, batch 100, Adam 1e-3.
    vae = train_config.get_config("quick" if quick else None)
    vae.data.dataset = "digits" if quick else "binarized_mnist"
    vae.model.latents, vae.model.hidden, vae.model.activation = 20, (200,), "tanh"
    vae.train.batch_size = 100
    c.vae = vae  # The VAE's training config (train.py's fields).
    c.vae_epochs = 1 if quick else 5  # Epochs of the trained checkpoint.
    c.vae_batch_size = 10  # The fixed batch: the first test images.
    c.vae_draws = 200 if quick else 1000  # Gradient draws per (K, estimator); 0: no VAE.
    c.vae_num_importance = c.num_importance  # The VAE's Ks (its cost grows with K).
    # Bias of STL and DReG against reparam on the toy (perturbation s = 0.1).
    c.bias_ks = (1, 10) if quick else (1, 10, 100)  # The Ks of the bias check.
    c.bias_perturbation = 0.1  # The toy's perturbation there.
    c.bias_draws = 2000 if quick else 20000  # Paired draws per (K, estimator).
    return c
