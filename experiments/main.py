"""Entry point of every vaekl experiment.

  python -m experiments.main --config=experiments/configs/<name>.py[:arg] --workdir=DIR \
      [--config.<field>=value ...]

The config's `experiment` field names what runs: "train" calls
`vaekl.train.train_and_evaluate`; any other name runs `experiments.<name>.run`.
"""

import importlib
import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results, plots and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str) -> dict:
    """Runs the experiment that `config.experiment` names; returns its results."""
    name = config.get("experiment")
    if name == "train":
        from vaekl import train

        return train.train_and_evaluate(config, workdir)
    try:
        module = importlib.import_module(f"experiments.{name}")
    except ModuleNotFoundError:
        raise ValueError(f"--config: unknown experiment {name!r}; expected the name of a"
                         " module in experiments/ (e.g. 'estimators') or 'train'.") from None
    return module.run(config, workdir)


class _QuietLibraries(py_logging.Filter):
    """Keeps orbax's and XLA's per-save and start-up INFO lines out of the run's log."""

    def filter(self, record):
        noisy = ("orbax" in record.pathname or "xla_bridge" in record.pathname)
        return record.levelno >= py_logging.WARNING or not noisy


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        run(FLAGS.config, FLAGS.workdir)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        # Bad input and divergence end the run with their message, not a traceback.
        logging.error("%s: %s", type(e).__name__, e)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
