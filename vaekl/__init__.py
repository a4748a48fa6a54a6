"""vaekl: the KL term of variational autoencoders, analytic and sampled, measured.

Light to import (no TensorFlow): `vaekl.kl`, `vaekl.elbo`, `vaekl.posteriors` and
`vaekl.priors` are loaded here; `vaekl.data`, `vaekl.models` and `vaekl.train` on demand.
"""

from vaekl import elbo, kl, posteriors, priors
from vaekl.validate import checked

__all__ = ["checked", "elbo", "kl", "posteriors", "priors"]
__version__ = "0.1.0"
