"""absl's INFO lines outside an absl app (a notebook, a script), where they would be lost.

`app.run` parses the flags and puts absl's handler on the root logger; without it
absl logs to a logger with no handler and WARNING as its level, so training's
progress lines go nowhere. `show_info()` does what `app.run` would, with INFO as
the verbosity, once, and leaves a process whose flags were parsed alone.
"""

import logging as py_logging

from absl import flags, logging


class QuietLibraries(py_logging.Filter):
    """Keeps orbax's and XLA's per-save and start-up INFO lines out of a run's log."""

    def filter(self, record):
        noisy = "orbax" in record.pathname or "xla_bridge" in record.pathname
        return record.levelno >= py_logging.WARNING or not noisy


def show_info() -> None:
    """Sends absl INFO lines to stderr (a notebook's cell output) unless absl flags were parsed.

    absl says once that it logs to stderr before flag parsing; the libraries' own
    INFO lines (orbax, XLA) stay out.
    """
    handler = logging.get_absl_handler()
    if flags.FLAGS.is_parsed() or handler in py_logging.root.handlers:
        return  # An absl app, or set up before: its verbosity and handlers decide.
    handler.addFilter(QuietLibraries())
    logging.set_verbosity(logging.INFO)
    logging.use_absl_handler()
