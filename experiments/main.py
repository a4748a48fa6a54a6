"""Entry point of every vaekl experiment.

  python -m experiments.main --config=experiments/configs/<name>.py[:arg] --workdir=DIR \
      [--config.<field>=value ...]

The config's `experiment` field names what runs: "train" calls
`vaekl.train.train_and_evaluate`; any other name runs `experiments.<name>.run`.
"""

import importlib

from absl import app, flags
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
