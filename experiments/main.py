"""Entry point of every vaekl experiment.

  python -m experiments.main --config=experiments/configs/<name>.py[:arg] --workdir=DIR \
      [--config.<field>=value ...]

The config's `experiment` field names what runs: "train" calls
`vaekl.train.train_and_evaluate`; any other name runs `experiments.<name>.run`.
"""

import importlib
import logging as py_logging
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from vaekl import distributed

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
        distributed.initialize()  # One process of several: joins the others first.
        run(FLAGS.config, FLAGS.workdir)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        # Bad input and divergence end the run with their message, not a traceback.
        logging.error("%s: %s", type(e).__name__, e)
        sys.exit(f"error: {e}")
    except (KeyError, AttributeError) as e:
        # A config made for another experiment: a field lookup failed in ml_collections.
        if "ml_collections" not in traceback.extract_tb(e.__traceback__)[-1].filename:
            raise
        field = str(e).strip("\"'").splitlines()[0].strip("'")
        message = (f"--config: the config has no field {field!r}, which experiment"
                   f" {FLAGS.config.get('experiment')!r} needs; use that experiment's config"
                   " file from experiments/configs/.")
        logging.error(message)
        sys.exit(f"error: {message}")


def _parse_flags(argv):
    """absl's flag parsing, but a bad --config ends in one clear line, never a traceback.

    An unknown field (--config.no_such_field=1), a config file that is missing
    or raises (an unknown preset), and an unparsable value exit with status 1
    and a message that names the flag.
    """
    try:
        args = FLAGS(argv)
        # A config file that failed to load raises only when first read.
        getattr(FLAGS.config, "experiment", None)
        return args
    except flags.Error as e:
        message = str(e)
        if "Traceback (most recent call last)" in message:  # ml_collections embeds one.
            lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
            message = f"{lines[0]} {lines[-1]}"
    except (AttributeError, KeyError) as e:  # ml_collections: an override of no field.
        chain = [e]
        while chain[-1].__context__ is not None:
            chain.append(chain[-1].__context__)
        key = next((c.args[0] for c in reversed(chain)
                    if isinstance(c, KeyError) and c.args), str(e))
        hint = next((ln for c in chain for ln in str(c.args[0] if c.args else "").splitlines()
                     if ln.startswith("Did you mean")), "")
        named = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                 and str(key) in a.split("=")[0][len("--config."):].split(".")]
        message = (f"flag {named[0] if named else '--config'}: the config has no field"
                   f" {key!r}. {hint}").strip()
    except OSError as e:  # The config file is missing or unreadable.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        message = f"flag --config: cannot load the config file: {lines[-1]}"
    sys.exit(f"FATAL Flags parsing error: {message}\n"
             "Pass --helpshort or --helpfull to see help on flags.")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
