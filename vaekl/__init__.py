"""vaekl: the KL term of variational autoencoders, analytic and sampled, measured.

Light to import (no TensorFlow): `vaekl.distributions`, `vaekl.kl`, `vaekl.elbo` and
`vaekl.posteriors` are loaded here; the other modules (`vaekl.train`, `vaekl.data`, `vaekl.models`,
`vaekl.config`, ...) on first use of the attribute, so that `import vaekl` then
`vaekl.train.train_and_evaluate(...)` works as in a notebook.
"""

import importlib

from vaekl import distributions, elbo, kl, posteriors
from vaekl.validate import checked

__all__ = ["checked", "distributions", "elbo", "kl", "posteriors"]
__version__ = "0.1.0"

# The modules loaded on first access (PEP 562); tests check this against vaekl/*.py.
LAZY_MODULES = ("bounds", "categorical", "checkpoint", "config", "data", "distributed", "evaluate", "interrupt",
                "linear_gaussian", "logs", "measure", "models", "prepare", "progress", "steps", "train",
                "validate", "workdir")


def __getattr__(name: str):
    if name in LAZY_MODULES:
        return importlib.import_module(f"vaekl.{name}")  # Also binds it here.
    raise AttributeError(f"module 'vaekl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(LAZY_MODULES))
