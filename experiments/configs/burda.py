"""Burda et al.'s (2015) one-stochastic-layer protocol on MNIST, for the study sweeps.

  python -m launch.sweep --sweep=burda_short --root=ROOT   # every row, resumable
  python -m launch.collect --root=ROOT                      # the table beside Burda's Table 1

The net, optimiser and schedule are the `iwae` preset of train.py (784-200-200-50
tanh, batch 20, Adam b1 0.99 eps 1e-4, lr 1e-3 round(10^(-i/7), 1) for 3^i epochs)
on `mnist` with dynamic binarisation, evaluated by the IWAE-5000 test
log-likelihood. The argument names the protocol:

  full   Burda's 3,280 epochs (i = 0..7)
  short  the schedule's first four stages, 1+3+9+27 = 40 epochs, same learning rates
  quick  seconds, on the embedded `digits` (tests)

The rows (objective, K, KL term, gradient estimator) are the sweeps' runs, in
launch/sweeps.py.
"""

from experiments.configs import train

from experiments.configs import presets

PROTOCOLS = {"full": 3280, "short": 40, "quick": 1}  # Epochs of each.
PRESETS = {"full": "Burda's 3,280 epochs", "short": "the first 4 stages, 40 epochs (default)",
           "quick": "1 epoch on digits (tests)"}


def get_config(protocol=None):
    protocol = presets.check("burda", protocol, PRESETS) or "short"
    c = train.get_config("iwae")
    c.train.num_epochs = PROTOCOLS[protocol]  # The protocol's epochs of Burda's schedule.
    c.train.checkpoint_every_secs = 60.0  # Seconds after which an epoch's end checkpoints.
    if protocol == "quick":
        c.data.dataset, c.eval.eval_importance_samples, c.train.log_every_steps = "digits", 20, 20
    return c
