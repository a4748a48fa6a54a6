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

The fields and presets live in the package, `vaekl/config.py`, so that an installed
vaekl (a notebook) has them too.
"""

from vaekl import config


def get_config(arg=None):
    return config.get_config(arg)
