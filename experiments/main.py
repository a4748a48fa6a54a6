"""Entry point of every vaekl experiment.

  python -m experiments.main --config=experiments/configs/<name>.py[:preset] --workdir=DIR \
      [--config.<field>=value ...]
  python -m experiments.main --help [--config=FILE[:preset]]

The config's `experiment` field names what runs: "train" calls
`vaekl.train.train_and_evaluate`; any other name runs `experiments.<name>.run`.
The config is checked first (`experiments.configs.catalog.check`); every bad flag or
field ends the command with one line that names it.
"""

import importlib
import logging as py_logging
import sys
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.configs import catalog, presets

FLAGS = flags.FLAGS
_HELP_FLAGS = ("--help", "-help", "--helpshort", "-helpshort", "-?")


def _define_flags():
    config_flags.DEFINE_config_file("config", None, "The experiment's config file,"
                                    " FILE.py[:PRESET].", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for results, plots and checkpoints.")
    flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str) -> dict:
    """Runs the experiment that `config.experiment` names; returns its results.

    Raises:
      ValueError: naming each field of `config` that `catalog.check` refuses.
    """
    problems = catalog.check(config)
    if problems:
        raise ValueError("\n".join(problems))
    if config.experiment == catalog.TRAIN:
        from vaekl import train

        return train.train_and_evaluate(config, workdir)
    return importlib.import_module(f"experiments.{config.experiment}").run(config, workdir)


def _help(spec: str | None) -> str:
    """The text of --help: experiments, config files and presets; the fields of `spec`."""
    lines = [__doc__.split("\n\n")[0].strip(), "", "Experiments (config.experiment):"]
    lines += [f"  {name:<18} {doc}" for name, doc in catalog.experiments().items()]
    lines += ["", "Config files and their presets (--config=FILE[:PRESET]):"]
    for file, module in catalog.config_files().items():
        lines.append(f"  {file}  (experiment {module.get_config().experiment})")
        lines += [f"    :{name:<10} {doc}" for name, doc in getattr(module, "PRESETS", {}).items()]
    if spec:
        file, config = catalog.load(spec)
        lines += ["", f"Fields of --config={spec} (override with --config.FIELD=VALUE):"]
        lines += catalog.field_lines(config, "config", catalog.field_docs(file))
    else:
        lines += ["", "With --config=FILE[:PRESET], --help lists that config's fields."]
    lines += ["", "Flags:", FLAGS.main_module_help(), "",
              "--helpfull lists every flag of every module."]
    return "\n".join(lines)


def _flag_value(argv, name: str) -> str | None:
    """The value of --name in `argv` (`--name=V` or `--name V`), or None."""
    for i, arg in enumerate(argv[1:], 1):
        key, equals, value = arg.lstrip("-").partition("=")
        if key == name and arg.startswith("-"):
            return value if equals else (argv[i + 1] if i + 1 < len(argv) else "")
    return None


def _unknown_override(argv) -> str | None:
    """The line naming the first --config.<path> of `argv` that the config file lacks."""
    spec = _flag_value(argv, "config")
    _, config = catalog.load(spec)
    for arg in argv[1:]:
        path = arg.lstrip("-").partition("=")[0]
        if not (arg.startswith("-") and path.startswith("config.")):
            continue
        node, keys = config, path.split(".")
        for depth in range(1, len(keys)):
            if not isinstance(node, ml_collections.ConfigDict) or keys[depth] not in node:
                known = node.keys() if isinstance(node, ml_collections.ConfigDict) else ()
                holder = ".".join(keys[:depth])
                return f"--{path}: {catalog.no_field(holder, keys[depth], known, spec)}"
            node = node[keys[depth]]
    return None


def _parse_flags(argv):
    """absl's flag parsing, with the --help of `_help`, and a bad flag ending in one line.

    ml_collections refuses an override of a field the config lacks (--config.no_such=1)
    with a KeyError or AttributeError from inside the parse, and a config file's unknown
    preset raises `presets.UnknownPresetError`; neither is an absl flag error.
    """
    spec = _flag_value(argv, "config")
    if spec is not None and not Path(spec.partition(":")[0]).is_file():
        sys.exit(f"error: --config: no such file {spec.partition(':')[0]!r}.")
    try:
        if any(arg in _HELP_FLAGS for arg in argv[1:]):
            print(_help(spec))
            sys.exit(0)
        return FLAGS(argv)
    except flags.Error as e:  # absl's own: one line naming the flag.
        message = str(e)
    except presets.UnknownPresetError as e:
        message = f"--config: {e}"
    except (KeyError, AttributeError):
        message = _unknown_override(argv)
        if message is None:  # Not a missing field: a bug, with its traceback.
            raise
    sys.exit(f"error: {message}")


class _QuietLibraries(py_logging.Filter):
    """Keeps orbax's and XLA's per-save and start-up INFO lines out of the run's log."""

    def filter(self, record):
        noisy = ("orbax" in record.pathname or "xla_bridge" in record.pathname)
        return record.levelno >= py_logging.WARNING or not noisy


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; settings are flags,"
                 " --config.FIELD=VALUE.")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from vaekl import distributed  # JAX is imported here, not for --help.
    from vaekl.interrupt import Interrupted

    try:
        distributed.initialize()  # One process of several: joins the others first.
        run(FLAGS.config, FLAGS.workdir)
    except Interrupted as e:  # SIGINT/SIGTERM: checkpointed; one line, status 130/143.
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")  # Bad input and divergence: their message, no traceback.


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=_parse_flags)
